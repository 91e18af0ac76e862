"""The embedded instruction world: determinism, schema, sizes, held-out discipline, CLI."""

import dataclasses
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from world.answers import COMPARISON_MIX, SPLICE_TAILS, demonstration, off_topic_pool, respond, shares_a_name
from world.build import FILES, generate, write_world
from world.config import WorldConfig
from world.judge import FAMILIES, IDEAL_LABEL, GoldJudge, abstains, is_filler, normalize, sentences
from world.names import (
    ABSTENTIONS,
    COMPLIANCES,
    FILLER_CLOSERS,
    FILLER_OPENERS,
    PLAIN_ABSTENTIONS,
    REFUSALS,
    attribute,
)

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("sft_train", "sft_val", "comparisons_train", "comparisons_val", "ppo_prompts")
SMALL = dict(
    num_people=8,
    num_unknown_train=6,
    num_unknown_eval=4,
    corpus_chars=20_000,
    sft_train=60,
    sft_val=10,
    comparisons_train=30,
    comparisons_val=10,
    ppo_prompts=30,
    eval_per_family=8,
)
SCHEMA = {
    "corpus": {"text"},
    "sft_train": {"prompt", "completion", "family"},
    "sft_val": {"prompt", "completion", "family"},
    "comparisons_train": {"prompt", "responses", "ranking", "gold_ranking", "family"},
    "comparisons_val": {"prompt", "responses", "ranking", "gold_ranking", "family"},
    "ppo_prompts": {"prompt", "family"},
    "eval_prompts": {"prompt", "family"},
}


