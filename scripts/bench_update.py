"""The update on packed rows (`train.pack_tokens`) against the padded one, on one real rollout: the
update's seconds (alternating, each on a fresh copy of the same state), its matmul FLOPs counted in
the compiled programs (every loop by its trip count, `rlhf_jax.plan.hlo`; the micro-batch loops by the
trips they run), and the tokens each computes per forward against the real ones. Three updates: padded,
packed (a minibatch's rows in one forward, every minibatch padded to the most rows any needs), and
packed in micro-batches of `--micro_rows` rows per device (`train.micro_rows`: a minibatch runs only
the micro-batches its samples fill). The last line printed is one JSON object.

The default is SmolLM2-135M-Instruct (`make smollm2`) with LoRA PPO (`configs/smollm2_lora_ppo.py`:
16 chat questions, the value head on the trunk, 2 epochs x 2 minibatches) at 256 new tokens, where
the answers' natural lengths spread (mean about 90). Any config and overrides work:

    python scripts/bench_update.py
    python scripts/bench_update.py --config=configs/smollm2_lora_grpo.py --set sampling.max_new_tokens=128
"""

if __name__ == "__main__":  # it may restart the process, so before the heavy imports below
    from rlhf_jax.run.runtime import tune_process
    tune_process()

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import load_config
from rlhf_jax.core.packing import micro_trips, packing_stats
from rlhf_jax.parallel.sharding import batch_devices
from rlhf_jax.plan.hlo import program_costs
from rlhf_jax.run.trainer import RLTrainer
from rlhf_jax.step.update import make_update, packed_minibatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2_lora_ppo.py"))
    parser.add_argument("--set", nargs="*", default=["sampling.max_new_tokens=256"],
                        help="dotted overrides, key=value (as the command line's --config.key=value)")
    parser.add_argument("--pack_tokens", type=int, default=0, help="the row budget (0: prompt + response length)")
    parser.add_argument("--micro_rows", type=int, default=1,
                        help="also run the packed update in micro-batches of this many rows per device (0: not)")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates of each, alternating")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = load_config(args.config, overrides)
    config.logging.update(progress=False, tensorboard=False, samples_every=0)
    config.train.pack_tokens = 0
    budget = args.pack_tokens or config.data.max_prompt_len + config.sampling.max_new_tokens
    packed_config = config.copy_and_resolve_references()
    packed_config.train.pack_tokens = budget
    micro_config = packed_config.copy_and_resolve_references()
    micro_config.train.micro_rows = args.micro_rows

    trainer = RLTrainer(config, tempfile.mkdtemp(prefix="bench_update_"))
    state = trainer.init_state()
    index = np.repeat(np.arange(config.train.rollout_batch_size // trainer.generations), trainer.generations)
    t0 = time.perf_counter()
    rollout = trainer.rollout_fn(trainer.policy_params(state), trainer.to_device_batch(trainer.prompt_ids[index]),
                                 trainer.to_device_batch(trainer.prompt_mask[index]), jax.random.PRNGKey(0),
                                 reward_params=trainer.rm_params)
    jax.block_until_ready(rollout)
    rollout_s = time.perf_counter() - t0
    scores = trainer.to_device_batch(np.linspace(-1, 1, len(index), dtype=np.float32))
    unit = batch_devices(trainer.mesh)
    update_of = lambda c: make_update(c, policy_graphdef=trainer.policy_graphdef, ref_graphdef=trainer.ref_graphdef,
                                      value_graphdef=trainer.value_graphdef, eos_ids=trainer.eos_ids,
                                      optimizer=trainer.optimizer, mesh=trainer.mesh)
    runs = {"padded": (trainer.update_fn, None),
            "packed": (update_of(packed_config), packed_minibatches(packed_config, state.key, rollout, trainer.pad_id,
                                                                    unit))}
    if args.micro_rows:
        runs["micro"] = (update_of(micro_config), packed_minibatches(micro_config, state.key, rollout, trainer.pad_id,
                                                                     unit))
    args_of = lambda: (jax.tree.map(jnp.copy, state), rollout, scores, trainer.frozen, trainer.update_reference)

    def executed_flops(fn, layout):
        # The micro-batch loops run as many trips as each minibatch fills.
        trips = None if layout is None else micro_trips(layout)
        costs = program_costs(fn.lower(*args_of(), layout).compile().as_text(), trips)
        assert not costs.unknown_trip_counts, "a loop of unknown trip count: the FLOPs would be wrong"
        return costs.flops

    flops = {name: executed_flops(fn, layout) for name, (fn, layout) in runs.items()}
    times = {name: [] for name in runs}
    for i in range(args.repeats + 1):  # the first round compiles
        for name, (fn, layout) in (runs.items() if i % 2 == 0 else reversed(runs.items())):
            inputs = args_of()
            jax.block_until_ready(inputs)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*inputs, layout))
            if i:
                times[name].append(time.perf_counter() - t0)

    rows = len(index)
    real = int(np.asarray(rollout.prompt_mask).sum() + np.asarray(rollout.response_mask).sum())
    padded_tokens = rows * (config.data.max_prompt_len + config.sampling.max_new_tokens)
    epochs = config.rl.num_ppo_epochs
    # Per epoch: the tokens each forward runs, and the share of them that are a sample's.
    tokens = {"padded": padded_tokens, **{name: packing_stats(layout)["computed_tokens"] // epochs
                                          for name, (_, layout) in runs.items() if layout is not None}}
    result = {
        "config": args.config, "overrides": overrides, "rows": rows, "pack_tokens": budget,
        "micro_rows": args.micro_rows, "rollout_s": rollout_s,
        "mean_response_tokens": float(np.asarray(rollout.lengths).mean()), "real_tokens": real,
        "computed_tokens": tokens, "real_fraction": {name: real / n for name, n in tokens.items()},
        "packed_rows": {name: packing_stats(layout)["rows"] for name, (_, layout) in runs.items()
                        if layout is not None},
        "update_s": {name: statistics.median(t) for name, t in times.items()},
        "update_s_all": times,
        "update_gflop": {name: f / 1e9 for name, f in flops.items()},
    }
    result["speedup"] = {name: result["update_s"]["padded"] / s for name, s in result["update_s"].items()}
    # What the padded update's FLOPs would be on the real tokens alone (linear in the tokens; the
    # attention's quadratic part aside), against which each update's are compared.
    result["flops_over_real"] = {name: f / (flops["padded"] * real / padded_tokens) for name, f in flops.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
