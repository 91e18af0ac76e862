"""The tensor math of PPO for language models, as small pure functions (tested in isolation).

Shapes: B episodes, T response tokens. `mask` is 1 on real response tokens (up to and including the
first EOS) and 0 on the padding after it. Papers: Ziegler et al. 2019 (KL-shaped reward, adaptive
KL), Ouyang et al. 2022 (InstructGPT), Huang et al. 2024 ("The N+ implementation details of RLHF
with PPO", cited below as N+).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding stays 0. N+: whitened advantages."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for each position: [B, T, V], [B, T] -> [B, T] (float32 for stability)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum p z."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of [B, V] probabilities by inverting the cumulative distribution: one
    uniform number per row instead of the V exponentials torch.multinomial draws (on a CPU a tenth
    of the time per generated token at V = 512). The sum runs in float64 so no token's interval
    collapses in rounding on large vocabularies."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def truncate_after_eos(
    responses: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens after the first EOS become padding (N+: "truncate after EOS").

    Returns (responses, mask, has_eos): the mask covers the tokens up to and including the first
    EOS (all tokens when there is none); has_eos says whether the response ended by itself.
    """
    is_eos = responses == eos_id
    # Number of EOS tokens strictly before each position: 0 means "still inside the answer".
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    return torch.where(mask.bool(), responses, torch.full_like(responses, pad_id)), mask, is_eos.any(dim=1)


def apply_no_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """A response cut off by max_new_tokens gets a fixed low score instead of the reward model's
    (N+: "penalise responses that do not end with EOS"): the reward model never saw unfinished
    answers, and rambling must not pay."""
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token (the EOS, or the final token of an unfinished one)."""
    return (mask.sum(dim=1) - 1).clamp(min=0)


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward -kl_coef * (log pi - log pi_ref), plus the sequence score on the last real
    token (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2). Returns (rewards, kl per token)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response (Schulman et al. 2016), vectorised over
    the batch. Values and rewards past the last real token count as 0, so the episode ends there.
    Returns (advantages, returns = advantages + values)."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    returns = advantages + values
    return advantages * mask, returns * mask


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token", max_tokens: int = 0) -> torch.Tensor:
    """A per-token loss [B, T] to one number. "token": the mean over every response token of the batch
    (N+); "sequence": each answer's token mean, then the mean over answers (GRPO, DeepSeekMath eq. 3: a
    long answer's tokens weigh less); "constant": the sum over tokens divided by B * max_tokens, the same
    for every batch (Dr. GRPO, Liu et al. 2025: no bias towards long wrong answers or short right ones)."""
    if how == "token":
        return masked_mean(x, mask)
    if how == "sequence":
        return masked_mean(x, mask, dim=1).mean()
    if how == "constant":
        return (x * mask).sum() / (x.shape[0] * max_tokens)
    raise ValueError(f"no loss aggregation called {how!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float = 0.0,
    aggregation: str = "token",
    max_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), aggregated over response tokens (`aggregate`).
    The ratio is clipped to [1 - cliprange, 1 + cliprange_high] (0: cliprange; a higher upper bound
    leaves rare tokens room to grow, DAPO's clip-higher, Yu et al. 2025).

    Returns (loss, clip fraction, approx KL(old || new) = mean 0.5 (log ratio)^2)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + (cliprange_high or cliprange))
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (N+: "value clipping"): the new value may move at most cliprange_value
    from the rollout's value; take the worse of clipped and unclipped squared errors."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: steer beta so the KL to the reference stays near a target.

    error = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + error * n_steps / horizon),
    where n_steps is the number of episodes since the last update.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
