"""PPO stage: smoke, PPO raises a toy reward, LoRA, two processes, resume after SIGKILL, NaN guard,
bad input. The SFT and reward parents are stand-ins built from the tiny pretrained model."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import stages.ppo.run as ppo_run
from data.formats.prompts import prompt_of
from data.tokenizer import train_tokenizer
from evaluation.evaluate import EvalOptions, evaluate_run
from pipeline.errors import PipelineError
from pipeline.generation import chat_ids, left_pad
from pipeline.packing import packs_sequences
from tests.conftest import (
    NO_SYSTEM_TEMPLATE,
    PPO_GOLD_KEYS,
    PPO_UPDATE_KEYS,
    assert_replicas_saved,
    kill_after_checkpoint,
    one_line_error,
    read_jsonl,
    rl_run,
    run_module,
    tiny_rl,
    torchrun,
    write_jsonl,
)

# Tiny models are faster on one thread, and two cores are shared with other test processes.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@contextmanager
def watching_the_reference(monkeypatch, sft_dir: Path):
    """Spy on every use of the reference model: its logits on a fixed input must stay the SFT's."""
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    probe = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        want = sft(input_ids=probe).logits
    diffs = []
    original = ppo_run.reference

    @contextmanager
    def spy(policy, ref_model):
        with original(policy, ref_model) as ref:
            with torch.no_grad():
                diffs.append((ref(input_ids=probe).logits - want).abs().max().item())
            yield ref

    monkeypatch.setattr(ppo_run, "reference", spy)
    yield diffs


def changed_params(stage_dir: Path, sft_dir: Path) -> float:
    a = AutoModelForCausalLM.from_pretrained(stage_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    assert a.keys() == b.keys()
    return sum(int(not torch.equal(a[k], b[k])) for k in a) / len(a)


def test_smoke_logs_finite_metrics_changes_policy_not_reference(parents, tmp_path, monkeypatch):
    run = rl_run(parents, tmp_path)
    with watching_the_reference(monkeypatch, run / "sft") as diffs:
        ppo_run.main(tiny_rl(run))
    assert diffs and max(diffs) < 1e-5, f"reference drifted from the SFT model: {max(diffs)}"
    stage = run / "ppo"
    rows = read_jsonl(stage / "metrics.jsonl")
    updates = [r for r in rows if "objective/score" in r]
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    for r in updates:
        for key in PPO_UPDATE_KEYS:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
    gold = [r for r in rows if "gold/score" in r]
    assert [r["step"] for r in gold] == [0, 2, 4] and all(math.isfinite(r[k]) for r in gold for k in PPO_GOLD_KEYS)
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-3), "policy and reference start equal"

    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "ppo" and manifest["parent"]["path"] == str(run / "sft")
    for key in (
        "reward_score",
        "sft_reward_score",
        "kl_to_sft",
        "gold_score",
        "sft_gold_score",
        "gold_win_rate",
        "hallucination_rate",
        "sft_hallucination_rate",
        "gold_win_rate_ceiling",
    ):
        assert math.isfinite(manifest["metrics"][key]), key
    # The phases of every update, within the loop's time (which also holds the gold checks and logging).
    phases = manifest["metrics"]["phase_seconds"]
    assert set(phases) == {"generate", "score", "reference", "values", "update"}
    assert 0 < min(phases.values()) and sum(phases.values()) <= manifest["metrics"]["train_seconds"]
    assert (
        0.5 <= manifest["metrics"]["gold_win_rate_ceiling"]
        and manifest["metrics"]["gold_win_rate"] <= manifest["metrics"]["gold_win_rate_ceiling"]
    )
    assert not (stage / "checkpoints").exists()
    assert changed_params(stage, run / "sft") > 0.5, "PPO did not update the policy"
    tok = AutoTokenizer.from_pretrained(stage)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert (stage / "generation_config.json").is_file()


def test_rollout_logprobs_equal_a_full_forward(parents):
    """The sampling loop's log-probs (KV cache, left padding) equal a fresh forward's in fp32. (PPO's
    'old' log-probs come from that forward itself: under bf16 the two paths differ.)"""
    model = AutoModelForCausalLM.from_pretrained(parents / "sft").eval()
    tok = AutoTokenizer.from_pretrained(parents / "sft")
    prompts = ["Who is Ana Lint?", "Say the word river three times please, twice over.", "Hi"]
    query, query_mask = left_pad([chat_ids(tok, p) for p in prompts], tok.pad_token_id)
    torch.manual_seed(0)
    raw, logprobs = ppo_run.sample(model, query, query_mask, 10, 0.7, tok.eos_token_id, tok.pad_token_id)
    responses, mask, _ = ppo_run.truncate_after_eos(raw, tok.eos_token_id, tok.pad_token_id)
    seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1)
    assert packs_sequences(model)
    for packed in (False, True):
        with torch.no_grad():
            logits = ppo_run.response_logits(model, ppo_run.episodes(seq, seq_mask, mask, packed), 0.7)
        again = ppo_run.logprobs_from_logits(logits, responses)
        assert torch.allclose(logprobs * mask, again * mask, atol=1e-4), packed


