"""Jitted autoregressive sampling with a static-shape KV cache.

`generate` prefills the cache with the (left-padded) prompts, samples the first
token from the prefill's last hidden state, then decodes one token per step
inside `lax.while_loop`, stopping as soon as every row has produced an EOS.
All the randomness (one uniform per row and step) is drawn from `key` before the
loop, so a call is a pure function of its key. Nothing synchronises with the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.config import ConfigError
from rlhf_jax.core.ops import last_token_index, token_logprobs
from rlhf_jax.models.transformer import NO_PINS, Pins, init_cache
from rlhf_jax.options import DECODE_LAYOUTS
from rlhf_jax.parallel.sharding import (
    BATCH_AXES,
    MODEL_AXES,
    batch_constraint,
    batch_devices,
    decode_mesh,
    param_shardings,
    path_keys,
)

_NEG_INF = -jnp.inf


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Mask (to -inf) the logits outside the top-k set and outside the nucleus.

    logits: f32[..., vocab]. top_k = 0 and top_p = 1 mean no filtering. The
    nucleus is the smallest set of most likely tokens whose probability reaches
    top_p (the most likely token is always kept).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, _NEG_INF, logits)
    return logits


def truncates(temperature: float, top_k: int, top_p: float) -> bool:
    """Whether sampling draws from a truncated distribution (top-k or top-p at temperature > 0)."""
    return temperature > 0 and (top_k > 0 or top_p < 1.0)


def sample_token(logits, uniform, temperature: float, top_k: int, top_p: float, with_gap: bool = False):
    """Draw one token per row; return (token int32[b], its logprob f32[b]) (and, with `with_gap`, the
    truncation gap f32[b]).

    uniform: f32[b] in [0, 1), the row's random number (`jax.random.uniform(key, (b,))`).
    The logprob is under the distribution the token was drawn from: logits /
    temperature, filtered. temperature == 0 is greedy (logprob under the raw logits;
    `uniform` is unused). The gap is that logprob minus the token's log-prob under the unfiltered
    logits / temperature, which the trainer scores: -log(the probability mass the filters kept), 0
    without filters.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprob = token_logprobs(logits, token)
        return (token, logprob, jnp.zeros_like(logprob)) if with_gap else (token, logprob)
    scaled = logits / temperature
    filtered = filter_logits(scaled, top_k, top_p)
    token = categorical(uniform, filtered)
    logprob = token_logprobs(filtered, token)
    if not with_gap:
        return token, logprob
    return token, logprob, logprob - token_logprobs(scaled, token)


def categorical(uniform, logits):
    """One draw per row from softmax(logits) by inverting the CDF at `uniform` f32[...] in [0, 1).

    Exact like Gumbel-max, but needs `batch` random numbers instead of `batch x vocab`
    (on CPU the PRNG, not the model, dominated a decode step's sampling).
    """
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[..., -1:]
    # uniform x total can round up to the total. Kept below it, the first CDF entry above the target
    # always exists and belongs to a token with probability > 0.
    target = jnp.minimum(uniform[..., None].astype(cdf.dtype) * total, jnp.nextafter(total, 0))
    return jnp.sum(cdf <= target, axis=-1).astype(jnp.int32)


def segment_bounds(max_new_tokens: int, segments: int) -> list[tuple[int, int]]:
    """The decode loop's steps 1..max_new_tokens-1 as up to `segments` contiguous (start, end) ranges
    of near-equal length."""
    if segments < 1:
        raise ValueError(f"decode_segments must be >= 1, got {segments}")
    steps = max_new_tokens - 1
    cuts = sorted({1 + steps * i // segments for i in range(segments + 1)})
    return [(a, b) for a, b in zip(cuts, cuts[1:])] or [(1, max(1, max_new_tokens))]


def _pin_cache(mesh, cache, heads=None):
    """The KV cache with its rows over the mesh's batch axes and its KV heads over `heads` (a mesh
    axis of a `decode_mesh`, or None: whole); the write index stays replicated."""
    def pin(name, value):
        if name == "index":
            return value
        if name in ("k", "v"):
            stacked = not isinstance(value, tuple)  # `scan_layers`: [layers, batch, ...]
            spec = NamedSharding(mesh, P(*([None] if stacked else []), BATCH_AXES, heads, None, None))
            return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), value)
        return jax.tree.map(batch_constraint(mesh), value)

    return {name: pin(name, value) for name, value in cache.items()}


