"""WorldConfig: every knob of a generated world, each with its one-line help (`python -m world --help`)."""

import dataclasses
from dataclasses import dataclass, field

from world.judge import FAMILIES
from world.names import ATTRIBUTES, NAME_HALF


def option(default, help: str):
    """A config field with its one-line help (shown by --help, kept in the field's metadata)."""
    return field(default=default, metadata={"help": help})


@dataclass
class WorldConfig:
    seed: int = option(0, "random seed; the same seed gives byte-identical files")
    num_people: int = option(40, "known people described in the corpus")
    num_attributes: int = option(3, "attributes per person (hometown, profession, pet, food, colour), 1-5")
    num_unknown_train: int = option(40, "non-existent people asked about in training splits")
    num_unknown_eval: int = option(24, "other non-existent people asked about only in eval")
    heldout_fact_fraction: float = option(0.2, "share of (person, attribute) facts asked only in eval")
    heldout_topic_fraction: float = option(0.25, "share of harmful topics asked only in eval")
    heldout_instruction_fraction: float = option(0.15, "share of instruction items asked only in eval")
    corpus_chars: int = option(800_000, "size of the pretraining corpus in characters")
    sft_train: int = option(2000, "SFT demonstrations for training")
    sft_val: int = option(200, "SFT demonstrations for validation")
    comparisons_train: int = option(2000, "ranked comparison groups for reward-model training")
    comparisons_val: int = option(200, "ranked comparison groups for validation")
    ppo_prompts: int = option(1000, "prompts for PPO rollouts")
    eval_per_family: int = option(64, "held-out evaluation prompts per family")
    family_mix: str = option(
        "fact:4,unknown:2,harmful:2,instruction:2", "relative share of each family in the training splits"
    )
    k_min: int = option(4, "fewest responses in a comparison group")
    k_max: int = option(9, "most responses in a comparison group")
    verbose_rate: float = option(0.4, "share of demonstrations padded with filler")
    wrong_rate: float = option(0.15, "share of fact/instruction demonstrations with one wrong detail")
    over_refuse_rate: float = option(0.05, "share of fact/instruction demonstrations that refuse")
    hallucinate_rate: float = option(0.8, "share of unknown-person demonstrations that make up a fact")
    comply_rate: float = option(0.3, "share of harmful-request demonstrations that comply")
    noise: float = option(
        0.5, "labeler noise (Gumbel scale on gold scores); 0.5 makes two labelers agree on ~73 percent of pairs"
    )

    def __post_init__(self):
        self.mix = parse_family_mix(self.family_mix)
        checks = [
            (1 <= self.num_people <= NAME_HALF**2, f"num_people must be 1..{NAME_HALF**2}"),
            (1 <= self.num_attributes <= len(ATTRIBUTES), f"num_attributes must be 1..{len(ATTRIBUTES)}"),
            (
                min(self.num_unknown_train, self.num_unknown_eval) >= 1,
                "num_unknown_train and num_unknown_eval must be >= 1",
            ),
            (self.num_unknown_train + self.num_unknown_eval <= NAME_HALF**2, f"at most {NAME_HALF**2} unknown names"),
            (2 <= self.k_min <= self.k_max <= 9, "need 2 <= k_min <= k_max <= 9"),
            (self.corpus_chars >= 1000, "corpus_chars must be >= 1000"),
            (self.eval_per_family >= 1, "eval_per_family must be >= 1"),
            (
                min(self.sft_train, self.sft_val, self.comparisons_train, self.comparisons_val, self.ppo_prompts) >= 0,
                "split sizes must be >= 0",
            ),
            (self.noise >= 0, "noise must be >= 0"),
            (self.wrong_rate + self.over_refuse_rate <= 1, "wrong_rate + over_refuse_rate must be <= 1"),
        ]
        for name in ("heldout_fact_fraction", "heldout_topic_fraction", "heldout_instruction_fraction"):
            checks.append((0 < getattr(self, name) < 1, f"{name} must be between 0 and 1 (exclusive)"))
        for name in ("verbose_rate", "wrong_rate", "over_refuse_rate", "hallucinate_rate", "comply_rate"):
            checks.append((0 <= getattr(self, name) <= 1, f"{name} must be between 0 and 1"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_family_mix(text: str) -> dict[str, float]:
    """'fact:4,unknown:2,...' -> {family: weight}, in FAMILIES order."""
    mix = {}
    for item in text.split(","):
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in FAMILIES:
            raise ValueError(f"family_mix: unknown family {name!r} (families: {', '.join(FAMILIES)})")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise ValueError(f"family_mix: weight of {name!r} is not a number: {weight!r}") from None
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("family_mix: weights must be >= 0 with a positive sum")
    return {family: mix.get(family, 0.0) for family in FAMILIES}
