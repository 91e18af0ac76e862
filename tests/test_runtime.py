"""Process set-up: per-rank seeds and the CPU thread count."""

from __future__ import annotations

import json
import os

import torch

from pipeline.runtime import process_seed, set_threads


def test_rank_seeds_of_one_run_never_replay_another_runs_ranks():
    # With seed + rank, run seed 0's rank 1 drew what run seed 1's rank 0 drew.
    seeds = [process_seed(seed, rank) for seed in range(1000) for rank in range(64)]
    assert len(set(seeds)) == len(seeds)
    assert process_seed(7, 0) == 7  # a single process keeps the seed it was given


def test_threads_default_to_this_process_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(0) == max(1, cores // 2)
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert set_threads(0) == cores
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_every_stage_resumes_from_its_last_complete_checkpoint(tmp_path):
    from pipeline.stage import last_complete_checkpoint

    def accelerate_state(step: int, complete: bool = True):
        (tmp_path / f"step_{step}").mkdir()
        if complete:
            (tmp_path / f"step_{step}" / "extra.json").write_text(json.dumps({"step": step}))

    def trainer_state(step: int, state: str | None = None, weights: bool = True):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(state or json.dumps({"global_step": step}))
        if weights:
            (folder / "model.safetensors").write_bytes(b"")

    assert last_complete_checkpoint(tmp_path / "none") == (None, 0)
    accelerate_state(10)
    accelerate_state(20, complete=False)  # extra.json is written last: a cut-short save
    (tmp_path / "step_30.tmp").mkdir()  # a save in progress
    assert last_complete_checkpoint(tmp_path) == (str(tmp_path / "step_10"), 10)
    trainer_state(40)
    trainer_state(50, state='{"global_st')  # cut short
    trainer_state(60, weights=False)
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True) == (str(tmp_path / "checkpoint-40"), 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40", "step_10", "step_20", "step_30.tmp"]


def test_lora_config_is_none_at_rank_0_and_names_its_targets():
    from pipeline.lora import lora_config

    assert lora_config(0, 16, ["all-linear"]) is None
    every = lora_config(8, 16, ["all-linear"])
    assert every.r == 8 and every.lora_alpha == 16 and every.target_modules == "all-linear"
    some = lora_config(4, 8, ["q_proj", "v_proj"], dropout=0.1, task_type="SEQ_CLS", modules_to_save=["score"])
    assert set(some.target_modules) == {"q_proj", "v_proj"} and some.modules_to_save == ["score"]
    assert some.task_type == "SEQ_CLS" and some.lora_dropout == 0.1