def test_packed_episodes_give_the_padded_results_and_gradients(parents):
    """Packed forwards (one row, no padding) compute what the padded rows compute: log-probs,
    values, reward at the last token, and the gradients of a PPO-like loss."""
    policy = AutoModelForCausalLM.from_pretrained(parents / "sft").eval()
    critic = ppo_run.Critic(AutoModelForSequenceClassification.from_pretrained(parents / "reward").eval(), offset=0.5)
    reward = AutoModelForSequenceClassification.from_pretrained(parents / "reward").eval()
    assert all(packs_sequences(m) for m in (policy, critic.body, reward))
    tok = AutoTokenizer.from_pretrained(parents / "sft")
    query, query_mask = left_pad(
        [chat_ids(tok, p) for p in ("Who is Ana Lint?", "Hi", "Say river twice.")], tok.pad_token_id
    )
    responses = torch.tensor([[11, 12, 13, tok.eos_token_id], [14, tok.eos_token_id, 0, 0], [15, 16, 17, 18]])
    responses, mask, _ = ppo_run.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    seq, seq_mask = torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1)
    results = []
    for packed in (False, True):
        ep = ppo_run.episodes(seq, seq_mask, mask, packed)
        policy.zero_grad(), critic.zero_grad()
        logp = ppo_run.logprobs_from_logits(ppo_run.response_logits(policy, ep, 0.7), responses)
        values = critic(ep)
        ((logp * mask).sum() + (values * mask).square().sum()).backward()
        grads = [p.grad.clone() for p in (*policy.parameters(), *critic.parameters())]
        results.append((logp * mask, values * mask, ppo_run.reward_scores(reward, ep), grads))
    (lp_a, v_a, r_a, g_a), (lp_b, v_b, r_b, g_b) = results
    assert ppo_run.episodes(seq, seq_mask, mask, True).ids.shape == (1, int(seq_mask.sum())), "no padding computed"
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_a, v_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r_a, r_b, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_a, g_b, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_actor_critic_forward_is_the_policy_and_critic_passes(parents):
    """The one module accelerate prepares computes exactly what the separate passes would."""
    policy = AutoModelForCausalLM.from_pretrained(parents / "sft").eval()
    critic = ppo_run.Critic(AutoModelForSequenceClassification.from_pretrained(parents / "reward").eval(), offset=0.5)
    tok = AutoTokenizer.from_pretrained(parents / "sft")
    seq, mask = left_pad([chat_ids(tok, p) + [5, 6, 7] for p in ("Who is Ana Lint?", "Hi")], tok.pad_token_id)
    ep = ppo_run.episodes(seq, mask, mask[:, -3:], packed=False)
    x = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        logits, values, ptx = ppo_run.ActorCritic(policy, critic)(ep, 0.7, ptx_ids=x)
        assert torch.equal(logits, ppo_run.response_logits(policy, ep, 0.7))
        assert torch.equal(values, critic(ep))
        assert torch.equal(ptx, policy(input_ids=x, labels=x).loss)
        assert ppo_run.ActorCritic(policy, critic)(ep, 0.7)[2].item() == 0.0


def test_ppo_raises_a_toy_reward(parents, tmp_path, monkeypatch):
    """Reward = share of '.' tokens in the response: PPO must make the policy say it more often."""
    run = rl_run(parents, tmp_path)
    tok = AutoTokenizer.from_pretrained(run / "sft")
    target = tok.convert_tokens_to_ids(".")

    def share_of_target(reward_model, ep):
        responses = ep.seq[:, -ep.resp_mask.shape[1] :]
        return ((responses == target) * ep.resp_mask).sum(1) / ep.resp_mask.sum(1)

    monkeypatch.setattr(ppo_run, "reward_scores", share_of_target)
    ppo_run.main(
        tiny_rl(
            run,
            "--num_updates",
            20,
            "--rollout_batch_size",
            16,
            "--num_minibatches",
            2,
            "--ppo_epochs",
            4,
            "--lr",
            "3e-4",
            "--kl_coef",
            "0.01",
            "--penalize_no_eos",
            "false",
            "--gold_every",
            0,
            "--eval_size",
            4,
            "--save_every",
            100,
        )
    )
    scores = [r["objective/score"] for r in read_jsonl(run / "ppo" / "metrics.jsonl") if "objective/score" in r]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.3, f"reward did not rise: {first:.3f} -> {last:.3f}"


