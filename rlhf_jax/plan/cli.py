"""Will it fit? Compile a config's rollout and update for a TPU slice (or the local devices) from
shapes alone and report per-device memory, FLOPs and compile time.

    python -m rlhf_jax.plan --config=configs/llama3_8b_ppo.py --topology=v5e:4x4
    python -m rlhf_jax.plan --config=configs/tiny.py                       # the local devices

No weights are created: the models are `nnx.eval_shape`d, and every argument is a
`jax.ShapeDtypeStruct` with the sharding the trainer gives it. `--topology` needs libtpu
(`pip install -e ".[tpu]"`), whose compile-only devices stand in for the slice. The last line
printed is one JSON object; the exit status is 3 when a function does not fit.

Time: each compiled program is read (`rlhf_jax.plan.hlo`) for its FLOPs, HBM bytes and collective bytes
per device, every loop counted as often as it runs (the decode loop once per new token), and put
on a roofline (`rlhf_jax.plan.roofline`): a lower bound per function and for the whole iteration, with
the model-FLOPs utilisation it would reach. Without `--topology` each function also runs on the
local devices (zeros for weights, every row decoded to the full length) and its measured seconds
stand beside the estimate, on a roofline of this machine's measured matmul and memory speed.
A Pallas kernel (`model.attention = "splash"`) is one opaque custom call to that reader: its own
FLOPs are not counted, its HBM bytes only as one read of its operands and one write of its result.

Memory per device counts everything resident while a function runs, not only its arguments: the
train state (params and optimizer moments), the frozen LoRA base, the reference, the reward model,
the rollout batch during the update, plus the function's temporaries and outputs (less the donated
buffers its outputs reuse).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time

import jax

GIB = 2 ** 30
MIB = 2 ** 20

# (topology name prefix, libtpu topology name prefix, chip config, HBM GiB per chip): HBM as XLA
# reports it when a program does not fit.
GENERATIONS = {
    "v5e": ("v5e", "default", 15.75),
    "v5p": ("v5", "megacore", 95.74),
    "v4": ("v4", "megacore", 30.75),
}


class PlanError(ValueError):
    """A planner argument that cannot work (one line, exit status 2)."""


def topology_devices(topology: str):
    """The compile-only devices of a TPU slice named like "v5e:4x4", "v5p:2x2x1" or "v4:2x2x1",
    and the HBM per chip in GiB."""
    generation, _, shape = topology.partition(":")
    if generation not in GENERATIONS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise PlanError(f"--topology={topology!r}: expected <generation>:<shape> with generation one of "
                        f"{sorted(GENERATIONS)}, e.g. v5e:4x4, v5p:2x2x1, v4:2x2x1")
    # Compiling needs no TPU of its own: do not take libtpu's one-process-per-host lock (a test run, or
    # a training job on this TPU VM, may hold it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401 - only to say what is missing
        from jax.experimental import topologies
    except ImportError as e:
        raise PlanError(f"--topology needs libtpu for its compile-only TPU devices ({e}): "
                        "pip install -e \".[tpu]\" (or pip install \"jax[tpu]\")") from e
    name, chip_config, hbm = GENERATIONS[generation]
    dims = [int(d) for d in shape.split("x")]
    # A host holds up to 2 x 2 chips of a slice; smaller slices are one host.
    bounds = tuple(min(d, 2) for d in dims[:2]) + (1,)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{name}:{shape}",
                                        chip_config_name=chip_config, chips_per_host_bounds=bounds, num_slices=1,
                                        wrap=(False,) * 3)
    return list(desc.devices), hbm


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _hbm_needed(message: str):
    """(needed, available) GiB from XLA's out-of-memory message, or None."""
    match = re.search(r"\(([\d.]+)([MGK])\) exceeds available HBM \(([\d.]+)([MGK])\)", message)
    if not match:
        return None
    unit = {"K": 1 / 2 ** 20, "M": 1 / 1024, "G": 1.0}
    return float(match.group(1)) * unit[match.group(2)], float(match.group(3)) * unit[match.group(4)]


