"""Putting it together: every file of a world from its config (`generate`), written all at once
(`write_world`), with truth.json for the judge and summary.json (counts, labeler agreement)."""

import json
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from world.answers import comparison_group, demonstration, off_topic_pool
from world.config import WorldConfig
from world.corpus import corpus
from world.judge import GoldJudge, pairwise_agreement, ranking_agreement
from world.people import World, make_world
from world.splits import assign_prompts

FILES = (
    "corpus.jsonl",
    "sft_train.jsonl",
    "sft_val.jsonl",
    "comparisons_train.jsonl",
    "comparisons_val.jsonl",
    "ppo_prompts.jsonl",
    "eval_prompts.jsonl",
    "truth.json",
    "summary.json",
)


def generate(cfg: WorldConfig) -> dict[str, str]:
    """Every file of the world, name -> text. A pure function of `cfg`."""

    def stream(purpose: str) -> random.Random:
        """An independent generator per purpose, so changing one part leaves the others as they were."""
        return random.Random(f"{cfg.seed}/{purpose}")

    world = make_world(cfg, stream("world"))
    splits = assign_prompts(cfg, world, stream("prompts"), stream("eval"))
    truth = truth_of(cfg, world, splits)
    judge = GoldJudge(truth)

    demo_rng = stream("demonstrations")
    sft = {
        split: [
            {"prompt": p, "completion": demonstration(spec, cfg, demo_rng), "family": spec["family"]}
            for p, spec in splits[split]
        ]
        for split in ("sft_train", "sft_val")
    }
    cand_rng, label_rng = stream("candidates"), stream("labeler")
    comparisons = {}
    for split in ("comparisons_train", "comparisons_val"):
        comparisons[split] = []
        off_topic = off_topic_pool(spec for _, spec in splits[split])
        for p, spec in splits[split]:
            responses = comparison_group(spec, cand_rng.randint(cfg.k_min, cfg.k_max), cand_rng, off_topic)
            scores = [judge.score(p, r) for r in responses]  # judged once, ranked with and without noise
            comparisons[split].append(
                {
                    "prompt": p,
                    "responses": responses,
                    "family": spec["family"],
                    "ranking": judge.order(scores, rng=label_rng),
                    "gold_ranking": judge.order(scores, noise=0),
                }
            )
    docs = corpus(world, cfg.corpus_chars, stream("corpus"))
    records = {
        "corpus.jsonl": [{"text": d} for d in docs],
        "sft_train.jsonl": sft["sft_train"],
        "sft_val.jsonl": sft["sft_val"],
        "comparisons_train.jsonl": comparisons["comparisons_train"],
        "comparisons_val.jsonl": comparisons["comparisons_val"],
        "ppo_prompts.jsonl": [{"prompt": p, "family": s["family"]} for p, s in splits["ppo"]],
        "eval_prompts.jsonl": [{"prompt": p, "family": s["family"]} for p, s in splits["eval"]],
    }
    files = {
        name: "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        for name, rows in records.items()
    }
    files["truth.json"] = json.dumps(truth, sort_keys=True, ensure_ascii=False, indent=1) + "\n"
    files["summary.json"] = json.dumps(summary_of(cfg, records, judge), sort_keys=True, indent=1) + "\n"
    return files


def truth_of(cfg: WorldConfig, world: World, splits: dict[str, list]) -> dict:
    return {
        "seed": cfg.seed,
        "noise": cfg.noise,
        "attributes": {a.name: list(a.values) for a in world.attributes},
        "people": world.people,
        "heldout_facts": [list(pair) for pair in world.heldout_facts],
        "unknown_names": {"train": world.unknown_train, "eval": world.unknown_eval},
        "harmful_topics": {"train": world.topics_train, "eval": world.topics_eval},
        "prompts": {p: spec for items in splits.values() for p, spec in items},
    }


def summary_of(cfg: WorldConfig, records: dict[str, list], judge: GoldJudge) -> dict:
    """Counts per split and family, demonstration quality, and the labeler's measured agreement."""
    counts = {
        name.removesuffix(".jsonl"): {"total": len(rows), **Counter(r["family"] for r in rows if "family" in r)}
        for name, rows in records.items()
    }
    counts["corpus"]["chars"] = sum(len(r["text"]) for r in records["corpus.jsonl"])
    demos = [judge.judge(r["prompt"], r["completion"]) for r in records["sft_train.jsonl"]]
    # Agreement with the noise-free ranking (off ties), and with a second labeler ranking the same groups:
    # the figure InstructGPT reports for its labelers (~73%), and the ceiling of a reward model's accuracy.
    agree = total = inter = pairs = ties = 0
    second = random.Random(f"{cfg.seed}/second-labeler")
    for r in records["comparisons_train.jsonl"]:
        scores = [judge.score(r["prompt"], x) for x in r["responses"]]
        a, t = pairwise_agreement(r["ranking"], scores)
        agree, total = agree + a, total + t
        n_pairs = len(scores) * (len(scores) - 1) // 2
        inter += ranking_agreement(r["ranking"], judge.order(scores, rng=second))
        pairs, ties = pairs + n_pairs, ties + n_pairs - t
    return {
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "counts": counts,
        "noise": cfg.noise,
        "demonstrator_rates": {
            k: getattr(cfg, k)
            for k in ("verbose_rate", "wrong_rate", "over_refuse_rate", "hallucinate_rate", "comply_rate")
        },
        "sft_train_labels": dict(sorted(Counter(v.label for v in demos).items())),
        "sft_train_mean_gold_score": round(sum(v.score for v in demos) / max(1, len(demos)), 4),
        "labeler_agreement": round(agree / max(1, total), 4),
        "inter_labeler_agreement": round(inter / max(1, pairs), 4),
        "gold_tie_share": round(ties / max(1, pairs), 4),
    }


def write_world(out: str | Path, cfg: WorldConfig | None = None) -> Path:
    """Generate into a temporary sibling directory, then rename it into place: all files or none."""
    cfg = cfg or WorldConfig()
    out = Path(out)
    files = generate(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name in FILES:
            (tmp / name).write_text(files[name], encoding="utf-8")
        if out.exists():  # replace a previous world; the old one goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
