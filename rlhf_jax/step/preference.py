"""One optimizer step of offline preference optimisation on a batch of pairs (`config.dpo`: DPO, IPO,
SimPO or ORPO, `rlhf_jax.core.preference`), through the same training forward as the RL update.

    update = make_preference_update(config, policy_graphdef=graphdef)
    state, metrics = update(state, pairs, frozen, reference)

`pairs`: prompt_ids, prompt_mask [b, prompt_len] (left-padded, as rollouts are), chosen_ids,
chosen_mask, rejected_ids, rejected_mask [b, response_len] (right-padded). A pair's two responses run
as two rows of one forward; the reference's log-probs (DPO and IPO only) come from the same program
without gradient, so with the reference equal to the policy (step 0, or LoRA adapters at zero) every
log-ratio is exactly 0 and DPO's loss exactly log 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.core.preference import preference_loss, sequence_logps
from rlhf_jax.step.forward import TrainingForward
from rlhf_jax.step.state import TrainState, make_optimizer

PAIR_KEYS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def pair_rows(pairs: dict) -> dict:
    """A batch of pairs as the training forward's minibatch: 2b rows, the chosen responses first."""
    twice = lambda x: jnp.concatenate([x, x], axis=0)
    return {"prompt_ids": twice(pairs["prompt_ids"]), "prompt_mask": twice(pairs["prompt_mask"]),
            "response_ids": jnp.concatenate([pairs["chosen_ids"], pairs["rejected_ids"]], axis=0),
            "response_mask": jnp.concatenate([pairs["chosen_mask"], pairs["rejected_mask"]], axis=0)}


def make_preference_update(config, *, policy_graphdef, ref_graphdef=None, optimizer=None, mesh=None):
    """The jitted step `update(state, pairs, frozen=None, reference=None) -> (state, metrics)`.

    Reads `config.dpo` (loss, beta, label_smoothing, gamma, orpo_lambda) and `config.model`'s memory
    levers. `reference` and `frozen` as in `rlhf_jax.step.update.make_update` (the reference's params;
    the LoRA base); SimPO and ORPO have no reference and never run one. The log-probs are the model's
    at temperature 1. The state is donated.
    """
    d = config.dpo
    optimizer = optimizer or make_optimizer(config)
    fwd = TrainingForward(config, policy_graphdef, ref_graphdef or policy_graphdef, None, mesh, value_head=False)
    fwd.temperature = 1.0  # the pairs' likelihood, not the sampler's tempered one
    use_ref = d.loss in ("sigmoid", "ipo")
    options = dict(loss=d.loss, beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.gamma,
                   orpo_lambda=d.orpo_lambda)

    def sums(hidden, mb, head):
        logprobs, _ = fwd.token_stats(hidden, mb, head)
        total, count = sequence_logps(logprobs, mb["response_mask"])
        b = total.shape[0] // 2
        return (total[:b], total[b:]), (count[:b], count[b:])

    def update(state: TrainState, pairs, frozen=None, reference=None):
        if use_ref and reference is None:
            raise ValueError(f"update(state, pairs, frozen, reference): dpo.loss {d.loss!r} needs the reference's "
                             "params")
        mb = pair_rows(pairs)
        ref = (None, None)
        if use_ref:
            ref_model = fwd.reference(reference, frozen)
            ref = jax.lax.stop_gradient(sums(fwd.hidden(ref_model, mb), mb, ref_model.logits)[0])
        head = fwd.head(frozen)

        def loss_fn(params):
            hidden = fwd.hidden(fwd.policy(params, frozen), mb)
            (chosen, rejected), (chosen_len, rejected_len) = sums(hidden, mb, lambda h: head(params, h))
            return preference_loss(chosen, rejected, chosen_len, rejected_len, *ref, **options)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(update, donate_argnums=(0,))