def compile_report(lowered_fn, resident_bytes: int, extra_bytes: int, hbm_gib: float | None, chip=None,
                   trips: dict | None = None):
    """Compile one function and measure it: (report, compiled or None when it does not fit).
    `resident_bytes`: what stays on the device anyway (the train state, frozen weights, reference,
    reward model); `extra_bytes`: its other arguments; `chip`: a `roofline.Chip` for the estimate;
    `trips`: the runs of loops whose count only the data decides (`time_report`)."""
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is an XlaRuntimeError; report, not raise
        needed = _hbm_needed(str(e))
        if needed is None:
            raise
        return {"fits": False, "compile_s": time.perf_counter() - t0, "needed_gib": needed[0],
                "hbm_gib": needed[1], "error": str(e).splitlines()[0][:300]}, None
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = (resident_bytes + extra_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    report = {
        "argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
        "total_gib": total / GIB, "hbm_gib": hbm_gib, "compile_s": compile_s,
    }
    report["fits"] = hbm_gib is None or report["total_gib"] <= hbm_gib
    report.update(time_report(compiled.as_text(), chip, trips))
    return report, compiled


def time_report(hlo_text: str, chip, trips: dict | None = None) -> dict:
    """Per-device FLOPs, HBM traffic and collectives of a compiled program, its loops (one trip each),
    and the roofline estimate on `chip` (None: no estimate). `trips`: `rlhf_jax.plan.hlo.program_costs`'."""
    from rlhf_jax.plan.hlo import program_costs
    from rlhf_jax.plan.roofline import estimate

    costs = program_costs(hlo_text, trips)
    report = {"flops": costs.flops, "hbm_traffic_gib": costs.hbm_bytes / GIB, "comm_gib": costs.comm_bytes / GIB,
              "comm_gib_by_kind": {k: v / GIB for k, v in costs.comm_by_kind.items() if v},
              "loops": [{"op_name": loop["op_name"], "trips": loop["trips"], "flops": loop["flops"],
                         "hbm_traffic_mib": loop["hbm_bytes"] / MIB, "comm_mib": loop["comm_bytes"] / MIB,
                         **({"trip_est_s": estimate(_LoopCosts(loop), chip)["est_s"]} if chip else {})}
                        for loop in costs.loops]}
    if costs.unknown_trip_counts:
        report["unknown_trip_counts"] = costs.unknown_trip_counts
    if chip is not None:
        report.update(estimate(costs, chip))
    return report


class _LoopCosts:
    """One trip of a loop as `roofline.estimate` reads a program's costs."""

    def __init__(self, loop: dict):
        self.flops, self.hbm_bytes = loop["flops"], loop["hbm_bytes"]
        self.comm_by_kind = loop.get("comm_by_kind", {})


def geometric_lengths(rows: int, budget: int, mean_fraction: float, seed: int = 0):
    """Response lengths for the engine's estimate: geometric (a constant chance to end at each token,
    as a model with an EOS hazard), mean `mean_fraction` x `budget`, cut at the budget."""
    import numpy as np

    mean = max(mean_fraction * budget, 1.0)
    return np.minimum(np.random.default_rng(seed).geometric(1.0 / mean, rows), budget)


def engine_program(config, model_cfg, mesh, chip, resident_bytes: int, hbm_gib: float | None) -> dict:
    """The continuous-batching engine's own rollout program compiled for the devices: its memory (as
    `compile_report`'s: it holds `slots` rows of KV cache, and the outputs of every row) and the slot
    counts of its decode loops, largest first (`tail_sizes` for the decode layout's own row unit, which
    in the tensor layout can be smaller than the cache's). A tail loop's trip is one decode step of its
    slots (`steps`: its costs); the first loop's trip also holds the refill loop (the HLO reader cannot
    know how often that runs), so it is not a step's cost. How many trips each loop makes depends on the
    sampled lengths: `engine_estimate` prices the schedule."""
    from rlhf_jax.plan.aot import abstract_iteration
    from rlhf_jax.sampling.rollout import engine_shape

    step = abstract_iteration(config, model_cfg, mesh, eos_ids=(1,))
    report, _ = compile_report(step.lower_rollout, resident_bytes, per_device_bytes(step.rollout_args[1:]),
                               hbm_gib, chip)
    if "error" in report:
        return report
    slots = min(engine_shape(config, mesh)["slots"], config.train.rollout_batch_size)
    loops = [loop for loop in report["loops"] if "/decode/" in loop["op_name"] and loop["op_name"].endswith("while")]
    keep = ("argument_gib", "output_gib", "alias_gib", "temp_gib", "total_gib", "hbm_gib", "fits", "compile_s")
    return {**{k: report[k] for k in keep}, "sizes": [slots >> i for i in range(len(loops))],
            "steps": [{"slots": slots >> i, "gflop": loop["flops"] / 1e9, "hbm_mib": loop["hbm_traffic_mib"],
                       "comm_mib": loop["comm_mib"], **({"est_s": loop["trip_est_s"]} if "trip_est_s" in loop else {})}
                      for i, loop in enumerate(loops) if i]}


def engine_estimate(config, model_cfg, mesh, chip, mean_fraction: float, resident_bytes: int = 0,
                    hbm_gib: float | None = None) -> dict:
    """The continuous-batching engine's rollout on `chip`: its compiled program's memory and decode steps
    (`engine_program`, under "program"), and its time from its schedule for geometric response lengths
    (`geometric_lengths`). A tail decode step costs what the program's own step of that many slots does;
    a step of all `slots` (whose loop also holds the refills) what the static sampler's decode step of
    `slots` rows does (the same model and cache length; the engine adds a scatter of each row's new keys
    and values), and admitting `refill` requests that share of the static sampler's prefill of `slots`
    rows. Where the program does not fit, every size is priced as the static sampler's ("source")."""
    from rlhf_jax.plan.aot import abstract_iteration
    from rlhf_jax.sampling.engine import schedule, tail_sizes
    from rlhf_jax.sampling.rollout import cache_row_unit, engine_shape

    program = engine_program(config, model_cfg, mesh, chip, resident_bytes, hbm_gib)
    shape = engine_shape(config, mesh)
    budget, rows = config.sampling.max_new_tokens, config.train.rollout_batch_size
    lengths = geometric_lengths(rows, budget, mean_fraction)
    # The smallest slot count the program decodes with halves no further: as a row unit, it gives the
    # program's sizes (where it did not compile, the cache's row unit stands in).
    unit = program["sizes"][-1] if "sizes" in program else cache_row_unit(config, mesh)
    loops = schedule(lengths, shape["slots"], shape["refill"], shape["tail_halvings"], unit)
    sizes = [size for size, _ in loops]
    assert sizes == tail_sizes(min(shape["slots"], rows), shape["tail_halvings"], unit) == program.get("sizes", sizes)
    own = {step["slots"]: step for step in program.get("steps", [])}
    per_size = {}
    for size in sizes:
        if size in own:  # the engine's own decode step (a tail size below the cache's row unit included)
            per_size[size] = {"decode_step_s": own[size]["est_s"], "per_token_comm_mib": own[size]["comm_mib"],
                              "source": "engine"}
            continue
        static = copy.deepcopy(config)
        static.sampling.engine = "static"
        static.train.rollout_batch_size = size
        report, _ = compile_report(abstract_iteration(static, model_cfg, mesh, eos_ids=()).lower_rollout,
                                   0, 0, None, chip)
        _rollout_details(report)
        step_s = report["per_token_est_s"]
        per_size[size] = {"decode_step_s": step_s,
                          "prefill_s": max(report["est_s"] - report["decode_steps"] * step_s, 0.0),
                          "per_token_comm_mib": report["per_token_comm_mib"], "source": "static"}
    slots = sizes[0]
    refills = (rows - slots) // shape["refill"]
    prefill_s = per_size[slots]["prefill_s"] * (1 + refills * shape["refill"] / slots)
    decode_s = sum(steps * per_size[size]["decode_step_s"] for size, steps in loops)
    row_steps = sum(size * steps for size, steps in loops)
    return {"slots": slots, "refill": shape["refill"], "tail_halvings": shape["tail_halvings"],
            "lengths": f"geometric, mean {mean_fraction} x {budget} tokens, cut at {budget} (seed 0)",
            "mean_length": float(lengths.mean()), "at_budget": int((lengths == budget).sum()),
            "loops": [{"slots": size, "steps": steps, **per_size[size]} for size, steps in loops],
            "useful_fraction": float((lengths.sum() - rows) / max(row_steps, 1)),
            "est_s": prefill_s + decode_s, "prefill_s": prefill_s, "decode_s": decode_s, "program": program}


def plan(config, topology: str | None = None, only: tuple[str, ...] = ("rollout", "update"),
         measure: bool | None = None, engine_lengths: float = 0.0, pack_lengths: float = 1.0) -> dict:
    """Compile the rollout and the update of `config` (on `topology`, or the local devices) and
    report each (or those named in `only`); see the module docstring. `measure` (default: without
    a topology): also run each on the local devices and report the median seconds. With
    `train.pack_tokens`, the update runs the packed layout of responses of geometric lengths of mean
    `pack_lengths` x `max_new_tokens` (1: every one at the budget)."""
    unknown = sorted(set(only) - {"rollout", "update"})
    if unknown or not only:
        raise PlanError(f"--only={','.join(only)}: name rollout and/or update")
    from rlhf_jax.config import validate, validate_lengths
    from rlhf_jax.parallel.attention import validate_attention
    from rlhf_jax.parallel.sharding import batch_devices, make_mesh
    from rlhf_jax.plan.aot import abstract_iteration
    from rlhf_jax.plan.roofline import CHIPS, measure_local_chip
    from rlhf_jax.sampling.generate import validate_decode_layout

    validate(config)
    measure = not topology if measure is None else measure
    if measure and topology:
        raise PlanError("--measure runs the functions on the local devices: it cannot go with --topology")
    if topology:
        devices, hbm = topology_devices(topology)
        chip = CHIPS[topology.partition(":")[0]]
    else:
        devices, hbm = jax.devices(), None
        chip = measure_local_chip()
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    validate(config, num_devices=batch_devices(mesh))
    validate_attention(config, mesh.devices.flat[0].platform)
    model_cfg = _model_config(config)
    validate_lengths(config, model_cfg.max_position_embeddings)
    validate_decode_layout(config, model_cfg, mesh)
    # No EOS: every row decodes to max_new_tokens, the length the estimate counts.
    lengths = None
    if config.train.pack_tokens and pack_lengths < 1:
        lengths = geometric_lengths(config.train.rollout_batch_size, config.sampling.max_new_tokens, pack_lengths)
    step = abstract_iteration(config, model_cfg, mesh, eos_ids=(), response_lengths=lengths)
    rollout, scores = step.update_args[1:3]
    resident = per_device_bytes(step.resident)
    functions, compiled = {}, {}
    if "rollout" in only:
        functions["rollout"], compiled["rollout"] = compile_report(
            step.lower_rollout, resident, per_device_bytes(step.rollout_args[1:]), hbm, chip)
    if "update" in only:
        functions["update"], compiled["update"] = compile_report(
            step.lower_update, resident, per_device_bytes((rollout, scores, step.update_args[5:])), hbm, chip,
            step.update_trips)
        if step.packing is not None:
            from rlhf_jax.core.packing import packing_stats

            functions["update"]["packing"] = {
                "pack_tokens": config.train.pack_tokens, "micro_rows": config.train.micro_rows,
                "response_lengths": ("all at the budget" if lengths is None else
                                     f"geometric, mean {pack_lengths} x {config.sampling.max_new_tokens} (seed 0)"),
                **packing_stats(step.packing)}
    counts = param_counts(step.rollout_args[0])
    n_params = sum(counts.values())
    devices = len(mesh.devices.flat)
    result = {"topology": topology or jax.default_backend(), "devices": devices,
              "mesh": dict(mesh.shape), "policy_params": n_params,
              "chip": {"peak_tflops": chip.peak_flops / 1e12, "hbm_gb_s": chip.hbm_bandwidth / 1e9,
                       "ici_gb_s": chip.ici_bandwidth and chip.ici_bandwidth / 1e9, "source": chip.source},
              "fits": all(f["fits"] for f in functions.values()), "functions": functions}
    if "rollout" in functions and "error" not in functions["rollout"]:
        _rollout_details(functions["rollout"])
    model_flops = iteration_model_flops(config, model_cfg, counts)
    if step.packing is not None and "update" in model_flops:
        # The model FLOPs of the tokens the packed update trains on (those are for full-length rows).
        padded = config.rl.num_ppo_epochs * config.train.rollout_batch_size * (
            config.data.max_prompt_len + config.sampling.max_new_tokens)
        model_flops["update"] *= functions["update"]["packing"]["real_tokens"] / padded
    for name, f in functions.items():
        if "est_s" in f:
            f["model_flops"] = model_flops[name]
            f["est_mfu"] = model_flops[name] / devices / f["est_s"] / chip.peak_flops
    if all("est_s" in functions.get(name, {}) for name in ("rollout", "update")):
        seconds = functions["rollout"]["est_s"] + functions["update"]["est_s"]
        tokens = config.train.rollout_batch_size * (config.data.max_prompt_len + config.sampling.max_new_tokens)
        result["iteration"] = {"est_s": seconds, "tokens_per_s_per_chip": tokens / seconds / devices,
                               "est_mfu": sum(model_flops.values()) / devices / seconds / chip.peak_flops}
    if engine_lengths and "rollout" in functions and "est_s" in functions["rollout"]:
        engine_config = copy.deepcopy(config)
        engine_config.sampling.engine = "continuous"
        result["engine"] = engine_estimate(engine_config, model_cfg, mesh, chip, engine_lengths, resident, hbm)
        static_s = functions["rollout"]["est_s"]
        result["engine"].update(static_est_s=static_s, speedup=static_s / result["engine"]["est_s"])
        result["fits"] = result["fits"] and result["engine"]["program"]["fits"]
    if measure:
        for name, seconds in measured_seconds(step, compiled).items():
            f = functions[name]
            f["measured_s"] = seconds
            if "est_s" in f:
                f["measured_over_est"] = seconds / f["est_s"]
    return result


def _concrete(tree):
    """Arrays for a tree of sharded ShapeDtypeStructs: integers 1 (masks on, token 1), floats 0,
    made on their devices with their shardings."""
    import jax.numpy as jnp

    def one(x):
        fill = 1 if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint32 else 0
        return jax.jit(lambda: jnp.full(x.shape, fill, x.dtype), out_shardings=x.sharding)()
    return jax.tree.map(one, tree)


def measured_seconds(step, compiled: dict, repeats: int = 3) -> dict:
    """Median seconds of each compiled function on the local devices, after one warm-up call. The
    update's state is donated, so every call gets a fresh one (made outside the timing)."""
    import statistics

    def timed(fn, make_args):
        times = []
        for i in range(repeats + 1):
            args, kwargs = make_args()
            jax.block_until_ready((args, kwargs))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args, **kwargs))
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    seconds = {}
    if compiled.get("rollout") is not None:
        rollout_args = _concrete((step.rollout_args, step.rollout_kwargs))
        seconds["rollout"] = timed(compiled["rollout"], lambda: rollout_args)
    if compiled.get("update") is not None:
        state, rollout, scores, frozen, reference = step.update_args[:5]
        rest = _concrete((rollout, scores, frozen, reference)) + ((step.packing,) if step.packing else ())
        seconds["update"] = timed(compiled["update"], lambda: ((_concrete(state), *rest), {}))
    return seconds


