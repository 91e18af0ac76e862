"""bench/ppo.py's and bench/grpo.py's TRL sides: the same optimizer steps per update as our stage (pure functions,
no TRL here), and bench-grpo run end to end at its smallest size (slow: it launches our stage and TRL)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import grpo
from bench.ppo import trl_command, trl_optimizer_steps_per_update, trl_settings
from tests.conftest import rl_run, run_module, tiny_rl


@pytest.mark.parametrize("rollout, minibatches, epochs", [(32, 2, 4), (64, 4, 4), (8, 8, 1), (16, 1, 3)])
def test_trl_settings_take_one_optimizer_step_per_minibatch_like_ours(rollout, minibatches, epochs):
    s = trl_settings(rollout, minibatches)
    # TRL 1.12: rollout (its batch_size on one process) = per_device_train_batch_size * gradient_accumulation_steps
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == rollout
    assert s["num_mini_batches"] == minibatches
    assert trl_optimizer_steps_per_update(s, epochs) == epochs * minibatches  # stages.ppo: one step per minibatch


def test_replay_counts_the_former_settings_as_one_step_per_epoch():
    # What the benchmark passed before: per-device rollout / minibatches, accumulation = minibatches.
    former = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "num_mini_batches": 2}
    assert trl_optimizer_steps_per_update(former, 4) == 4


def test_trl_settings_refuse_what_trl_cannot_replay():
    with pytest.raises(ValueError, match="accumulat"):
        trl_settings(32, 2, gradient_accumulation=2)
    with pytest.raises(ValueError, match="divisible"):
        trl_settings(30, 4)


def test_trl_command_passes_the_matching_settings():
    a = argparse.Namespace(
        updates=10,
        rollout_batch_size=32,
        num_minibatches=2,
        ppo_epochs=4,
        max_new_tokens=24,
        temperature=0.7,
        lr=1e-5,
        kl_coef=0.05,
        seed=0,
    )
    cmd = trl_command(Path("python"), Path("run"), a)
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--per_device_train_batch_size"] == "32" and flags["--gradient_accumulation_steps"] == "1"
    assert flags["--num_mini_batches"] == "2" and flags["--local_rollout_forward_batch_size"] == "32"
    assert flags["--rollout_batch_size"] == "32" and flags["--ppo_epochs"] == "4"


# ---- bench/grpo.py: our GRPO against TRL's GRPOTrainer ------------------------------------------


@pytest.mark.parametrize("rollout, minibatches, epochs, group", [(32, 2, 4, 4), (64, 4, 2, 8), (8, 1, 1, 2)])
def test_grpo_trl_settings_replay_our_update(rollout, minibatches, epochs, group):
    s = grpo.trl_settings(rollout, minibatches, epochs, group)
    # one generation of `rollout` episodes, epochs x minibatches optimizer steps on it (stages.ppo: one per minibatch)
    assert grpo.trl_shape(s) == (rollout, epochs * minibatches)
    assert s["per_device_train_batch_size"] == rollout // minibatches and s["gradient_accumulation_steps"] == 1


def test_grpo_trl_settings_refuse_what_does_not_divide():
    with pytest.raises(ValueError, match="num_generations"):
        grpo.trl_settings(30, 2, 4, 4)
    with pytest.raises(ValueError, match="num_minibatches"):
        grpo.trl_settings(32, 3, 4, 4)


def test_grpo_commands_give_both_sides_the_same_shape():
    a = argparse.Namespace(
        updates=10,
        rollout_batch_size=32,
        num_generations=4,
        num_minibatches=2,
        ppo_epochs=4,
        max_new_tokens=24,
        temperature=0.7,
        lr=1e-5,
        kl_coef=0.05,
        seed=0,
        threads=1,
        context=128,
    )
    ours = grpo.our_command("grpo", Path("run"), a)
    flags = dict(zip(ours[3::2], ours[4::2], strict=True))
    assert flags["--advantage"] == "grpo" and flags["--kl_penalty"] == "loss" and flags["--samples_per_prompt"] == "4"
    assert flags["--loss_aggregation"] == "sequence" and flags["--threads"] == "1"
    trl = grpo.trl_command(Path("run"), a)
    tflags = dict(zip(trl[2::2], trl[3::2], strict=True))
    assert tflags["--num_generations"] == "4" and tflags["--beta"] == flags["--kl_coef"] == "0.05"
    assert tflags["--per_device_train_batch_size"] == "16" and tflags["--steps_per_generation"] == "2"
    assert tflags["--num_iterations"] == flags["--ppo_epochs"] == "4" and tflags["--threads"] == "1"
    assert tflags["--max_new_tokens"] == flags["--max_new_tokens"] and tflags["--lr"] == flags["--lr"]
    ppo = dict(zip(*[iter(grpo.our_command("ppo", Path("run"), a)[3:])] * 2, strict=True))
    assert ppo["--advantage"] == "gae" and ppo["--rollout_batch_size"] == "32" and ppo["--threads"] == "1"


@pytest.mark.slow
def test_bench_grpo_smoke(tmp_path):
    """`make bench-grpo` at the smallest size: one round of ours, TRL and our PPO, the table and the JSON."""
    grpo.main(
        [
            *("--updates 1 --rollout_batch_size 8 --num_generations 4 --num_minibatches 2 --ppo_epochs 1").split(),
            *("--max_new_tokens 4 --n_layers 1 --hidden_size 32 --repeats 1 --out").split(),
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "grpo.json").read_text())
    for side in ("ours", "trl", "ours_ppo"):
        assert result["best"][side]["episodes"] == 8 and result["best"][side]["optimizer_steps_per_update"] == 2
        assert result["best"][side]["threads"] == 1
    assert result["ratio"]["best"] > 0 and (tmp_path / "grpo.md").is_file()


# ---- bench/pretrain.py: nanoGPT's own train.py beside our stage ----------------------------------

FAKE_TRAIN = """
import os, pickle, sys
import numpy as np
exec(open("configurator.py").read())  # nanoGPT reads its overrides from the working directory
meta = pickle.load(open(os.path.join("data", dataset, "meta.pkl"), "rb"))
tokens = np.fromfile(os.path.join("data", dataset, "train.bin"), dtype=np.uint16)
assert tokens.max() < meta["vocab_size"], "tokens outside the vocabulary"
os.makedirs(out_dir, exist_ok=True)
seen = [meta["vocab_size"], len(tokens), batch_size, block_size, compile, device, os.environ["OMP_NUM_THREADS"]]
open(os.path.join(out_dir, "seen.txt"), "w").write(" ".join(map(str, seen)))
for it in range(max_iters + 1):
    print(f"iter {it}: loss 1.2345, time {100.0 * (it + 1):.2f}ms, mfu -100.00%")
