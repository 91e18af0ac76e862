"""The critic-free estimators and the loss aggregations, against hand-computed examples."""

import math

import pytest
import torch

from stages.ppo.advantages import (
    group_advantages,
    k3_kl,
    minus_group_mean,
    reinforce_pp_advantages,
    returns_to_go,
)
from stages.ppo.math import aggregate, policy_loss


def test_grpo_normalises_by_the_group_mean_and_sample_std():
    # Group 1: scores 1, 2, 3 (mean 2, sample std 1); group 2: 0, 0, 6 (mean 2, std sqrt(12)).
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    got = group_advantages(scores, 3, "grpo", eps=0.0)
    s = math.sqrt(12)
    torch.testing.assert_close(got, torch.tensor([-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s]))


def test_equal_rewards_in_a_group_give_zero_advantage_not_nan():
    scores = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 0.0])
    for method in ("grpo", "dr_grpo", "rloo"):
        got = group_advantages(scores, 4, method)
        assert torch.isfinite(got).all(), method
        assert got[:4].abs().max().item() == 0.0, method
        assert got[4:].abs().min().item() > 0.0, method
    assert (minus_group_mean(scores, 4)[:4] == 0).all()


def test_rloo_on_two_answers_is_the_difference_to_the_other():
    scores = torch.tensor([3.0, 1.0, -1.0, 0.5])
    torch.testing.assert_close(group_advantages(scores, 2, "rloo"), torch.tensor([2.0, -2.0, -1.5, 1.5]))
    # G = 3: r_i minus the mean of the other two.
    torch.testing.assert_close(
        group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, "rloo"), torch.tensor([3.0, -1.5, -1.5])
    )


def test_dr_grpo_keeps_the_scale_no_std():
    # Scaling the rewards scales Dr. GRPO's advantages; GRPO's do not move (the std divides it out).
    scores = torch.tensor([1.0, 2.0, 4.0, 5.0])
    torch.testing.assert_close(group_advantages(scores, 4, "dr_grpo"), torch.tensor([-2.0, -1.0, 1.0, 2.0]))
    torch.testing.assert_close(
        group_advantages(10 * scores, 4, "dr_grpo"), 10 * group_advantages(scores, 4, "dr_grpo")
    )
    torch.testing.assert_close(group_advantages(10 * scores, 4, "grpo"), group_advantages(scores, 4, "grpo"))


def test_a_batch_that_does_not_split_into_groups_is_refused():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4, "grpo")


def test_returns_to_go_and_reinforce_pp_whitening():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0], [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(
        returns_to_go(rewards, mask), torch.tensor([[1.0, 1.0, 1.0, 0.0], [3.0, 2.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(
        returns_to_go(rewards, mask, gamma=0.5), torch.tensor([[0.25, 0.5, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    )
    adv = reinforce_pp_advantages(rewards, mask)
    real = adv[mask.bool()]
    # Whitened over the whole batch's response tokens (unbiased variance, as PPO's whitening); padding stays 0.
    assert abs(real.mean().item()) < 1e-6 and abs(real.std().item() - 1.0) < 1e-4
    assert (adv[~mask.bool()] == 0).all()


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert (k3_kl(logp, logp) == 0).all()
    d = torch.tensor([0.3, -0.3, 1.0])
    torch.testing.assert_close(k3_kl(logp, logp + d), torch.exp(d) - d - 1)
    assert (k3_kl(logp, logp + d) > 0).all()


def test_loss_aggregations():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(x, mask, "token").item() == pytest.approx(8 / 5)  # every token alike
    assert aggregate(x, mask, "sequence").item() == pytest.approx((1 + 4) / 2)  # every answer alike
    # Dr. GRPO: the sum over a constant, so a short answer's token weighs what a long one's does.
    assert aggregate(x, mask, "constant", max_tokens=8).item() == pytest.approx(8 / (2 * 8))
    with pytest.raises(ValueError):
        aggregate(x, mask, "answer")


def test_clip_higher_bounds_the_ratio_asymmetrically():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    sym, clipfrac, _ = policy_loss(new, old, adv, mask, cliprange=0.2)
    high, clipfrac_high, _ = policy_loss(new, old, adv, mask, cliprange=0.2, cliprange_high=0.6)
    # Symmetric: -(1.2) for the first token and -(-1 x 0.8) = 0.8 for the second, mean -0.2.
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2) and clipfrac.item() == 1.0
    # Upper bound 1.6: the first token's ratio 1.5 is inside, only the second is clipped.
    assert high.item() == pytest.approx((-1.5 + 0.8) / 2) and clipfrac_high.item() == 0.5