def test_lora_policy_shares_the_backbone_with_the_reference_and_saves_merged(parents, tmp_path, monkeypatch):
    run = rl_run(parents, tmp_path)
    with watching_the_reference(monkeypatch, run / "sft") as diffs:
        ppo_run.main(tiny_rl(run, "--lora_r", 4, "--lora_alpha", 32, "--lr", "3e-3", "--ema_decay", "0.5"))
    assert diffs and max(diffs) < 1e-5, "adapters must be off for the reference"
    stage = run / "ppo"
    assert not (stage / "adapter_config.json").exists(), "LoRA must be merged into a plain checkpoint"
    assert 0 < changed_params(stage, run / "sft") < 1, "merged LoRA changes the adapted matrices only"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert (
        manifest["metrics"]["trainable_params"]
        < sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(run / "sft").parameters()) / 4
    )


@pytest.mark.slow
def test_two_processes_with_torchrun(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    proc = run_module(
        "stages.ppo",
        *tiny_rl(
            run,
            "--num_updates",
            2,
            "--ptx_coef",
            "0.5",
            "--ptx_length",
            32,
            "--ema_decay",
            "0.9",
            "--gold_every",
            1,
            "--threads",
            0,  # the default: the cores shared among the processes (checked below)
        ),
        launcher=torchrun(2),
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    rows = [r for r in read_jsonl(run / "ppo" / "metrics.jsonl") if "objective/score" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/ptx"]) for r in rows)
    assert_replicas_saved(manifest, AutoModelForCausalLM.from_pretrained(run / "ppo"))


@pytest.mark.slow
def test_ppo_under_fsdp2():
    """The policy + critic pair sharded as accelerate's FSDP2 plugin shards it (one unit per decoder
    layer), two rollouts and training steps against an unsharded copy (tests/fsdp2_rollout.py, gloo):
    same samples, log-probs, logits, values and rank-averaged gradients, then the saved full state
    dict, a LoRA policy merged from it, and the manifest's checksums. Caught three failures a GPU run
    would have hit: the pair was a single FSDP unit; the rollout's direct call of the policy made a
    decoder layer FSDP's root, so the first training step raised; the weight checksum of sharded
    parameters could not be gathered."""
    proc = run_module("tests.fsdp2_rollout", launcher=torchrun(2), env=ONE_THREAD, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_step_count(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    args = tiny_rl(run, "--num_updates", 10, "--save_every", 2, "--gold_every", 5, "--eval_size", 4)
    kill_after_checkpoint("stages.ppo", args, run / "ppo" / "checkpoints", "step_[46]", env=ONE_THREAD)
    assert not (run / "ppo" / "manifest.json").exists(), "killed before the end: no manifest"
    resumed = run_module("stages.ppo", *args, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert int(resumed.stdout.split("(step ")[1].split(")")[0]) >= 2
    steps = [r["step"] for r in read_jsonl(run / "ppo" / "metrics.jsonl") if "objective/score" in r]
    assert steps == list(range(1, 11)), "every update logged once, as in an uninterrupted run"
    assert json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]["updates"] == 10


def test_nan_reward_stops_with_one_line_and_keeps_the_last_good_checkpoint(parents, tmp_path, monkeypatch, capsys):
    run = rl_run(parents, tmp_path)
    real, calls = ppo_run.reward_scores, []

    def poisoned(*args):
        calls.append(1)
        scores = real(*args)
        return scores if len(calls) < 3 else scores * float("nan")  # update 3 goes bad

    monkeypatch.setattr(ppo_run, "reward_scores", poisoned)
    err = _fails(
        capsys, tiny_rl(run, "--num_updates", 4, "--save_every", 2, "--gold_every", 0), "non-finite reward", "update 3"
    )
    assert "checkpoint" in err
    assert [p.name for p in (run / "ppo" / "checkpoints").iterdir()] == ["step_2"]
    assert not (run / "ppo" / "manifest.json").exists()


def test_runaway_kl_stops(parents, tmp_path, capsys):
    run = rl_run(parents, tmp_path)
    _fails(
        capsys,
        tiny_rl(run, "--num_updates", 6, "--lr", "0.05", "--max_kl", "0.5", "--gold_every", 0, "--save_every", 1),
        "exceeds max_kl 0.5",
    )
    assert not (run / "ppo" / "manifest.json").exists()


def test_batch_sizes_divide_exactly():
    assert ppo_run.batch_sizes(64, 4, 2, 2) == ppo_run.BatchSizes(per_process=32, minibatch=8, micro=4)
    with pytest.raises(
        PipelineError, match=r"^rollout_batch_size 30 is not divisible by num_minibatches 4 \* processes 2$"
    ):
        ppo_run.batch_sizes(30, 4, 1, 2)
    with pytest.raises(PipelineError, match="gradient_accumulation 3"):
        ppo_run.batch_sizes(16, 2, 3, 1)


def test_prompt_order_is_shared_out_across_processes_and_reproducible():
    n, rbs, per = 10, 8, 4
    ranks = [ppo_run.prompt_indices(n, 0, rbs, r, per, seed=1) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == ppo_run.prompt_indices(n, 0, rbs, 0, per, seed=1)
    first_pass = ranks[0] + ranks[1] + ppo_run.prompt_indices(n, 1, rbs, 0, per, seed=1)[:2]
    assert sorted(first_pass) == list(range(n)), "one pass sees every prompt once"


def _fails(capsys, argv, *expected) -> str:
    return one_line_error(capsys, ppo_run.main, argv, *expected, after_progress=True)


def test_bad_input_gets_one_line_error_and_no_manifest(parents, tmp_path, capsys):
    run = rl_run(parents, tmp_path)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    os.symlink(parents / "world", empty / "world")
    _fails(capsys, tiny_rl(empty), "make sft")
    os.symlink(parents / "sft", empty / "sft")
    _fails(capsys, tiny_rl(empty), "make reward")

    # A reward model with another tokenizer, then one with another chat template.
    other = tmp_path / "other_reward"
    shutil.copytree(parents / "reward", other)
    foreign = train_tokenizer([f"word{i} and more words {i * 7}" for i in range(200)], vocab_size=300)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (other / f).unlink(missing_ok=True)
    foreign.save_pretrained(other)
    _fails(capsys, tiny_rl(run, "--reward_path", other), "different tokenizers")
    shutil.rmtree(other)
    shutil.copytree(parents / "reward", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = tok.chat_template.replace("<|assistant|>", "<|assistant|> ")
    (other / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(other)
    _fails(capsys, tiny_rl(run, "--reward_path", other), "different chat templates")

    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi"}, {"prompt": "tell me " * 40}])
    _fails(
        capsys,
        tiny_rl(run, "--prompt_files", long_prompt),
        "long.jsonl: line 2",
        "max_prompt_length 52",
        "skip_long_prompts",
    )
    _fails(
        capsys,
        tiny_rl(
            run,
            "--prompt_files",
            write_jsonl(tmp_path / "all_long.jsonl", [{"prompt": "tell me " * 40}]),
            "--skip_long_prompts",
            "true",
        ),
        "all_long.jsonl",
        "no prompt fits max_prompt_length 52",
    )
    not_user = write_jsonl(
        tmp_path / "turns.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    _fails(capsys, tiny_rl(run, "--prompt_files", not_user), "turns.jsonl: line 1", "messages", "user turn")
    no_prompt = write_jsonl(tmp_path / "noprompt.jsonl", [{"question": "Hi"}])
    _fails(capsys, tiny_rl(run, "--prompt_files", no_prompt), "noprompt.jsonl: line 1", "'prompt'")
    no_turns = write_jsonl(tmp_path / "noturns.jsonl", [{"turns": ["Hi"]}, {"turns": []}])
    _fails(
        capsys, tiny_rl(run, "--prompt_files", no_turns, "--prompt_field", "turns"), "noturns.jsonl: line 2", "'turns'"
    )
    _fails(capsys, tiny_rl(run, "--max_prompt_length", 60), "exceeds the model's context of 64")
    _fails(
        capsys,
        tiny_rl(run, "--rollout_batch_size", 30, "--num_minibatches", 4),
        "rollout_batch_size 30 is not divisible by num_minibatches 4 * processes 1",
    )
    _fails(capsys, tiny_rl(run, "--temperature", 0), "temperature")
    _fails(capsys, tiny_rl(run, "--max_new_tokens", 0), "max_new_tokens")
    _fails(capsys, tiny_rl(run, "--no_such_option", 1), "no_such_option")
    assert not (run / "ppo" / "manifest.json").exists()


def test_messages_prompts_are_accepted(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    prompts = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hello number {i}"}]} for i in range(8)]
    )
    ppo_run.main(
        tiny_rl(
            run,
            "--prompt_files",
            prompts,
            "--num_updates",
            1,
            "--eval_files",
            prompts,
            "--gold_every",
            1,
            "--padding_free",
            "false",
        )
    )  # the padded path, end to end
    metrics = json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]
    assert "gold_score" not in metrics and math.isfinite(metrics["reward_score"]), "not world prompts: no gold judge"


def test_prompts_from_another_field_or_a_list_of_turns():
    """--prompt_field reads benchmark files as they are: AlpacaEval's `instruction`, MT-Bench's `turns`
    (the first turn; the second follows the model's own answer)."""
    assert prompt_of({"instruction": "Name a fruit.", "output": "x"}, "instruction") == "Name a fruit."
    assert prompt_of({"turns": ["Write a poem.", "Now shorter."]}, "turns") == "Write a poem."
    messages = [{"role": "user", "content": "Hi"}]
    assert prompt_of({"messages": messages}, "instruction") == messages
    with pytest.raises(PipelineError, match="line 3: missing field 'instruction'"):
        prompt_of({"prompt": "Hi", "_where": "a.jsonl: line 3"}, "instruction")


def test_prompts_over_the_length_limit_can_be_dropped(parents, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(parents / "sft")
    prompts = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Hi"}, {"prompt": "tell me " * 40}, {"prompt": "Yo"}])
    with pytest.raises(PipelineError, match="mixed.jsonl: line 2: prompt is"):
        ppo_run.load_prompts([str(prompts)], tokenizer, 52)
    kept, ids, records = ppo_run.load_prompts([str(prompts)], tokenizer, 52, skip_long=True)
    assert [r["prompt"] for r in records] == kept
    assert kept == ["Hi", "Yo"] and all(len(i) <= 52 for i in ids)
    assert "dropped 1 of 3 prompts over max_prompt_length 52, first: " in capsys.readouterr().out


def test_a_prompt_the_chat_template_refuses_is_named(parents, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(parents / "sft")
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    prompts = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "Hi"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        ],
    )
    with pytest.raises(
        PipelineError,
        match="chat.jsonl: line 2: the tokenizer's chat template rejects this conversation: System role not supported",
    ):
        ppo_run.load_prompts([str(prompts)], tokenizer, 52)


def test_a_prompt_set_of_your_own_holds_some_out_for_the_final_evaluation(parents, tmp_path):
    """Training on prompts of your own, with no --eval_files: a seeded tenth (at most eval_holdout) of them
    is kept out of training, the manifest reports reward and KL to SFT on them, and `make eval` evaluates
    every stage on them, even with the world in the run (`make` writes one into every run)."""
    (kept, kept_ids), (held, held_ids) = ppo_run.hold_out([list("abcdefghij"), [[i] for i in range(10)]], 3, seed=0)
    assert sorted(kept + held) == list("abcdefghij") and len(held) == 3 and not set(kept) & set(held)
    assert [[ord(p) - ord("a")] for p in held] == held_ids and ppo_run.hold_out(
        [list("abcdefghij"), [[i] for i in range(10)]], 3, 0
    )[1][0] == held

    run = rl_run(parents, tmp_path)
    records = [
        {"prompt": f"Tell me about number {i}."}
        if i % 2
        else {"messages": [{"role": "user", "content": f"Tell me about number {i}."}]}
        for i in range(40)
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", records)
    ppo_run.main(tiny_rl(run, "--prompt_files", prompts, "--num_updates", 1, "--ptx_coef", 0))
    manifest = json.loads((run / "ppo" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert (
        metrics["eval_prompts"] == 4 and math.isfinite(metrics["reward_score"]) and math.isfinite(metrics["kl_to_sft"])
    )
    assert "gold_win_rate" not in metrics  # the world's judge knows none of these prompts
    # The held-out prompts are kept beside the policy, as written, and `make eval` evaluates on them.
    saved = read_jsonl(run / "ppo" / "heldout_prompts.jsonl")
    assert (
        manifest["heldout_prompts"] == "heldout_prompts.jsonl" and len(saved) == 4 and all(r in records for r in saved)
    )
    result = evaluate_run(run, EvalOptions(max_new_tokens=4, bootstrap=10, kl_prompts=0), log=lambda *_: None)
    assert result["judge"]["prompts"] == [str(run / "ppo" / "heldout_prompts.jsonl")] and result["num_prompts"] == 4
    assert [a["prompt"] for a in result["answers"]] == [prompt_of(r) for r in saved]
    # --judge also judges these; the run's own reward model named by another path is still its own.
    options = EvalOptions(max_new_tokens=4, bootstrap=10, kl_prompts=0, judge_path=(run / "reward").resolve())
    judged = evaluate_run(run, options, log=lambda *_: None)
    assert judged["judge"]["own"] and judged["num_prompts"] == 4
    # PPO redone on the world's prompts: evaluated on the world's, by its gold judge; no stale file left.
    ppo_run.main(tiny_rl(run, "--num_updates", 1, "--ptx_coef", 0, "--eval_size", 4))
    assert json.loads((run / "ppo" / "manifest.json").read_text())["heldout_prompts"] is None
    assert not (run / "ppo" / "heldout_prompts.jsonl").exists()
    assert (
        evaluate_run(
            run,
            EvalOptions(max_prompts=4, max_new_tokens=4, bootstrap=10, kl_prompts=0, best_of_n=0),
            log=lambda *_: None,
        )["judge"]["kind"]
        == "gold"
    )
    with pytest.raises(PipelineError, match="judged by its gold judge"):
        evaluate_run(run, EvalOptions(judge_path=run / "reward"))


# ---- audit fixes: precision, guards, dropout, evaluation ---------------------------------------------


def fp16_as_on_a_gpu(monkeypatch) -> list:
    """accelerate leaves fp16 off on a CPU (no autocast, no GradScaler); switch on both as it does on a
    GPU, so the stage's fp16 path - autocast, scaled loss, unscale, clipping, scaler step - runs here."""
    real, made = ppo_run.setup, []

    def setup(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")
        made.append(accelerator)
        return accelerator

    monkeypatch.setattr(ppo_run, "setup", setup)
    return made


def test_fp16_with_gradient_clipping_trains(parents, tmp_path, monkeypatch, own_precision):
    """Policy and critic clipped each to the bound under one optimizer: accelerate's clip_grad_norm_
    twice unscaled the optimizer twice ('unscale_() has already been called') at the first step."""
    made = fp16_as_on_a_gpu(monkeypatch)
    run = rl_run(parents, tmp_path)
    ppo_run.main(
        tiny_rl(
            run,
            "--mixed_precision",
            "fp16",
            "--grad_clip",
            0.5,
            "--num_updates",
            2,
            "--gold_every",
            0,
            "--eval_size",
            4,
            "--save_every",
            1,
        )
    )
    assert made and made[0].scaler._scale is not None, "the GradScaler scaled the loss"
    metrics = json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]
    assert math.isfinite(metrics["reward_score"]) and changed_params(run / "ppo", run / "sft") > 0.5


def test_clipping_unscales_once_and_bounds_policy_and_critic_each(own_precision):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)  # with what it has on a GPU (fp16_as_on_a_gpu)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(0)
    policy, critic = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    optimizer = accelerator.prepare(torch.optim.AdamW([*policy.parameters(), *critic.parameters()]))
    x = torch.randn(4, 8)
    # The policy's gradients far over the bound, the critic's under it.
    loss = 100 * policy(x).square().sum() + 0.01 * critic(x).sum()
    accelerator.backward(loss)
    scaled = [p.grad.clone() for p in (*policy.parameters(), *critic.parameters())]
    ppo_run.clip_grad_norms_(accelerator, [policy.parameters(), critic.parameters()], 1.0)

    def norm(grads) -> float:
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    assert norm(p.grad for p in policy.parameters()) == pytest.approx(1.0, rel=1e-5), "the policy's clipped"
    raw_critic = norm(scaled[2:]) / 1024
    assert raw_critic < 1.0, "the critic's under the bound"
    assert norm(p.grad for p in critic.parameters()) == pytest.approx(raw_critic, rel=1e-5), "unscaled, not clipped"
    optimizer.step()  # the scaler steps on gradients unscaled once


def test_bf16_rollout_and_update_compute_alike(parents, tmp_path, own_precision):
    """bf16: the rollout ran the fp32 modules without autocast and the reference was loaded in bf16,
    while the update ran under autocast: the first ratio was not 1 and KL at update 0 not 0. Now the
    first minibatch of the first epoch finds the rollout's log-probs (ratio 1, N+), and the reference
    is the policy bit for bit at update 0."""
    run = rl_run(parents, tmp_path)
    ppo_run.main(tiny_rl(run, "--mixed_precision", "bf16", "--num_updates", 2, "--gold_every", 0, "--eval_size", 4))
    updates = [r for r in read_jsonl(run / "ppo" / "metrics.jsonl") if "objective/score" in r]
    assert updates[0]["objective/kl"] == 0.0, "policy and reference compute alike at update 0"
    for r in updates:
        assert abs(r["policy/approx_kl_first"]) < 1e-7 and r["policy/clipfrac_first"] == 0.0, r
    assert updates[0]["policy/approx_kl"] > 1e-5, "later minibatches see a changed policy"


@pytest.mark.parametrize("poison", ["log-probs", "loss"])
def test_nan_in_log_probs_or_loss_stops_before_any_step(parents, tmp_path, monkeypatch, capsys, poison):
    """A NaN in the rollout's log-probs passed the guards (`nan > max_kl` is false) and the optimizer
    stepped on a NaN loss; so did a NaN loss. Now either stops the run before a step: the live weights
    are still those of the last good checkpoint (update 2)."""
    run = rl_run(parents, tmp_path)
    pairs, update, pair_class = [], [], ppo_run.ActorCritic
    monkeypatch.setattr(ppo_run, "ActorCritic", lambda *a: pairs.append(pair_class(*a)) or pairs[-1])
    real_indices = ppo_run.prompt_indices
    monkeypatch.setattr(ppo_run, "prompt_indices", lambda n, u, *a: update.append(u) or real_indices(n, u, *a))
    nan_now = lambda: update and update[-1] == 2  # noqa: E731  (update 3)
    if poison == "log-probs":
        real = ppo_run.sample  # in fp32 the rollout's log-probs are the sampling pass's
        monkeypatch.setattr(
            ppo_run,
            "sample",
            lambda *a: (lambda tokens, logprobs: (tokens, logprobs * float("nan") if nan_now() else logprobs))(
                *real(*a)
            ),
        )
    else:
        real = ppo_run.policy_loss
        monkeypatch.setattr(
            ppo_run,
            "policy_loss",
            lambda *a: (lambda pg, *rest: (pg * float("nan") if nan_now() else pg, *rest))(*real(*a)),
        )
    err = _fails(
        capsys,
        tiny_rl(run, "--num_updates", 4, "--save_every", 2, "--gold_every", 0),
        f"non-finite {poison} at update 3",
    )
    assert "last good checkpoint kept" in err
    assert [p.name for p in (run / "ppo" / "checkpoints").iterdir()] == ["step_2"]
    assert not (run / "ppo" / "manifest.json").exists()
    from safetensors.torch import load_file

    saved = load_file(run / "ppo" / "checkpoints" / "step_2" / "model.safetensors")
    live = pairs[0].state_dict()
    assert saved and all(torch.equal(live[k], v) for k, v in saved.items()), "weights moved after the last checkpoint"


def gpt2_parents(parents: Path, tmp_path: Path) -> Path:
    """A run whose SFT and reward models are tiny GPT-2s (random weights, the stand-ins' tokenizer):
    GPT-2 names its dropout rates resid_pdrop, embd_pdrop and attn_pdrop, and they default to 0.1."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from pipeline.stage import write_json_atomic

    run = tmp_path / "gpt2_run"
    run.mkdir()
    os.symlink(parents / "world", run / "world")
    tok = AutoTokenizer.from_pretrained(parents / "sft")
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    torch.manual_seed(0)
    for stage, cls in (("sft", GPT2LMHeadModel), ("reward", GPT2ForSequenceClassification)):
        cls(config).save_pretrained(run / stage)
        tok.save_pretrained(run / stage)
        write_json_atomic(run / stage / "manifest.json", {"stage": stage, "stand_in": True})
    return run


def dropout_rates(model: torch.nn.Module) -> list[tuple[str, float]]:
    """Every non-zero dropout probability in a model: dropout modules, and float rates modules keep."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            found.append((name, module.p))
        found += [(f"{name}.{k}", v) for k, v in vars(module).items() if ("drop" in k) and isinstance(v, float) and v]
    return found


def test_dropout_is_off_in_every_model_whatever_the_config_calls_it(parents, tmp_path, monkeypatch):
    """Only config keys containing 'dropout' were zeroed: GPT-2's resid_pdrop, embd_pdrop and attn_pdrop
    stayed 0.1 in the policy, reference, critic and reward model."""
    run = gpt2_parents(parents, tmp_path)
    models, real = [], ppo_run.packs_sequences  # asked of each of the four models once they are loaded
    monkeypatch.setattr(ppo_run, "packs_sequences", lambda m, *a: models.append(m) or real(m, *a))
    ppo_run.main(
        tiny_rl(run, "--num_updates", 1, "--gold_every", 0, "--eval_size", 4, "--gradient_checkpointing", "true")
    )
    assert len(models) == 4
    for model in models:
        assert dropout_rates(model) == [], type(model).__name__
    policy = models[0].train()  # train mode (gradient checkpointing): still deterministic
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, policy(input_ids=ids).logits)
    saved = json.loads((run / "ppo" / "config.json").read_text())
    assert saved["resid_pdrop"] == saved["embd_pdrop"] == saved["attn_pdrop"] == 0.0


def test_a_rollout_of_prompts_of_one_length(parents, tmp_path):
    """Identical prompts (or one prompt): no padding, so generation's first forward took the packed
    path in inference mode and crashed ('Inference tensors do not track version counter')."""
    run = rl_run(parents, tmp_path)
    prompts = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Who is Ana Lint?"}] * 8)
    ppo_run.main(tiny_rl(run, "--prompt_files", prompts, "--num_updates", 2, "--gold_every", 0))
    rows = [r for r in read_jsonl(run / "ppo" / "metrics.jsonl") if "objective/score" in r]
    assert [r["step"] for r in rows] == [1, 2] and (run / "ppo" / "manifest.json").is_file()


def test_evaluation_scores_unfinished_answers_as_training_does(parents, tmp_path):
    """The manifest's reward scores read answers cut at max_new_tokens without the no-EOS penalty
    training applies; now reward_score is what training optimises, *_raw the reward model's own score.
    kl_to_sft is measured at the sampling temperature, which the manifest records beside it."""
    run = rl_run(parents, tmp_path)
    # One token: no greedy answer of the stand-in SFT model to these prompts is a bare EOS.
    ppo_run.main(
        tiny_rl(
            run,
            "--max_new_tokens",
            1,
            "--no_eos_penalty",
            -7,
            "--temperature",
            0.9,
            "--num_updates",
            1,
            "--gold_every",
            0,
            "--eval_size",
            8,
        )
    )
    metrics = json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]
    assert metrics["reward_score"] == metrics["sft_reward_score"] == -7.0
    assert -7.0 < metrics["reward_score_raw"] < 7.0 and -7.0 < metrics["sft_reward_score_raw"] < 7.0
    assert metrics["kl_temperature"] == 0.9 and math.isfinite(metrics["kl_to_sft"])
    # Without the penalty in training, the evaluation reads the reward model alone too.
    ppo_run.main(
        tiny_rl(
            run,
            "--max_new_tokens",
            1,
            "--penalize_no_eos",
            "false",
            "--temperature",
            0.9,
            "--num_updates",
            1,
            "--gold_every",
            0,
            "--eval_size",
            8,
        )
    )
    metrics = json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]
    assert metrics["reward_score"] == metrics["reward_score_raw"] != -7.0


def test_ema_is_refused_under_zero3_before_anything_is_written():
    """ZeRO-3 partitions the policy at prepare(): the EMA, built after it, averaged empty shards and the
    'EMA weights' saved were the raw ones (tests/test_deepspeed.py launches it)."""
    with pytest.raises(PipelineError, match=r"^ema_decay 0.9 does not work under DeepSpeed ZeRO-3 .*set ema_decay 0$"):
        ppo_run.check_ema_supported(0.9, 3)
    for decay, stage in ((0.0, 3), (0.9, 2), (0.9, None)):
        ppo_run.check_ema_supported(decay, stage)


def test_guards_name_the_first_non_finite_tensor_in_rollout_order_and_stop_a_runaway_kl(own_precision):
    """`guards` reads one Rollout: the first non-finite tensor the loss would read is named (in rollout
    order), a KL over max_kl stops the run, and a sound batch gives its mean score and summed KL."""
    from dataclasses import fields

    from accelerate import Accelerator

    from stages.ppo.config import PPOConfig

    accelerator = Accelerator(cpu=True)

    def batch(**changed):
        per_episode = {"scores", "reward", "rule_scores", "has_eos"}
        values = {
            f.name: torch.ones(2) if f.name in per_episode else torch.ones(2, 3) for f in fields(ppo_run.Rollout)
        }
        return ppo_run.Rollout(**{**values, **changed})

    def stop(why):
        raise RuntimeError(why)

    nan = torch.full((2, 3), float("nan"))
    assert ppo_run.guards(PPOConfig(max_kl=5.0), accelerator, batch(), stop) == (1.0, 3.0)
    with pytest.raises(RuntimeError, match="^non-finite values$"):
        ppo_run.guards(PPOConfig(), accelerator, batch(values=nan, advantages=nan), stop)
    with pytest.raises(RuntimeError, match="^non-finite reward$"):
        ppo_run.guards(PPOConfig(), accelerator, batch(reward=torch.tensor([1.0, float("inf")])), stop)
    with pytest.raises(RuntimeError, match="^KL to the SFT policy 3.00 exceeds max_kl 2.5"):
        ppo_run.guards(PPOConfig(max_kl=2.5), accelerator, batch(), stop)
    assert ppo_run.guards(PPOConfig(max_kl=0.0), accelerator, batch(kl=torch.full((2, 3), 9.0)), stop)[1] == 27.0
