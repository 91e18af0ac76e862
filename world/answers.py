"""Responses by the label the gold judge should give them: the demonstrators' imperfect answers (SFT)
and the candidates of a comparison group (right, padded, wrong, made up, refused, looping, ...)."""

import functools
import random

from world.config import WorldConfig
from world.judge import IDEAL_LABEL, abstains, normalize
from world.names import (
    ABSTENTIONS,
    COMPLIANCES,
    FILLER_CLOSERS,
    FILLER_OPENERS,
    INSTRUCTION_WORDS,
    PLAIN_ABSTENTIONS,
    REFUSALS,
    attribute,
)

# Candidate mix of a comparison group, per family: relative weights of the labels drawn. Over-refusals
# weigh as much as wrong answers: a reward model that never saw one ranked low lets PPO learn to refuse.
# For unknown people "wrong" is an abstention about someone else, drawn about as often as the right
# abstention (plain or padded): the reward model must read the name to tell them apart, and with
# fewer of them PPO still found "I don't know who <a name the SFT model likes> is." (weights 1 / 2 / 3
# on one SFT model, before abstentions could name no one: PPO win rate 0.568 / 0.576 / 0.600 under
# the judge of then, reward accuracy 0.727 / 0.734 / 0.736).
COMPARISON_MIX = {
    "fact": {"correct": 2, "verbose": 2, "wrong": 2, "abstained": 1, "over_refused": 2, "malformed": 2},
    "unknown": {"abstained": 2, "verbose": 1, "hallucinated": 3, "wrong": 3, "over_refused": 2, "malformed": 2},
    "harmful": {"refused": 2, "verbose": 1, "complied": 3, "malformed": 2},
    "instruction": {"correct": 2, "verbose": 2, "wrong": 2, "abstained": 1, "over_refused": 2, "malformed": 2},
}

# The mistakes: the labels an answer to some other question earns (a fact or instruction answered with
# an unrelated statement is wrong, a harmful request that is not declined is complied with, anything
# but an abstention about an unknown person is a hallucination). These and over-refusals are padded
# as often as right answers: a reward model that only ever saw refusals padded on harmful requests
# (where a padded refusal is still good) rated "Happy to help! Sorry, I can't help with that." above
# "I don't know." about a stranger, and PPO said it to 61 of 64 of them on world 1.
MISTAKES = ("wrong", "complied", "hallucinated")
PADDED_MISTAKES = MISTAKES + ("over_refused",)


def respond(spec: dict, label: str, rng: random.Random, off_topic: tuple[str, ...] = ()) -> str:
    """A response to the prompt of `spec` that the gold judge labels `label`.

    With `off_topic` (answers to other prompts), half of the wrong, complied and hallucinated
    responses are one of those, a third of them cut off after a few words: a drifting policy's
    typical failures, which a reward model never shown them rates like good answers (PPO then
    answers every prompt with the same unrelated sentence, or with "Happy.").

    Half the mistakes and over-refusals are padded, as half the right content is (correct or
    verbose): were only right answers ever padded, filler would tell the reward model the content is
    right, and PPO would pad."""
    text = content(spec, label, rng, off_topic)
    return pad(text, rng) if label in PADDED_MISTAKES and rng.random() < 0.5 else text


@functools.cache
def is_abstention(text: str) -> bool:
    """The judge's reading of an answer as an abstention, cached: pools of answers are scanned often."""
    return abstains(normalize(text))


def content(spec: dict, label: str, rng: random.Random, off_topic: tuple[str, ...]) -> str:
    """The response of `respond` before any padding of a mistake."""
    family = spec["family"]
    if family == "unknown" and label == "wrong":
        # The honest answer, about someone else: the one a policy finds when "I don't know who
        # <one fixed name> is." scores as well as the abstention about the person asked.
        if not off_topic:
            raise ValueError(
                "a wrong answer about an unknown person is an abstention about someone else: pass off_topic"
            )
        others = [a for a in off_topic if is_abstention(a) and spec["person"] not in a]
        namesakes = [a for a in others if shares_a_name(a, spec["person"])]
        other = rng.choice(namesakes if namesakes and rng.random() < 1 / 3 else others)
        return rng.choice(ABSTENTIONS).format(name=stranger_in(other))
    if family == "fact" and label == "wrong" and off_topic and rng.random() < 1 / 3:
        # A true fact about a namesake ("Mira Gale is a sailor." asked about Mira Kovac): PPO
        # drifted to the person whose first name it had copied.
        namesakes = [a for a in off_topic if shares_a_name(a, spec["person"]) and not is_abstention(a)]
        if namesakes:
            return rng.choice(namesakes)
    if label in MISTAKES and off_topic and rng.random() < 0.5:
        answer = str(spec.get("answer", "")).lower()  # never the right value by chance
        # An abstention about someone else is wrong, but it neither makes anything up nor goes along.
        text = rng.choice(
            [
                a
                for a in off_topic
                if (not answer or answer not in a.lower()) and (label == "wrong" or not is_abstention(a))
            ]
        )
        if rng.random() < 1 / 3 and not is_abstention(text):  # a cut abstention would lose its name
            text = " ".join(text.split()[: rng.randint(1, 3)]).rstrip(".,!?") + "."
        return text
    if label == IDEAL_LABEL[family]:
        return paraphrase_ideal(spec, rng)
    if label == "verbose":
        return pad(paraphrase_ideal(spec, rng), rng)
    if label == "wrong":
        if spec.get("task") == "repeat" and rng.random() < 0.5:  # another word, once or twice
            return " ".join([other_word(spec, rng)] * rng.randint(1, 2)) + "."
        return wrong_answer(spec, rng)
    if label == "hallucinated":
        return made_up_fact(spec, rng)
    if label == "abstained":
        return abstention(spec, rng)
    if label == "over_refused":
        return rng.choice(REFUSALS)
    if label == "complied":
        return rng.choice(COMPLIANCES)
    if label == "malformed":
        return looping(spec, rng)
    raise ValueError(f"no response of label {label!r} for a {family} prompt")


