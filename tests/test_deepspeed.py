"""Every stage under DeepSpeed ZeRO-3, launched the way a GPU cluster launches it (`accelerate
launch --config_file pipeline/accelerate/zero3.yaml`), here on DeepSpeed's CPU accelerator with 2
processes (gloo); PPO also under ZeRO-2. Each run is checked against the same run under plain data
parallelism (torchrun): the same losses step by step and the same saved weights.

This caught, before any GPU ran it: the launcher's accumulation steps (1 in the config files)
silently replacing the stage's own; prepare() failing for want of a micro-batch size; transformers
partitioning every model as it loaded (the packing checks and PPO's frozen models saw empty
weights); loads on the main process alone after training (SFT's gold evaluation, the LoRA merges,
the reward normalisation) waiting forever on zero.Init's collective; the gathered state dict read
on every process, or asked of the model instead of the engine; the reward head's per-token outputs
taken before the engine's hook, so its backward found the head's weights released; and, with LoRA,
the engine's per-layer hooks re-gathering the weights inside the rollout's inference mode.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, free_port, read_jsonl, run_module, torchrun, write_jsonl

pytest.importorskip("deepspeed", reason="DeepSpeed is a dev dependency: pip install -e '.[dev]'")
pytestmark = pytest.mark.slow  # every test here runs two DeepSpeed processes

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "CI": "1"}


def deepspeed(config: str, nproc: int = 2) -> list[str]:
    """One of the project's DeepSpeed configs, plus the precision, accumulation steps and clipping
    bound that configs made by `accelerate config` carry: the stage's own settings (fp32 here) must win."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "pipeline/accelerate" / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "bf16",
        "--gradient_accumulation_steps",
        "1",
        "--gradient_clipping",
        "1.0",
    ]


def run_both(module: str, make_run, args: list, config: str = "zero3.yaml") -> dict[str, Path]:
    """The same stage run under DeepSpeed ("ds", ZeRO-3 unless told) and under DDP, each in its own
    run directory."""
    runs = {}
    for name, launcher in (("ds", deepspeed(config)), ("ddp", torchrun(2))):
        run = make_run(name)
        proc = run_module(module, "--run_dir", run, *args, launcher=launcher, env=ENV, timeout=400)
        assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
        runs[name] = run
    return runs


def run_with_parents(parents: Path, base: Path, name: str, stages: tuple[str, ...]) -> Path:
    """A run directory with the world and copies of the given finished stages (tiny stand-ins)."""
    run = base / name
    run.mkdir()
    (run / "world").symlink_to((parents / "world").resolve())
    for stage in stages:
        shutil.copytree(parents / stage, run / stage)
    return run


