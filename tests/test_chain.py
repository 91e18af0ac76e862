"""The whole recipe through the Makefile on the tiny profile: data -> pretrain -> sft -> comparisons ->
reward -> ppo -> eval -> report, each stage consuming the previous one's checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import subprocess

import pytest
import torch.distributed as dist

from tests.conftest import ROOT, read_jsonl


def make(*targets: str, run, timeout: int = 900) -> subprocess.CompletedProcess:
    # Not the variables of a `make test ARGS=...` around us (make exports them): they would reach the stages.
    outer = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARGS", "LAUNCH", "SEED", "STAGE", "PROMPT")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [
            "make",
            *targets,
            f"RUN={run}",
            "PROFILE=tiny",
            "EVAL_ARGS=--max_prompts 24",
            "COMPARISONS_ARGS=--prompts 16 --k 3 --max_new_tokens 16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_make_all_on_tiny_profile(tmp_path):
    run = tmp_path / "run"
    proc = make("all", run=run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in ("pretrain", "sft", "reward", "ppo")}
    assert {s: m["stage"] for s, m in manifests.items()} == {s: s for s in manifests}
    # Each stage names the directory of the one it was built from.
    assert manifests["sft"]["parent"]["path"].endswith("pretrain")
    assert manifests["reward"]["parent"]["path"].endswith("sft")
    assert manifests["ppo"]["parent"]["path"].endswith("sft")
    policy_comparisons = read_jsonl(run / "comparisons" / "policy_comparisons.jsonl")
    assert 1 <= len(policy_comparisons) <= 16

    report = json.loads((run / "eval.json").read_text())
    for stage in ("base", "sft", "ppo"):
        assert stage in report["stages"], report["stages"].keys()
    assert "ppo_vs_sft" in report["win_rates"]
    text = (run / "report.md").read_text()
    images = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert images, "report embeds no plots"
    for image in images:
        assert (run / image).stat().st_size > 1000

    # A second `make all` finds every stage finished and redoes nothing.
    again = make("pretrain", "sft", "comparisons", "reward", "ppo", run=run)
    assert again.returncode == 0
    assert again.stdout.count("up to date") == 5, again.stdout[-3000:]

    # Moved (or named by another path), the run is the same run: nothing is redone.
    moved = tmp_path / "moved"
    run.rename(moved)
    again = make("pretrain", "sft", "comparisons", "reward", "ppo", run=moved)
    assert again.returncode == 0
    assert again.stdout.count("up to date") == 5, again.stdout[-3000:]
    run = moved

    # Another round of the loop: the PPO policy's answers ranked, the reward model retrained on every
    # comparison so far, PPO again on it; rerunning the same round finds it done.
    old_reward = (run / "reward" / "manifest.json").read_text()
    proc = make("round", run=run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 1 <= len(read_jsonl(run / "comparisons" / "ppo_round1.jsonl")) <= 16
    reward = json.loads((run / "reward" / "manifest.json").read_text())
    assert (run / "reward" / "manifest.json").read_text() != old_reward
    assert {f.rsplit("/", 1)[-1] for f in reward["config"]["train_files"]} == {
        "comparisons_train.jsonl",
        "policy_comparisons.jsonl",
        "ppo_round1.jsonl",
    }
    ppo = json.loads((run / "ppo" / "manifest.json").read_text())
    assert ppo["started"] > reward["started"]  # PPO was redone on the new reward model
    again = make("round", run=run)
    assert again.returncode == 0 and again.stdout.count("up to date") == 3, again.stdout[-3000:]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
@pytest.mark.parametrize("fails", [False, True])
def test_stage_process_leaves_no_process_group_behind(stage, fails, monkeypatch):
    """`python -m stages.X` destroys the process group its launch made, also after an error: left to
    interpreter exit, gloo's threads abort finished multi-process runs now and then (SIGABRT)."""

    def main():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if fails:
            raise ValueError("bad record")

    monkeypatch.setattr(importlib.import_module(f"stages.{stage}.run"), "main", main)
    try:
        if fails:
            with pytest.raises(ValueError, match="bad record"):
                runpy.run_module(f"stages.{stage}", run_name="__main__")
        else:
            runpy.run_module(f"stages.{stage}", run_name="__main__")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
