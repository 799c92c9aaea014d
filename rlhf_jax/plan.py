"""Will it fit? Compile a config's rollout and update for a TPU slice (or the local devices) from
shapes alone and report per-device memory, FLOPs and compile time.

    python -m rlhf_jax.plan --config=configs/llama3_8b_ppo.py --topology=v5e:4x4
    python -m rlhf_jax.plan --config=configs/tiny.py                       # the local devices

No weights are created: the models are `nnx.eval_shape`d, and every argument is a
`jax.ShapeDtypeStruct` with the sharding the trainer gives it. `--topology` needs libtpu
(`pip install -e ".[tpu]"`), whose compile-only devices stand in for the slice. The last line
printed is one JSON object; the exit status is 3 when a function does not fit.

Memory per device counts everything resident while a function runs, not only its arguments: the
train state (params and optimizer moments), the frozen LoRA base, the reference, the reward model,
the rollout batch during the update, plus the function's temporaries and outputs (less the donated
buffers its outputs reuse).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

import jax

GIB = 2 ** 30

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
        from jax.experimental import topologies
        import libtpu  # noqa: F401 - only to say what is missing
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


def compile_report(lowered_fn, resident_bytes: int, extra_bytes: int, hbm_gib: float | None) -> dict:
    """Compile one function and measure it. `resident_bytes`: what stays on the device anyway (the
    train state, frozen weights, reference, reward model); `extra_bytes`: its other arguments."""
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is an XlaRuntimeError; report, not raise
        needed = _hbm_needed(str(e))
        if needed is None:
            raise
        return {"fits": False, "compile_s": time.perf_counter() - t0, "needed_gib": needed[0],
                "hbm_gib": needed[1], "error": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (resident_bytes + extra_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    report = {
        "argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
        "total_gib": total / GIB, "hbm_gib": hbm_gib, "compile_s": compile_s,
        "flops": float((cost or {}).get("flops", 0.0)),
    }
    report["fits"] = hbm_gib is None or report["total_gib"] <= hbm_gib
    return report


def plan(config, topology: str | None = None, only: tuple[str, ...] = ("rollout", "update")) -> dict:
    """Compile the rollout and the update of `config` (on `topology`, or the local devices) and
    report each (or those named in `only`); see the module docstring."""
    unknown = sorted(set(only) - {"rollout", "update"})
    if unknown or not only:
        raise PlanError(f"--only={','.join(only)}: name rollout and/or update")
    from rlhf_jax.aot import abstract_iteration
    from rlhf_jax.config import validate, validate_lengths
    from rlhf_jax.sharding import make_mesh

    validate(config)
    if topology:
        devices, hbm = topology_devices(topology)
    else:
        devices, hbm = jax.devices(), None
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    validate(config, num_devices=mesh.shape["data"] * mesh.shape["fsdp"])
    model_cfg = _model_config(config)
    validate_lengths(config, model_cfg.max_position_embeddings)
    step = abstract_iteration(config, model_cfg, mesh)
    _, rollout, scores, _, _ = step.update_args
    resident = per_device_bytes(step.resident)
    functions = {}
    if "rollout" in only:
        functions["rollout"] = compile_report(step.lower_rollout, resident, per_device_bytes(step.rollout_args[1:]),
                                              hbm)
    if "update" in only:
        functions["update"] = compile_report(step.lower_update, resident, per_device_bytes((rollout, scores)), hbm)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(step.rollout_args[0]))
    return {"topology": topology or jax.default_backend(), "devices": len(mesh.devices.flat),
            "mesh": dict(mesh.shape), "policy_params": n_params,
            "fits": all(f["fits"] for f in functions.values()), "functions": functions}


def _model_config(config):
    from rlhf_jax.loading import builtin_model_config, load_tokenizer
    from rlhf_jax.models import config_from_hf, read_hf_config

    if config.model.path:
        return config_from_hf(read_hf_config(config.model.path), config.model.dtype, config.model.param_dtype)
    vocab = config.model.builtin.vocab_size or len(load_tokenizer(config, None))
    return builtin_model_config(config, vocab)


def format_table(result: dict) -> str:
    rows = [f"{result['topology']}: {result['devices']} devices, mesh {result['mesh']}, "
            f"policy {result['policy_params'] / 1e9:.2f} B params",
            f"{'function':10s}{'args GiB':>10s}{'out GiB':>10s}{'temp GiB':>10s}{'total GiB':>11s}"
            f"{'HBM GiB':>9s}{'TFLOP':>9s}{'compile s':>11s}  fits"]
    for name, f in result["functions"].items():
        hbm = f"{f['hbm_gib']:.2f}" if f.get("hbm_gib") else "-"
        if "error" in f:
            rows.append(f"{name:10s}{'':>30s}{f['needed_gib']:11.2f}{hbm:>9s}{'':>9s}{f['compile_s']:11.1f}  NO")
            continue
        rows.append(f"{name:10s}{f['argument_gib']:10.2f}{f['output_gib']:10.2f}{f['temp_gib']:10.2f}"
                    f"{f['total_gib']:11.2f}{hbm:>9s}{f['flops'] / 1e12:9.1f}{f['compile_s']:11.1f}  "
                    f"{'yes' if f['fits'] else 'NO'}")
    return "\n".join(rows)


def _main(argv):
    del argv
    from absl import flags

    from rlhf_jax.config import ConfigError
    try:
        result = plan(flags.FLAGS.config, flags.FLAGS.topology or None, tuple(flags.FLAGS.only))
    except (ConfigError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    for name, f in result["functions"].items():
        if not f["fits"]:
            needed = f.get("needed_gib", f.get("total_gib"))
            print(f"does not fit: {name} needs {needed:.2f} GiB per device, {f['hbm_gib']:.2f} GiB available",
                  file=sys.stderr)
    print(json.dumps(result))
    sys.exit(0 if result["fits"] else 3)


def run():
    from rlhf_jax.runtime import cpu_only_without_accelerators
    cpu_only_without_accelerators()
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a config file (a get_config() -> ConfigDict).",
                                    lock_config=True)
    flags.DEFINE_string("topology", "", "A TPU slice to compile for (v5e:4x4, v5p:2x2x1, v4:2x2x1); "
                                        "empty: the local devices.")
    flags.DEFINE_list("only", ["rollout", "update"], "The functions to compile.")
    flags.mark_flags_as_required(["config"])
    try:
        app.run(_main)
    except (AttributeError, KeyError) as e:
        print(f"error: bad config override: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
