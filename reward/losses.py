"""Reward-model losses: pure functions of reward tensors, tested in isolation (tests/test_reward.py).

InstructGPT (Ouyang et al. 2022, sec 3.5) shows labelers K = 4..9 answers to one prompt and trains on
all C(K,2) comparisons of that prompt as ONE batch element:

    loss(theta) = -1 / C(K,2) * E_(x, y_w, y_l) [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

Keeping a prompt's comparisons together matters: spread over a shuffled dataset, each answer would be
seen K-1 times in different batches and the model overfits within one epoch. Every response is
forwarded once, then all pairs are formed from the K rewards. With K = 2 this is exactly the
Bradley-Terry pairwise loss of a chosen/rejected pair (Stiennon et al. 2020).

Layout: `rewards` is flat, one scalar per response, groups one after another; `group_sizes[g]` = K of
group g; inside a group the responses are ordered BEST FIRST, so response i beats response j iff i < j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of `chosen` beating `rejected`, elementwise."""
    return -F.logsigmoid(chosen - rejected)


def group_pairs(group_sizes: list[int] | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All C(K,2) (better, worse) index pairs into the flat reward vector, and each pair's group."""
    sizes = [int(k) for k in group_sizes]
    better, worse, group = [], [], []
    offset = 0
    for g, k in enumerate(sizes):
        if k < 2:
            raise ValueError(f"group {g} has {k} response(s); a comparison needs at least 2")
        i, j = torch.triu_indices(k, k, offset=1, device=device)
        better.append(i + offset)
        worse.append(j + offset)
        group.append(torch.full_like(i, g))
        offset += k
    return torch.cat(better), torch.cat(worse), torch.cat(group)


def ranking_loss(rewards: torch.Tensor, group_sizes: list[int] | torch.Tensor) -> torch.Tensor:
    """InstructGPT's K-wise loss: per group the mean pairwise loss over its C(K,2) pairs, then the
    mean over groups (each prompt weighs the same, whatever its K)."""
    better, worse, group = group_pairs(group_sizes, rewards.device)
    per_pair = pairwise_loss(rewards[better], rewards[worse])
    n_groups = len(group_sizes)
    per_group = torch.zeros(n_groups, dtype=per_pair.dtype, device=rewards.device).index_add(0, group, per_pair)
    pairs_per_group = torch.zeros(n_groups, dtype=per_pair.dtype, device=rewards.device).index_add(
        0, group, torch.ones_like(per_pair)
    )
    return (per_group / pairs_per_group).mean()


def pair_accuracy(rewards: torch.Tensor, group_sizes: list[int] | torch.Tensor) -> torch.Tensor:
    """Share of all pairs (over all groups) whose better response gets the higher reward (ties count 0)."""
    better, worse, _ = group_pairs(group_sizes, rewards.device)
    return (rewards[better] > rewards[worse]).float().mean()


def pair_mean_loss(rewards: torch.Tensor, group_sizes: list[int] | torch.Tensor) -> torch.Tensor:
    """The same pairs as `ranking_loss`, each weighing the same: the mean over all pairs of the batch,
    so a group of K answers weighs in proportion to its C(K,2) pairs (a ranking of 9 answers tells
    36 preferences, one of 4 tells 6). Per-prompt averaging guards against overfitting a prompt's
    answers; a model that underfits its comparisons learns more from this one."""
    better, worse, _ = group_pairs(group_sizes, rewards.device)
    return pairwise_loss(rewards[better], rewards[worse]).mean()
