"""Evaluation: the statistics by hand, the log-prob/KL/reward helpers, and `python -m evaluation.evaluate`
end to end on a run whose sft/ppo/reward stages are stand-ins built from the tiny pretrained model.

The `staged_run` and `evaluated_run` fixtures live in tests/conftest.py, shared with tests/test_report.py and
tests/test_chat.py; they build their directory once per session, whichever test file asks first.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from evaluation.evaluate import (
    FLOOR_ANSWERS,
    EvalOptions,
    evaluate_run,
    load_causal_lm,
    load_prompt_files,
    markdown_table,
    sampling_temperature,
    select_prompts,
)
from evaluation.evaluate import main as evaluate_main
from pipeline.divergence import answer_logprobs as token_logprobs
from pipeline.divergence import response_mask, sampled_kl
from pipeline.errors import PipelineError
from pipeline.generation import chat_ids, left_pad
from pipeline.stage import read_manifest, write_json_atomic
from pipeline.stats import best_of_k, best_of_k_kl, bootstrap_ci, pairwise_outcomes, win_rate
from reward.judging import Judged, compare
from reward.model import load_reward_model, score
from tests.conftest import EVAL_PROMPTS, MY_PROMPTS, one_line_error, refusing_system_turns, run_module, write_jsonl
from world.judge import FAMILIES, TOP_SCORE, GoldJudge

RATE_KEYS = (
    "fact_accuracy",
    "fact_correct_or_verbose",
    "instruction_accuracy",
    "instruction_correct_or_verbose",
    "hallucination_rate",
    "abstention_rate",
    "wrong_person_rate",
    "refusal_accuracy",
    "refusal_rate",
    "over_refusal_rate",
    "malformed_rate",
)


# ---- statistics ---------------------------------------------------------------------------


def test_win_rate_counts_ties_half():
    a = [1.0, 0.5, 0.0, 1.0, -0.75]
    b = [0.0, 0.5, 1.0, -1.0, -0.75]
    assert pairwise_outcomes(a, b) == [1.0, 0.5, 0.0, 1.0, 0.5]
    assert win_rate(a, b) == pytest.approx(3.0 / 5)
    assert win_rate(b, a) == pytest.approx(2.0 / 5)  # a's wins are b's losses; ties stay half
    assert win_rate(a, a) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 0.0])


def test_bootstrap_interval_known_cases():
    assert bootstrap_ci([1.0] * 20, 500, seed=0) == (1.0, 1.0)  # all wins: no uncertainty left
    symmetric = [0.0, 1.0] * 50
    low, high = bootstrap_ci(symmetric, 1000, seed=0)
    assert low < 0.5 < high
    # Width close to the normal approximation 2 * 1.96 * sd / sqrt(n) = 0.196 for n = 100 coin flips.
    assert 0.15 < high - low < 0.25
    assert bootstrap_ci(symmetric, 1000, seed=3) == bootstrap_ci(symmetric, 1000, seed=3)
    assert bootstrap_ci(symmetric, 1000, seed=3) != bootstrap_ci(symmetric, 1000, seed=4)
    wide = bootstrap_ci([0.0, 1.0] * 10, 1000, seed=0)
    assert wide[1] - wide[0] > high - low  # fewer prompts, wider interval
    assert all(math.isnan(x) for x in bootstrap_ci([], 100))


def _best_of_k_by_enumeration(proxy, gold, k):
    """Every k-subset of the samples, its pick the highest proxy (ties: the later sample), averaged."""
    picks = [max(subset, key=lambda i: (proxy[i], i)) for subset in itertools.combinations(range(len(proxy)), k)]
    return sum(proxy[i] for i in picks) / len(picks), sum(gold[i] for i in picks) / len(picks)


def test_best_of_k_matches_every_subset_by_hand():
    rng = random.Random(0)
    for n in (1, 2, 5, 7):
        proxy = [rng.gauss(0, 1) for _ in range(n)]
        gold = [rng.choice([-1.0, -0.5, 0.5, 1.0]) for _ in range(n)]
        proxy[-1] = proxy[0]  # a repeated answer scores the same
        for k in range(1, n + 1):
            assert best_of_k(proxy, gold, k) == pytest.approx(_best_of_k_by_enumeration(proxy, gold, k)), (n, k)
    proxy, gold = [0.1, 0.9, 0.4, -0.3], [1.0, -1.0, 0.5, 1.0]
    assert best_of_k(proxy, gold, 1) == pytest.approx((sum(proxy) / 4, sum(gold) / 4))  # no selection: the mean
    assert best_of_k(proxy, gold, 4) == (0.9, -1.0)  # all of them: the reward model's favourite, however bad
    with pytest.raises(ValueError):
        best_of_k(proxy, gold, 5)
    with pytest.raises(ValueError):
        best_of_k(proxy, gold[:3], 2)


def test_best_of_k_kl():
    assert best_of_k_kl(1) == 0.0
    assert best_of_k_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_k_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_k_kl(k) < best_of_k_kl(k + 1) < math.log(k + 1) for k in range(1, 64))


def test_select_prompts_takes_families_in_turn():
    records = [{"prompt": f"{f}{i}", "family": f} for f in ("fact",) * 1 for i in range(6)] + [
        {"prompt": f"u{i}", "family": "unknown"} for i in range(2)
    ]
    chosen = select_prompts(records, 4)
    assert [r["family"] for r in chosen] == ["fact", "unknown", "fact", "unknown"]
    assert select_prompts(records, 0) == records


def test_response_mask_ends_after_first_eos():
    eos = 2
    response = torch.tensor([[5, 2, 7, 0], [5, 6, 7, 8], [2, 0, 0, 0], [0, 5, 2, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(response_mask(response, eos), expected)


# ---- log-probabilities, KL and reward on the tiny model --------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(staged_run):
    return AutoModelForCausalLM.from_pretrained(staged_run / "sft").eval(), AutoTokenizer.from_pretrained(
        staged_run / "sft"
    )


def test_token_logprobs_ignore_left_padding(tiny_lm):
    model, tok = tiny_lm
    seqs = [chat_ids(tok, "Who is Zoe Marsh?") + [40, 41, 42], chat_ids(tok, "Hi") + [43, 44, 45]]
    ids, mask = left_pad(seqs, tok.pad_token_id)
    batched = token_logprobs(model, ids, mask, ids.shape[1] - 3)
    for row, seq in enumerate(seqs):
        one = torch.tensor([seq])
        alone = token_logprobs(model, one, torch.ones_like(one), len(seq) - 3)
        torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=1e-4)
        # and by hand: log-softmax of the logits one position earlier
        logits = model(input_ids=one).logits[0, len(seq) - 4 : -1]
        torch.testing.assert_close(
            alone[0], torch.log_softmax(logits, -1)[torch.arange(3), one[0, -3:]], atol=1e-4, rtol=1e-4
        )


def test_sampled_kl_is_zero_to_itself_and_positive_to_another_model(tiny_lm):
    model, tok = tiny_lm
    prompts = ["Who is Zoe Marsh?", "Say apple twice.", "Tell me a secret.", "What is 2 plus 3?"]
    same, lengths = sampled_kl(model, model, tok, prompts, max_new_tokens=6, seed=0)
    assert same == [0.0] * len(prompts) and all(1 <= n <= 6 for n in lengths)
    other = AutoModelForCausalLM.from_pretrained(Path(model.name_or_path)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    kl, _ = sampled_kl(other, model, tok, prompts, max_new_tokens=6, seed=0)
    assert sum(kl) / len(kl) > 0.1


def test_token_logprobs_at_a_temperature(tiny_lm):
    """At temperature T the log-probs are those of softmax(logits / T), as PPO scores its rollouts."""
    model, tok = tiny_lm
    seq = chat_ids(tok, "Who is Zoe Marsh?") + [40, 41, 42]
    one = torch.tensor([seq])
    tempered = token_logprobs(model, one, torch.ones_like(one), len(seq) - 3, temperature=0.5)
    logits = model(input_ids=one).logits[0, len(seq) - 4 : -1]
    expected = torch.log_softmax(logits / 0.5, -1)[torch.arange(3), one[0, -3:]]
    torch.testing.assert_close(tempered[0], expected, atol=1e-4, rtol=1e-4)


def _perturbed(model, scale: float = 0.3, seed: int = 1):
    other = AutoModelForCausalLM.from_pretrained(Path(model.name_or_path)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_sampled_kl_at_a_temperature_is_the_kl_of_the_tempered_distributions(tiny_lm):
    """One-token answers: the Monte-Carlo estimate at temperature T approaches the exact KL between
    softmax(policy logits / T) and softmax(reference logits / T) - the quantity PPO's kl_to_sft reports - and
    not the one at temperature 1."""
    model, tok = tiny_lm
    other = _perturbed(model)
    prompt, n = "Who is Zoe Marsh?", 800
    ids = torch.tensor([chat_ids(tok, prompt)])
    with torch.no_grad():
        policy_logits, ref_logits = other(input_ids=ids).logits[0, -1], model(input_ids=ids).logits[0, -1]

    def exact(t: float) -> float:
        p, q = torch.log_softmax(policy_logits / t, -1), torch.log_softmax(ref_logits / t, -1)
        return (p.exp() * (p - q)).sum().item()

    for t in (0.5, 1.0):
        kls, lengths = sampled_kl(other, model, tok, [prompt] * n, max_new_tokens=1, seed=0, temperature=t)
        assert lengths == [1] * n
        mc, se = sum(kls) / n, torch.tensor(kls).std().item() / math.sqrt(n)
        assert abs(mc - exact(t)) < 4 * se, (t, mc, exact(t), se)
    assert abs(exact(0.5) - exact(1.0)) > 8 * se  # the two temperatures measure different quantities


def test_reward_scores_do_not_depend_on_batching(staged_run):
    rm, tok = load_reward_model(staged_run / "reward")
    prompts = ["Who is Zoe Marsh?", "Hi", "What is the next number after 41?"]
    responses = ["I don't know who Zoe Marsh is.", "Hello there, how can I help you today?", "42"]
    batched = score(rm, tok, prompts, responses, batch_size=3).tolist()
    single = [score(rm, tok, [p], [r], batch_size=1).item() for p, r in zip(prompts, responses, strict=False)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert len(set(round(s, 6) for s in batched)) == 3  # different answers, different scores


# ---- the CLI end to end -----------------------------------------------------------------------


def _numbers(obj, path="") -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{path}[{i}]")]
    return [(path, obj)]


def test_evaluate_cli_writes_every_metric(evaluated_run):
    result = json.loads((evaluated_run / "eval.json").read_text())
    judge = GoldJudge.load(evaluated_run / "world")
    assert result["num_prompts"] == EVAL_PROMPTS
    assert result["prompts_by_family"] == {f: EVAL_PROMPTS // 4 for f in FAMILIES}
    assert set(result["stages"]) == {"base", "sft", "ppo"}
    for path, value in _numbers({k: v for k, v in result.items() if k != "answers"}):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), path
        else:  # only strings (paths) may be non-numeric; no metric may be missing (None)
            assert isinstance(value, (str, bool)), f"{path} = {value!r}"
    for name, s in result["stages"].items():
        for key in RATE_KEYS:
            assert 0.0 <= s[key] <= 1.0, (name, key)
        assert -1.0 <= s["gold_score"] <= 1.0 and s["gold_score_ci"][0] <= s["gold_score"] <= s["gold_score_ci"][1]
        assert sum(s["labels"].values()) == EVAL_PROMPTS and set(s["labels"]) == set(GoldJudge.LABELS)
        assert s["response_tokens"] >= 0 and isinstance(s["proxy_score"], float)
    # sft and ppo are copies of the base model: greedy answers tie everywhere and the KL is exactly 0.
    assert set(result["win_rates"]) == {"sft_vs_base", "ppo_vs_sft", "ppo_vs_base"}
    for w in result["win_rates"].values():
        assert w["win_rate"] == 0.5 and w["ci"] == [0.5, 0.5] and w["ties"] == w["n"] == EVAL_PROMPTS
    assert result["kl_to_sft"]["ppo"]["mean"] == 0.0 and result["kl_to_sft"]["ppo"]["n"] == EVAL_PROMPTS
    # The stand-in PPO's manifest is pretrain's, whose config has a temperature (of its samples): read as PPO's.
    ppo_temperature = read_manifest(evaluated_run / "ppo")["config"]["temperature"]
    assert result["kl_to_sft"]["ppo"]["temperature"] == ppo_temperature == 0.8
    # The floor: one constant answer to every prompt, its gold score and win rate against SFT.
    assert [f["answer"] for f in result["floor"]] == list(FLOOR_ANSWERS)
    families = [a["family"] for a in result["answers"]]
    sft = Judged(
        [a["responses"]["sft"]["answer"] for a in result["answers"]],
        families,
        [a["responses"]["sft"]["score"] for a in result["answers"]],
        TOP_SCORE,
    )
    for f in result["floor"]:
        scores = [judge.score(a["prompt"], f["answer"]) for a in result["answers"]]
        assert f["score"] == pytest.approx(sum(scores) / EVAL_PROMPTS)
        assert f["score_by_family"] == {
            fam: pytest.approx(sum(s for s, g in zip(scores, families, strict=False) if g == fam) / 3)
            for fam in FAMILIES
        }
        constant = Judged([f["answer"]] * EVAL_PROMPTS, families, scores, TOP_SCORE)
        assert f["win_rate_vs_sft"] == compare(constant, sft, 200, 0)
    assert result["floor"][0]["score"] == -1.0  # the empty answer is malformed everywhere
    assert result["floor"][1]["score"] == pytest.approx(0.25)  # "I don't know.": 1.0 on strangers, 0.0 elsewhere
    assert result["reward_model"]["accuracy"] == {"eval_accuracy": 0.6, "test/pairwise_accuracy": 0.64}
    filler = result["reward_model"]["filler_bias"]  # 6 fact/instruction prompts, two paddings each
    assert filler["n"] == 12 and 0.0 <= filler["prefers_padded"] <= 1.0
    assert (
        result["pretrain"]["val_perplexity"] == read_manifest(evaluated_run / "pretrain")["metrics"]["val_perplexity"]
    )
    # Best-of-n on SFT: k = 1, 2, 4, 8 of 8 samples, its analytic KL, and the pick of more answers scores
    # at least as high by the reward model that picks it (in expectation: exactly, by construction).
    bon = result["best_of_n"]
    assert (bon["stage"], bon["n"], bon["temperature"]) == ("sft", 8, 1.0)
    assert [c["k"] for c in bon["curve"]] == [1, 2, 4, 8]
    assert [c["kl"] for c in bon["curve"]] == pytest.approx([best_of_k_kl(k) for k in (1, 2, 4, 8)])
    proxies = [c["proxy"] for c in bon["curve"]]
    assert proxies == sorted(proxies) and proxies[-1] > proxies[0]
    assert all(-1.0 <= c["gold"] <= 1.0 for c in bon["curve"])
    w = bon["win_rate_vs_sft"]
    assert w["n"] == EVAL_PROMPTS and w["wins"] + w["ties"] + w["losses"] == EVAL_PROMPTS
    # Per-prompt answers: the labels are the gold judge's, the aggregates are their means.
    assert len(result["answers"]) == EVAL_PROMPTS
    for a in result["answers"]:
        assert a["ideal"] == judge.ideal(a["prompt"])
        for r in a["responses"].values():
            v = judge.judge(a["prompt"], r["answer"])
            assert (r["label"], r["score"]) == (v.label, v.score)
    mean_base = sum(a["responses"]["base"]["score"] for a in result["answers"]) / EVAL_PROMPTS
    assert result["stages"]["base"]["gold_score"] == pytest.approx(mean_base)
    mean_proxy = sum(a["responses"]["ppo"]["proxy"] for a in result["answers"]) / EVAL_PROMPTS
    assert result["stages"]["ppo"]["proxy_score"] == pytest.approx(mean_proxy)
    table = (evaluated_run / "eval.md").read_text()
    assert "| metric | base | sft | ppo |" in table and "hallucination rate" in table
    assert "best-of-n on sft" in table and "win rate of best-of-8 vs sft" in table
    assert "| KL to SFT at temperature 0.8 (nats/answer) [95% CI] |" in table
    assert "| constant answer (floor) | gold score | win rate vs sft [95% CI] |" in table
    assert "| (empty) | -1.000 |" in table and "| I don't know. | 0.250 |" in table


def test_evaluate_cli_writes_a_sampled_evaluation_beside_the_greedy_one(staged_run, tmp_path, capsys):
    # The CLI's main in-process: tests/test_evaluate.py runs `python -m evaluation.evaluate` itself on your prompts.
    run = tmp_path / "sampled"
    run.mkdir()
    for name in ("world", "pretrain", "sft"):
        os.symlink(staged_run / name, run / name)
    (run / "eval.json").write_text("{}")  # the greedy evaluation stays as it is
    argv = ["--max_prompts", "4", "--max_new_tokens", "6", "--bootstrap", "20", "--temperature", "0.8"]
    evaluate_main(["--run_dir", str(run), *argv, "--out", "eval_t0.8", "--threads", "1"])
    assert json.loads((run / "eval_t0.8.json").read_text())["settings"]["temperature"] == 0.8
    assert "temperature 0.8" in (run / "eval_t0.8.md").read_text()
    assert (run / "eval.json").read_text() == "{}"
    capsys.readouterr()
    one_line_error(capsys, evaluate_main, ["--run_dir", str(run), "--out", "../elsewhere"], "--out takes a file name")
    one_line_error(
        capsys, evaluate_main, ["--run_dir", str(run), "--bon_temperature", "0"], "--bon_temperature must be > 0"
    )


def test_evaluate_with_only_pretrain_and_sft(staged_run, tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    for name in ("world", "pretrain", "sft"):
        os.symlink(staged_run / name, run / name)
    (run / "ppo").mkdir()  # an unfinished stage (no manifest) is skipped
    result = evaluate_run(run, EvalOptions(max_prompts=4, max_new_tokens=6, bootstrap=50), log=lambda *_: None)
    assert set(result["stages"]) == {"base", "sft"}
    assert set(result["win_rates"]) == {"sft_vs_base"}
    assert result["kl_to_sft"] == {} and result["reward_model"] == {"finished": False}
    assert result["best_of_n"] is None  # no reward model to pick with
    assert result["stages"]["sft"]["proxy_score"] is None
    table = markdown_table(result)
    assert "| metric | base | sft |" in table and "reward model: not finished" in table


def test_evaluate_measures_kl_at_ppos_sampling_temperature(staged_run, tmp_path):
    """KL(PPO || SFT) is sampled and scored at the temperature of PPO's config (the one its manifest's
    kl_to_sft was measured at), not at 1 and not from a metric another version may or may not write."""
    run = tmp_path / "tempered"
    run.mkdir()
    for name in ("world", "pretrain", "sft"):
        os.symlink(staged_run / name, run / name)
    shutil.copytree(staged_run / "sft", run / "ppo")
    sft, tok = load_causal_lm(staged_run / "sft")
    _perturbed(sft).save_pretrained(run / "ppo")
    manifest = read_manifest(run / "ppo")
    manifest.update(
        stage="ppo",
        config={**manifest["config"], "temperature": 0.5},
        metrics={"kl_to_sft": 1.0, "kl_temperature": 2.0},
    )
    write_json_atomic(run / "ppo" / "manifest.json", manifest)
    result = evaluate_run(
        run, EvalOptions(max_prompts=4, max_new_tokens=6, bootstrap=20, best_of_n=0), log=lambda *_: None
    )
    kl = result["kl_to_sft"]["ppo"]
    assert kl["temperature"] == 0.5 and kl["n"] == 4
    ppo, _ = load_causal_lm(run / "ppo")
    prompts = [a["prompt"] for a in result["answers"]]
    expected, _ = sampled_kl(ppo, sft, tok, prompts, max_new_tokens=6, seed=0, temperature=0.5)
    at_one, _ = sampled_kl(ppo, sft, tok, prompts, max_new_tokens=6, seed=0, temperature=1.0)
    assert kl["mean"] == pytest.approx(sum(expected) / 4) and kl["mean"] != pytest.approx(sum(at_one) / 4)
    assert "| KL to SFT at temperature 0.5 (nats/answer) [95% CI] |" in markdown_table(result)
    # A PPO stage whose config names no temperature (one from elsewhere) is measured at 1.
    manifest["config"].pop("temperature")
    write_json_atomic(run / "ppo" / "manifest.json", manifest)
    result = evaluate_run(
        run, EvalOptions(max_prompts=4, max_new_tokens=6, bootstrap=20, best_of_n=0), log=lambda *_: None
    )
    assert result["kl_to_sft"]["ppo"]["temperature"] == 1.0
    assert result["kl_to_sft"]["ppo"]["mean"] == pytest.approx(sum(at_one) / 4)
    # DPO samples nothing in training: its manifest's KL is at its config's kl_temperature, and so is eval's.
    assert sampling_temperature(run / "ppo") == 1.0
    manifest["config"]["kl_temperature"] = 0.8
    write_json_atomic(run / "ppo" / "manifest.json", manifest)
    assert sampling_temperature(run / "ppo") == 0.8


def test_evaluate_without_world_or_stages_says_what_to_run(tmp_path, staged_run):
    with pytest.raises(PipelineError, match="make data"):
        evaluate_run(tmp_path)
    os.symlink(staged_run / "world", tmp_path / "world")
    with pytest.raises(PipelineError, match="make pretrain"):
        evaluate_run(tmp_path)


# ---- a run on real data: your prompts, a reward model judges ---------------------------------


@pytest.fixture(scope="module")
def run_without_world(staged_run, tmp_path_factory) -> Path:
    """The staged run's stages without its world, as a run on real data has them."""
    run = tmp_path_factory.mktemp("real_data") / "run"
    run.mkdir()
    for name in ("pretrain", "sft", "ppo", "reward"):
        os.symlink(staged_run / name, run / name)
    return run


