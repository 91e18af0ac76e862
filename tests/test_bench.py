"""bench/ppo.py's TRL side: the same optimizer steps per update as our stage (pure functions, no TRL here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.ppo import trl_command, trl_optimizer_steps_per_update, trl_settings


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
