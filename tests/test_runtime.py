"""Process set-up: per-rank seeds and the CPU thread count."""

from __future__ import annotations

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