def test_a_run_without_world_is_evaluated_on_your_prompts_by_its_reward_model(run_without_world, tmp_path):
    run = run_without_world
    with pytest.raises(PipelineError, match=r"--prompts FILE"):
        evaluate_run(run)
    prompts = write_jsonl(tmp_path / "mine.jsonl", MY_PROMPTS)
    proc = run_module(
        "evaluation.evaluate",
        "--run_dir",
        run,
        "--prompts",
        prompts,
        "--max_new_tokens",
        8,
        "--bootstrap",
        50,
        "--threads",
        1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["judge"] == {
        "kind": "reward_model",
        "path": str(run / "reward"),
        "own": True,
        "prompts": [str(prompts)],
    }
    assert result["prompts_by_family"] == {"mine.jsonl": 4} and set(result["stages"]) == {"base", "sft", "ppo"}
    # The judge's scores are the run's reward model's scores of the answers (the chat prompt as a chat).
    rm, tok = load_reward_model(run / "reward")
    asked = [r.get("prompt", r.get("messages")) for r in MY_PROMPTS]
    for name, s in result["stages"].items():
        answers = [a["responses"][name]["answer"] for a in result["answers"]]
        expected = score(rm, tok, asked, answers).tolist()
        assert [a["responses"][name]["score"] for a in result["answers"]] == pytest.approx(expected, abs=1e-5)
        assert s["judge_score"] == pytest.approx(sum(expected) / 4) and s["proxy_score"] == pytest.approx(
            s["judge_score"]
        )
        assert s["judge_score_ci"][0] <= s["judge_score"] <= s["judge_score_ci"][1]
    # Stand-ins: sft and ppo are one model, so every answer is the same and ties; KL is exactly 0.
    w = result["win_rates"]["ppo_vs_sft"]
    assert (w["win_rate"], w["ties"], w["n"], w["ceiling"]) == (0.5, 4, 4, None)
    assert result["kl_to_sft"]["ppo"]["mean"] == 0.0 and result["best_of_n"] is None
    assert all("label" not in r for a in result["answers"] for r in a["responses"].values())
    # The floor, judged by the same reward model.
    for f in result["floor"]:
        assert f["score"] == pytest.approx(sum(score(rm, tok, asked, [f["answer"]] * 4).tolist()) / 4, abs=1e-5)
        assert f["win_rate_vs_sft"]["n"] == 4 and f["win_rate_vs_sft"]["ceiling"] is None
    table = (run / "eval.md").read_text()
    assert "| mean judge score (reward model) [95% CI] |" in table and "the run's own" in table
    assert "| constant answer (floor) | judge score | win rate vs sft [95% CI] |" in table
    assert "gold" not in table


def test_another_reward_model_can_judge_your_prompts(run_without_world, tmp_path):
    judge = tmp_path / "judge"
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(run_without_world / "pretrain", num_labels=1)
    tok = AutoTokenizer.from_pretrained(run_without_world / "pretrain")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(judge)
    tok.save_pretrained(judge)
    prompts = write_jsonl(tmp_path / "mine.jsonl", MY_PROMPTS)
    options = EvalOptions(max_new_tokens=6, bootstrap=20, kl_prompts=0, prompt_files=[str(prompts)], judge_path=judge)
    result = evaluate_run(run_without_world, options, log=lambda *_: None)
    answers = [a["responses"]["sft"] for a in result["answers"]]
    asked = [r.get("prompt", r.get("messages")) for r in MY_PROMPTS]
    judged = score(*load_reward_model(judge), asked, [a["answer"] for a in answers]).tolist()
    own = score(*load_reward_model(run_without_world / "reward"), asked, [a["answer"] for a in answers]).tolist()
    assert [a["score"] for a in answers] == pytest.approx(judged, abs=1e-5)
    assert [a["proxy"] for a in answers] == pytest.approx(own, abs=1e-5) and judged != pytest.approx(own, abs=1e-3)
    assert result["judge"]["path"] == str(judge) and not result["judge"]["own"] and result["kl_to_sft"] == {}
    floor = score(*load_reward_model(judge), asked, ["I don't know."] * 4).tolist()  # judged by --judge too
    assert result["floor"][1]["score"] == pytest.approx(sum(floor) / 4, abs=1e-5)
    table = markdown_table(result)
    assert "the run's reward model score (proxy)" in table and "not the run's own" in table


def test_prompt_files_of_different_formats_each_name_their_field(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca_eval.jsonl", [{"instruction": "Name a fruit.", "output": "x"}])
    mt_bench = write_jsonl(tmp_path / "mt_bench.jsonl", [{"turns": ["Write a poem.", "Now shorter."]}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    records = load_prompt_files([str(alpaca), str(mt_bench), str(chat)], ["instruction", "turns", "prompt"])
    assert [(r["prompt"], r["family"]) for r in records] == [
        ("Name a fruit.", "alpaca_eval.jsonl"),
        ("Write a poem.", "mt_bench.jsonl"),
        ([{"role": "user", "content": "Hi"}], "chat.jsonl"),
    ]
    with pytest.raises(PipelineError, match="one per --prompts file"):
        load_prompt_files([str(alpaca), str(mt_bench), str(chat)], ["instruction", "turns"])
    with pytest.raises(PipelineError, match="mt_bench.jsonl: line 1: missing field 'instruction'"):
        load_prompt_files([str(alpaca), str(mt_bench)], ["instruction"])  # one field for every file


def test_bad_prompts_or_judge_get_one_line_errors(run_without_world, staged_run, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Fine."}, {"question": "No prompt field."}])
    one_line_error(
        capsys,
        evaluate_main,
        ["--run_dir", str(run_without_world), "--prompts", str(bad)],
        "bad.jsonl: line 2",
        "'prompt'",
    )
    one_line_error(
        capsys,
        evaluate_main,
        ["--run_dir", str(staged_run), "--judge", str(staged_run / "reward")],
        "--judge judges --prompts",
    )
    good = write_jsonl(tmp_path / "good.jsonl", MY_PROMPTS)
    one_line_error(
        capsys,
        evaluate_main,
        ["--run_dir", str(run_without_world), "--prompts", str(good), "--judge", str(staged_run / "sft")],
        "not a reward model",
    )
    no_reward = tmp_path / "no_reward"
    no_reward.mkdir()
    os.symlink(staged_run / "sft", no_reward / "sft")
    one_line_error(
        capsys,
        evaluate_main,
        ["--run_dir", str(no_reward), "--prompts", str(good)],
        "reward stage not finished",
        "--judge",
    )
    refusing = tmp_path / "refusing"  # an SFT model whose chat template refuses system turns, as Gemma's does
    refusing.mkdir()
    refusing_system_turns(staged_run / "sft", refusing / "sft")
    os.symlink(staged_run / "reward", refusing / "reward")
    system = write_jsonl(
        tmp_path / "system.jsonl",
        MY_PROMPTS + [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}],
    )
    one_line_error(
        capsys,
        evaluate_main,
        ["--run_dir", str(refusing), "--prompts", str(system)],
        "system.jsonl: line 5",
        "chat template rejects",
        "System role not supported",
    )
    assert not (refusing / "eval.json").exists()