"""

FAKE_CONFIGURATOR = """
import sys
from ast import literal_eval
for arg in sys.argv[1:]:
    key, val = arg[2:].split("=", 1)
    assert key in globals(), key
    try:
        globals()[key] = literal_eval(val)
    except (SyntaxError, ValueError):
        globals()[key] = val
"""


def fake_nanogpt_tree(root: Path) -> Path:
    tree = root / "nanoGPT"
    tree.mkdir()
    # nanoGPT's train.py declares its settings before reading the overrides; the fake declares the ones it is given.
    settings = {"dataset": "''", "out_dir": "''", "batch_size": 0, "block_size": 0, "compile": 1, "device": "'gpu'"}
    names = "max_iters dtype n_layer n_head n_embd gradient_accumulation_steps dropout bias eval_interval eval_iters"
    settings |= dict.fromkeys([*names.split(), "log_interval", "always_save_checkpoint", "wandb_log"], 0)
    defaults = "".join(f"{k} = {v}\n" for k, v in settings.items())
    (tree / "train.py").write_text(defaults + FAKE_TRAIN)
    (tree / "configurator.py").write_text(FAKE_CONFIGURATOR)
    return tree


def test_nanogpt_side_runs_its_train_py_on_our_tokens_and_reads_its_own_timings(tmp_path):
    import torch

    from bench.pretrain import WARMUP, Shape, nanogpt, write_nanogpt_data

    tree = fake_nanogpt_tree(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    stream = torch.randint(0, 1201, (5000,))
    write_nanogpt_data(work, stream, 1201)
    (work / "configurator.py").symlink_to(tree / "configurator.py")
    shape = Shape("t", 2, 64, 2, 32, 4)
    steps = 5
    tps = nanogpt(tree, work, shape, steps, threads=1)
    # iterations WARMUP..WARMUP+steps-1 took (it + 1) * 100 ms each
    seconds = sum(0.1 * (it + 1) for it in range(WARMUP, WARMUP + steps))
    assert tps == pytest.approx(steps * 4 * 32 / seconds)
    seen = (work / "out" / "seen.txt").read_text().split()
    assert seen == ["1201", "5000", "4", "32", "False", "cpu", "1"]
    nanogpt(tree, work, shape, steps, threads=2, compile_=True)  # --compile: its own compile too
    assert (work / "out" / "seen.txt").read_text().split()[4:] == ["True", "cpu", "2"]
    assert sorted(p.name for p in tree.iterdir()) == ["configurator.py", "train.py"]  # the tree is not written to


def test_nanogpt_timings_too_few_iterations_is_an_error():
    from bench.pretrain import Shape, nanogpt_tokens_per_s

    out = "iter 0: loss 2.0, time 5.00ms, mfu -100.00%\niter 3: loss 2.0, time 5.00ms, mfu -100.00%\n"
    with pytest.raises(RuntimeError, match="1 timed iterations, expected 4"):
        nanogpt_tokens_per_s(out, Shape("t", 1, 8, 1, 8, 1), 4)


def test_our_side_times_the_stage_step(tmp_path):
    import torch

    from bench.pretrain import Shape, ours
    from data.tokenizer import train_tokenizer
    from pipeline.runtime import setup

    texts = [f"document {i} says the number {i * 7} twice: {i * 7}." for i in range(200)]
    tokenizer = train_tokenizer(texts, 300)
    stream = torch.tensor([t for s in texts for t in tokenizer(s)["input_ids"]])
    tps, first, params = ours(Shape("t", 1, 32, 2, 16, 2), tokenizer, stream, 3, setup(0, "no"))
    assert tps > 0 and first > 0
    # tied embedding; one block: q, k, v, o, the SwiGLU MLP at 8/3 x 32 rounded up to 128, two norms; final norm
    assert params == len(tokenizer) * 32 + (4 * 32 * 32 + 3 * 32 * 128 + 2 * 32) + 32


# ---- bench/ppo_flops.py: the work our PPO loop does, counted ---------------------------------------


def test_ppo_flops_counts_the_rollout_once_and_the_update_per_epoch(parents, tmp_path):
    """Twice the PPO epochs on the same rollouts: the same rollout FLOPs, about twice the update's (the
    shuffled minibatches pad attention a little differently)."""
    counts = []
    for epochs in (1, 2):
        run = rl_run(parents, tmp_path, f"run{epochs}")
        args = tiny_rl(run, "--num_updates", 1, "--ppo_epochs", epochs, "--gold_every", 0, "--eval_size", 4)
        proc = run_module("bench.ppo_flops", *args, env={"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, two = counts
    assert one["updates"] == two["updates"] == 1
    assert one["rollout"] == two["rollout"] > 0
    assert two["update"] / one["update"] == pytest.approx(2, rel=0.05)
