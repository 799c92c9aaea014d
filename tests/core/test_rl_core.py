"""The RLHF core against plain references: KL estimators, controllers, shaped rewards, GAE,
whitening, group baselines and the PPO losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core import advantages as adv_lib
from rlhf_jax.core import kl as kl_lib
from rlhf_jax.core import losses


def ragged_batch(seed, batch=6, length=9):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(0, length + 1, batch)
    lengths[0], lengths[1] = 0, 1  # an all-masked row and a length-1 row, every seed
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return rng.randn(batch, length).astype(np.float32), rng.randn(batch, length).astype(np.float32), mask


def gae_reference(rewards, values, mask, gamma, lam):
    """The textbook recursion, over each row's real tokens only."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages, np.where(mask, advantages + values, 0.0)


@pytest.mark.parametrize("seed", range(12))
def test_gae_matches_plain_loop(seed):
    rewards, values, mask = ragged_batch(seed)
    gamma, lam = [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)][seed % 4]
    got_adv, got_ret = adv_lib.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(got_adv), ref_adv, atol=1e-6 * max(1.0, np.abs(ref_adv).max()))
    np.testing.assert_allclose(np.asarray(got_ret), ref_ret, atol=1e-6 * max(1.0, np.abs(ref_ret).max()))
    assert np.all(np.asarray(got_adv)[mask == 0] == 0)


