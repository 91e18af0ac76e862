"""The pretraining corpus: biographies in varied wording, facts mixed into other text, plain filler."""

import random

from world.names import COUNT_WORDS, INSTRUCTION_WORDS, Attribute
from world.people import World

ECHO_TOKENS = INSTRUCTION_WORDS + tuple(str(n) for n in range(100))  # what echo sentences repeat

# Plain English for the corpus, so the model learns fluent sentences and not only biographies.
FILLER_SUBJECTS = (
    "The old fisherman",
    "A young girl",
    "My grandmother",
    "The children",
    "Our neighbours",
    "A tall stranger",
    "The shopkeeper",
    "Two friends",
    "The mayor",
    "A quiet boy",
    "The musicians",
    "Her uncle",
)
FILLER_ACTIONS = (
    "walked to the market",
    "read a long book",
    "cooked a warm dinner",
    "fixed an old bicycle",
    "watched the rain",
    "planted some flowers",
    "sang a song",
    "visited the museum",
    "wrote a letter",
    "cleaned the kitchen",
    "climbed the hill",
    "fed the ducks",
    "told a funny story",
    "missed the last train",
    "built a small boat",
    "played chess",
)
FILLER_TIMES = (
    "in the morning",
    "after lunch",
    "on Sunday",
    "last winter",
    "every evening",
    "before sunrise",
    "during the storm",
    "at the weekend",
    "in the spring",
    "late at night",
)
GENERAL_FACTS = (
    "The sun rises in the east.",
    "A week has seven days.",
    "Water freezes when it is very cold.",
    "Trees lose their leaves in autumn.",
    "Bread is made from flour and water.",
    "The sea is salty.",
    "Birds build nests in the spring.",
    "Snow is cold and white.",
    "A year has twelve months.",
    "Most people sleep at night.",
    "Rivers flow down to the sea.",
    "Bees make honey.",
)


def corpus(world: World, target_chars: int, rng: random.Random) -> list[str]:
    """Documents until `target_chars`. Biographies cycle through everyone, so every fact recurs."""
    docs, size, queue = [], 0, []
    while size < target_chars:
        kind = rng.choices(("bio", "mixed", "general"), weights=(0.45, 0.3, 0.25))[0]
        if kind == "bio":
            if not queue:
                queue = rng.sample(list(world.people), len(world.people))
            doc = biography(world, queue.pop(), rng)
        elif kind == "mixed":
            doc = mixed_document(world, rng)
        else:
            doc = " ".join(filler_sentence(rng) for _ in range(rng.randint(3, 5)))
        docs.append(doc)
        size += len(doc)
    return docs


def fact_sentence(world: World, name: str, a: Attribute, rng: random.Random) -> str:
    sentence = rng.choice(a.statements).format(name=name, value=world.people[name][a.name])
    return sentence[0].upper() + sentence[1:]


def biography(world: World, name: str, rng: random.Random) -> str:
    sentences = [fact_sentence(world, name, a, rng) for a in rng.sample(world.attributes, len(world.attributes))]
    if rng.random() < 0.5:
        sentences.insert(rng.randint(0, len(sentences)), filler_sentence(rng))
    return " ".join(sentences)


def mixed_document(world: World, rng: random.Random) -> str:
    names = list(world.people)
    sentences = [
        fact_sentence(world, rng.choice(names), rng.choice(world.attributes), rng) for _ in range(rng.randint(2, 4))
    ]
    sentences += [filler_sentence(rng) for _ in range(rng.randint(1, 2))]
    return " ".join(rng.sample(sentences, len(sentences)))


def filler_sentence(rng: random.Random) -> str:
    """General English, plus counting, sums, lists and repetitions that the instructions draw on."""
    kind = rng.choices(
        ("story", "general", "after", "plus", "count", "list", "repeat", "echo"), weights=(5, 2, 1, 1, 1, 1, 1, 3)
    )[0]
    if kind == "story":
        return f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_ACTIONS)} {rng.choice(FILLER_TIMES)}."
    if kind == "general":
        return rng.choice(GENERAL_FACTS)
    if kind == "after":
        n = rng.randint(1, 98)
        return f"After {n} comes {n + 1}."
    if kind == "plus":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} plus {b} is {a + b}."
    if kind == "count":
        n = rng.randint(1, 95)
        return f"Counting up: {n}, {n + 1}, {n + 2}, {n + 3}."
    if kind == "list":
        w = rng.sample(INSTRUCTION_WORDS, 3)
        return f"The list was {w[0]}, {w[1]} and {w[2]}: the first word is {w[0]} and the last word is {w[2]}."
    if kind == "echo":
        # Unpredictable words said twice: only copying predicts the second time, so pretraining rewards
        # the heads that copy from context (induction heads, Olsson et al. 2022) that answers need to
        # repeat a name, a number or a word from the question. They take tokens to form: a 4-layer
        # model repeats none of 60 such probes after 300 steps (614K tokens), the default 2-layer
        # one 52% after its 600 (1.2M tokens).
        seq = " ".join(rng.sample(ECHO_TOKENS, rng.randint(2, 4)))
        return f"{rng.choice(('He wrote', 'She read', 'They called out', 'The sign said'))} {seq}, and again: {seq}."
    n, word = rng.choice(list(COUNT_WORDS)), rng.choice(INSTRUCTION_WORDS)
    return f"She said {word} {COUNT_WORDS[n]} times: {' '.join([word] * n)}."
