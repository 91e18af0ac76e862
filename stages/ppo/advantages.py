"""Advantage estimators without a critic, as small pure functions (tested in isolation).

Episodes come in groups: G answers sampled for each prompt, one group after another in the batch (the
rollout keeps a group on one process). Shapes: `scores` [B] sequence rewards with B = groups * G;
`rewards`, `mask` [B, T] per response token. The estimators, each selected by the RL stage's `advantage`:

    grpo          (r - group mean) / group std                 Shao et al. 2024 (DeepSeekMath), eq. 3
    dr_grpo       r - group mean: no std, no length division   Liu et al. 2025 ("Understanding R1-Zero-like
                  (the loss sums tokens over a constant)       training", Dr. GRPO)
    rloo          r - mean of the other G - 1 answers' r       Ahmadian et al. 2024 (Back to Basics)
    reinforce_pp  per-token KL-shaped rewards, return-to-go,   Hu 2025 (REINFORCE++): the batch's mean and
                  whitened over the whole batch                 std replace a critic's baseline
    reinforce_pp_baseline  the same after subtracting each group's mean score (REINFORCE++-baseline)

PPO's own estimator (GAE over a learned critic) is in stages/ppo/math.py.
"""

from __future__ import annotations

import torch

from stages.ppo.math import whiten

CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
ADVANTAGES = ("gae", *CRITIC_FREE)
# Estimators whose baseline is the other answers to the same prompt: they need G >= 2.
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
# How each method averages its per-token loss when the config leaves it open: GRPO's per-answer mean
# then mean over answers (DeepSeekMath eq. 3, the 1/|o_i| term), Dr. GRPO's sum over a constant (no
# length bias), and the token mean over the batch elsewhere (PPO as in N+, RLOO, REINFORCE++).
LOSS_AGGREGATION = {"grpo": "sequence", "dr_grpo": "constant"}


def groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / G, G]: the answers to one prompt in a row."""
    if x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} episodes do not split into groups of {group_size}")
    return x.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, method: str, eps: float = 1e-6) -> torch.Tensor:
    """One advantage per answer [B] for grpo, dr_grpo or rloo. A group whose answers all score alike
    teaches nothing: its advantages are exactly 0 (GRPO's std is 0 there: 0 / eps, never 0 / 0)."""
    g = groups(scores.float(), group_size)
    mean = g.mean(dim=1, keepdim=True)
    if method == "grpo":
        # The sample std (n - 1), as DeepSeekMath's and TRL's implementations take it.
        return ((g - mean) / (g.std(dim=1, keepdim=True) + eps)).view(-1)
    if method == "dr_grpo":
        return (g - mean).view(-1)
    if method == "rloo":
        # The others' mean: (sum - r_i) / (G - 1); r_i - that = G / (G - 1) * (r_i - mean).
        others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
        return (g - others).view(-1)
    raise ValueError(f"no group advantage called {method!r}")


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted sum of the rewards from each response token to the end of its answer [B, T]."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return-to-go of KL-shaped per-token rewards, normalised by the mean
    and std of every response token in the batch: a global baseline instead of a critic's or a group's."""
    return whiten(returns_to_go(rewards, mask, gamma), mask)


def minus_group_mean(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score less its group's mean (REINFORCE++-baseline's first step)."""
    g = groups(scores.float(), group_size)
    return (g - g.mean(dim=1, keepdim=True)).view(-1).to(scores.dtype)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1 with d = log pi_ref - log pi (Schulman's k3, as
    GRPO's loss term, DeepSeekMath eq. 4): never negative, unbiased on samples of pi."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0