def assert_same_weights(a: Path, b: Path, atol: float = 1e-4) -> None:
    """Equal up to the rounding of a different reduction order, which Adam's first steps magnify
    (the tiny profiles' learning rates of 1e-3 and more move weights by more than 1e-3)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_pretrain_under_zero3_matches_ddp(parents, tmp_path):
    """Two micro-batches per optimizer step: the stage's --grad_accum, not the launcher's 1."""

    def make_run(name):
        return run_with_parents(parents, tmp_path, name, ())

    runs = run_both(
        "stages.pretrain", make_run, ["--profile", "tiny", "--max_steps", 4, "--grad_accum", 2, "--log_every", 1]
    )
    logs = {name: read_jsonl(run / "pretrain" / "metrics.jsonl") for name, run in runs.items()}
    assert [m["train/lr"] for m in logs["ds"]] == pytest.approx([m["train/lr"] for m in logs["ddp"]])
    assert [m["train/loss"] for m in logs["ds"]] == pytest.approx([m["train/loss"] for m in logs["ddp"]], abs=1e-5)
    manifest = json.loads((runs["ds"] / "pretrain" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert_same_weights(runs["ds"] / "pretrain", runs["ddp"] / "pretrain")


@pytest.mark.parametrize(
    "lora, config", [(False, "zero3.yaml"), (True, "zero3.yaml"), (False, "zero2.yaml")], ids=["full", "lora", "zero2"]
)
def test_ppo_under_deepspeed_matches_ddp(parents, tmp_path, lora, config):
    """Two micro-batches per minibatch, no clipping (DeepSpeed clips policy and critic together,
    the stage each on its own): every update's rollout and losses, and the saved policy, agree."""

    def make_run(name):
        return run_with_parents(parents, tmp_path, name, ("sft", "reward"))

    args = [
        "--profile",
        "tiny",
        "--num_updates",
        2,
        "--rollout_batch_size",
        8,
        "--num_minibatches",
        2,
        "--gradient_accumulation",
        2,
        "--grad_clip",
        0,
        "--eval_size",
        4,
        "--gold_every",
        0,
        "--save_every",
        10,
    ]
    runs = run_both("stages.ppo", make_run, args + (["--lora_r", 4] if lora else []), config)
    logs = {name: read_jsonl(run / "ppo" / "metrics.jsonl") for name, run in runs.items()}
    for key in ("objective/score", "objective/kl", "loss/policy", "loss/value", "policy/approx_kl"):
        assert [m[key] for m in logs["ds"]] == pytest.approx([m[key] for m in logs["ddp"]], abs=1e-5), key
    manifests = {name: json.loads((run / "ppo" / "manifest.json").read_text()) for name, run in runs.items()}
    assert manifests["ds"]["processes"] == 2
    assert manifests["ds"]["metrics"]["kl_to_sft"] == pytest.approx(manifests["ddp"]["metrics"]["kl_to_sft"], abs=1e-5)
    assert_same_weights(runs["ds"] / "ppo", runs["ddp"] / "ppo", atol=1e-6)  # a small lr: small steps
    sft = load_file(runs["ddp"] / "sft" / "model.safetensors")
    trained = load_file(runs["ds"] / "ppo" / "model.safetensors")
    assert any(not torch.equal(sft[k], trained[k]) for k in sft), "PPO under ZeRO-3 left the policy unchanged"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_under_zero3_matches_ddp(parents, tmp_path, lora):
    """SFT (TRL's SFTTrainer) from the tiny base model, then the gold evaluation on the main process."""
    world = parents / "world"
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(world / "sft_train.jsonl")[:48])
    val = write_jsonl(tmp_path / "val.jsonl", read_jsonl(world / "sft_val.jsonl")[:16])

    def make_run(name):
        run = run_with_parents(parents, tmp_path, name, ())
        shutil.copytree(parents / "sft", run / "pretrain")  # the stand-in SFT model is the tiny base model
        return run

    args = [
        "--profile",
        "tiny",
        "--train_files",
        train,
        "--val_files",
        val,
        "--max_steps",
        4,
        "--grad_accum",
        2,
        "--eval_prompts",
        4,
    ] + (["--lora_r", 4, "--lr", "1e-2"] if lora else [])
    runs = run_both("stages.sft", make_run, args)
    logs = {name: [m for m in read_jsonl(run / "sft" / "metrics.jsonl") if "loss" in m] for name, run in runs.items()}
    assert [m["loss"] for m in logs["ds"]] == pytest.approx([m["loss"] for m in logs["ddp"]], abs=1e-5)
    manifests = {name: json.loads((run / "sft" / "manifest.json").read_text()) for name, run in runs.items()}
    assert manifests["ds"]["processes"] == 2 and manifests["ds"]["metrics"]["params"] > 0
    assert manifests["ds"]["metrics"]["val_loss"] == pytest.approx(manifests["ddp"]["metrics"]["val_loss"], abs=1e-5)
    assert_same_weights(runs["ds"] / "sft", runs["ddp"] / "sft")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward_under_zero3_matches_ddp(parents, tmp_path, lora):
    """The reward model on packed K-wise groups, then its normalisation on the main process."""
    # LoRA at lr 1e-3: at 1e-2 Adam's first steps turn the reduction-order differences of the two
    # gradient paths into weight differences of 1e-4 and reference-mean differences of 2e-4 (measured;
    # at 1e-3: 7e-7 and 5e-7).
    args = ["--profile", "tiny", "--max_steps", 4] + (["--use_lora", "true", "--lr", "1e-3"] if lora else [])
    runs = run_both("stages.reward", lambda name: run_with_parents(parents, tmp_path, name, ("sft",)), args)
    logs = {
        name: [m for m in read_jsonl(run / "reward" / "metrics.jsonl") if "loss" in m] for name, run in runs.items()
    }
    assert [m["loss"] for m in logs["ds"]] == pytest.approx([m["loss"] for m in logs["ddp"]], abs=1e-5)
    metrics = {
        name: json.loads((run / "reward" / "manifest.json").read_text())["metrics"] for name, run in runs.items()
    }
    for key in ("val_pair_accuracy", "val_loss", "reference_raw_mean"):
        assert metrics["ds"][key] == pytest.approx(metrics["ddp"][key], abs=1e-4), key
    assert_same_weights(runs["ds"] / "reward", runs["ddp"] / "reward")


def test_ppo_refuses_an_ema_under_zero3(parents, tmp_path):
    """The EMA of a policy that ZeRO-3 has partitioned averages empty shards, so its 'EMA weights' were
    the raw ones: each process stops with one error line before the stage writes anything."""
    run = run_with_parents(parents, tmp_path, "ds", ("sft", "reward"))
    proc = run_module(
        "stages.ppo",
        "--run_dir",
        run,
        "--profile",
        "tiny",
        "--ema_decay",
        0.9,
        launcher=deepspeed("zero3.yaml"),
        env=ENV,
        timeout=400,
    )
    assert proc.returncode != 0
    message = (
        "error: ema_decay 0.9 does not work under DeepSpeed ZeRO-3 (the policy's weights are "
        "partitioned): use ZeRO-2 or DDP, or set ema_decay 0"
    )
    # One line from each process; the two processes write at once, so their lines may run into one.
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line.startswith(message) for line in errors), proc.stderr[-3000:]
    assert not (run / "ppo").exists()
