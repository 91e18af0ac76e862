"""PPO math against hand-written loops: GAE, whitening, KL-shaped rewards, EOS truncation, clipped
losses, KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from stages.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    apply_no_eos_penalty,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    policy_loss,
    sample_categorical,
    truncate_after_eos,
    value_loss,
    whiten,
)

EOS, PAD = 2, 0


def _naive_gae(rewards, values, length, gamma, lam):
    """One episode, textbook recursion over its real tokens only."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values[:length], strict=False)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_a_reversed_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        want_adv, want_ret = _naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert torch.allclose(adv[b, :n], torch.tensor(want_adv), atol=1e-5)
        assert torch.allclose(ret[b, :n], torch.tensor(want_ret), atol=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.5]])
    values = torch.tensor([[0.3, 0.4, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[1.4, 1.3, 1.5]]))
    assert torch.allclose(adv, ret - values)


def test_masked_mean_var_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).var().item())
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    kept = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(2.5, abs=1e-5)


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = torch.tensor([10.0, -3.0])
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(4):
            want_kl = (logp[b, t] - ref[b, t]).item() if t < n else 0.0
            want = -0.1 * want_kl + (scores[b].item() if t == n - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(want_kl)
            assert rewards[b, t].item() == pytest.approx(want)


def test_sample_categorical_draws_each_token_at_its_probability():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    draws = sample_categorical(probs.repeat(50_000, 1)).view(50_000, 2)
    share = torch.stack([torch.bincount(draws[:, i], minlength=4) / 50_000 for i in range(2)])
    assert share[:, 1].sum() == 0 and share[1, 3] == 1, "a token of probability 0 is never drawn"
    torch.testing.assert_close(share, probs, atol=0.01, rtol=0)  # 4 sigma at n = 50,000


def test_truncate_after_eos_pads_the_rest_and_reports_missing_eos():
    responses = torch.tensor([[5, 6, EOS, 7, EOS], [EOS, 8, 9, 9, 9], [5, 6, 7, 8, 9]])
    out, mask, has_eos = truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, 6, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 6, 7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]
    scores = apply_no_eos_penalty(torch.tensor([0.5, 2.0, 3.0]), has_eos, -1.0)
    assert scores.tolist() == [0.5, 2.0, -1.0]


def test_logprobs_and_entropy_match_definitions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    lp = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t], -1)
            assert lp[b, t].item() == pytest.approx(math.log(p[tokens[b, t]].item()), abs=1e-5)
            assert ent[b, t].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)


def _naive_policy_loss(logp, old, adv, mask, eps):
    terms, clipped = [], []
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            a, c = -adv[b][t] * r, -adv[b][t] * min(max(r, 1 - eps), 1 + eps)
            terms.append(max(a, c))
            clipped.append(float(c > a))
    return sum(terms) / len(terms), sum(clipped) / len(clipped)


def test_policy_loss_without_clipping_is_the_plain_surrogate():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    new = old + torch.tensor([[0.05, -0.05, 0.01]])  # ratios within 1 +- 0.2
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, 0.2)
    ratio = torch.exp(new - old)
    assert loss.item() == pytest.approx((-adv * ratio).mean().item(), abs=1e-6)
    assert clipfrac.item() == 0.0
    assert approx_kl.item() == pytest.approx(0.5 * ((new - old) ** 2).mean().item(), abs=1e-7)


def test_policy_loss_clips_and_counts_like_a_loop():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    new = torch.tensor([[-0.2, -2.9, -0.5, -1.0], [-1.5, -0.1, -1.0, -9.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 3.0], [-1.0, 2.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss, clipfrac, _ = policy_loss(new, old, adv, mask, 0.2)
    want_loss, want_frac = _naive_policy_loss(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(want_loss, abs=1e-5)
    assert clipfrac.item() == pytest.approx(want_frac)
    assert 0 < clipfrac.item() < 1
    # A clipped token passes no gradient: raising its ratio further changes nothing.
    new_grad = new.clone().requires_grad_(True)
    policy_loss(new_grad, old, adv, mask, 0.2)[0].backward()
    assert new_grad.grad[0, 0].item() == 0.0  # ratio e^0.8 > 1.2 with positive advantage: clipped
    assert new_grad.grad[0, 2].item() != 0.0  # ratio 1: not clipped


def test_value_loss_clips_around_the_old_values():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    # Small moves: no clipping, plain half squared error.
    near = torch.tensor([[0.1, -0.1, 0.05]])
    loss, frac = value_loss(near, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * ((near - returns) ** 2).mean().item())
    assert frac.item() == 0.0
    # Moving 0.9 toward a return of 1: the clipped value (0.2) has the larger error and is used.
    far = torch.tensor([[0.9, 0.0, 0.0]])
    loss, frac = value_loss(far, old, returns, mask, 0.2)
    want = 0.5 * ((1 - 0.2) ** 2 + 1.0 + 1.0) / 3
    assert loss.item() == pytest.approx(want)
    assert frac.item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # KL twice the target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(5.4, n_steps=200)  # error -0.1
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 200 / 10000))
    before = ctl.value
    ctl.update(0.0, n_steps=100)  # error clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(float("nan"), n_steps=100)
    assert ctl.value == before
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
