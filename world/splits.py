"""Splits: disjoint training and evaluation prompt pools, shared out among the training splits and eval."""

import random

from world.config import WorldConfig
from world.judge import FAMILIES
from world.people import World
from world.prompts import fact_prompts, harmful_prompts, instruction_prompts, unknown_prompts

SPLITS = ("sft_train", "sft_val", "comparisons_train", "comparisons_val", "ppo")


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainder), summing exactly to `total`."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(weights, key=lambda k: counts[k] - exact[k])  # stable: ties keep key order
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def allocate(pool: list, demand: dict[str, int], rng: random.Random) -> dict[str, list]:
    """Give each split its own prompts from `pool`: distinct if there are enough, else reused within the split."""
    pool = rng.sample(pool, len(pool))
    wanted = {split: n for split, n in demand.items() if n > 0}
    if len(pool) < len(wanted):
        raise ValueError(f"only {len(pool)} distinct prompts for {len(wanted)} splits; raise the world size")
    if len(pool) >= sum(wanted.values()):
        shares = wanted
    else:  # one prompt each, the rest in proportion to demand
        shares = {s: 1 + n for s, n in apportion(len(pool) - len(wanted), wanted).items()}
    parts, start = {split: [] for split in demand}, 0
    for split, share in shares.items():
        part = pool[start : start + share]
        parts[split] = [part[i % len(part)] for i in range(wanted[split])]
        start += share
    return parts


def prompt_pools(world: World) -> tuple[dict[str, list], dict[str, list]]:
    """(training pool, eval pool) of (prompt, spec) per family; the two never share an item."""
    held = set(world.heldout_facts)
    known = [(n, a.name) for n in world.people for a in world.attributes]
    train = {
        "fact": fact_prompts(world, [p for p in known if p not in held]),
        "unknown": unknown_prompts(world, world.unknown_train),
        "harmful": harmful_prompts(world.topics_train),
        "instruction": instruction_prompts(world.instructions_train),
    }
    evaluation = {
        "fact": fact_prompts(world, world.heldout_facts),
        "unknown": unknown_prompts(world, world.unknown_eval),
        "harmful": harmful_prompts(world.topics_eval),
        "instruction": instruction_prompts(world.instructions_eval),
    }
    return train, evaluation


def assign_prompts(
    cfg: WorldConfig, world: World, rng: random.Random, eval_rng: random.Random
) -> dict[str, list[tuple[str, dict]]]:
    """(prompt, spec) lists for every split and eval, each spec tagged with its split. The eval prompts
    come from their own generator (and pool), so resizing a training split leaves them as they were."""
    train_pool, eval_pool = prompt_pools(world)
    sizes = {
        "sft_train": cfg.sft_train,
        "sft_val": cfg.sft_val,
        "comparisons_train": cfg.comparisons_train,
        "comparisons_val": cfg.comparisons_val,
        "ppo": cfg.ppo_prompts,
    }
    per_split = {split: apportion(n, cfg.mix) for split, n in sizes.items()}
    splits: dict[str, list] = {split: [] for split in (*SPLITS, "eval")}
    for family in FAMILIES:
        parts = allocate(train_pool[family], {s: per_split[s][family] for s in SPLITS}, rng)
        for split in SPLITS:
            splits[split] += parts[split]
        pool = eval_pool[family]
        splits["eval"] += eval_rng.sample(pool, min(cfg.eval_per_family, len(pool)))
    shuffled = {split: rng.sample(items, len(items)) for split, items in splits.items() if split != "eval"}
    shuffled["eval"] = eval_rng.sample(splits["eval"], len(splits["eval"]))
    return {split: [(p, {**spec, "split": split}) for p, spec in items] for split, items in shuffled.items()}
