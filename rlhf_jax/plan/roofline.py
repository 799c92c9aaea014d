"""Roofline time estimates from a compiled program's costs (`rlhf_jax.plan.hlo.Costs`).

A function takes at least as long as the slowest of its three resources keeps it busy:
  compute = FLOPs / peak FLOP/s,  HBM = bytes / HBM bandwidth,  ICI = link bytes / ICI bandwidth,
per chip, and the estimate is the largest of the three. It is a lower bound, not a prediction: it
assumes every matmul at peak, every byte moved once at full bandwidth, and no overlap lost
between compute and communication.

Link bytes weigh each collective by what a ring moves per device: an all-reduce twice its buffer
(reduce-scatter then all-gather), every other collective once.
"""

from __future__ import annotations

import dataclasses
import time

MIB = 2 ** 20
LINK_FACTOR = {"all-gather": 1.0, "all-reduce": 2.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
               "collective-permute": 1.0}


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures: bf16 peak FLOP/s, HBM bytes/s, bidirectional ICI bytes/s (None: not published)."""

    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float | None
    source: str


# From each generation's Cloud TPU system-architecture page.
CHIPS = {
    "v5e": Chip(197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    # The v4 page gives no per-chip ICI figure: ICI time is not estimated on v4.
    "v4": Chip(275e12, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    "v6e": Chip(918e12, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def link_bytes(comm_by_kind: dict) -> float:
    return sum(LINK_FACTOR[k] * v for k, v in comm_by_kind.items())


def estimate(costs, chip: Chip) -> dict:
    """est_s (the largest of the three times) and est_bound naming it, with each time."""
    times = {"compute": costs.flops / chip.peak_flops, "hbm": costs.hbm_bytes / chip.hbm_bandwidth}
    if chip.ici_bandwidth:
        times["ici"] = link_bytes(costs.comm_by_kind) / chip.ici_bandwidth
    bound = max(times, key=times.get)
    return {"est_s": times[bound], "est_bound": bound, **{f"{k}_s": v for k, v in times.items()}}


def measure_local_chip(size: int = 2048, copy_mib: int = 256, repeats: int = 9) -> Chip:
    """This machine's device 0 as a Chip: a jitted f32 [size, size] matmul's FLOP/s and a jitted
    array copy's bytes/s (read + write). Collectives between local devices are memory copies, so
    they are charged at the memory bandwidth."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args):
        # The fastest run: the machine's capability, not its noise.
        fn(*args).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    a = jnp.ones((size, size), jnp.float32)
    peak = 2 * size ** 3 / best(jax.jit(lambda x: x @ x), a)
    big = jnp.ones((copy_mib * MIB // 4,), jnp.float32)
    bandwidth = 2 * big.nbytes / best(jax.jit(lambda x: x * 2.0), big)
    return Chip(peak, bandwidth, bandwidth, f"measured on {jax.devices()[0].device_kind}")


def transformer_flops(body_params: int, head_params: int, tokens: int, head_tokens: int, *, layers: int,
                      width: int, seq: int, backward: str) -> float:
    """Model FLOPs of a pass over `tokens` tokens in sequences of `seq`, the head (vocabulary
    projection) applied at `head_tokens` of them: 2 x params per token forward (the embedding lookup
    is no matmul) plus attention (4 x layers x seq x width per token, no causal discount); the
    backward doubles the forward ("full": weight and activation gradients, 3x in all) or, for frozen
    weights under LoRA, computes activation gradients only ("activations": 2x). "none": forward only."""
    forward = 2.0 * body_params * tokens + 2.0 * head_params * head_tokens + 4.0 * layers * seq * width * tokens
    return forward * {"none": 1.0, "activations": 2.0, "full": 3.0}[backward]