def _rollout_details(report: dict) -> None:
    """The decode loops' (the sampler's, `sampling.decode_segments` of them) costs per token,
    averaged over their steps, and what the rest (the prefill) moves."""
    loops = [loop for loop in report["loops"] if "/decode/" in loop["op_name"] and loop["op_name"].endswith("while")]
    steps = sum(loop["trips"] or 1 for loop in loops)
    if not steps:
        return
    total = {key: sum(loop[key] * (loop["trips"] or 1) for loop in loops) for key in ("comm_mib", "hbm_traffic_mib", "flops")}
    report["decode_steps"] = steps
    report["per_token_comm_mib"] = total["comm_mib"] / steps
    report["per_token_hbm_mib"] = total["hbm_traffic_mib"] / steps
    report["per_token_gflop"] = total["flops"] / steps / 1e9
    report["prefill_comm_gib"] = max(report["comm_gib"] - total["comm_mib"] / 1024, 0.0)
    if all("trip_est_s" in loop for loop in loops):  # with a chip: the roofline time of a decode step
        report["per_token_est_s"] = sum(loop["trip_est_s"] * (loop["trips"] or 1) for loop in loops) / steps


def param_counts(params) -> dict:
    """Parameters of a policy's params tree by role: "body" (the blocks' matmuls and norms), "head"
    (the vocabulary projection: the embedding when tied) and "embed" (lookup tables)."""
    from rlhf_jax.parallel.sharding import path_keys

    counts = {"body": 0, "head": 0, "embed": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(k) for k in path_keys(path)]
        role = "head" if "lm_head" in keys else "embed" if keys[-1] in ("embed", "pos_embed") else "body"
        counts[role] += math.prod(leaf.shape)
    return counts