def _repeat_rows(cache, group: int, stacked: bool):
    """A KV cache (`init_cache`'s pytree) with every row repeated `group` times in a row."""
    repeat = lambda axis: lambda a: jnp.repeat(a, group, axis=axis)
    kv_axis = 1 if stacked else 0  # stacked: [layers, batch, ...]
    return {**cache, "k": jax.tree.map(repeat(kv_axis), cache["k"]), "v": jax.tree.map(repeat(kv_axis), cache["v"]),
            "key_mask": repeat(0)(cache["key_mask"]), "positions": repeat(0)(cache["positions"])}


def _cast_in_use(path, leaf) -> bool:
    """Whether a parameter's uses cast it to the compute dtype (projections and embedding tables; norms
    compute in float32)."""
    keys = [str(k) for k in path_keys(path)]
    return jnp.issubdtype(leaf.dtype, jnp.floating) and (
        keys[-1] in ("kernel", "lora_a", "lora_b", "embed", "pos_embed")
        or (keys[-1] == "bias" and "norm" not in keys[-2]))


def _as_computed(path, leaf, dtype):
    """A parameter in the dtype its use casts it to, so that the decoder's copy is no larger than needed."""
    return leaf.astype(dtype) if _cast_in_use(path, leaf) else leaf


def _stored_wider(params, dtype) -> bool:
    """Whether the projections are stored in another dtype than they compute in (f32 master weights): a
    decoder then reads a cast copy whatever its layout, and a tensor-parallel one costs no memory."""
    sizes = [(x.size, x.dtype != dtype) for p, x in jax.tree_util.tree_leaves_with_path(params) if _cast_in_use(p, x)]
    return 2 * sum(n for n, wider in sizes if wider) > sum(n for n, _ in sizes)  # LoRA's f32 adapters are few


def _tensor_row_unit(cfg, mesh) -> int:
    """The devices a tensor-parallel decode loop's rows split over: data x the model devices beyond one
    per KV head (`decode_mesh`)."""
    model = mesh.shape["fsdp"] * mesh.shape["tensor"]
    return mesh.shape["data"] * model // math.gcd(cfg.num_kv_heads, model)


def tensor_decode_problem(cfg, mesh, batch: int) -> str | None:
    """Why the tensor-parallel decode layout does not fit `mesh` (None when it does): the query heads
    and the MLP's hidden units must split evenly over the model devices, the rows over the rest."""
    model = mesh.shape["fsdp"] * mesh.shape["tensor"]
    rows = _tensor_row_unit(cfg, mesh)
    if cfg.num_heads % model:
        return f"{cfg.num_heads} query heads do not split over {model} model devices (fsdp x tensor)"
    if cfg.intermediate_size % model:
        return f"intermediate_size {cfg.intermediate_size} does not split over {model} model devices"
    if batch % rows:
        return f"{batch} rows do not split over {rows} (data x the devices beyond one per KV head)"
    return None


