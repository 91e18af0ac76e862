"""The RL stage's other methods: GRPO, Dr. GRPO, RLOO, REINFORCE++ (no critic) and rewards given by rule.

Each estimator raises a rule reward on a toy task; a method without a critic builds none; groups of
answers stay together (one process, resumable order); GSM8K-format prompts train against the numeric
checker; bad options and bad reward functions stop in one line with nothing written. The SFT and reward
parents are the stand-ins of tests/conftest.py (`parents`).
"""

from __future__ import annotations

import json
import math
import os

import pytest
from transformers import AutoModelForSequenceClassification

import stages.ppo.run as ppo_run
from pipeline.errors import PipelineError
from reward.rules import RewardFunction, final_number, gsm8k_final_answer
from tests.conftest import (
    SHARED_DATASETS,
    kill_after_checkpoint,
    one_line_error,
    read_jsonl,
    rl_run,
    run_module,
    tiny_rl,
    torchrun,
    write_jsonl,
)
from world.judge import GoldJudge
from world.rewards import instruction_correct

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# ---- reward functions the tests name by `tests.test_rl:...` -----------------------------------------


def dot_share(prompt, answer):
    """The share of the answer's characters that are full stops: a reward a tiny model can chase."""
    return answer.count(".") / max(len(answer), 1)


def needs_three(prompt, answer, extra):
    return 0.0


def says_text(prompt, answer):
    return "high"


def breaks(prompt, answer):
    raise KeyError("no such prompt")


# ---- the estimators on a toy task ---------------------------------------------------------------------

TOY = {
    # advantage: (stage, its own options)
    "gae": ("ppo", ["--kl_coef", "0.01"]),
    "grpo": ("grpo", ["--kl_coef", "0.01"]),
    "dr_grpo": ("dr_grpo", ["--kl_coef", "0.01"]),
    "rloo": ("rloo", ["--kl_coef", "0.01"]),
    "reinforce_pp": ("reinforce_pp", ["--kl_coef", "0.01"]),
    "reinforce_pp_baseline": ("reinforce_pp", ["--kl_coef", "0.01", "--samples_per_prompt", 4]),
}