def iteration_model_flops(config, model_cfg, counts: dict) -> dict:
    """Model FLOPs of one iteration's rollout and update over the whole batch (see
    `roofline.transformer_flops`): the rollout's forward over prompt and response, the head at the
    sampled tokens (and a reward model's forward); the update's PPO epochs (forward and backward) and
    its scoring forwards (reference, recomputed old log-probs, a separate value model)."""
    from rlhf_jax.config import uses_value
    from rlhf_jax.plan.roofline import transformer_flops
    from rlhf_jax.step.state import resolve_old_logprobs

    batch, response = config.train.rollout_batch_size, config.sampling.max_new_tokens
    seq = config.data.max_prompt_len + response
    head = counts["head"] or model_cfg.vocab_size * model_cfg.hidden_size  # tied: the embedding

    def passes(count, backward, lm_head=True):
        return count * transformer_flops(counts["body"], head if lm_head else 0, batch * seq, batch * response,
                                         layers=model_cfg.num_layers, width=model_cfg.hidden_size, seq=seq,
                                         backward=backward)

    rollout = passes(1, "none") + (passes(1, "none", lm_head=False) if config.reward.kind == "model" else 0.0)
    update = passes(config.rl.num_ppo_epochs, "activations" if config.lora.enabled else "full")
    uses_reference = config.algorithm == "ppo" or config.rl.kl_coef > 0
    update += passes(int(uses_reference) + int(resolve_old_logprobs(config) == "recompute"), "none")
    if uses_value(config) and config.model.value_model != "shared":
        update += passes(config.rl.num_ppo_epochs, "full", lm_head=False) + passes(1, "none", lm_head=False)
    return {"rollout": rollout, "update": update}