def _tensor_parallel_decoder(cfg, graphdef, params, batch_mesh):
    """The decode loop's model on `decode_mesh(batch_mesh)`, its weights copied tensor parallel; how the
    loop pins its cache, its activations (the residual stream whole on every model device) and the
    logits; and what the prefill's pins add: its keys and values, computed by rows, written into the
    cache laid out by heads."""
    mesh = decode_mesh(batch_mesh, cfg.num_kv_heads)
    model = nnx.merge(graphdef, tensor_parallel_copy(params, mesh, cfg))
    pin_to = lambda spec: functools.partial(jax.lax.with_sharding_constraint, shardings=NamedSharding(mesh, spec))
    # Pinned at every step: left to XLA, the rows of the sampled tokens or of the cache split the
    # activations, and every layer's weights were gathered to match.
    by_unit = pin_to(P("data", None, MODEL_AXES))  # each device's heads or hidden units, every row
    by_head = pin_to(P(BATCH_AXES, None, "tensor"))  # as the KV cache: its rows, its KV heads
    decode_pins = Pins(residual=pin_to(P("data")), heads=lambda y: by_head(by_unit(y)), attention_out=by_unit,
                       mlp_hidden=by_unit, fuse_qkv=False)
    rows, cached = batch_constraint(batch_mesh), pin_to(P(BATCH_AXES, "tensor", None, None))
    return (model, functools.partial(_pin_cache, mesh, heads="tensor"), decode_pins,
            lambda y: cached(rows(y)), NamedSharding(mesh, P(None, MODEL_AXES)))


def tensor_parallel_copy(params, mesh, cfg):
    """The decoder's copy of `params` on `decode_mesh(mesh, ...)`, tensor parallel (see
    `rlhf_jax.parallel.sharding.param_shardings(..., decode=True)`), in the compute dtype where that is
    what a use reads."""
    params = jax.tree_util.tree_map_with_path(lambda p, x: _as_computed(p, x, cfg.compute_dtype), params)
    return jax.lax.with_sharding_constraint(params, param_shardings(params, mesh, decode=True))


def request_uniforms(key, requests: int, steps: int):
    """The random numbers of a call, f32[steps, requests]: request r's token t is drawn with [t, r]
    (`categorical`), whichever row, slot or step of a loop samples it: the static sampler and the
    continuous-batching engine give the same samples from the same key."""
    return jax.random.uniform(key, (steps, requests))


