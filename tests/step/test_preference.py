"""The preference update through the model: DPO's step-0 invariants with LoRA (adapters at zero: the
policy is the reference), each step's loss against the papers' formulas on log-probs taken from the
model's plain forward, and training on fixed pairs raising the chosen responses' margin."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.run.data import encode_preference_pairs
from rlhf_jax.step.preference import make_preference_update
from rlhf_jax.tasks import reviews
from tests import common


def _setup(tmp_path, loss):
    from rlhf_jax.run.trainer import RLTrainer

    c = common.config(lora__enabled=True, lora__rank=4, dpo__loss=loss, dpo__beta=0.5, optim__learning_rate=1e-2)
    c.logging.progress = False
    trainer = RLTrainer(c, str(tmp_path))
    # The built-in reviews task's pairs (chosen: the more positive continuation of one opening).
    records = reviews.preference_pairs(4, seed=0)
    pairs = encode_preference_pairs(records, trainer.tokenizer, c.data.max_prompt_len, c.sampling.max_new_tokens)
    chosen = pairs["chosen_ids"][0][pairs["chosen_mask"][0] > 0]
    assert chosen[-1] == trainer.tokenizer.eos_token_id
    assert trainer.tokenizer.decode(chosen[:-1]).split() == records[0]["chosen"].split()[:len(chosen) - 1]
    pairs = {k: jnp.asarray(v) for k, v in pairs.items()}
    update = make_preference_update(c, policy_graphdef=trainer.policy_graphdef, ref_graphdef=trainer.ref_graphdef,
                                    optimizer=trainer.optimizer)
    return c, trainer, pairs, update


def _sums(model, pairs, name):
    """Summed log-probs of one side's responses from the model's plain forward (numpy, float64)."""
    ids = jnp.concatenate([pairs["prompt_ids"], pairs[f"{name}_ids"]], 1)
    mask = jnp.concatenate([pairs["prompt_mask"], pairs[f"{name}_mask"]], 1)
    logits = np.asarray(model(ids, mask)["logits"], np.float64)
    start = pairs["prompt_ids"].shape[1]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    response = np.asarray(pairs[f"{name}_ids"])
    taken = np.take_along_axis(logp[:, start - 1:-1], response[..., None], -1)[..., 0]
    response_mask = np.asarray(pairs[f"{name}_mask"], bool)
    return np.where(response_mask, taken, 0.0).sum(1), response_mask.sum(1)


def test_dpo_step_0_is_log_2_and_training_raises_the_margin(tmp_path):
    c, trainer, pairs, update = _setup(tmp_path, "sigmoid")
    state = trainer.init_state()
    state, metrics = update(state, pairs, trainer.frozen, trainer.update_reference)
    assert float(metrics["loss"]) == float(np.float32(np.log(2.0)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[key]) == 0.0, key
    for _ in range(4):
        state, metrics = update(state, pairs, trainer.frozen, trainer.update_reference)
    assert float(metrics["loss"]) < np.log(2.0) and float(metrics["rewards/margins"]) > 0

    # This step's loss, from the plain forward's log-probs and the paper's formula.
    policy = nnx.merge(trainer.policy_graphdef, state.params["policy"], trainer.frozen)
    reference = nnx.merge(trainer.policy_graphdef, trainer.update_reference, trainer.frozen)
    (pc, _), (pr, _) = _sums(policy, pairs, "chosen"), _sums(policy, pairs, "rejected")
    (rc, _), (rr, _) = _sums(reference, pairs, "chosen"), _sums(reference, pairs, "rejected")
    z = 0.5 * ((pc - rc) - (pr - rr))
    _, metrics = update(state, pairs, trainer.frozen, trainer.update_reference)
    assert float(metrics["loss"]) == pytest.approx(np.mean(np.logaddexp(0.0, -z)), rel=1e-5)
    assert float(metrics["logps/chosen"]) == pytest.approx(pc.mean(), rel=1e-5)


def test_orpo_needs_no_reference_and_is_its_formula(tmp_path):
    c, trainer, pairs, update = _setup(tmp_path, "orpo")
    state = trainer.init_state()
    policy = nnx.merge(trainer.policy_graphdef, state.params["policy"], trainer.frozen)
    (pc, lc), (pr, lr) = _sums(policy, pairs, "chosen"), _sums(policy, pairs, "rejected")
    ac, ar = pc / lc, pr / lr
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    expected = -pc.sum() / lc.sum() - 0.1 * np.mean(-np.logaddexp(0.0, -log_odds))
    _, metrics = update(state, pairs, trainer.frozen)  # no reference
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)

    records = reviews.preference_pairs(2, seed=1)
    records[1]["rejected"] = ""
    with pytest.raises(ValueError, match="preference pair 1: its rejected response has no tokens"):
        encode_preference_pairs(records, trainer.tokenizer, 4, 8)