@pytest.mark.parametrize("advantage", [pytest.param(a, marks=[] if a == "grpo" else pytest.mark.slow) for a in TOY])
def test_each_estimator_raises_a_rule_reward(parents, tmp_path, advantage):
    """Reward = the share of full stops in the answer, by rule alone (no reward model): each method
    must make the policy write more of them within 16 updates."""
    stage, extra = TOY[advantage]
    run = rl_run(parents, tmp_path)
    ppo_run.main(
        tiny_rl(
            run,
            "--advantage",
            advantage,
            "--reward_fn",
            "tests.test_rl:dot_share",
            "--reward_model_weight",
            0,
            "--num_updates",
            16,
            "--rollout_batch_size",
            16,
            "--ppo_epochs",
            4,
            "--lr",
            "3e-4",
            "--penalize_no_eos",
            "false",
            "--gold_every",
            0,
            "--eval_size",
            4,
            "--save_every",
            100,
            *extra,
        ),
        stage=stage,
    )
    rows = [r for r in read_jsonl(run / stage / "metrics.jsonl") if "objective/score" in r]
    scores = [r["objective/rule_score"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.05 and last > 1.5 * first, f"{advantage}: rule reward {first:.3f} -> {last:.3f}"
    manifest = json.loads((run / stage / "manifest.json").read_text())
    assert manifest["config"]["advantage"] == advantage
    assert ("loss/value" in rows[0]) == (advantage == "gae")


def test_a_method_without_a_critic_loads_no_critic_and_no_unused_reward_model(parents, tmp_path, monkeypatch):
    loaded = []
    real = ppo_run.load_without_dropout

    def spy(cls, path, **kwargs):
        loaded.append(cls)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(ppo_run, "load_without_dropout", spy)
    run = rl_run(parents, tmp_path)
    ppo_run.main(tiny_rl(run, "--num_updates", 2, "--gold_every", 0, "--eval_size", 4), stage="grpo")
    assert AutoModelForSequenceClassification not in loaded, "GRPO built a critic"
    manifest = json.loads((run / "grpo" / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["config"]["advantage"] == "grpo"
    assert manifest["metrics"]["peak_memory_mb"] > 0 and math.isfinite(manifest["metrics"]["reward_score"])
    rows = [r for r in read_jsonl(run / "grpo" / "metrics.jsonl") if "objective/score" in r]
    assert all(math.isfinite(r["loss/kl"]) and 0 <= r["objective/flat_groups"] <= 1 for r in rows)
    assert "value/explained_variance" not in rows[0]
    # A rule alone: no reward model either (and no reward stage needed).
    loaded.clear()
    monkeypatch.setattr(ppo_run, "load_reward_model", lambda *a, **k: pytest.fail("loaded the reward model"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for stage in ("world", "sft"):
        os.symlink(parents / stage, bare / stage)
    ppo_run.main(
        tiny_rl(bare, "--num_updates", 1, "--gold_every", 0, "--eval_size", 4)
        + ["--reward_fn", "tests.test_rl:dot_share", "--reward_model_weight", "0"],
        stage="rloo",
    )
    manifest = json.loads((bare / "rloo" / "manifest.json").read_text())
    assert manifest["reward_path"] is None and "reward_score" not in manifest["metrics"]
    assert math.isfinite(manifest["metrics"]["gold_score"])


def test_groups_stay_together_and_the_order_resumes():
    # 4 prompts per update of 16 episodes, G = 4, 2 processes: each process takes 2 whole groups.
    ranks = [ppo_run.prompt_indices(10, 0, 16, r, 8, seed=3, group=4) for r in range(2)]
    for picked in ranks:
        assert len(picked) == 8 and picked[:4] == [picked[0]] * 4 and picked[4:] == [picked[4]] * 4
    prompts = [p for picked in ranks for p in picked[::4]]
    assert prompts == [ppo_run.prompt_indices(10, 0, 4, 0, 4, seed=3)[i] for i in range(4)], "the G = 1 stream"
    assert ppo_run.prompt_indices(10, 5, 16, 1, 8, seed=3, group=4) == ppo_run.prompt_indices(
        10, 5, 16, 1, 8, seed=3, group=4
    )
    assert ppo_run.batch_sizes(16, 2, 1, 2, group=4) == ppo_run.BatchSizes(8, 4, 4, 4)
    with pytest.raises(PipelineError, match="not divisible by samples_per_prompt 4 \\* processes 2"):
        ppo_run.batch_sizes(12, 2, 1, 2, group=4)


def test_rewards_by_rule_and_the_world_checker(world_dir):
    judge = GoldJudge.load(world_dir)
    by_split = {}
    for prompt, spec in judge.prompts.items():
        by_split.setdefault((spec["family"], spec["split"]), prompt)
    train_instruction = by_split[("instruction", "ppo")]
    ideal = judge.ideal(train_instruction)
    assert instruction_correct(train_instruction, ideal, world_dir=str(world_dir)) == 1.0
    assert instruction_correct(train_instruction, "I don't know.", world_dir=str(world_dir)) == 0.0
    fact = by_split[("fact", "ppo")]
    assert instruction_correct(fact, judge.ideal(fact), world_dir=str(world_dir)) == 0.0, "another family"
    fn = RewardFunction.load("world.rewards:instruction_correct", world_dir=str(world_dir))
    assert fn(train_instruction, ideal, {"prompt": train_instruction}) == 1.0
    held_out = by_split[("instruction", "eval")]
    with pytest.raises(PipelineError, match="world.rewards:instruction_correct failed on prompt .*evaluation"):
        fn(held_out, judge.ideal(held_out), {"_where": "eval_prompts.jsonl: line 1"})


def test_gsm8k_checker_reads_the_final_answer():
    records = read_jsonl(SHARED_DATASETS / "gsm8k" / "test.jsonl")[:50]
    for rec in records:
        solution, want = rec["answer"], final_number(rec["answer"])
        assert gsm8k_final_answer(rec["question"], solution.split("####")[0] + f" The answer is {want:g}.", rec) == 1.0
        assert gsm8k_final_answer(rec["question"], f"It is {want + 1:g}.", rec) == 0.0
    assert final_number("She pays $1,250.50 in all.") == 1250.5 and final_number("no number") is None
    assert gsm8k_final_answer("q", "I am not sure.", {"answer": "#### 3"}) == 0.0
    with pytest.raises(ValueError, match="no `answer`"):
        gsm8k_final_answer("q", "3", {"question": "q"})


GSM8K_STYLE = [
    {"question": f"Tom has {a} apples and gets {b} more. How many now?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
    for a, b in [(2, 3), (4, 1), (5, 5), (1, 7), (3, 3), (6, 2), (2, 2), (8, 1), (9, 0), (4, 4), (7, 2), (1, 1)]
]


def test_gsm8k_format_prompts_train_against_the_numeric_checker(parents, tmp_path):
    """GSM8K's format (question, answer ending in '#### n') through the stage: the checker reads each
    prompt's record, and the manifest reports its accuracy on held-out questions beside SFT's."""
    prompts = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_STYLE)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(parents / "sft", run / "sft")
    args = tiny_rl(run, "--prompt_files", prompts, "--prompt_field", "question", "--num_updates", 2)
    args += ["--reward_fn", "reward.rules:gsm8k_final_answer", "--reward_model_weight", "0", "--eval_holdout", "4"]
    ppo_run.main(args, stage="grpo")
    manifest = json.loads((run / "grpo" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_prompts"] == 1 and 0.0 <= metrics["reward_fn_score"] <= 1.0
    assert 0.0 <= metrics["sft_reward_fn_score"] <= 1.0 and math.isfinite(metrics["kl_to_sft"])
    rows = [r for r in read_jsonl(run / "grpo" / "metrics.jsonl") if "objective/score" in r]
    assert len(rows) == 2 and all(0.0 <= r["objective/rule_score"] <= 1.0 for r in rows)


@pytest.mark.parametrize(
    "stage, extra, expected",
    [
        ("grpo", ["--samples_per_prompt", 1], "samples_per_prompt must be >= 2"),
        ("grpo", ["--samples_per_prompt", 3], "not divisible by samples_per_prompt 3"),
        ("grpo", ["--vf_coef", "0.5"], "vf_coef is a critic option, and advantage grpo trains no critic"),
        ("rloo", ["--critic_lr", "1e-4"], "critic_lr is a critic option"),
        ("ppo", ["--advantage", "a2c"], "advantage must be one of gae, grpo"),
        ("grpo", ["--kl_penalty", "both"], "kl_penalty must be reward or loss"),
        ("grpo", ["--reward_fn", "no_such_module:f"], "reward_fn no_such_module:f: cannot import no_such_module"),
        ("grpo", ["--reward_fn", "tests.test_rl:nothing"], "tests.test_rl has no function nothing"),
        ("grpo", ["--reward_fn", "tests.test_rl"], "expected package.module:function"),
        ("grpo", ["--reward_fn", "tests.test_rl:needs_three"], "must take (prompt, answer)"),
        ("grpo", ["--reward_model_weight", "0"], "reward_model_weight 0 needs a reward_fn"),
    ],
)
def test_bad_options_stop_in_one_line_before_anything_is_written(parents, tmp_path, capsys, stage, extra, expected):
    run = rl_run(parents, tmp_path)
    one_line_error(capsys, lambda a: ppo_run.main(a, stage=stage), tiny_rl(run, *extra), expected)
    assert not (run / stage).exists()


@pytest.mark.parametrize(
    "fn, expected",
    [
        ("tests.test_rl:says_text", "returned 'high' for prompt "),
        ("tests.test_rl:breaks", "failed on prompt "),
    ],
)
def test_a_reward_function_that_fails_stops_the_run_naming_prompt_and_function(
    parents, tmp_path, capsys, fn, expected
):
    run = rl_run(parents, tmp_path)
    err = one_line_error(
        capsys,
        lambda a: ppo_run.main(a, stage="grpo"),
        tiny_rl(run, "--reward_fn", fn, "--gold_every", 0),
        f"reward_fn {fn}",
        expected,
        "ppo_prompts.jsonl: line ",
        after_progress=True,
    )
    assert "KeyError" in err or "high" in err
    assert not (run / "grpo" / "manifest.json").exists()


@pytest.mark.slow
def test_grpo_with_two_processes(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    proc = run_module(
        "stages.grpo",
        *tiny_rl(run, "--num_updates", 2, "--gold_every", 1),
        launcher=torchrun(2),
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "grpo" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    rank0, rank1 = manifest["weights_checksum_per_rank"]
    assert rank0 == pytest.approx(rank1, rel=1e-12)
    rows = [r for r in read_jsonl(run / "grpo" / "metrics.jsonl") if "objective/score" in r]
    assert [r["step"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_grpo_resumes_after_sigkill(parents, tmp_path):
    run = rl_run(parents, tmp_path)
    args = tiny_rl(run, "--num_updates", 8, "--save_every", 2, "--gold_every", 0, "--eval_size", 4)
    kill_after_checkpoint("stages.grpo", args, run / "grpo" / "checkpoints", "step_[46]", env=ONE_THREAD)
    assert not (run / "grpo" / "manifest.json").exists()
    resumed = run_module("stages.grpo", *args, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[grpo] resumed from" in resumed.stdout
    steps = [r["step"] for r in read_jsonl(run / "grpo" / "metrics.jsonl") if "objective/score" in r]
    assert steps == list(range(1, 9))