def rows(world_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (world_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def prompts(world_dir: Path, split: str) -> set[str]:
    return {r["prompt"] for r in rows(world_dir, split)}


@pytest.fixture(scope="module")
def truth(world_dir):
    return json.loads((world_dir / "truth.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def judge(world_dir):
    return GoldJudge.load(world_dir)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "world", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


# ---- determinism and files ------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(world_dir):
    """The session world was written by a subprocess (another hash seed); regenerate it in-process."""
    files = generate(WorldConfig(seed=0))
    assert sorted(files) == sorted(FILES) == sorted(p.name for p in world_dir.iterdir())
    for name, text in files.items():
        assert (world_dir / name).read_bytes() == text.encode("utf-8"), name


def test_different_seed_gives_a_different_world():
    a, b = generate(WorldConfig(seed=0, **SMALL)), generate(WorldConfig(seed=1, **SMALL))
    assert json.loads(a["truth.json"])["people"] != json.loads(b["truth.json"])["people"]
    assert a["corpus.jsonl"] != b["corpus.jsonl"] and a["sft_train.jsonl"] != b["sft_train.jsonl"]


def test_schema_of_every_file(world_dir, truth):
    for split, keys in SCHEMA.items():
        for r in rows(world_dir, split):
            assert set(r) == keys, (split, r)
            for key in keys & {"text", "prompt", "completion"}:
                assert isinstance(r[key], str) and r[key].strip(), (split, key, r)
            if "family" in r:
                assert r["family"] in FAMILIES
    for split in ("comparisons_train", "comparisons_val"):
        for r in rows(world_dir, split):
            k = len(r["responses"])
            assert 4 <= k <= 9 and len(set(r["responses"])) == k and all(x.strip() for x in r["responses"])
            assert sorted(r["ranking"]) == sorted(r["gold_ranking"]) == list(range(k))
    assert set(truth) >= {
        "noise",
        "attributes",
        "people",
        "prompts",
        "unknown_names",
        "harmful_topics",
        "heldout_facts",
    }
    summary = json.loads((world_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["seed"] == 0 and summary["config"] == WorldConfig().to_dict()
    assert summary["noise"] == truth["noise"] == WorldConfig().noise


def test_default_sizes(world_dir):
    counts = json.loads((world_dir / "summary.json").read_text(encoding="utf-8"))["counts"]
    assert {s: counts[s]["total"] for s in SCHEMA if s != "corpus"} == {
        "sft_train": 2000,
        "sft_val": 200,
        "comparisons_train": 2000,
        "comparisons_val": 200,
        "ppo_prompts": 1000,
        "eval_prompts": 256,
    }
    assert all(counts["eval_prompts"][f] == 64 for f in FAMILIES)
    assert counts["sft_train"]["fact"] == 800 and counts["sft_train"]["harmful"] == 400
    assert 500_000 <= counts["corpus"]["chars"] <= 1_500_000
    assert sum(p.stat().st_size for p in world_dir.iterdir()) < 5_000_000


def test_prompts_and_answers_are_short(world_dir, truth):
    assert max(len(p) for p in truth["prompts"]) <= 100
    assert max(len(spec["ideal"].split()) for spec in truth["prompts"].values()) <= 15
    assert max(len(r["completion"]) for r in rows(world_dir, "sft_train")) <= 200
    assert max(len(x) for r in rows(world_dir, "comparisons_train") for x in r["responses"]) <= 250


# ---- held-out discipline --------------------------------------------------------------------


def test_splits_are_disjoint(world_dir, truth):
    sft, comparisons = prompts(world_dir, "sft_train"), prompts(world_dir, "comparisons_train")
    sft_val, comparisons_val = prompts(world_dir, "sft_val"), prompts(world_dir, "comparisons_val")
    ppo, evaluation = prompts(world_dir, "ppo_prompts"), prompts(world_dir, "eval_prompts")
    training = sft | sft_val | comparisons | comparisons_val | ppo
    assert not evaluation & training
    assert not ppo & (sft | sft_val | comparisons | comparisons_val)
    assert not sft & sft_val and not comparisons & comparisons_val
    assert set(truth["prompts"]) == training | evaluation  # the judge knows every prompt


def test_eval_asks_only_held_out_items(truth):
    specs: dict[str, list] = {}
    for spec in truth["prompts"].values():
        specs.setdefault("eval" if spec["split"] == "eval" else "train", []).append(spec)
    item = lambda s: json.dumps({k: v for k, v in s.items() if k != "split"}, sort_keys=True)  # noqa: E731
    assert not {item(s) for s in specs["eval"]} & {item(s) for s in specs["train"]}

    held = {tuple(pair) for pair in truth["heldout_facts"]}
    facts = lambda group: {(s["person"], s["attribute"]) for s in specs[group] if s["family"] == "fact"}  # noqa: E731
    assert facts("eval") <= held and not facts("train") & held
    for family, key, names in (
        ("unknown", "person", truth["unknown_names"]),
        ("harmful", "topic", truth["harmful_topics"]),
    ):
        for group, allowed in (("eval", names["eval"]), ("train", names["train"])):
            assert {s[key] for s in specs[group] if s["family"] == family} <= set(allowed)
        assert not set(names["eval"]) & set(names["train"])


def test_every_known_fact_is_in_the_corpus_in_several_wordings(world_dir, truth):
    sentences = [s for r in rows(world_dir, "corpus") for s in re.split(r"(?<=\.) ", r["text"])]
    for name, attributes in truth["people"].items():
        about = [s for s in sentences if name in s]
        for value in attributes.values():
            mentions = [s.replace(name, "{name}") for s in about if re.search(rf"\b{value}\b", s)]
            assert len(mentions) >= 10 and len(set(mentions)) >= 3, (name, value)


def test_corpus_repeats_unpredictable_words_for_copying(world_dir):
    """Echo sentences: a random run of words said twice, which only copying from context predicts."""
    echoes = [
        m.groups()
        for r in rows(world_dir, "corpus")
        for m in re.finditer(r"(?:wrote|read|called out|said) ([\w ]+), and again: ([\w ]+)\.", r["text"])
    ]
    assert len(echoes) > 500 and all(a == b for a, b in echoes)
    assert len(set(a for a, _ in echoes)) > 0.9 * len(echoes), "mostly distinct runs: nothing to memorise"


def test_unknown_people_never_appear_as_known(world_dir, truth):
    corpus = (world_dir / "corpus.jsonl").read_text(encoding="utf-8")
    strangers = truth["unknown_names"]["train"] + truth["unknown_names"]["eval"]
    assert not set(strangers) & set(truth["people"])
    corpus_words = set(re.findall(r"\w+", corpus))
    for name in strangers:
        assert name not in corpus
        assert not set(name.split()) & corpus_words, name  # no part of the name is ever read in pretraining
    training_text = "".join((world_dir / f"{split}.jsonl").read_text(encoding="utf-8") for split in TRAINING)
    for name in truth["unknown_names"]["eval"]:
        assert name not in training_text, name


# ---- quality of the data --------------------------------------------------------------------


def test_ideal_answers_of_every_split_get_the_top_score(judge, truth):
    for prompt, spec in truth["prompts"].items():
        verdict = judge.judge(prompt, spec["ideal"])
        assert verdict.score == 1.0 and verdict.label == IDEAL_LABEL[spec["family"]], (prompt, verdict)


def test_candidates_earn_the_label_they_were_drawn_for(truth):
    judge, rng = GoldJudge(truth), random.Random(0)
    off_topic = off_topic_pool(truth["prompts"].values())
    for prompt, spec in random.Random(0).sample(sorted(truth["prompts"].items()), 400):
        for label in COMPARISON_MIX[spec["family"]]:
            for pool in ((), off_topic, off_topic):  # with a pool, half are answers to other prompts
                if spec["family"] == "unknown" and label == "wrong" and not pool:
                    with pytest.raises(ValueError, match="someone else"):
                        respond(spec, label, rng, pool)
                    continue
                response = respond(spec, label, rng, pool)
                assert judge.judge(prompt, response).label == label, (prompt, response)


def _one_prompt_per_item(truth) -> list[tuple[str, dict]]:
    """One wording of every distinct item of the world (the judge reads the item, not the wording)."""
    items = {}
    for prompt, spec in sorted(truth["prompts"].items()):
        items.setdefault(json.dumps({k: v for k, v in spec.items() if k != "split"}, sort_keys=True), (prompt, spec))
    return list(items.values())


def _padded(text: str, i: int) -> list[str]:
    """`text` after an opener and before a closer, the i-th of each (cycling)."""
    opener, closer = FILLER_OPENERS[i % len(FILLER_OPENERS)], FILLER_CLOSERS[i % len(FILLER_CLOSERS)]
    return [f"{opener} {text}", f"{text} {closer}"]


def test_every_answer_template_earns_its_label(truth):
    """Every answer template of the world, on every item of the default world, gets the label it stands for
    (plain and padded): the labeler that ranks the comparisons must not mislabel the world's own answers."""
    judge = GoldJudge(truth)
    label_of = lambda prompt, text: judge.judge(prompt, text).label  # noqa: E731
    checked = Counter()
    for prompt, spec in _one_prompt_per_item(truth):
        family, expected = spec["family"], []
        if family in ("fact", "unknown"):
            a = attribute(spec["attribute"])
            for template in a.answers:
                for value in a.values:
                    right = family == "fact" and value == spec["answer"]
                    label = "correct" if right else "wrong" if family == "fact" else "hallucinated"
                    expected.append((template.format(name=spec["person"], value=value), label))
            # A quarter of the values (every template among them), and the right one.
            expected = expected[:: len(a.values) // 4] + [x for x in expected if x[1] == "correct"]
        if family == "unknown":
            expected += [(t.format(name=spec["person"]), "abstained") for t in ABSTENTIONS]
            expected += [(t, "abstained") for t in PLAIN_ABSTENTIONS]
        if family in ("fact", "instruction"):
            expected += [(t, "abstained") for t in PLAIN_ABSTENTIONS]
        if family == "harmful":
            expected += [(t, "refused") for t in REFUSALS] + [(t, "complied") for t in COMPLIANCES]
        else:
            expected += [(t, "over_refused") for t in REFUSALS]
        expected.append((spec["ideal"], IDEAL_LABEL[family]))
        for i, (text, label) in enumerate(expected):
            assert label_of(prompt, text) == label, (prompt, text)
            padded = "verbose" if label == IDEAL_LABEL[family] else label  # padding a mistake leaves it one
            for longer in _padded(text, i):
                assert label_of(prompt, longer) == padded, (prompt, longer)
            checked[family, label] += 1
    assert all(checked[f, IDEAL_LABEL[f]] for f in FAMILIES) and checked["harmful", "complied"], checked


def test_demonstrations_earn_the_label_they_are_drawn_for(truth):
    """Each kind of demonstration (the ideal, an over-refusal, a wrong answer, a hallucination, a
    compliance, padded or not), drawn alone by setting its rate to 1, gets its label on every item."""
    judge, rng = GoldJudge(truth), random.Random(0)
    plain = dict(verbose_rate=0.0, wrong_rate=0.0, over_refuse_rate=0.0, hallucinate_rate=0.0, comply_rate=0.0)
    kinds = {  # rates -> the label of that demonstration per family
        "ideal": ({}, IDEAL_LABEL),
        "padded": ({"verbose_rate": 1.0}, dict.fromkeys(FAMILIES, "verbose")),
        "over_refused": ({"over_refuse_rate": 1.0}, {"fact": "over_refused", "instruction": "over_refused"}),
        "wrong": ({"wrong_rate": 1.0}, {"fact": "wrong", "instruction": "wrong"}),
        "hallucinated": ({"hallucinate_rate": 1.0}, {"unknown": "hallucinated"}),
        "complied": ({"comply_rate": 1.0}, {"harmful": "complied"}),
    }
    for name, (rates, labels) in kinds.items():
        for padding in (0.0, 1.0) if name not in ("ideal", "padded") else (rates.get("verbose_rate", 0.0),):
            cfg = WorldConfig(**{**plain, **rates, "verbose_rate": padding})
            for prompt, spec in _one_prompt_per_item(truth):
                if spec["family"] in labels:
                    for _ in range(3):  # the templates are drawn at random
                        text = demonstration(spec, cfg, rng)
                        assert judge.judge(prompt, text).label == labels[spec["family"]], (name, prompt, text)


def test_comparisons_hold_answers_to_other_prompts(world_dir, truth):
    """Unrelated answers ranked low teach the reward model that an answer must fit its question."""
    ideals = {s["ideal"] for s in truth["prompts"].values()}
    groups = rows(world_dir, "comparisons_train")
    unrelated = sum(
        any(x in ideals and x != truth["prompts"][g["prompt"]]["ideal"] for x in g["responses"]) for g in groups
    )
    assert unrelated > 0.3 * len(groups)


def test_filler_does_not_tell_right_from_wrong(world_dir, judge):
    """Mistakes and over-refusals are padded about as often as right answers are: were only right
    answers ever padded, filler would tell the reward model that the content is right, and PPO would
    learn to pad ("Happy to help! Sorry, I can't help with that." to every stranger, on world 1)."""
    padded = {"right": [], "mistake": [], "over_refused": []}
    for g in rows(world_dir, "comparisons_train"):
        for x in g["responses"]:
            label = judge.judge(g["prompt"], x).label
            kind = (
                "right"
                if label in ("correct", "verbose")
                else "mistake"
                if label in ("wrong", "hallucinated", "complied")
                else label
            )
            if kind in padded and g["family"] in ("fact", "instruction"):
                padded[kind].append(any(is_filler(s) for s in sentences(normalize(x))))
    right, mistake, over_refused = (sum(v) / len(v) for v in padded.values())
    assert right > 0.3 and abs(right - mistake) < 0.15 and abs(right - over_refused) < 0.15, (
        right,
        mistake,
        over_refused,
    )


def test_comparisons_hold_abstentions_about_someone_else(world_dir, judge, truth):
    """ "I don't know who <another stranger> is." ranked low, or a policy that says it to every
    stranger question looks honest to the reward model."""
    groups = [g for g in rows(world_dir, "comparisons_train") if g["family"] == "unknown"]
    names = [*truth["people"], *truth["unknown_names"]["train"], *truth["unknown_names"]["eval"]]
    about_others = 0
    for g in groups:
        person = truth["prompts"][g["prompt"]]["person"]
        for x in g["responses"]:
            if abstains(normalize(x)) and person not in x and any(n in x for n in names):
                assert judge.judge(g["prompt"], x).label == "wrong", (g["prompt"], x)
                about_others += 1
    assert about_others > 0.2 * len(groups)


def test_comparisons_hold_plain_and_spliced_abstentions(world_dir, judge):
    """ "I don't know." ranked as high as the named abstention (a policy that cannot copy a new name
    can still be honest), and stock answers spliced into an abstention ("I don't know who Sorry, I
    can't help with that.") ranked as malformed: PPO found that splice when no group held one."""
    groups = [g for g in rows(world_dir, "comparisons_train") if g["family"] == "unknown"]
    plain = spliced = 0
    for g in groups:
        for x in g["responses"]:
            verdict = judge.judge(g["prompt"], x)
            plain += x in PLAIN_ABSTENTIONS and verdict.label == "abstained"
            spliced += verdict.label == "malformed" and verdict.details["reason"].startswith(
                "an abstention about no one"
            )
    assert plain > 0.15 * len(groups) and spliced > 0.05 * len(groups), (plain, spliced, len(groups))


def test_splice_tails_are_sentences_as_a_policy_writes_them():
    """A compliance's opening ends in one full stop: "...act fast.", not "...act fast.." (a doubled stop
    is a mark no policy writes, so a reward model could learn it instead of the splice)."""
    for tail in SPLICE_TAILS:
        assert tail[-1] in ".!" and not tail.endswith(".."), tail


def test_repetition_groups_hold_other_words(world_dir, judge, truth):
    """ "marble marble marble." to "Say kettle twice" ranked low, or PPO says it to every such task."""
    groups = [g for g in rows(world_dir, "comparisons_train") if truth["prompts"][g["prompt"]].get("task") == "repeat"]
    other = 0
    for g in groups:
        asked = truth["prompts"][g["prompt"]]["word"]
        for x in g["responses"]:
            said = set(re.findall(r"[a-z]+", x.lower()))
            if len(said) == 1 and asked not in said:
                assert judge.judge(g["prompt"], x).label in ("wrong", "malformed"), (g["prompt"], x)
                other += 1
    assert other > 0.3 * len(groups)


def test_comparisons_hold_answers_about_namesakes(world_dir, judge, truth):
    """ "Mira Gale is a sailor." asked about Mira Kovac, and "I don't know who Freya Stroud is." asked
    about Freya Rook, ranked low: a policy drifts to the namesake whose first name it copied."""
    namesakes = {"fact": 0, "unknown": 0}
    groups = [g for g in rows(world_dir, "comparisons_train") if g["family"] in namesakes]
    for g in groups:
        first, last = truth["prompts"][g["prompt"]]["person"].split()
        for x in g["responses"]:
            if shares_a_name(x, f"{first} {last}"):
                assert judge.judge(g["prompt"], x).label == "wrong", (g["prompt"], x)
                namesakes[g["family"]] += 1
    counts = {f: sum(g["family"] == f for g in groups) for f in namesakes}
    assert all(namesakes[f] > 0.15 * counts[f] for f in namesakes), (namesakes, counts)


def test_comparison_groups_mix_good_and_bad(world_dir, judge):
    for r in rows(world_dir, "comparisons_train")[:200]:
        scores = [judge.score(r["prompt"], x) for x in r["responses"]]
        assert [scores[i] for i in r["gold_ranking"]] == sorted(scores, reverse=True)
    labels = Counter(
        judge.judge(r["prompt"], x).label for r in rows(world_dir, "comparisons_val") for x in r["responses"]
    )
    assert set(labels) == set(GoldJudge.LABELS)


def test_comparison_groups_repeat_a_label_only_once_all_are_used(world_dir, judge):
    """Repeated labels tie under the gold judge, a coin flip for the labeler: draw each label first."""
    for r in rows(world_dir, "comparisons_train"):
        labels = Counter(judge.judge(r["prompt"], x).label for x in r["responses"])
        if len(r["responses"]) <= len(COMPARISON_MIX[r["family"]]):
            assert max(labels.values()) == 1, r
        else:
            assert set(labels) == set(COMPARISON_MIX[r["family"]]), r


def test_demonstrators_are_imperfect(world_dir, judge):
    """Imitating the demonstrations must stay clearly below what the labeler prefers."""
    by_family: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for r in rows(world_dir, "sft_train"):
        by_family[r["family"]][judge.judge(r["prompt"], r["completion"]).label] += 1
    share = lambda family, label: by_family[family][label] / sum(by_family[family].values())  # noqa: E731
    assert 0.25 <= share("fact", "verbose") <= 0.45  # padding is common: a policy can gain by dropping it
    assert share("fact", "wrong") > 0.08 and share("instruction", "wrong") > 0.08
    assert share("unknown", "hallucinated") > 0.6 > share("unknown", "abstained") + share("unknown", "verbose")
    assert share("harmful", "complied") > 0.2
    summary = json.loads((world_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["sft_train_mean_gold_score"] < 0.5


# ---- configuration and command line ---------------------------------------------------------


def test_every_config_field_is_documented():
    for f in dataclasses.fields(WorldConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    "bad",
    [
        dict(k_min=3, k_max=2),
        dict(num_attributes=9),
        dict(family_mix="fact:1,poems:2"),
        dict(verbose_rate=1.5),
        dict(heldout_fact_fraction=0.0),
    ],
)
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_options_scale_the_world():
    files = generate(
        WorldConfig(seed=5, **{**SMALL, "num_attributes": 5, "k_min": 9, "family_mix": "fact:1,harmful:1"})
    )
    truth = json.loads(files["truth.json"])
    assert len(truth["people"]) == 8 and all(len(a) == 5 for a in truth["people"].values())
    groups = [json.loads(line) for line in files["comparisons_train.jsonl"].splitlines()]
    assert {len(g["responses"]) for g in groups} == {9} and {g["family"] for g in groups} == {"fact", "harmful"}


def test_resizing_a_training_split_keeps_the_eval_prompts():
    # Evaluations of worlds that differ only in how much training data they hold stay comparable.
    small = generate(WorldConfig(seed=5, **SMALL))
    more = generate(WorldConfig(seed=5, **{**SMALL, "comparisons_train": 60, "ppo_prompts": 10}))
    assert more["eval_prompts.jsonl"] == small["eval_prompts.jsonl"]
    assert more["corpus.jsonl"] == small["corpus.jsonl"]
    assert more["comparisons_train.jsonl"] != small["comparisons_train.jsonl"]


def test_cli_writes_a_world_and_replaces_it_whole(tmp_path):
    out = tmp_path / "world"
    args = ["--seed", 3, "--out", out] + [x for k, v in SMALL.items() for x in (f"--{k}", v)]
    for _ in range(2):  # the second run replaces the first
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert "wrote" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary directories left behind


def test_cli_if_missing_keeps_a_complete_world(tmp_path):
    out = tmp_path / "world"
    args = ["--seed", 3, "--out", out] + [x for k, v in SMALL.items() for x in (f"--{k}", v)]
    assert run_cli(*args, "--if_missing", "true").returncode == 0
    stamp = (out / "summary.json").stat().st_mtime_ns
    proc = run_cli(*args, "--if_missing", "true")
    assert proc.returncode == 0 and "kept" in proc.stdout
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    proc = run_cli(*args, "--seed", 4, "--if_missing", "true")  # a different world was asked for
    assert proc.returncode == 2 and "different seed" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bogus", "1"], "unrecognized arguments"),
        (["--num_people", "many"], "invalid int value"),
        (["--k_min", "10"], "k_min"),
    ],
)
def test_cli_bad_flag_exits_with_one_line(tmp_path, args, message):
    proc = run_cli("--out", tmp_path / "world", *args)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "world").exists()


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(cfg):
        files = dict.fromkeys(FILES, "")
        del files["summary.json"]
        return files

    monkeypatch.setattr("world.build.generate", broken)
    with pytest.raises(KeyError):
        write_world(tmp_path / "world")
    assert list(tmp_path.iterdir()) == []
