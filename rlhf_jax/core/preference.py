"""Offline preference losses on pairs of responses to one prompt, chosen (preferred) and rejected:
DPO and conservative DPO ("sigmoid"), IPO, SimPO and ORPO, as pure functions of per-sequence
log-probs.

Every loss takes the policy's summed log-probs of each response, f32[b] (`sequence_logps`), and the
responses' token counts; DPO and IPO also the reference's. The formulas are the papers', as TRL's
DPOTrainer, CPOTrainer and ORPOTrainer compute them:

    sigmoid (DPO, Rafailov et al. 2023; with label_smoothing, conservative DPO, Mitchell 2023):
        z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
    ipo (Azar et al. 2023, eq. 17): the log-probs averaged over each response's tokens,
        loss = ((avg_pi_c - avg_ref_c) - (avg_pi_r - avg_ref_r) - 1 / (2 beta))^2
    simpo (Meng et al. 2024): no reference; the average log-probs, a target margin gamma,
        z = beta * (avg_pi_c - avg_pi_r) - gamma, loss as sigmoid's
    orpo (Hong et al. 2024): no reference; the chosen responses' NLL (per token over the batch) minus
        lambda x the mean log sigmoid of the log odds ratio,
        log odds(y) = avg(y) - log(1 - exp(avg(y))), ratio = log odds(chosen) - log odds(rejected)

The implicit rewards (TRL's `rewards/*` metrics) are beta x (policy - reference) summed log-probs for
DPO and IPO, beta x the policy's average log-probs for SimPO, and orpo_lambda x them for ORPO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.options import PREFERENCE_LOSSES


def sequence_logps(token_logprobs, mask):
    """(summed log-probs, token counts) of each row's masked tokens: f32[b] each."""
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, token_logprobs, 0.0), axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)


def _smoothed_logsigmoid(z, label_smoothing: float):
    if not label_smoothing:  # exactly -log sigmoid(z): step 0's loss is exactly log 2
        return -jax.nn.log_sigmoid(z)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def preference_loss(policy_chosen, policy_rejected, chosen_len, rejected_len, ref_chosen=None, ref_rejected=None, *,
                    loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                    orpo_lambda: float = 0.1):
    """The mean preference loss of a batch of pairs, and TRL's metrics.

    policy_*, ref_*: summed log-probs f32[b] of the chosen and rejected responses (`sequence_logps`);
    *_len: their token counts f32[b]. ref_* are needed by "sigmoid" and "ipo" only.
    Returns (loss, metrics): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins
    (means over the pairs of the implicit rewards, see the module docstring), logps/chosen and
    logps/rejected (means of the policy's summed log-probs), and for ORPO nll_loss and log_odds_ratio.
    """
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; choose one of {PREFERENCE_LOSSES}")
    if loss in ("sigmoid", "ipo") and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"preference loss {loss!r} needs the reference's log-probs")
    chosen_len, rejected_len = jnp.maximum(chosen_len, 1.0), jnp.maximum(rejected_len, 1.0)
    extra = {}
    if loss == "sigmoid":
        chosen_reward, rejected_reward = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
        # The difference of the two log-ratios, not of the two rewards: with the policy equal to the
        # reference each log-ratio is exactly 0, so z is too.
        z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
        losses = _smoothed_logsigmoid(z, label_smoothing)
    elif loss == "ipo":
        chosen_ratio = (policy_chosen - ref_chosen) / chosen_len
        rejected_ratio = (policy_rejected - ref_rejected) / rejected_len
        chosen_reward, rejected_reward = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
        losses = jnp.square(chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta))
    elif loss == "simpo":
        chosen_avg, rejected_avg = policy_chosen / chosen_len, policy_rejected / rejected_len
        chosen_reward, rejected_reward = beta * chosen_avg, beta * rejected_avg
        losses = _smoothed_logsigmoid(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    else:  # orpo
        chosen_avg, rejected_avg = policy_chosen / chosen_len, policy_rejected / rejected_len
        # log(1 - p) for p = exp(avg) < 1: log(-expm1(avg)), accurate near p = 1 as log1p(-exp) is not.
        log_odds = (chosen_avg - rejected_avg) - (jnp.log(-jnp.expm1(chosen_avg)) - jnp.log(-jnp.expm1(rejected_avg)))
        ratio = jax.nn.log_sigmoid(log_odds)
        nll = -jnp.sum(policy_chosen) / jnp.sum(chosen_len)
        chosen_reward, rejected_reward = orpo_lambda * chosen_avg, orpo_lambda * rejected_avg
        losses = nll - orpo_lambda * ratio
        extra = {"nll_loss": nll, "log_odds_ratio": jnp.mean(ratio)}
    metrics = {"rewards/chosen": jnp.mean(chosen_reward), "rewards/rejected": jnp.mean(rejected_reward),
               "rewards/accuracies": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
               "rewards/margins": jnp.mean(chosen_reward - rejected_reward),
               "logps/chosen": jnp.mean(policy_chosen), "logps/rejected": jnp.mean(policy_rejected), **extra}
    return jnp.mean(losses), metrics
