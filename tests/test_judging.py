"""reward.judging: the summary of hand-made verdicts, the empty-set rule, win rates, the gold judge through
the judge interface, and a reward model judging texts and token ids on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from data.tokenizer import train_tokenizer
from pipeline.generation import chat_ids
from reward.judging import (
    RATES,
    Answers,
    Judged,
    RewardModelJudge,
    WorldJudge,
    compare,
    judge_answers,
    judge_policies,
    summarize,
)
from reward.model import BIAS_KEY, score
from tests.conftest import ROOT, read_jsonl
from world.judge import FAMILIES, SCORES, TOP_SCORE, GoldJudge


def gold_judged(rows: list[tuple[str, str, float]], answers: list[str] | None = None, **extra) -> Judged:
    """A Judged from hand-made (family, label, score) verdicts."""
    return Judged(
        answers,
        [f for f, _, _ in rows],
        [s for _, _, s in rows],
        TOP_SCORE,
        labels=[label for _, label, _ in rows],
        **extra,
    )


# ---- the summary ----------------------------------------------------------------------------------


def test_summary_of_hand_made_verdicts():
    rows = [
        ("unknown", "hallucinated", -0.75),
        ("unknown", "abstained", 1.0),
        ("unknown", "wrong", -0.5),
        ("unknown", "abstained", 1.0),
        ("harmful", "refused", 1.0),
        ("harmful", "complied", -1.0),
        ("harmful", "verbose", 0.5),
        ("fact", "correct", 1.0),
        ("fact", "verbose", 0.5),
        ("fact", "over_refused", -0.25),
        ("instruction", "wrong", -0.5),
    ]
    judged = gold_judged(rows, answers=["a b c"] * len(rows), tokens=[4] * len(rows), proxy=[0.5] * len(rows))
    m = summarize(judged, n_boot=100, seed=0)
    assert m["hallucination_rate"] == 0.25 and m["abstention_rate"] == 0.5 and m["wrong_person_rate"] == 0.25
    assert m["refusal_accuracy"] == pytest.approx(1 / 3) and m["refusal_rate"] == pytest.approx(2 / 3)
    assert m["over_refusal_rate"] == pytest.approx(1 / 4)  # fact + instruction prompts only
    assert m["fact_accuracy"] == pytest.approx(1 / 3) and m["fact_correct_or_verbose"] == pytest.approx(2 / 3)
    assert m["instruction_accuracy"] == 0.0 and m["malformed_rate"] == 0.0
    assert m["gold_score"] == pytest.approx(sum(s for _, _, s in rows) / len(rows))
    assert m["gold_score_ci"][0] <= m["gold_score"] <= m["gold_score_ci"][1]
    assert m["gold_score_by_family"]["harmful"] == pytest.approx(0.5 / 3)
    assert m["gold_score_by_family"]["unknown"] == pytest.approx(0.75 / 4)
    assert m["labels"]["verbose"] == 2 and sum(m["labels"].values()) == len(rows) and set(m["labels"]) == set(SCORES)
    assert m["labels_by_family"]["harmful"]["complied"] == 1 and m["labels_by_family"]["fact"]["refused"] == 0
    assert (m["n"], m["response_tokens"], m["response_words"], m["proxy_score"]) == (11, 4, 3, 0.5)
    assert set(m) == set(RATES) | {
        "n",
        "gold_score",
        "gold_score_ci",
        "gold_score_by_family",
        "labels",
        "labels_by_family",
        "response_tokens",
        "response_words",
        "proxy_score",
    }
    # Without a bootstrap the interval is the mean twice; the same seed gives the same interval.
    assert summarize(judged)["gold_score_ci"] == [m["gold_score"]] * 2
    assert summarize(judged, 100, 0) == m


def test_summary_of_a_reward_model_judgement():
    judged = Judged(["Yes.", "No, never."], ["a.jsonl", "b.jsonl"], [0.5, -1.5], None, tokens=[2, 3])
    m = summarize(judged, n_boot=50, seed=0)
    assert m["judge_score"] == -0.5 and m["judge_score_by_file"] == {"a.jsonl": 0.5, "b.jsonl": -1.5}
    assert m["response_tokens"] == 2.5 and m["response_words"] == 1.5 and m["proxy_score"] is None
    assert "gold_score" not in m and "hallucination_rate" not in m


def test_empty_sets_are_none():
    """One rule: a mean, rate or win rate over no answers is None, its interval [None, None]."""
    empty = gold_judged([], answers=[], tokens=[])
    m = summarize(empty, n_boot=100)
    assert m["n"] == 0 and m["gold_score"] is None and m["gold_score_ci"] == [None, None]
    assert all(m[name] is None for name in RATES)
    assert m["gold_score_by_family"] == dict.fromkeys(FAMILIES) and m["labels"] == dict.fromkeys(SCORES, 0)
    assert m["response_tokens"] is None and m["response_words"] is None and m["proxy_score"] is None
    # A family nobody asked: its rates are None, not 0.0 (PPO used to report a hallucination rate of 0.0).
    facts = summarize(gold_judged([("fact", "correct", 1.0), ("fact", "wrong", -0.5)]))
    assert facts["hallucination_rate"] is None and facts["refusal_accuracy"] is None
    assert facts["gold_score_by_family"]["unknown"] is None and facts["fact_accuracy"] == 0.5
    assert facts["response_words"] is None  # the answers were not kept
    w = compare(empty, empty, n_boot=100)
    assert (w["win_rate"], w["ci"], w["n"], w["ceiling"], w["by_family"]) == (None, [None, None], 0, None, {})
    assert summarize(Judged([], [], [], None))["judge_score"] is None


# ---- win rates ------------------------------------------------------------------------------------


def test_win_rate_reports_the_ceiling_an_ideal_answer_reaches():
    ppo = Judged(None, ["fact"] * 4, [1.0, 0.5, -0.5, 1.0], TOP_SCORE)
    sft = Judged(None, ["fact"] * 4, [1.0, -0.5, -0.5, 0.5], TOP_SCORE)
    result = compare(ppo, sft, n_boot=50, seed=0)
    assert result["win_rate"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 2, 0)
    assert result["ceiling"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)  # SFT's one ideal answer is a tie at best
    assert compare(sft, sft, 50, 0)["ceiling"] == result["ceiling"] and compare(sft, sft, 50, 0)["win_rate"] == 0.5
    assert result["ci"][0] <= result["win_rate"] <= result["ci"][1]


def test_a_reward_model_judge_ties_the_same_answer_and_has_no_ceiling():
    ppo = Judged(["Yes.", "No.", "Hm."], ["a.jsonl"] * 3, [0.3000001, 0.2, -1.0], None)
    sft = Judged(["Yes.", "Maybe.", "Eh."], ["a.jsonl"] * 3, [0.3, 0.4, -2.0], None)
    result = compare(ppo, sft, n_boot=50, seed=0)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 1, 1)  # the same text ties however scored
    assert result["ceiling"] is None and result["by_family"] == {"a.jsonl": pytest.approx(0.5)}
    with pytest.raises(ValueError):
        compare(ppo, Judged(None, ["a.jsonl"], [0.0], None))


# ---- the gold judge through the judge interface ------------------------------------------------------


def test_world_judge_evaluates_policies_in_one_call(world_dir):
    judge = WorldJudge.load(world_dir)
    records = read_jsonl(world_dir / "eval_prompts.jsonl")
    picked = [next(r for r in records if r["family"] == f) for f in FAMILIES]
    prompts = [r["prompt"] for r in picked]
    ideal = [judge.gold.ideal(p) for p in prompts]
    evaluation = judge_policies(
        judge,
        prompts,
        {"ideal": ideal, "idk": ["I don't know."] * 4},
        pairs=[("ideal", "idk"), ("idk", "ideal")],
        n_boot=20,
    )
    best, idk = evaluation.summaries["ideal"], evaluation.summaries["idk"]
    assert best["gold_score"] == TOP_SCORE and best["hallucination_rate"] == 0.0 and best["refusal_accuracy"] == 1.0
    assert idk["gold_score"] == pytest.approx(0.25) and idk["abstention_rate"] == 1.0  # 1.0 on strangers only
    assert evaluation.judged["idk"].families == list(FAMILIES) and evaluation.judged["idk"].labels[1] == "abstained"
    assert [v.label for v in judge.verdicts(prompts, ideal)] == evaluation.judged["ideal"].labels
    assert evaluation.win_rates["ideal_vs_idk"]["win_rate"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert evaluation.win_rates["idk_vs_ideal"]["ceiling"] == 0.5  # nothing left to win against the ideal
    assert evaluation.summaries["ideal"]["response_tokens"] is None  # no token counts given
    assert isinstance(judge.gold, GoldJudge) and judge.top_score == TOP_SCORE


# ---- a reward model judging texts and token ids ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reward_model():
    tokenizer = train_tokenizer(
        [f"Who is person {i}? I don't know who person {i} is." for i in range(200)], vocab_size=300
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config).eval()
    setattr(model.config, BIAS_KEY, 0.25)  # the reward stage's normalising offset
    return model, tokenizer


def test_reward_model_judge_scores_texts_as_the_reward_library_does(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    judge = RewardModelJudge(model, tokenizer, batch_size=2)
    prompts = ["Who is person 3?", "Who is person 4?", [{"role": "user", "content": "Who is person 5?"}]]
    answers = ["I don't know who person 3 is.", "person 4", "I don't know."]
    expected = score(model, tokenizer, prompts, answers, batch_size=2).tolist()
    assert judge.scores(prompts, answers) == expected
    judged = judge.judge(prompts, answers, ["a", "a", "b"])
    assert judged.scores == expected and judged.labels is None and judged.top_score is None
    assert summarize(judged)["judge_score_by_file"] == {"a": pytest.approx(sum(expected[:2]) / 2), "b": expected[2]}


def test_reward_model_judge_scores_generated_ids_with_the_no_eos_penalty(tiny_reward_model):
    """Token ids as a policy generated them, left-padded in one batch, read at the last token: what each
    sequence alone scores, plus the offset; an answer without EOS at the penalty, its own score kept raw."""
    model, tokenizer = tiny_reward_model
    eos = tokenizer.eos_token_id
    prompt_ids = [chat_ids(tokenizer, "Who is person 7?"), chat_ids(tokenizer, "Who is person 12? Tell me.")]
    responses = [
        tokenizer("I don't know", add_special_tokens=False)["input_ids"] + [eos],
        tokenizer("person 12 is", add_special_tokens=False)["input_ids"],
    ]  # cut off: no EOS
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([p + r])).logits[0, 0].item() + 0.25
            for p, r in zip(prompt_ids, responses, strict=True)
        ]
    judge = RewardModelJudge(model, tokenizer, batch_size=2, no_eos_penalty=-3.0)
    penalised, raw = judge.scores_of_ids(prompt_ids, responses)
    assert raw == pytest.approx(alone, abs=1e-5)
    assert penalised == [raw[0], -3.0]
    assert RewardModelJudge(model, tokenizer).scores_of_ids(prompt_ids, responses) == (raw, raw)

    # PPO's evaluation in one call: the gold judge would label; here the reward model is judge and proxy at
    # once, so the answers are scored once, from the ids, and their lengths are the ids'.
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    prompts = ["Who is person 7?", "Who is person 12? Tell me."]
    judged = judge_answers(judge, prompts, Answers(texts, ids=responses), proxy=judge, prompt_ids=prompt_ids)
    assert judged.proxy == judged.scores == penalised and judged.proxy_raw == raw
    assert judged.tokens == [len(r) for r in responses]
    s = summarize(judged)
    assert s["proxy_score"] == pytest.approx(sum(penalised) / 2)
    assert s["response_tokens"] == sum(judged.tokens) / 2
    # Without ids the proxy reads the texts through the chat template.
    by_text = judge_answers(judge, prompts, texts, proxy=RewardModelJudge(model, tokenizer))
    assert by_text.proxy == by_text.proxy_raw == score(model, tokenizer, prompts, texts).tolist()


def test_the_judging_module_imports_nothing_above_the_reward_library():
    code = (
        "import json, sys, reward.judging; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'stages', 'evaluation', 'bench'})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
