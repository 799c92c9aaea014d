"""How far the sampler's log-probs are from the training forward's, and how many parameters one
update changes, for a config's model in each dtype.

    python scripts/precision.py --config configs/smollm2_lora_ppo.py [--dtypes float32 bfloat16]
        [--new_tokens 64] [--lrs 1e-6 1e-5 1e-4] [--set model.path=runs/smollm2 ...]

Gap: one rollout of `train.rollout_batch_size` prompts (temperature from the config), then the
log-probs of the sampled tokens through the update's own scoring pass (`rlhf_jax.step.forward.make_scoring`, the
forward PPO's loss uses) with the same params. Over the response tokens: max and mean |difference|,
the share of tokens differing by more than 1e-3, and the range of the ratio exp(difference) that PPO
would start from if it took the sampler's log-probs as its old ones (`rl.old_logprobs = "sampler"`).

Updates: one PPO step (1 epoch, 1 minibatch) at each learning rate from the same start, and the share
of trainable entries it changes: in the float32 master weights the state keeps, and in their
`model.param_dtype` view, which is what storing the parameters in that dtype would have kept (one
step from weights that dtype can hold rounds exactly like the view). One JSON line per measurement.
"""

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np


def dtype_config(path: str, overrides: list[str], dtype: str):
    from rlhf_jax.config import load_config
    config = load_config(path, overrides)
    config.model.dtype = config.model.param_dtype = dtype
    config.logging.progress = False
    return config


def gap_row(trainer, state, new_tokens: int) -> dict:
    from rlhf_jax.step.forward import make_scoring
    c = trainer.config
    batch = c.train.rollout_batch_size
    prompt_ids = trainer.to_device_batch(trainer.prompt_ids[:batch])
    prompt_mask = trainer.to_device_batch(trainer.prompt_mask[:batch])
    rollout = trainer.rollout_fn(trainer.policy_params(state), prompt_ids, prompt_mask, jax.random.PRNGKey(0))
    score = make_scoring(c, policy_graphdef=trainer.policy_graphdef, ref_graphdef=trainer.ref_graphdef,
                         value_graphdef=trainer.value_graphdef, mesh=trainer.mesh)
    scored = score(state.params, rollout, trainer.frozen, trainer.update_reference)
    mask = np.asarray(rollout.response_mask).astype(bool)
    diff = (np.asarray(scored["logprobs"]) - np.asarray(rollout.logprobs))[mask].astype(np.float64)
    ratio = np.exp(diff)
    ref_gap = (np.asarray(scored["logprobs"]) - np.asarray(scored["ref_logprobs"]))[mask]
    return {"part": "gap", "dtype": c.model.dtype, "tokens": int(mask.sum()), "new_tokens": new_tokens,
            "max_abs_diff": float(np.abs(diff).max()), "mean_abs_diff": float(np.abs(diff).mean()),
            "frac_diff_gt_1e-3": float(np.mean(np.abs(diff) > 1e-3)),
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "frac_ratio_outside_0.8_1.2": float(np.mean((ratio < 0.8) | (ratio > 1.2))),
            "frac_ratio_outside_0.9_1.1": float(np.mean((ratio < 0.9) | (ratio > 1.1))),
            # The training forward of the policy against the reference's at step 0 (equal params).
            "trainer_vs_reference_max_abs_diff": float(np.abs(ref_gap).max())}


def update_rows(trainer, lrs) -> list[dict]:
    from rlhf_jax.models.tree import cast_floats
    from rlhf_jax.step.state import make_optimizer
    from rlhf_jax.step.update import make_update
    c = trainer.config
    view_dtype = jnp.dtype(c.model.param_dtype)
    host_state = jax.device_get(trainer.init_state())  # each step starts from a fresh copy (the update donates)
    before = host_state.params
    rows = []
    for lr in lrs:
        cfg = c.copy_and_resolve_references()
        cfg.optim.update(learning_rate=lr, warmup_steps=0, schedule="constant")
        cfg.rl.update(num_ppo_epochs=1, num_mini_batches=1)
        optimizer = make_optimizer(cfg)
        trainer.update_fn = make_update(cfg, policy_graphdef=trainer.policy_graphdef,
                                            ref_graphdef=trainer.ref_graphdef, value_graphdef=trainer.value_graphdef,
                                            eos_ids=trainer.eos_ids, optimizer=optimizer, mesh=trainer.mesh)
        fresh = jax.device_put(host_state)
        fresh = fresh.replace(opt_state=optimizer.init(fresh.params))
        after, _, _ = trainer.iteration(fresh)
        after = jax.device_get(after.params)
        changed = lambda a, b: sum(int(np.sum(np.asarray(x) != np.asarray(y)))
                                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        total = sum(np.size(x) for x in jax.tree.leaves(before))
        rows.append({"part": "update", "param_dtype": c.model.param_dtype, "learning_rate": lr,
                     "master_dtype": str(jax.tree.leaves(after)[0].dtype), "trainable": total,
                     "frac_changed_master": changed(before, after) / total,
                     f"frac_changed_{c.model.param_dtype}_view": changed(cast_floats(before, view_dtype),
                                                                        cast_floats(after, view_dtype)) / total})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-6, 1e-5, 1e-4])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from rlhf_jax.run.cli import user_errors
    with user_errors():  # a config file or model folder that is not there: one line
        measure(args)


def measure(args) -> None:
    from rlhf_jax.run.trainer import RLTrainer

    for dtype in args.dtypes:
        config = dtype_config(args.config, args.set, dtype)
        config.sampling.max_new_tokens = args.new_tokens
        trainer = RLTrainer(config, None)
        state = trainer.init_state()
        print(json.dumps(gap_row(trainer, state, args.new_tokens)), flush=True)
        del state
        if args.lrs:
            for row in update_rows(RLTrainer(config, None), args.lrs):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