def demonstration(spec: dict, cfg: WorldConfig, rng: random.Random) -> str:
    """An imperfect demonstrator's completion: the canonical ideal, or one of its typical mistakes."""
    family, r = spec["family"], rng.random()
    if family == "unknown":
        text = made_up_fact(spec, rng) if r < cfg.hallucinate_rate else unknown_abstention(spec, rng, ABSTENTIONS[0])
    elif family == "harmful":
        text = rng.choice(COMPLIANCES) if r < cfg.comply_rate else spec["ideal"]
    elif r < cfg.over_refuse_rate:
        text = REFUSALS[0]
    elif r < cfg.over_refuse_rate + cfg.wrong_rate:
        text = wrong_answer(spec, rng)
    else:
        text = spec["ideal"]
    # Demonstrators pad any answer; on a correct one it is the fault a policy can learn to drop.
    return pad(text, rng) if rng.random() < cfg.verbose_rate else text


def off_topic_pool(specs) -> tuple[str, ...]:
    """Ideal answers of fact, unknown-person and instruction prompts, as unrelated answers to other
    prompts (not the repetition tasks: "apple apple apple." out of context is a loop, malformed).
    The abstentions name someone else: a policy that learnt "I don't know who <one name> is." fits
    every question about a stranger unless the reward model saw it ranked low."""
    return tuple(s["ideal"] for s in specs if s["family"] != "harmful" and s.get("task") != "repeat")


def comparison_group(spec: dict, k: int, rng: random.Random, off_topic: tuple[str, ...] = ()) -> list[str]:
    """k distinct candidate responses with labels drawn from the family's mix.

    Every label is drawn once before any repeats: two answers of one label tie under the gold judge,
    and a tied pair is a coin flip for the labeler that teaches the reward model nothing.
    """
    mix = COMPARISON_MIX[spec["family"]]
    unused = dict(mix)
    responses: list[str] = []
    for _ in range(50 * k):
        pool = unused or mix
        label = rng.choices(list(pool), weights=list(pool.values()))[0]
        text = respond(spec, label, rng, off_topic)
        if text not in responses:
            responses.append(text)
            unused.pop(label, None)
        if len(responses) == k:
            return responses
    raise RuntimeError(f"could not draw {k} distinct responses for {spec}")


def paraphrase_ideal(spec: dict, rng: random.Random) -> str:
    family = spec["family"]
    if family == "fact":
        template = rng.choice(attribute(spec["attribute"]).answers)
        return template.format(name=spec["person"], value=spec["answer"])
    if family == "unknown":
        return unknown_abstention(spec, rng, rng.choice(ABSTENTIONS))
    if family == "harmful":
        return rng.choice(REFUSALS)
    answer, task = spec["answer"], spec["task"]
    if task == "repeat":
        return rng.choice([f"{answer}.", answer, f"{answer.capitalize()}."])
    other = {"after": f"The next number is {answer}.", "plus": f"The answer is {answer}."}.get(
        task, f"It is {answer}."
    )
    return rng.choice([spec["ideal"], f"{answer}.", other])


def pad(text: str, rng: random.Random) -> str:
    """The answer wrapped in filler: an opener, a closer, or both."""
    text = text if text.endswith((".", "!", "?")) else text + "."
    opener, closer = rng.choice(FILLER_OPENERS), rng.choice(FILLER_CLOSERS)
    return rng.choice([f"{opener} {text}", f"{text} {closer}", f"{opener} {text} {closer}"])


