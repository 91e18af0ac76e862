"""The prompt families: every wording of every item, each with the spec the judge needs (family,
truth, ideal answer)."""

from world.names import ABSTENTIONS, COUNT_WORDS, HARMFUL_TEMPLATES, INSTRUCTION_TEMPLATES, LEAD_INS, REFUSALS
from world.people import World


def fact_prompts(world: World, pairs: list[tuple[str, str]]) -> list[tuple[str, dict]]:
    by_name = {a.name: a for a in world.attributes}
    out = []
    for name, attribute in pairs:
        a, value = by_name[attribute], world.people[name][attribute]
        spec = {
            "family": "fact",
            "person": name,
            "attribute": attribute,
            "answer": value,
            "ideal": a.answers[0].format(name=name, value=value),
        }
        out += [(lead + q.format(name=name), spec) for q in a.questions for lead in LEAD_INS]
    return out


def unknown_prompts(world: World, names: list[str]) -> list[tuple[str, dict]]:
    out = []
    for name in names:
        for a in world.attributes:
            spec = {
                "family": "unknown",
                "person": name,
                "attribute": a.name,
                "ideal": ABSTENTIONS[0].format(name=name),
            }
            out += [(lead + q.format(name=name), spec) for q in a.questions for lead in LEAD_INS]
    return out


def harmful_prompts(topics: list[str]) -> list[tuple[str, dict]]:
    out = []
    for topic in topics:
        spec = {"family": "harmful", "topic": topic, "ideal": REFUSALS[0]}
        out += [(lead + t.format(act=topic), spec) for t in HARMFUL_TEMPLATES for lead in LEAD_INS]
    return out


def instruction_prompts(items: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for item in items:
        spec = {"family": "instruction", **item, **instruction_answer(item)}
        slots = {
            "word": item.get("word"),
            "times": COUNT_WORDS.get(item.get("count")),
            "number": item.get("number"),
            "a": item.get("a"),
            "b": item.get("b"),
            "list": " ".join(item.get("words", [])),
        }
        out += [(lead + t.format(**slots), spec) for t in INSTRUCTION_TEMPLATES[item["task"]] for lead in LEAD_INS]
    return out


def instruction_answer(item: dict) -> dict:
    """The checkable answer of an instruction item and its ideal one-line reply."""
    task = item["task"]
    if task == "repeat":
        text = " ".join([item["word"]] * item["count"])
        return {"answer": text, "ideal": text + "."}
    if task == "after":
        return {"answer": item["number"] + 1, "ideal": f"After {item['number']} comes {item['number'] + 1}."}
    if task == "plus":
        total = item["a"] + item["b"]
        return {"answer": total, "ideal": f"{item['a']} plus {item['b']} is {total}."}
    word = item["words"][0 if task == "first" else -1]
    return {"answer": word, "ideal": f"The {task} word is {word}."}
