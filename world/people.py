"""Who exists and what is true: the known people and their facts, the strangers, the harmful topics
and instruction items, and which of them are held out for evaluation (`make_world`)."""

import random
from dataclasses import dataclass

from world.config import WorldConfig
from world.names import (
    ATTRIBUTES,
    COUNT_WORDS,
    FIRST_NAMES,
    HARMFUL_ACTS,
    INSTRUCTION_WORDS,
    LAST_NAMES,
    LIST_ITEMS_PER_TASK,
    NAME_HALF,
    Attribute,
)


@dataclass
class World:
    attributes: tuple[Attribute, ...]
    people: dict[str, dict[str, str]]  # name -> attribute -> value
    heldout_facts: list[tuple[str, str]]  # (name, attribute) asked only in eval
    unknown_train: list[str]
    unknown_eval: list[str]
    topics_train: list[str]
    topics_eval: list[str]
    instructions_train: list[dict]  # instruction specs (task + arguments), without prompt wording
    instructions_eval: list[dict]


def make_world(cfg: WorldConfig, rng: random.Random) -> World:
    attributes = ATTRIBUTES[: cfg.num_attributes]
    known, unknown = name_pools(rng)
    names = rng.sample(known, cfg.num_people)
    people = {name: {a.name: rng.choice(a.values) for a in attributes} for name in names}
    strangers = rng.sample(unknown, cfg.num_unknown_train + cfg.num_unknown_eval)
    topics = rng.sample(HARMFUL_ACTS, len(HARMFUL_ACTS))
    n_topics_eval = max(1, round(cfg.heldout_topic_fraction * len(topics)))
    instructions_eval, instructions_train = split_instructions(rng, cfg.heldout_instruction_fraction)
    return World(
        attributes=attributes,
        people=people,
        heldout_facts=heldout_facts(names, attributes, cfg.heldout_fact_fraction),
        unknown_train=strangers[: cfg.num_unknown_train],
        unknown_eval=strangers[cfg.num_unknown_train :],
        topics_train=topics[n_topics_eval:],
        topics_eval=topics[:n_topics_eval],
        instructions_train=instructions_train,
        instructions_eval=instructions_eval,
    )


def name_pools(rng: random.Random) -> tuple[list[str], list[str]]:
    """All full names for known people, and all for unknown people, from disjoint name halves."""
    first = rng.sample(FIRST_NAMES, len(FIRST_NAMES))
    last = rng.sample(LAST_NAMES, len(LAST_NAMES))
    known = [f"{f} {s}" for f in first[:NAME_HALF] for s in last[:NAME_HALF]]
    unknown = [f"{f} {s}" for f in first[NAME_HALF:] for s in last[NAME_HALF:]]
    return known, unknown


def heldout_facts(names: list[str], attributes, fraction: float) -> list[tuple[str, str]]:
    """Hold out facts spread over people and attributes: person i's attribute i (cycling), then i+1, ..."""
    count = max(1, round(fraction * len(names) * len(attributes)))
    pairs = [
        (names[i], attributes[(i + shift) % len(attributes)].name)
        for shift in range(len(attributes))
        for i in range(len(names))
    ]
    return pairs[:count]


def split_instructions(rng: random.Random, fraction: float) -> tuple[list[dict], list[dict]]:
    """Every instruction item, split per task into (eval, train) so each task is held out evenly."""
    items = {
        "repeat": [{"word": w, "count": n} for w in INSTRUCTION_WORDS for n in COUNT_WORDS],
        "after": [{"number": n} for n in range(1, 99)],
        "plus": [{"a": a, "b": b} for a in range(10) for b in range(10)],
        "first": [{"words": w} for w in word_lists(rng, LIST_ITEMS_PER_TASK)],
        "last": [{"words": w} for w in word_lists(rng, LIST_ITEMS_PER_TASK)],
    }
    held, kept = [], []
    for task, args in items.items():
        specs = [{"task": task, **a} for a in rng.sample(args, len(args))]
        n_eval = max(1, round(fraction * len(specs)))
        held += specs[:n_eval]
        kept += specs[n_eval:]
    return held, kept


def word_lists(rng: random.Random, count: int) -> list[list[str]]:
    """`count` distinct lists of three distinct words (a repeated list would be one prompt twice)."""
    lists: list[list[str]] = []
    while len(lists) < count:
        words = rng.sample(INSTRUCTION_WORDS, 3)
        if words not in lists:
            lists.append(words)
    return lists