def _model_config(config):
    from rlhf_jax.models import config_from_hf, read_hf_config
    from rlhf_jax.run.loading import builtin_model_config, load_tokenizer

    if config.model.path:
        return config_from_hf(read_hf_config(config.model.path), config.model.dtype,
                              config.model.param_dtype).replace(scan_layers=bool(config.model.scan_layers))
    vocab = config.model.builtin.vocab_size or len(load_tokenizer(config, None))
    return builtin_model_config(config, vocab)


def memory_reports(result: dict) -> dict:
    """A plan's memory reports by name: each compiled function's, and the continuous engine's own
    program ("engine") where `--engine_lengths` compiled it."""
    reports = dict(result["functions"])
    if "program" in result.get("engine", {}):
        reports["engine"] = result["engine"]["program"]
    return reports


def format_table(result: dict) -> str:
    rows = [f"{result['topology']}: {result['devices']} devices, mesh {result['mesh']}, "
            f"policy {result['policy_params'] / 1e9:.2f} B params",
            f"{'function':10s}{'args GiB':>10s}{'out GiB':>10s}{'temp GiB':>10s}{'total GiB':>11s}"
            f"{'HBM GiB':>9s}{'compile s':>11s}  fits"]
    for name, f in memory_reports(result).items():
        hbm = f"{f['hbm_gib']:.2f}" if f.get("hbm_gib") else "-"
        if "error" in f:
            rows.append(f"{name:10s}{'':>30s}{f['needed_gib']:11.2f}{hbm:>9s}{f['compile_s']:11.1f}  NO")
            continue
        rows.append(f"{name:10s}{f['argument_gib']:10.2f}{f['output_gib']:10.2f}{f['temp_gib']:10.2f}"
                    f"{f['total_gib']:11.2f}{hbm:>9s}{f['compile_s']:11.1f}  {'yes' if f['fits'] else 'NO'}")
    timed = {name: f for name, f in result["functions"].items() if "flops" in f}
    if timed:
        chip = result["chip"]
        rows += ["", f"time per device (roofline lower bound; chip: {chip['peak_tflops']:.4g} TFLOP/s, "
                     f"HBM {chip['hbm_gb_s']:.4g} GB/s, ICI {chip['ici_gb_s'] or '?'} GB/s; {chip['source']})",
                 f"{'function':10s}{'TFLOP':>9s}{'HBM GiB':>9s}{'comm GiB':>10s}{'est s':>9s}  {'bound':8s}"
                 f"{'MFU':>6s}{'measured s':>12s}"]
        for name, f in timed.items():
            measured = f"{f['measured_s']:12.4g}" if "measured_s" in f else f"{'-':>12s}"
            mfu = f"{f['est_mfu']:6.0%}" if "est_mfu" in f else f"{'-':>6s}"
            rows.append(f"{name:10s}{f['flops'] / 1e12:9.3g}{f['hbm_traffic_gib']:9.3g}{f['comm_gib']:10.3g}"
                        f"{f.get('est_s', float('nan')):9.3g}  {f.get('est_bound', '-'):8s}{mfu}{measured}")
            kinds = ", ".join(f"{k} {v:.3g}" for k, v in f["comm_gib_by_kind"].items())
            if kinds:
                rows.append(f"{'':10s}collectives GiB: {kinds}")
            if "packing" in f:
                pk = f["packing"]
                micro = f", micro-batches of {pk['micro_rows']} row(s) per device" if pk["micro_rows"] else ""
                rows.append(f"{'':10s}packed rows of {pk['pack_tokens']} tokens ({pk['rows']} per forward{micro}), "
                            f"responses {pk['response_lengths']}: {pk['real_fraction']:.0%} of the computed "
                            "tokens are real")
            if "per_token_comm_mib" in f:
                rows.append(f"{'':10s}decode loop, per token: {f['per_token_gflop']:.3g} GFLOP, "
                            f"{f['per_token_hbm_mib']:.4g} MiB HBM, {f['per_token_comm_mib']:.3g} MiB collectives; "
                            f"the rest (prefill) {f['prefill_comm_gib']:.3g} GiB collectives")
        if "engine" in result:
            e = result["engine"]
            loops = ", ".join(f"{loop['steps']} steps of {loop['slots']}" for loop in e["loops"])
            rows.append(f"rollout with the continuous engine ({e['lengths']}; {loops}; useful fraction "
                        f"{e['useful_fraction']:.2f}): {e['est_s']:.3g} s against {e['static_est_s']:.3g} s "
                        f"static ({e['speedup']:.2f}x)")
            for loop in e["loops"]:
                how = ("the engine's own step" if loop["source"] == "engine"
                       else f"as the static sampler's at {loop['slots']} rows")
                rows.append(f"{'':10s}{loop['steps']} decode steps of {loop['slots']} slots ({how}): "
                            f"{loop['per_token_comm_mib']:.3g} MiB collectives, {loop['decode_step_s'] * 1e3:.3g} ms each")
        if "iteration" in result:
            it = result["iteration"]
            rows.append(f"iteration: {it['est_s']:.3g} s, {it['tokens_per_s_per_chip']:.4g} tokens/s per chip, "
                        f"model FLOPs utilisation {it['est_mfu']:.0%} (estimates)")
    return "\n".join(rows)


