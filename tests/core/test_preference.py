"""The offline preference losses against NumPy implementations of their papers' formulas, on ragged
batches, and DPO's step-0 invariants."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core.preference import preference_loss, sequence_logps


def _batch(seed=0, b=6, length=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, (4, b))
    masks = [(np.arange(length) < n[:, None]) for n in lengths]
    # Token log-probs of a model sure of little: between log(0.05) and log(0.9).
    tokens = [np.log(rng.uniform(0.05, 0.9, (b, length))) for _ in range(4)]
    sums = [np.where(m, t, 0.0).sum(1) for t, m in zip(tokens, masks)]
    return tokens, masks, sums, [m.sum(1).astype(np.float64) for m in masks]


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _numpy_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma, lam):
    if kind == "sigmoid":
        z = beta * ((pc - rc) - (pr - rr))
        return np.mean(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)), beta * (pc - rc), beta * (pr - rr)
    if kind == "ipo":
        h = (pc - rc) / lc - (pr - rr) / lr
        return np.mean((h - 1 / (2 * beta)) ** 2), beta * (pc - rc), beta * (pr - rr)
    ac, ar = pc / lc, pr / lr
    if kind == "simpo":
        z = beta * (ac - ar) - gamma
        return np.mean(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)), beta * ac, beta * ar
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    nll = -pc.sum() / lc.sum()
    return nll - lam * np.mean(_log_sigmoid(log_odds)), lam * ac, lam * ar


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("simpo", 0.0),
                                      ("simpo", 0.2), ("orpo", 0.0)])
def test_each_loss_is_its_papers_formula(kind, eps):
    tokens, masks, sums, lens = _batch()
    ours = [sequence_logps(jnp.asarray(t, jnp.float32), jnp.asarray(m)) for t, m in zip(tokens, masks)]
    for (total, count), expected_total, expected_count in zip(ours, sums, lens):
        np.testing.assert_allclose(total, expected_total, rtol=1e-6)
        np.testing.assert_array_equal(count, expected_count)
    (pc, lc), (pr, lr), (rc, _), (rr, _) = ours
    options = dict(beta=0.3, label_smoothing=eps, gamma=0.4, orpo_lambda=0.2)
    loss, metrics = preference_loss(pc, pr, lc, lr, rc, rr, loss=kind, **options)
    expected, chosen, rejected = _numpy_loss(kind, sums[0], sums[1], sums[2], sums[3], lens[0], lens[1], 0.3, eps,
                                             0.4, 0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(chosen.mean(), rel=1e-5, abs=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(rejected.mean(), rel=1e-5, abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx((chosen - rejected).mean(), rel=1e-5, abs=1e-6)
    assert float(metrics["rewards/accuracies"]) == pytest.approx((chosen > rejected).mean())
    assert float(metrics["logps/chosen"]) == pytest.approx(sums[0].mean(), rel=1e-5)
    assert float(metrics["logps/rejected"]) == pytest.approx(sums[1].mean(), rel=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dpo_at_step_0_is_exactly_log_2_with_zero_rewards(dtype):
    # The policy is the reference: each log-ratio is exactly 0, whatever the rounding of the log-probs.
    tokens, masks, _, _ = _batch(1)
    (pc, lc), (pr, lr) = [sequence_logps(jnp.asarray(t, dtype), jnp.asarray(m)) for t, m in zip(tokens[:2], masks[:2])]
    loss, metrics = preference_loss(pc, pr, lc, lr, pc, pr, loss="sigmoid", beta=0.1)
    assert loss.dtype == dtype and float(loss) == float(jnp.log(jnp.asarray(2.0, dtype)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[key]) == 0.0, key


def test_bad_loss_names_and_missing_references_raise():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss(x, x, x, x, x, x, loss="kto")
    with pytest.raises(ValueError, match="'ipo' needs the reference's log-probs"):
        preference_loss(x, x, x, x, loss="ipo")
