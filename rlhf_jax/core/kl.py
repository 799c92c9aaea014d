"""KL estimators between the policy and the reference, and the KL coefficient controllers.

The per-token estimators work on tokens sampled from the policy pi_theta, with
log r = ref_logprob - logprob (r = pi_ref / pi_theta):

    k1 = -log r               unbiased, can be negative per token
    k2 = (log r)^2 / 2        biased, low variance
    k3 = (r - 1) - log r      unbiased, never negative (Schulman, "Approximating KL divergence")

All take `logprobs, ref_logprobs: f32[batch, response_len]` (or any matching
shapes) and return the per-token estimate of the same shape; masking is the
caller's job (`rlhf_jax.core.advantages` and `rlhf_jax.core.losses` do it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.options import KL_ESTIMATORS

# exp(20) is about 5e8, far from overflowing f32; without the clamp one degenerate token (a log-prob
# of -1e9 from a masked logit) would make k3 inf or NaN.
LOG_RATIO_CLAMP = 20.0


def _log_ratio(logprobs, ref_logprobs):
    return jnp.clip(ref_logprobs - logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def k1(logprobs, ref_logprobs):
    """-log r = logprob - ref_logprob."""
    return logprobs - ref_logprobs


def k2(logprobs, ref_logprobs):
    """(log r)^2 / 2."""
    return 0.5 * jnp.square(ref_logprobs - logprobs)


def k3(logprobs, ref_logprobs):
    """(r - 1) - log r, with log r clamped to +-LOG_RATIO_CLAMP; always >= 0."""
    log_r = _log_ratio(logprobs, ref_logprobs)
    return jnp.maximum(jnp.expm1(log_r) - log_r, 0.0)


ESTIMATORS: dict[str, Callable] = dict(zip(KL_ESTIMATORS, (k1, k2, k3)))


def get_estimator(name: str) -> Callable:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def full_kl(logits, ref_logits):
    """Exact KL(pi || pi_ref) per position from two logit tensors: f[..., vocab] -> f32[...].

    For diagnostics: it costs a full softmax over the vocabulary.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)


class KLController(NamedTuple):
    """The KL coefficient as train state (a pytree of scalars, so it jits and checkpoints).

    `adaptive` false: the coefficient stays fixed. True: Ziegler et al. (2019)'s
    proportional controller steers the measured KL towards `target`.
    """

    kl_coef: jax.Array
    target: jax.Array
    horizon: jax.Array
    adaptive: jax.Array


def fixed_kl_controller(kl_coef: float) -> KLController:
    return KLController(jnp.float32(kl_coef), jnp.float32(0.0), jnp.float32(1.0), jnp.bool_(False))


def adaptive_kl_controller(kl_coef: float, target: float, horizon: float) -> KLController:
    if target <= 0 or horizon <= 0:
        raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0 (got {target}, {horizon})")
    return KLController(jnp.float32(kl_coef), jnp.float32(target), jnp.float32(horizon), jnp.bool_(True))


def update_kl_controller(state: KLController, kl, n_steps) -> KLController:
    """One controller step after a batch of `n_steps` samples whose mean KL was `kl`.

    err = clip(kl / target - 1, -0.2, 0.2); kl_coef <- kl_coef * (1 + err * n_steps / horizon).
    """
    err = jnp.clip(kl / jnp.where(state.adaptive, state.target, 1.0) - 1.0, -0.2, 0.2)
    new_coef = state.kl_coef * (1.0 + err * n_steps / state.horizon)
    return state._replace(kl_coef=jnp.where(state.adaptive, new_coef, state.kl_coef).astype(jnp.float32))