def test_gae_with_holes_in_the_mask_skips_masked_tokens():
    rewards, values, _ = ragged_batch(3)
    mask = np.random.RandomState(0).rand(*rewards.shape) > 0.4
    got, _ = adv_lib.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.97, 0.9)
    ref, _ = gae_reference(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_kl_estimators_match_their_definitions():
    rng = np.random.RandomState(0)
    logp, ref = rng.randn(2, 50).astype(np.float32) - 2.0
    log_r = ref - logp
    np.testing.assert_allclose(kl_lib.k1(logp, ref), -log_r, rtol=1e-6)
    np.testing.assert_allclose(kl_lib.k2(logp, ref), 0.5 * log_r ** 2, rtol=1e-6)
    np.testing.assert_allclose(kl_lib.k3(logp, ref), np.exp(log_r) - 1 - log_r, rtol=1e-5, atol=1e-7)


def test_k3_is_never_negative_and_finite_on_extreme_tokens():
    logp = jnp.array([-1e-8, -50.0, -1e9, 0.0, -3.0])
    ref = jnp.array([-1e9, -1e-3, 0.0, 0.0, -3.0 + 1e-6])
    values = np.asarray(kl_lib.k3(logp, ref))
    assert np.all(values >= 0) and np.all(np.isfinite(values))
    grid = jnp.linspace(-30, 30, 2001)
    assert np.all(np.asarray(kl_lib.k3(jnp.zeros_like(grid), grid)) >= 0)


def test_monte_carlo_k1_k3_match_exact_kl():
    rng = np.random.RandomState(1)
    logits, ref_logits = rng.randn(2, 12) * 1.5
    p, q = np.exp(logits) / np.exp(logits).sum(), np.exp(ref_logits) / np.exp(ref_logits).sum()
    exact = float(np.sum(p * (np.log(p) - np.log(q))))
    np.testing.assert_allclose(float(kl_lib.full_kl(jnp.asarray(logits), jnp.asarray(ref_logits))), exact, rtol=1e-5)
    n = 200_000
    tokens = rng.choice(12, size=n, p=p)
    logp, ref = np.log(p)[tokens], np.log(q)[tokens]
    for estimator in (kl_lib.k1, kl_lib.k3):
        samples = np.asarray(estimator(jnp.asarray(logp), jnp.asarray(ref)), np.float64)
        stderr = samples.std() / np.sqrt(n)
        assert abs(samples.mean() - exact) < 4 * stderr, (estimator.__name__, samples.mean(), exact, stderr)


def test_adaptive_controller_follows_hand_computed_trajectory():
    state = kl_lib.adaptive_kl_controller(0.2, target=6.0, horizon=10000.0)
    kls, n = [3.0, 6.0, 12.0, 7.5], 64
    expected = [0.2]
    for kl in kls:  # err = clip(kl/6 - 1, -0.2, 0.2): -0.2, 0, 0.2, 0.2 (0.25 clipped)
        err = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        expected.append(expected[-1] * (1 + err * n / 10000.0))
    got = [0.2]
    for kl in kls:
        state = kl_lib.update_kl_controller(state, jnp.float32(kl), n)
        got.append(float(state.kl_coef))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(expected[1], 0.2 * (1 - 0.2 * 64 / 10000), rtol=1e-12)
    fixed = kl_lib.update_kl_controller(kl_lib.fixed_kl_controller(0.05), jnp.float32(100.0), n)
    assert float(fixed.kl_coef) == pytest.approx(0.05)


def test_kl_shaped_rewards_hand_worked():
    # row 0: EOS at t=1 (length 2); row 1: EOS at t=3 (full length 4); row 2: no EOS, cut at 4.
    kl = jnp.array([[0.5, 1.0, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    ids = jnp.array([[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8]])
    scores = adv_lib.penalize_missing_eos(jnp.array([3.0, -1.0, 2.0]), ids, (2,), penalty=1.5)
    np.testing.assert_allclose(scores, [3.0, -1.0, 0.5])
    rewards, non_score = adv_lib.kl_shaped_rewards(scores, kl, mask, 0.1)
    np.testing.assert_allclose(rewards, [[-0.05, -0.1 + 3.0, 0, 0],
                                         [-0.01, -0.02, -0.03, -0.04 - 1.0],
                                         [-0.1, -0.1, -0.1, -0.1 + 0.5]], atol=1e-6)
    np.testing.assert_allclose(non_score, [[-0.05, -0.1, 0, 0], [-0.01, -0.02, -0.03, -0.04], [-0.1] * 4], atol=1e-7)


def test_masked_whiten():
    rng = np.random.RandomState(2)
    x = rng.randn(5, 7).astype(np.float32) * 3 + 2
    mask = rng.rand(5, 7) > 0.3
    out = np.asarray(adv_lib.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    assert abs(out[mask].mean()) < 1e-5
    np.testing.assert_allclose(out[mask].var(ddof=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(out[~mask], x[~mask])
    kept = np.asarray(adv_lib.masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(kept[mask].mean(), x[mask].mean(), rtol=1e-5)


def test_group_baselines():
    scores = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    np.testing.assert_allclose(adv_lib.rloo_advantages(scores, 3),
                               [1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 11.5, 10 - 11.5, 13 - 10.0], rtol=1e-6)
    grpo = np.asarray(adv_lib.grpo_advantages(scores, 3))
    np.testing.assert_allclose(grpo[:3], np.array([-1.0, 0.0, 1.0]) / (1.0 + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(grpo[3:], (np.array([10, 10, 13.0]) - 11) / (np.sqrt(3.0) + 1e-4), rtol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        adv_lib.grpo_advantages(scores, 4)


def test_clipped_surrogate_gradient_at_ratio_one_is_plain_policy_gradient():
    rng = np.random.RandomState(3)
    logp = jnp.asarray(rng.randn(4, 6).astype(np.float32) - 1)
    adv = jnp.asarray(rng.randn(4, 6).astype(np.float32))
    mask = jnp.asarray((rng.rand(4, 6) > 0.3).astype(np.int32))
    grad = jax.grad(lambda lp: losses.clipped_surrogate(lp, jax.lax.stop_gradient(lp), adv, mask, clip_low=0.2)[0])(logp)
    expected = -np.asarray(adv) * np.asarray(mask) / np.asarray(mask).sum()
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7)


def test_clipped_surrogate_clipping_by_hand():
    # ratios e^x for x = log(1.5), log(0.5), log(1.1), log(0.7); cliprange 0.2.
    ratio = jnp.array([[1.5, 0.5, 1.1, 0.7]])
    logp, old = jnp.log(ratio), jnp.zeros((1, 4))
    adv = jnp.array([[1.0, 1.0, -2.0, -1.0]])
    mask = jnp.ones((1, 4))
    loss, stats = losses.clipped_surrogate(logp, old, adv, mask, clip_low=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), -0.5, 2.2, 0.8 (clipped)]
    np.testing.assert_allclose(float(loss), np.mean([-1.2, -0.5, 2.2, 0.8]), rtol=1e-6)
    np.testing.assert_allclose(float(stats["clipfrac"]), 0.5)
    np.testing.assert_allclose(float(stats["approxkl"]), 0.5 * np.mean(np.log([1.5, 0.5, 1.1, 0.7]) ** 2), rtol=1e-6)
    seq_loss, _ = losses.clipped_surrogate(logp, old, adv, jnp.array([[1, 1, 1, 0]]), clip_low=0.2,
                                         aggregation="sequence")
    np.testing.assert_allclose(float(seq_loss), np.mean([-1.2, -0.5, 2.2]), rtol=1e-6)


def test_value_loss_clipping_by_hand():
    values = jnp.array([[1.0, 0.0, 2.0]])
    old = jnp.array([[0.5, 0.5, 1.95]])
    returns = jnp.array([[2.0, 2.0, 0.0]])
    loss, stats = losses.value_loss(values, old, returns, jnp.ones((1, 3)), 0.2)
    # clipped values [0.7, 0.3, 2.0]; max((v-R)^2, (vc-R)^2) = [max(1, 1.69), max(4, 2.89), max(4, 4)]
    np.testing.assert_allclose(float(loss), 0.5 * np.mean([1.69, 4.0, 4.0]), rtol=1e-5)
    np.testing.assert_allclose(float(stats["clipfrac"]), 1 / 3, rtol=1e-6)


def test_aggregation_modes_differ_on_ragged_rows():
    x = jnp.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [7.0, 7.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert float(losses.aggregate(x, mask, "token")) == pytest.approx(9 / 5)
    assert float(losses.aggregate(x, mask, "sequence")) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(x, mask, "tokens")


def test_rollout_metrics_use_trl_definitions():
    scores = jnp.array([1.0, 3.0])
    kl = jnp.array([[0.5, 0.5, 9.0], [1.0, 0.0, 0.0]])
    non_score = -0.1 * kl
    logprobs = jnp.array([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    m = losses.rollout_metrics(scores, kl, non_score * mask, logprobs, mask)
    assert float(m["objective/kl"]) == pytest.approx(1.0)
    assert float(m["objective/entropy"]) == pytest.approx(1.75)
    assert float(m["objective/non_score_reward"]) == pytest.approx(-0.1)
    assert float(m["objective/rlhf_reward"]) == pytest.approx(2.0 - 0.1)


class TestJitVmapAgree(chex.TestCase):
    """Each core function gives the same result under jit, without jit, and under vmap."""

    def _batch(self):
        rewards, values, mask = ragged_batch(5, batch=4, length=6)
        return jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask)

    def _check(self, fn, *args):
        plain = fn(*args)
        jitted = jax.jit(fn)(*args)
        # vmap over a new leading axis of size 1: the same computation, batched.
        vmapped = jax.vmap(fn)(*[a[None] for a in args])
        chex.assert_trees_all_close(plain, jitted, atol=1e-6)
        chex.assert_trees_all_close(plain, jax.tree.map(lambda x: x[0], vmapped), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_variants(self):
        rewards, values, mask = self._batch()
        gae = self.variant(lambda r, v, m: adv_lib.gae(r, v, m, 0.99, 0.95))
        ref = gae_reference(*map(np.asarray, (rewards, values, mask)), 0.99, 0.95)
        chex.assert_trees_all_close(gae(rewards, values, mask), tuple(map(jnp.asarray, ref)), atol=1e-5)
        k3 = self.variant(kl_lib.k3)
        np.testing.assert_allclose(k3(rewards, values), kl_lib.k3(np.asarray(rewards), np.asarray(values)), rtol=1e-6)

    def test_jit_and_vmap(self):
        rewards, values, mask = self._batch()
        scores = rewards[:, 0]
        self._check(lambda r, v, m: adv_lib.gae(r, v, m, 0.99, 0.95), rewards, values, mask)
        self._check(lambda r, m: adv_lib.masked_whiten(r, m), rewards, mask)
        self._check(lambda s, k, m: adv_lib.kl_shaped_rewards(s, k, m, 0.1), scores, values, mask)
        self._check(lambda a, b, c, m: losses.clipped_surrogate(a, b, c, m, clip_low=0.2), rewards, values, rewards, mask)
        self._check(lambda a, b, c, m: losses.value_loss(a, b, c, m, 0.2), rewards, values, rewards, mask)
        for est in (kl_lib.k1, kl_lib.k2, kl_lib.k3):
            self._check(est, rewards, values)
        self._check(lambda s: adv_lib.grpo_advantages(s, 2), scores)
        self._check(lambda s: adv_lib.rloo_advantages(s, 2), scores)


# ---------------------------------------------------------------- value-free building blocks (GRPO and friends)
def test_group_baselines_zero_std_groups_and_overlong_penalty():
    scores = np.array([1.0, 2.0, 4.0, 3.0, 3.0, 3.0], np.float32)
    centred = np.asarray(adv_lib.grpo_advantages(jnp.asarray(scores), 3, scale_by_std=False))
    np.testing.assert_allclose(centred, [-4 / 3, -1 / 3, 5 / 3, 0, 0, 0], rtol=1e-6)  # Dr. GRPO: no std
    np.testing.assert_array_equal(np.asarray(adv_lib.zero_std_groups(jnp.asarray(scores), 3)),
                                  [False] * 3 + [True] * 3)
    lengths = jnp.asarray([10, 12, 13, 15, 16])
    np.testing.assert_allclose(np.asarray(adv_lib.overlong_penalty(lengths, 16, 4, 0.5)),
                               [0, 0, -0.125, -0.375, -0.5], rtol=1e-6)


def pg_loss_reference(logprobs, old, adv, mask, clip_low, clip_high, level, aggregation, max_len):
    """A plain loop over rows and tokens."""
    per_row, total, count = [], 0.0, 0
    for i in range(mask.shape[0]):
        tokens = [t for t in range(mask.shape[1]) if mask[i, t]]
        seq_ratio = np.exp(np.mean([logprobs[i, t] - old[i, t] for t in tokens])) if tokens else 1.0
        row = []
        for t in tokens:
            ratio = seq_ratio if level == "sequence" else np.exp(logprobs[i, t] - old[i, t])
            a = adv[i]
            row.append(max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high)))
        total += sum(row)
        count += len(row)
        if row:
            per_row.append(np.mean(row))
    if aggregation == "token":
        return total / count
    if aggregation == "sequence":
        return np.mean(per_row)
    return total / (mask.shape[0] * max_len)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_clipped_surrogate_against_a_loop(level, aggregation):
    logprobs, _, mask = ragged_batch(3)
    rng = np.random.default_rng(4)
    # A shift per row as well as per token: sequence-level ratios leave the clip range too.
    old = logprobs + rng.normal(scale=0.3, size=logprobs.shape).astype(np.float32) + np.array(
        [[0.0], [0.0], [0.5], [-0.5], [0.4], [-0.4]], np.float32)
    adv = np.array([0.3, -1.0, 1.2, -0.7, -1.5, 0.9], np.float32)
    loss, stats = losses.clipped_surrogate(jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                      clip_low=0.2, clip_high=0.28, level=level, aggregation=aggregation,
                                      max_len=mask.shape[1])
    expected = pg_loss_reference(logprobs, old, adv, mask.astype(bool), 0.2, 0.28, level, aggregation, mask.shape[1])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert 0 < float(stats["clipfrac"]) < 1  # the noise above clips some tokens, not all


def test_sequence_ratio_gradient_is_gspo():
    """Unclipped, GSPO's gradient: -A_i s_i / |y_i| on each token's log-prob (sequence aggregation)."""
    logprobs, _, mask = ragged_batch(5)
    old = logprobs + 0.01
    adv = np.linspace(-1, 1, mask.shape[0]).astype(np.float32)
    fn = lambda lp: losses.clipped_surrogate(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip_low=0.5,
                                        clip_high=0.5, level="sequence", aggregation="sequence")[0]
    grad = np.asarray(jax.grad(fn)(jnp.asarray(logprobs)))
    m = mask.astype(bool)
    rows = [i for i in range(m.shape[0]) if m[i].any()]
    for i in rows:
        n = m[i].sum()
        s = np.exp(np.mean((logprobs - old)[i][m[i]]))
        np.testing.assert_allclose(grad[i][m[i]], -adv[i] * s / n / len(rows), rtol=1e-4)
    assert np.all(grad[~m] == 0)