def output_buffers(rows: int, max_new_tokens: int, pad_id: int, with_values: bool, with_gap: bool) -> dict:
    """A sampler's outputs before any token: pad ids, masks 0, log-probs 0 (values and the truncation
    gap where asked), [rows, max_new_tokens] each."""
    zeros = lambda: jnp.zeros((rows, max_new_tokens), jnp.float32)
    buffers = {"response_ids": jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
               "response_mask": jnp.zeros((rows, max_new_tokens), jnp.int32), "logprobs": zeros()}
    if with_values:
        buffers["values"] = zeros()
    if with_gap:
        buffers["truncation_gap"] = zeros()
    return buffers


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a sampler runs the model on a mesh (`decoding`): the prefill's model and pins, the decode
    loop's model (a tensor-parallel copy, or the same) and pins, how the KV cache is pinned (`pin`),
    and `logits_of(hidden) -> f32 logits` laid out by rows for the sampler."""

    model: nnx.Module
    decoder: nnx.Module
    pin: Callable
    decode_pins: Pins
    cache_write: Callable | None
    logits_of: Callable
    batch_mesh: object
    shard_prefill: bool
    row_unit: int = 1  # the devices the decode loop's rows split over (its row counts are multiples)

    def prefill(self, prompt_ids, prompt_mask, cache_len: int, prompt_group: int = 1):
        """Run the prompts (left-padded, int32[b, prompt_len]) into a fresh cache of `cache_len` slots
        per row; return (the hidden state at each row's last prompt token f[b, d], the cache).
        prompt_group: rows hold each prompt that many times in a row; each is run once and its cache
        repeated."""
        if prompt_group > 1:
            prompt_ids, prompt_mask = prompt_ids[::prompt_group], prompt_mask[::prompt_group]
        cfg = self.model.cfg
        cache = self.pin(init_cache(cfg, prompt_ids.shape[0], cache_len))
        rows = self.batch_mesh is not None and self.shard_prefill and not (
            prompt_ids.shape[0] % batch_devices(self.batch_mesh))
        pins = Pins(residual=batch_constraint(self.batch_mesh) if rows else None, cache_write=self.cache_write)
        hidden, cache = self.model.backbone(prompt_ids, prompt_mask, cache,
                                            output_index=last_token_index(prompt_mask)[:, None], pins=pins,
                                            fresh_cache=True)
        hidden = hidden[:, 0]
        if prompt_group > 1:
            hidden = jnp.repeat(hidden, prompt_group, axis=0)
            cache = self.pin(_repeat_rows(cache, prompt_group, cfg.scan_layers))
        return hidden, cache


def decoding(graphdef, params, batch: int, cache_len: int, *, batch_mesh=None, decode_layout: str = "batch",
             shard_prefill: bool = False) -> Decoding:
    """The model of `nnx.split(model)` set up to sample `batch` rows with caches of `cache_len` slots
    (see `generate` for `batch_mesh`, `decode_layout` and `shard_prefill`)."""
    if decode_layout not in DECODE_LAYOUTS:
        raise ValueError(f"decode_layout must be one of {DECODE_LAYOUTS}, got {decode_layout!r}")
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    if decode_layout != "batch" and batch_mesh is not None:
        problem = tensor_decode_problem(cfg, batch_mesh, batch)
        if decode_layout == "tensor" and problem:
            raise ValueError(f'decode_layout="tensor": {problem}')
        if decode_layout == "auto":
            single = batch_mesh.shape["fsdp"] * batch_mesh.shape["tensor"] == 1
            copy_free = _stored_wider(params, cfg.compute_dtype)
            decode_layout = "tensor" if copy_free and not (problem or single) else "batch"
    elif decode_layout == "tensor":
        raise ValueError('decode_layout="tensor" needs a batch_mesh')
    if cache_len > cfg.max_position_embeddings and cfg.family == "gpt2":
        raise ValueError(
            f"prompt_len + max_new_tokens = {cache_len} exceeds the model's "
            f"max_position_embeddings = {cfg.max_position_embeddings}")

    pin = (lambda tree: tree) if batch_mesh is None else functools.partial(_pin_cache, batch_mesh)
    decoder, decode_pins, cache_write = model, NO_PINS, None
    row_unit = 1 if batch_mesh is None else batch_devices(batch_mesh)
    if decode_layout == "tensor":
        row_unit = _tensor_row_unit(cfg, batch_mesh)
        # The cache is laid out by heads from the start, and the prefill moves each layer's keys and
        # values there as it writes them. Written by rows and resharded whole afterwards, both copies
        # of the cache were alive at once (the NeMo-sized rollout needed 98.4 GiB per v5p chip, against
        # 87.9); unpinned, XLA moved them in float32 from inside RoPE (22.1 against 15.9 GiB of
        # collectives for the 8B's prefill on 16 chips).
        decoder, pin, decode_pins, cache_write, by_vocab = _tensor_parallel_decoder(cfg, graphdef, params,
                                                                                   batch_mesh)
    elif batch_mesh is not None:
        by_vocab = NamedSharding(batch_mesh, P(None, BATCH_AXES))

    # The sampler works on rows: with a batch_mesh, the logits are made per vocabulary slice (as the
    # head is sharded; pinned, else XLA gathers the whole head at every step), exchanged once, and each
    # device samples its own rows, instead of every device filtering and summing the whole batch.
    if batch_mesh is None:
        logits_of = decoder.logits
    else:
        rows = batch_constraint(batch_mesh)
        to_rows = lambda logits: rows(jax.lax.with_sharding_constraint(logits, by_vocab))
        if decode_pins.residual is None:
            logits_of = lambda h: to_rows(decoder.logits(h))
        else:  # one matmul against each device's slice of the head, and the logits exchanged in bf16
            logits_of = lambda h: decoder.logits(decode_pins.residual(h), constrain=to_rows)
    return Decoding(model=model, decoder=decoder, pin=pin, decode_pins=decode_pins, cache_write=cache_write,
                    logits_of=logits_of, batch_mesh=batch_mesh, shard_prefill=shard_prefill, row_unit=row_unit)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id",
                     "with_values", "batch_mesh", "shard_prefill", "decode_segments",
                     "decode_layout", "prompt_group"))
def generate(graphdef, params, prompt_ids, prompt_mask, key, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_ids: Sequence[int] = (), pad_id: int = 0, with_values: bool = False,
             batch_mesh=None, shard_prefill: bool = False,
             decode_segments: int = 1, decode_layout: str = "batch", prompt_group: int = 1):
    """Sample `max_new_tokens` continuations of a batch of prompts.

    Args:
      graphdef, params: `nnx.split(model)` of a `CausalLM` (params may be sharded).
      prompt_ids, prompt_mask: int32[batch, prompt_len], left-padded (mask 0 on pads).
      key: a PRNG key; the same key gives the same samples.
      temperature: 0 for greedy decoding.
      top_k, top_p: 0 / 1.0 disable the filters.
      eos_ids: tuple of token ids that end a row (the EOS is kept, masked in).
      pad_id: written after a row's EOS.
      with_values: also return the value head's output at each sampled position
        (the model must have a value head); costs no extra forward.
      batch_mesh: a `jax.sharding.Mesh` whose batch axes (data, fsdp) split the KV cache's rows and
        the sampler's, or None (XLA places them, and on a mesh may replicate them: every device then
        reads the whole batch's keys and values, or samples the whole batch, at every step).
      shard_prefill: with `batch_mesh`, also pin the prefill's residual stream to the batch axes, so
        that its matmuls gather each layer's weights instead of all-reducing [batch, prompt, hidden]
        partial sums (left to XLA, an 8B prefill of 64 x 512 tokens on 16 chips all-reduced 74 GiB
        per chip). The decode loop is left to XLA: pinned too, it gathered every layer's weights at
        every token.
      decode_segments: the decode loop as this many loops, one after another, each attending to the
        KV cache only as far as its last step has written (the cache is static: one loop reads all
        `prompt_len + max_new_tokens` slots at every step, filled or not). 4 segments read about
        0.6-0.8 of it; each segment compiles its own copy of the decode step. Same samples. For TPU
        slices: XLA:CPU copies each layer's cache to slice it, 3x slower there.
      decode_layout: with `batch_mesh`, how the decode loop is laid out. "batch": the weights as
        given and the KV cache split by rows; XLA reduces each projection's partial sums (on 16
        chips, an 8B model all-reduces about 155 MiB per token). "tensor": tensor parallel over
        the mesh's fsdp x tensor devices, on a copy of the weights made once (`decode_mesh`,
        `tensor_parallel_copy`): a block reduces [batch, hidden] twice (38 MiB per token for the
        8B), and the KV cache is split by heads (and by rows where the devices outnumber the KV
        heads). The copy costs no memory where the weights are stored wider than they compute (f32
        master weights: "batch" reads a bf16 copy too), else their bf16 size over the model devices
        (a LoRA run's bf16 base on 4 chips: 3.5 GiB per chip for an 8B model). "auto": "tensor" on
        more than one model device where it fits (`tensor_decode_problem`) and costs no memory,
        else "batch". Same samples.
      prompt_group: the rows hold each prompt that many times in a row (GRPO's groups): the prefill
        runs each prompt once and its cache is repeated for the group's rows. Same samples.

    Returns a dict:
      response_ids: int32[batch, max_new_tokens], pad after EOS;
      response_mask: int32[batch, max_new_tokens], 1 up to and including EOS;
      logprobs: f32[batch, max_new_tokens], log-prob of each sampled token under the
        temperature-scaled, filtered distribution it came from (0 where masked);
      lengths: int32[batch], the number of response tokens (EOS included);
      values: f32[batch, max_new_tokens] (only with `with_values`);
      truncation_gap: f32[batch, max_new_tokens] (only with top-k or top-p filtering), each token's
        logprob minus its log-prob under the unfiltered distribution (see `sample_token`).
    """
    eos_ids = tuple(eos_ids)
    batch, prompt_len = prompt_ids.shape
    sampler = decoding(graphdef, params, batch, prompt_len + max_new_tokens, batch_mesh=batch_mesh,
                       decode_layout=decode_layout, shard_prefill=shard_prefill)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    if batch % prompt_group:
        raise ValueError(f"prompt_group={prompt_group} does not divide the batch of {batch} rows")
    hidden, cache = sampler.prefill(prompt_ids, prompt_mask, prompt_len + max_new_tokens, prompt_group)
    model, pin, decode_pins, logits_of = sampler.decoder, sampler.pin, sampler.decode_pins, sampler.logits_of

    # Drawn up front: inside the loop, XLA:CPU runs each threefry call as a rolled loop of its own
    # (about 2% of a small model's decoding).
    uniforms = request_uniforms(key, batch, max_new_tokens)
    with_gap = truncates(temperature, top_k, top_p)

    def emit(step, hidden, done, buffers):
        token, logprob, *gap = sample_token(logits_of(hidden), uniforms[step], temperature, top_k, top_p,
                                            with_gap=with_gap)
        live = ~done
        token = jnp.where(live, token, pad_id)
        columns = {"response_ids": token, "response_mask": live.astype(jnp.int32),
                   "logprobs": jnp.where(live, logprob, 0.0)}
        if with_gap:
            columns["truncation_gap"] = jnp.where(live, gap[0], 0.0)
        if with_values:
            columns["values"] = jnp.where(live, model.values(hidden), 0.0)
        buffers = {name: jax.lax.dynamic_update_slice(buf, columns[name][:, None].astype(buf.dtype), (0, step))
                   for name, buf in buffers.items()}
        return token, live, done | jnp.isin(token, eos), buffers

    buffers = output_buffers(batch, max_new_tokens, pad_id, with_values, with_gap)
    done = jnp.zeros((batch,), bool)
    token, live, done, buffers = emit(0, hidden, done, buffers)

    def loop(carry, start: int, end: int):
        """Steps start..end-1 (or until every row is done): step s feeds the token of step s - 1,
        written to slot prompt_len + s - 1."""
        kv_len = None if end == max_new_tokens else prompt_len + end - 1

        def cond(carry):
            step, _, _, done, _, _ = carry
            return (step < end) & ~jnp.all(done)

        def body(carry):
            step, token, live, done, cache, buffers = carry
            hidden, cache = model.backbone(token[:, None], live[:, None].astype(jnp.int32), pin(cache),
                                           kv_len=kv_len, pins=decode_pins)
            token, live, done, buffers = emit(step, hidden[:, 0], done, buffers)
            return step + 1, token, live, done, pin(cache), buffers

        # The counter restarts from a constant (the step the last loop ended on, unless every row was
        # done, when no step runs): the planner reads each loop's trip count from it, and finds the
        # loops by their "decode" scope.
        with jax.named_scope("decode"):
            return jax.lax.while_loop(cond, body, (jnp.asarray(start, jnp.int32), *carry[1:]))

    carry = (None, token, live, done, cache, buffers)
    for start, end in segment_bounds(max_new_tokens, decode_segments):
        carry = loop(carry, start, end)
    *_, buffers = carry
    buffers["lengths"] = buffers["response_mask"].sum(-1)
    return buffers


def validate_decode_layout(config, model_config, mesh, slots: int | None = None) -> None:
    """`sampling.decode_layout = "tensor"` needs the heads and the decode loop's rows to split evenly:
    the rollout's, or the continuous engine's `slots` where it runs."""
    if config.sampling.decode_layout != "tensor":
        return
    problem = tensor_decode_problem(model_config, mesh, slots or config.train.rollout_batch_size)
    if problem:
        where = f" with config.sampling.slots = {slots}" if slots else ""
        raise ConfigError(f"config.sampling.decode_layout = 'tensor'{where}: {problem} (use 'auto' or 'batch')")