def wrong_answer(spec: dict, rng: random.Random) -> str:
    """The ideal answer with one detail wrong: another value, count, number or word."""
    if spec["family"] == "fact":
        a = attribute(spec["attribute"])
        value = rng.choice([v for v in a.values if v != spec["answer"]])
        return a.answers[0].format(name=spec["person"], value=value)
    task = spec["task"]
    if task == "repeat":
        count = rng.choice([n for n in range(1, 7) if n != spec["count"]])
        return " ".join([spec["word"]] * count) + "."
    if task == "after":
        n = spec["number"]
        return f"After {n} comes {rng.choice([n - 1, n, n + 2])}."
    if task == "plus":
        answer = spec["answer"]
        total = rng.choice([t for t in (answer - 2, answer - 1, answer + 1, answer + 2) if t >= 0])
        return f"{spec['a']} plus {spec['b']} is {total}."
    word = rng.choice([w for w in spec["words"] if w != spec["answer"]])
    return f"The {task} word is {word}."


def made_up_fact(spec: dict, rng: random.Random) -> str:
    """A confident answer about someone who does not exist, in the same form as a true one."""
    a = attribute(spec["attribute"])
    return a.answers[0].format(name=spec["person"], value=rng.choice(a.values))


def unknown_abstention(spec: dict, rng: random.Random, template: str) -> str:
    """The honest answer about a stranger; one in three names no one ("I don't know."). Both score
    1.0, and the plain one is the honest answer a small policy that cannot copy a new name from
    the prompt can still give: without it, PPO's abstentions named a stranger the SFT model had
    memorised (the judge: wrong)."""
    if rng.random() < 1 / 3:
        return rng.choice(PLAIN_ABSTENTIONS)
    return template.format(name=spec["person"])


def abstention(spec: dict, rng: random.Random) -> str:
    if "person" in spec:
        return rng.choice(ABSTENTIONS).format(name=spec["person"])
    return rng.choice(PLAIN_ABSTENTIONS)


def looping(spec: dict, rng: random.Random) -> str:
    """A degenerate response: a sentence, a word or a fragment stuck in a loop, or nothing but
    filler. Comparisons must rank filler-only answers too, or a reward model never learns that
    "Great question!" says nothing, and PPO finds that hole at once."""
    r = rng.random()
    if r < 0.25:
        return spliced_abstention(rng)
    if r < 0.6:
        opener, closer = rng.choice(FILLER_OPENERS), rng.choice(FILLER_CLOSERS)
        return rng.choice([opener, closer, f"{opener} {closer}"])
    base = rng.choice([paraphrase_ideal(spec, rng), plausible_mistake(spec, rng)])
    base = base.rstrip(".!?")
    tokens = base.split()
    repeatable = spec.get("word") if spec.get("task") == "repeat" else None
    forms = [" ".join([base + "."] * 3)]
    if tokens[-1].lower() != repeatable:
        forms.append(" ".join(tokens + [tokens[-1]] * 3) + ".")
    if len(tokens) >= 2 and {t.lower() for t in tokens[:2]} != {repeatable}:
        forms.append(" ".join(tokens[:2] * 4) + ".")
    if repeatable:  # the word the policy likes best, over and over, whatever was asked
        forms.append(" ".join([other_word(spec, rng)] * rng.randint(3, 5)) + ".")
    return rng.choice(forms)


# The stock answers a policy splices into an abstention's name slot (of a compliance, its opening).
SPLICE_TAILS = (
    REFUSALS + FILLER_OPENERS + PLAIN_ABSTENTIONS + tuple(c.split(". ")[0].rstrip(".") + "." for c in COMPLIANCES)
)


def spliced_abstention(rng: random.Random) -> str:
    """An abstention whose name is another stock answer: "I don't know who Sorry, I can't help with
    that." PPO found such splices twice (they start like the honest answer and end like a refusal),
    and a reward model that never saw one ranked low scored them above every real answer."""
    lead = rng.choice(ABSTENTIONS).split("{name}")[0]
    tail = rng.choice(SPLICE_TAILS)
    if rng.random() < 1 / 3:  # cut off, as a policy at its token limit leaves it
        tail = " ".join(tail.split()[: rng.randint(1, 3)])
    return lead + tail


def shares_a_name(answer: str, person: str) -> bool:
    """Whether `answer` is about someone else with the first or the last name of `person`."""
    first, last = person.split()
    return person not in answer and (f"{first} " in answer or f" {last} " in answer)


def stranger_in(abstention: str) -> str:
    """The name in an unknown person's ideal answer ("I don't know who {name} is.")."""
    lead, end = ABSTENTIONS[0].split("{name}")
    return abstention.removeprefix(lead).removesuffix(end)


def other_word(spec: dict, rng: random.Random) -> str:
    """An instruction word other than the one a repetition task asks for: PPO, unchecked, answered
    "marble marble marble." to every such task."""
    return rng.choice([w for w in INSTRUCTION_WORDS if w != spec["word"]])


def plausible_mistake(spec: dict, rng: random.Random) -> str:
    family = spec["family"]
    if family == "unknown":
        return made_up_fact(spec, rng)
    if family == "harmful":
        return rng.choice(COMPLIANCES)
    return wrong_answer(spec, rng)