def _main(config):
    from absl import flags
    try:
        result = plan(config, flags.FLAGS.topology or None, tuple(flags.FLAGS.only), measure=flags.FLAGS.measure,
                      engine_lengths=flags.FLAGS.engine_lengths, pack_lengths=flags.FLAGS.pack_lengths)
    except PlanError as e:  # run_cli reports the config's and the model folder's errors alike
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    for name, f in memory_reports(result).items():
        if name == "engine":
            name = "the continuous engine's rollout"
        if not f["fits"]:
            needed = f.get("needed_gib", f.get("total_gib"))
            print(f"does not fit: {name} needs {needed:.2f} GiB per device, {f['hbm_gib']:.2f} GiB available",
                  file=sys.stderr)
    print(json.dumps(result))
    sys.exit(0 if result["fits"] else 3)


def run():
    """Console entry point (`rlhf-jax-plan`, `python -m rlhf_jax.plan`)."""
    from absl import flags

    from rlhf_jax.run.cli import run_cli

    def extra_flags():
        flags.DEFINE_string("topology", "", "A TPU slice to compile for (v5e:4x4, v5p:2x2x1, v4:2x2x1); "
                                            "empty: the local devices.")
        flags.DEFINE_list("only", ["rollout", "update"], "The functions to compile.")
        flags.DEFINE_bool("measure", None, "Also run each function on the local devices and report its seconds "
                                           "(default: without --topology).")
        flags.DEFINE_float("engine_lengths", 0.0, "Also estimate the continuous-batching engine's rollout for "
                                                  "geometric response lengths of this mean, as a fraction of "
                                                  "max_new_tokens (e.g. 0.25); 0: no.")
        flags.DEFINE_float("pack_lengths", 1.0, "With train.pack_tokens: the update's packed layout holds "
                                                "responses of geometric lengths of this mean, as a fraction of "
                                                "max_new_tokens; 1: every one at the budget.")

    # As before this command line existed here, the planner runs in the process it was started in.
    run_cli(_main, "Path to a config file (a get_config() -> ConfigDict).", extra_flags, workdir=False, setup=False)


if __name__ == "__main__":
    run()
