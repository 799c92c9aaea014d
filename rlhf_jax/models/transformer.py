"""One decoder-only transformer (Flax NNX) for the GPT-2, Llama/Qwen2/Qwen3/Mistral/SmolLM3 and Gemma 3 families.

Left padding is handled here, not by callers: position ids come from the
attention mask (`cumsum(mask) - 1`), and padded keys are masked out, so a
left-padded row gives the same logits as the same row without padding.

The KV cache has static shapes: `init_cache` allocates `max_len` slots; a call
with a cache writes its `S` new keys/values at `cache["index"]` and advances it.
Prefill is a call with the whole prompt, decoding a call with one token.

Use the modules functionally: `graphdef, params = nnx.split(model)` and
`nnx.merge(graphdef, params)(...)` inside `jax.jit`, as `rlhf_jax.step.forward` and
`rlhf_jax.sampling.generate` do. Where activations sit on a mesh is the caller's choice, passed in as
one `Pins` (sharding constraints, from `rlhf_jax.parallel`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import ModelConfig

_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Pins:
    """Where a forward pins its activations: each field a function applied to one activation (a
    sharding constraint, made by the caller's parallel layout), or None to leave it to XLA.

    residual: the residual stream f[b, s, d] after the embedding and every block;
    heads: the projections q, k and v, f[b, s, heads x head_dim];
    attention_out: the attention's output before o_proj, f[b, s, heads x head_dim];
    mlp_hidden: the MLP's hidden units, f[b, s, intermediate];
    cache_write: the keys and values f[b, kv, s, d] as they are written to a KV cache;
    fuse_qkv: q, k and v as one matmul (False: three, as a tensor-parallel decoder wants them: its
      kernels are split by heads, and their concatenation would be resharded at every step).
    """

    residual: Callable | None = None
    heads: Callable | None = None
    attention_out: Callable | None = None
    mlp_hidden: Callable | None = None
    cache_write: Callable | None = None
    fuse_qkv: bool = True

    def __call__(self, name: str, x):
        pin = getattr(self, name)
        return x if pin is None else pin(x)


NO_PINS = Pins()


def matmul(x, w):
    """x[..., k] @ w[k, n] as one 2-D matmul. With the leading axes flattened, autodiff's weight
    gradient is a plain [k, tokens] x [tokens, n] matmul; left 3-D, it contracts two axes and
    XLA:CPU materialises the transposed gradient in fusions that recompute the backward's
    residual sums layer after layer (the large benchmark's update took 1.46x as long)."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def token_positions(mask, start=None):
    """Each token's position: its index among its row's real tokens (`cumsum(mask) - 1`, 0 on left
    padding), after `start` int[b] earlier ones (a cache's, a shared prompt's) where given."""
    offsets = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(offsets if start is None else start[:, None] + offsets, 0)


def segment_positions(segment_ids):
    """Each token's position within its segment (its index since the segment began): packed rows'
    positions, restarting at every sample."""
    column = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return column - jax.lax.cummax(jnp.where(starts, column, 0), axis=1)


def select_positions(x, index):
    """x[b, s, ...] at the positions `index`: a slice (the same for every row) or int[b, n]."""
    if isinstance(index, slice):
        return x[:, index]
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA: (x @ lora_a) @ lora_b * alpha / rank); kernel stored (in, out).

    The LoRA factors are `nnx.LoRAParam`s, so `nnx.split(model, nnx.LoRAParam, ...)` separates
    the adapters from the frozen base; lora_b starts at zero (the adapters start as no change).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, cfg: ModelConfig,
                 rngs: nnx.Rngs, zero_init: bool = False, name: str = ""):
        shape = (in_features, out_features)
        if zero_init:
            kernel = jnp.zeros(shape, cfg.weight_dtype)
        else:
            kernel = _INIT_STD * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), cfg.weight_dtype)) if use_bias else None
        self.dtype = cfg.compute_dtype
        if cfg.lora_rank and name in cfg.lora_targets:
            self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (in_features, cfg.lora_rank),
                                                          cfg.weight_dtype) / math.sqrt(in_features))
            self.lora_b = nnx.LoRAParam(jnp.zeros((cfg.lora_rank, out_features), cfg.weight_dtype))
            self.lora_scale = cfg.lora_alpha / cfg.lora_rank
        else:
            self.lora_a = self.lora_b = None

    def lora_delta(self, x):
        """The adapter's contribution to y (None without an adapter)."""
        if self.lora_a is None:
            return None
        x = x.astype(self.dtype)
        return matmul(matmul(x, self.lora_a[...].astype(self.dtype)),
                      self.lora_b[...].astype(self.dtype)) * self.lora_scale

    def __call__(self, x):
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        delta = self.lora_delta(x)
        return y if delta is None else y + delta


class Norm(nnx.Module):
    """LayerNorm (gpt2) or RMSNorm (llama; gemma3's multiplies by 1 + scale), computed in f32."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.rms = cfg.family != "gpt2"
        self.plus_one = cfg.family == "gemma3"
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        self.scale = nnx.Param((jnp.zeros if self.plus_one else jnp.ones)((dim,), cfg.weight_dtype))
        self.bias = None if self.rms else nnx.Param(jnp.zeros((dim,), cfg.weight_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            scale = self.scale[...].astype(jnp.float32)
            return ((1.0 + scale if self.plus_one else scale) * y).astype(self.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jnp.ndarray:
    """Inverse RoPE frequencies, with the config's scaling; `local`: a sliding-window layer's (its own
    base, no scaling)."""
    d = cfg.head_dim
    theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if not cfg.rope_scaling or local:
        return inv_freq
    scaling = dict(cfg.rope_scaling)
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(is_medium, smoothed, scaled)


def layer_inv_freqs(cfg: ModelConfig) -> list:
    """Each layer's inverse RoPE frequencies (None: no RoPE in that layer)."""
    if cfg.family == "gpt2":
        return [None] * cfg.num_layers
    full, local = rope_inv_freq(cfg), rope_inv_freq(cfg, local=True) if cfg.sliding_layers else None
    return [None if i in cfg.nope_layers else local if i in cfg.sliding_layers else full
            for i in range(cfg.num_layers)]


def softcap(x, cap: float):
    """cap * tanh(x / cap) (Gemma's soft-capping; cap 0: x unchanged)."""
    return cap * jnp.tanh(x / cap) if cap else x


def apply_rope(x, positions, inv_freq):
    """HF "rotate_half" RoPE. x: [batch, seq, heads, head_dim]; positions: int[batch, seq]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, s, d/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Dense(d, h * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs, name="q_proj")
        self.k_proj = Dense(d, kv * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs, name="k_proj")
        self.v_proj = Dense(d, kv * hd, use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs, name="v_proj")
        self.o_proj = Dense(h * hd, d, use_bias=cfg.o_bias, cfg=cfg, rngs=rngs, name="o_proj")
        self.q_norm = Norm(hd, cfg) if cfg.qk_norm else None
        self.k_norm = Norm(hd, cfg) if cfg.qk_norm else None

    def qkv_kernel(self):
        """The q, k and v kernels side by side: [d, (heads + 2 kv_heads) x head_dim]."""
        dtype = self.cfg.compute_dtype
        return jnp.concatenate([p.kernel[...].astype(dtype) for p in (self.q_proj, self.k_proj, self.v_proj)], axis=-1)

    def _qkv(self, x, fuse: bool):
        """The three projections as one matmul (`fuse`): on CPU, one [d, 3d] dot costs about what one
        [d, d] dot does at decoding's small batch sizes."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not fuse:
            return [p(x) for p in projections]
        dtype = self.cfg.compute_dtype
        y = matmul(x.astype(dtype), self.qkv_kernel())
        if self.cfg.qkv_bias:
            y = y + jnp.concatenate([p.bias[...].astype(dtype) for p in projections])
        sizes = [p.kernel.shape[1] for p in projections]
        outs = jnp.split(y, [sizes[0], sizes[0] + sizes[1]], axis=-1)
        deltas = [p.lora_delta(x) for p in projections]
        return [o if d is None else o + d for o, d in zip(outs, deltas)]

    def __call__(self, x, positions, allowed, kv_cache, cache_index, inv_freq, query_index=None, attend=None,
                 pins: Pins = NO_PINS):
        """x: [b, s, d]; allowed: bool[b, s, t] (t = s, or the cache length). With `query_index`
        (see `select_positions`), only those positions attend (and are returned); keys and values
        still come from every position. `attend(q, k, v)`, when given (no cache, every position),
        replaces the scores and softmax here (a fused kernel, `rlhf_jax.parallel.attention`)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q, k, v = (pins("heads", y) for y in self._qkv(x, pins.fuse_qkv))
        q = q.reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_positions = positions
        if query_index is not None:
            q, q_positions, allowed = (select_positions(a, query_index) for a in (q, positions, allowed))
            s = q.shape[1]
        if inv_freq is not None:
            q = apply_rope(q, q_positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        # Heads-major layout [b, kv, t, d]: XLA:CPU runs the batched attention dots far faster
        # this way than with the sequence axis second (7x for one-token decoding).
        k = k.transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if kv_cache is not None:
            keys = allowed.shape[-1]  # the cache's first `keys` slots (see Transformer's kv_len)
            own = keys == k.shape[2]  # a fresh cache's prefill: this call's own keys only
            new_cache, seen = _write_cache(kv_cache, pins("cache_write", k), pins("cache_write", v), cache_index,
                                           None if own else keys)
            if not own:
                k, v = seen
        else:
            new_cache = None
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, s, cfg.num_kv_heads, groups, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        if attend is not None:
            scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
            out = attend((q.astype(jnp.float32) * scale).astype(q.dtype), k.astype(q.dtype), v.astype(q.dtype))
            out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, cfg.num_heads * cfg.head_dim)
            return self.o_proj(out.astype(cfg.compute_dtype)), new_cache
        # One query per row (decoding): the dots without the unit query axis, which XLA:CPU ran about 3x
        # slower (SmolLM2's decode step at 64 rows and 296 cache slots: 0.39 s with it, 0.24 s without).
        one = s == 1
        scores = jnp.einsum("bkgd,bktd->bkgt" if one else "bkgsd,bktd->bkgst", q[:, :, :, 0] if one else q,
                            k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
        # allowed [b, s, t] broadcast over the KV heads and groups: [b, 1, 1, t] or [b, 1, 1, s, t]
        scores = jnp.where(allowed[:, None] if one else allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgt,bktd->bkgd" if one else "bkgst,bktd->bskgd", probs, v)
        out = out.reshape(b, s, cfg.num_heads * cfg.head_dim)
        out = pins("attention_out", out)
        return self.o_proj(out.astype(cfg.compute_dtype)), new_cache


def _write_cache(kv_cache, k, v, cache_index, keys: int | None = None):
    """Write the new keys and values [b, kv, s, d] at slot `cache_index` (int[], or int[b]: each row's own,
    as a continuous-batching engine's slots are at different steps).

    kv_cache: (k, v) of one layer, [b, kv, t, d] each; or, under `scan_layers`, (k, v, layer) with
    the whole stack [layers, b, kv, t, d], written in place at `layer` (the scan carries the stack:
    as scanned inputs and outputs, every decoded token would copy the whole cache).
    Returns (the new cache, in the form given; this layer's keys and values after the write, their
    first `keys` slots, each read as one slice (a layer picked from the stack and then cut, XLA:TPU
    copied the layer's whole cache at every decoded token); None without `keys`)."""
    per_row = jnp.ndim(cache_index) == 1
    if len(kv_cache) == 2:
        if per_row:
            write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))
            new = tuple(write(c, x.astype(c.dtype), cache_index) for c, x in zip(kv_cache, (k, v)))
        else:
            new = tuple(jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, 0, cache_index, 0))
                        for c, x in zip(kv_cache, (k, v)))
        return new, None if keys is None else tuple(c if keys == c.shape[2] else c[:, :, :keys] for c in new)
    *stacks, layer = kv_cache
    if per_row:
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x[None], (layer, 0, i, 0)),
                         in_axes=(1, 0, 0), out_axes=1)
        new = tuple(write(c, x.astype(c.dtype), cache_index) for c, x in zip(stacks, (k, v)))
    else:
        new = tuple(jax.lax.dynamic_update_slice(c, x.astype(c.dtype)[None], (layer, 0, 0, cache_index, 0))
                    for c, x in zip(stacks, (k, v)))
    if keys is None:
        return (*new, layer), None
    return (*new, layer), tuple(
        jax.lax.dynamic_slice(c, (layer, 0, 0, 0, 0), (1, *c.shape[1:3], keys, c.shape[4]))[0] for c in new)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.family != "gpt2"
        self.activation = jax.nn.silu if cfg.family == "llama" else lambda y: jax.nn.gelu(y, approximate=True)
        if self.gated:
            self.gate_proj = Dense(d, i, use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs, name="gate_proj")
        self.up_proj = Dense(d, i, use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs, name="up_proj")
        self.down_proj = Dense(i, d, use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs, name="down_proj")

    def __call__(self, x, pins: Pins = NO_PINS):
        pin = functools.partial(pins, "mlp_hidden")
        if self.gated:
            return self.down_proj(pin(self.activation(pin(self.gate_proj(x))) * pin(self.up_proj(x))))
        return self.down_proj(pin(self.activation(pin(self.up_proj(x)))))


class Block(nnx.Module):
    """Pre-norm attention and MLP, each added to the residual stream; gemma3 also normalises
    each one's output before adding it."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        sandwich = cfg.family == "gemma3"
        self.attn_post_norm = Norm(cfg.hidden_size, cfg) if sandwich else None
        self.mlp_post_norm = Norm(cfg.hidden_size, cfg) if sandwich else None

    def __call__(self, x, positions, allowed, kv_cache, cache_index, inv_freq, query_index=None, attend=None,
                 pins: Pins = NO_PINS):
        h, new_cache = self.attn(self.attn_norm(x), positions, allowed, kv_cache, cache_index, inv_freq,
                                 query_index, attend, pins)
        if query_index is not None:
            x = select_positions(x, query_index)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x), pins)
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h)), new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache with `max_len` slots per row.

    Returns a pytree: `k`, `v`: tuples (one per layer) of [batch, kv_heads, max_len, head_dim]
    (with `cfg.scan_layers`: one array each, [layers, batch, kv_heads, max_len, head_dim]; a decode
    step takes either);
    `key_mask`: bool[batch, max_len] (which slots hold real tokens); `positions`: int32[batch]
    (real tokens seen so far, the next position id); `index`: int32[] (next slot to write; a
    continuous-batching engine makes it int32[batch], each row's own).
    """
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if cfg.scan_layers:
        k = v = jnp.zeros((cfg.num_layers,) + shape, dtype)
    else:
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for _ in range(2))
    return {
        "k": k,
        "v": v,
        "key_mask": jnp.zeros((batch, max_len), bool),
        "positions": jnp.zeros((batch,), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


# What a rematerialised block saves for the backward (None: nothing but its inputs).
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _checkpointed(layer, fn, remat: str):
    """`fn(layer, *args)` as a function of `args` under `jax.checkpoint` with the named policy.

    Functional (split, then merge inside) rather than `nnx.remat`: a LoRA block mixes variables of
    two traces (the frozen base and the adapters being differentiated), which nnx.remat refuses."""
    graphdef, state = nnx.split(layer)

    def run(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return functools.partial(jax.checkpoint(run, policy=REMAT_POLICIES[remat]), state)


def _remat_block(layer, x, positions, allowed, inv_freq, remat: str, attend=None, pins: Pins = NO_PINS):
    """One block (no cache, every position) under `jax.checkpoint` with the named policy."""
    def run(block, x, positions, allowed, inv_freq):
        return block(x, positions, allowed, None, None, inv_freq, attend=attend, pins=pins)[0]

    return _checkpointed(layer, run, remat)(x, positions, allowed, inv_freq)


def stack_blocks(blocks) -> Block:
    """One Block holding `blocks`' arrays stacked on a new leading axis (what `scan_layers` runs)."""
    states = [nnx.split(block)[1] for block in blocks]
    return nnx.merge(nnx.split(blocks[0])[0], jax.tree.map(lambda *a: jnp.stack(a), *states))


def _scan_layers(stacked: Block, carry, step, inv_freqs, sliding_layers, remat: str):
    """Run `step(block, carry, layer, inv_freq, is_sliding) -> carry` over the stacked blocks under
    `jax.lax.scan`, layer after layer.

    Per-layer differences travel as scanned inputs: the layer's index, its RoPE frequencies (zeros for
    a layer without RoPE: cos 1, sin 0, the identity exactly; None where no layer has RoPE) and
    whether its attention is windowed."""
    graphdef, state = nnx.split(stacked)
    num_layers = len(inv_freqs)
    rope = any(f is not None for f in inv_freqs)
    if rope:
        half = next(f for f in inv_freqs if f is not None).shape
        freqs = jnp.stack([jnp.zeros(half, jnp.float32) if f is None else f for f in inv_freqs])
    else:
        freqs = jnp.zeros((num_layers, 0), jnp.float32)
    sliding = jnp.asarray([i in sliding_layers for i in range(num_layers)])

    def block(layer_state, carry, layer, freq, is_sliding):
        return step(nnx.merge(graphdef, layer_state), carry, layer, freq if rope else None, is_sliding)

    if remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(carry, xs):
        layer_state, layer, freq, is_sliding = xs
        return block(layer_state, carry, layer, freq, is_sliding), None

    carry, _ = jax.lax.scan(body, carry, (state, jnp.arange(num_layers), freqs, sliding))
    return carry


def _scan_blocks(stacked: Block, x, positions, allowed, windowed, sliding_layers, kv, index, inv_freqs,
                 remat: str, pins: Pins, attend=None):
    """The stacked blocks, scanned (`_scan_layers`). The KV cache (kv: (k, v) stacks, or None) rides
    in the carry and is written in place. Returns (x, (k, v) or None)."""

    def step(block, carry, layer, freq, is_sliding):
        x, kv = carry
        layer_allowed = allowed if windowed is None else jnp.where(is_sliding, windowed, allowed)
        layer_kv = None if kv is None else (*kv, layer)
        layer_attend = None if attend is None else functools.partial(attend, sliding=is_sliding)
        x, new_kv = block(x, positions, layer_allowed, layer_kv, index, freq, attend=layer_attend, pins=pins)
        return pins("residual", x), None if kv is None else new_kv[:2]

    return _scan_layers(stacked, (x, kv), step, inv_freqs, sliding_layers, remat)


class Transformer(nnx.Module):
    """Embeddings, blocks and the final norm: the backbone every head sits on."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_INIT_STD * jax.random.normal(
            rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype))
        if cfg.family == "gpt2":
            self.pos_embed = nnx.Param(_INIT_STD * jax.random.normal(
                rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), cfg.weight_dtype))
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        # Scanned: one Block whose every array has a leading layer axis (the same initial values).
        self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = Norm(cfg.hidden_size, cfg)

    def __call__(self, input_ids, attention_mask, cache=None, output_index=None, *, remat: str = "none",
                 pins: Pins = NO_PINS, fresh_cache: bool = False, attend=None, kv_len: int | None = None,
                 segment_ids=None):
        """input_ids, attention_mask: int[batch, seq]. Returns (hidden f[batch, seq, d], new cache or None).

        output_index: return the hidden states at these positions only (a slice, or int[batch, n]):
        the last block then runs its attention output and MLP there alone, and the final norm too.
        remat (without a cache: training and scoring forwards): what a block keeps for the backward:
          "none" (everything), "full" (only its input; the block is recomputed), "dots" (its matmul
          outputs; the elementwise work is recomputed);
        pins: where the activations are pinned (`Pins`: e.g. the residual stream's batch axis kept
          sharded).
        fresh_cache: the cache is empty (a prefill): its keys and values are written, but the call
          attends to its own `seq` positions only, not to all `max_len` slots (the same result; a
          512-token prefill into a 4096-slot cache otherwise computes 8x the scores it needs).
        kv_len (with a cache, static): attend to the cache's first `kv_len` slots only (they must
          hold every slot written so far, this call's included): a decode step then reads that
          much of the static cache, not all `max_len` slots.
        attend (without a cache): a fused attention, `rlhf_jax.parallel.attention.splash_attention(...)`,
          for every block that attends at every position.
        segment_ids (without a cache or `attend`): int[batch, seq], rows of packed samples
          (`rlhf_jax.core.packing`): 1, 2, ... for each sample in turn, 0 on the unused tail, which
          replaces `attention_mask` (pass None). Each sample's positions start at 0 and its tokens
          attend within it only: each gets the hidden states it would get alone.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        cfg = self.cfg
        if segment_ids is not None:
            if cache is not None or attend is not None or attention_mask is not None:
                raise ValueError("segment_ids (packed rows) go without a cache, a fused attention or an attention_mask")
            attention_mask = segment_ids > 0
        mask = attention_mask.astype(bool)
        seq = input_ids.shape[1]
        # Causality and sliding windows are over slots (where each query and key sits in the cache;
        # the sequence index without one), as in transformers.
        if cache is None:
            positions = token_positions(mask) if segment_ids is None else segment_positions(segment_ids)
            index = None
            # A constant lower triangle: XLA:CPU's update ran 5-10% slower with the same mask as a
            # comparison of iotas.
            causal = jnp.tril(jnp.ones((seq, seq), bool))
            if segment_ids is not None:  # sliding windows stay within a sample: its slots are contiguous
                causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
            window = jnp.triu(jnp.ones((seq, seq), bool), 1 - cfg.sliding_window) if cfg.sliding_layers else None
            keys_real = mask
        else:
            index = cache["index"]
            positions = token_positions(mask, cache["positions"])
            keys = seq if fresh_cache else kv_len or cache["key_mask"].shape[1]
            if index.ndim:  # each row's own write slot
                if fresh_cache:
                    raise ValueError("fresh_cache (a prefill) takes a cache with one write index for every row")
                key_mask = jax.vmap(lambda m, new, i: jax.lax.dynamic_update_slice(m, new, (i,)))(
                    cache["key_mask"], mask, index)
                distance = (index[:, None] + jnp.arange(seq))[:, :, None] - jnp.arange(keys)
            else:
                key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], mask, (0, index))
                distance = ((index + jnp.arange(seq))[:, None] - jnp.arange(keys))[None]
            causal = distance >= 0
            window = distance < cfg.sliding_window
            keys_real = mask if fresh_cache else key_mask[:, :keys]
        if causal.ndim == 2:
            causal, window = causal[None], None if window is None else window[None]
        allowed = causal & keys_real[:, None, :]
        windowed = allowed & window if cfg.sliding_layers else None
        inv_freqs = layer_inv_freqs(cfg)
        x = pins("residual", self._embed(input_ids, positions))
        # Decoding runs the blocks one after another even when they are stacked: XLA then keeps each
        # layer's weights in place and reduces partial sums, where in a scan it gathered every layer's
        # weights at every token (19.5 GiB per token per chip for an 8B model on 16 v5e chips, against
        # 155 MiB). Training, scoring and the prefill scan.
        if attend is not None:
            if cache is not None:
                raise ValueError("attend (a fused attention) is for calls without a KV cache")
            attend = functools.partial(attend, key_real=mask)
        if cfg.scan_layers and (cache is None or fresh_cache):
            kv = None if cache is None else (cache["k"], cache["v"])
            x, kv = _scan_blocks(self.layers, x, positions, allowed, windowed, cfg.sliding_layers, kv, index,
                                 inv_freqs, remat if cache is None else "none", pins, attend)
            if output_index is not None:  # every position ran the last block (the scan's one shape)
                x = select_positions(x, output_index)
            hidden = self.final_norm(x)
            if cache is None:
                return hidden, None
            return hidden, self._advanced(cache, *kv, key_mask, mask, index, seq)
        # Under scan_layers a cache may still come one array per layer (a tuple: the continuous engine's).
        stacked_cache = cfg.scan_layers and cache is not None and not isinstance(cache["k"], tuple)
        new_k, new_v = (cache["k"], cache["v"]) if stacked_cache else ([], [])
        for i, layer in enumerate(self._each_layer()):
            query_index = output_index if i == cfg.num_layers - 1 else None
            layer_allowed = windowed if i in cfg.sliding_layers else allowed
            layer_attend = None if attend is None or query_index is not None else functools.partial(
                attend, sliding=i in cfg.sliding_layers)
            if cache is None and remat != "none" and query_index is None:
                x = _remat_block(layer, x, positions, layer_allowed, inv_freqs[i], remat, layer_attend, pins)
            elif stacked_cache:  # written in place
                x, (new_k, new_v, _) = layer(x, positions, layer_allowed, (new_k, new_v, i), index, inv_freqs[i],
                                             query_index, pins=pins)
            else:
                layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
                x, layer_cache = layer(x, positions, layer_allowed, layer_cache, index, inv_freqs[i], query_index,
                                       layer_attend, pins)
                if cache is not None:
                    new_k.append(layer_cache[0])
                    new_v.append(layer_cache[1])
            x = pins("residual", x)
        if not cfg.num_layers and output_index is not None:
            x = select_positions(x, output_index)
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, None
        if not stacked_cache:
            new_k, new_v = tuple(new_k), tuple(new_v)
        return hidden, self._advanced(cache, new_k, new_v, key_mask, mask, index, seq)

    def _embed(self, input_ids, positions):
        cfg = self.cfg
        x = self.embed[...][input_ids].astype(cfg.compute_dtype)
        if cfg.family == "gpt2":
            x = x + self.pos_embed[...][positions].astype(cfg.compute_dtype)
        if cfg.family == "gemma3":  # transformers rounds the scale to the weights' dtype first
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.weight_dtype).astype(cfg.compute_dtype)
        return x

    def grouped(self, prompt_ids, prompt_mask, response_ids, response_mask, group: int, *, remat: str = "none",
                pins: Pins = NO_PINS):
        """The hidden states that predict each response token, f[b, response_len, d], for rows that
        continue each prompt `group` times in a row (b = prompts x group, as GRPO samples them): each
        prompt runs through the blocks once, and its keys and values serve its group's responses.

        The same values, up to rounding, as the full-sequence forward
        `self(join(prompt_ids repeated, ...), output_index=response_positions(...))`, over
        prompt_len + group x response_len tokens per prompt instead of group x (prompt_len +
        response_len). prompt_ids, prompt_mask: int[b / group, prompt_len], left-padded, each row with
        a real last token; response_ids, response_mask: int[b, response_len]. remat, pins: as for
        `__call__`.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        cfg = self.cfg
        prompts, prompt_len = prompt_ids.shape
        rows, response_len = response_ids.shape
        if rows != prompts * group:
            raise ValueError(f"{rows} responses are not {group} per prompt for {prompts} prompts")
        total = prompt_len + response_len
        prompt_mask, response_mask = prompt_mask.astype(bool), response_mask.astype(bool)
        prompt_positions = token_positions(prompt_mask)
        response_positions = token_positions(
            response_mask, jnp.repeat(jnp.sum(prompt_mask.astype(jnp.int32), axis=-1), group))
        # Over slots of the joined sequence, as the full-sequence forward's (constants, see __call__).
        causal = np.tril(np.ones((total, total), bool))
        keys_real = jnp.concatenate([jnp.repeat(prompt_mask, group, axis=0), response_mask], axis=1)
        masks = {False: (causal[None, :prompt_len, :prompt_len] & prompt_mask[:, None, :],
                         causal[None, prompt_len:] & keys_real[:, None, :])}
        if cfg.sliding_layers:
            window = np.triu(np.ones((total, total), bool), 1 - cfg.sliding_window)
            masks[True] = (masks[False][0] & window[None, :prompt_len, :prompt_len],
                           masks[False][1] & window[None, prompt_len:])
        constrain = functools.partial(pins, "residual")
        empty = jnp.zeros((prompts, cfg.num_kv_heads, total, cfg.head_dim), cfg.compute_dtype)

        def step(block, carry, inv_freq, sliding, last: bool = False):
            """One block over the prompts (its keys and values written to a cache of the joined
            length), then over the responses, which attend to them repeated and to their own."""
            x_prompt, x_response = carry
            if not cfg.sliding_layers:
                prompt_allowed, response_allowed = masks[False]
            elif isinstance(sliding, bool):  # unrolled
                prompt_allowed, response_allowed = masks[sliding]
            else:  # scanned: a traced flag
                prompt_allowed, response_allowed = (jnp.where(sliding, w, a) for w, a in zip(masks[True], masks[False]))
            x_prompt, kv = block(x_prompt, prompt_positions, prompt_allowed, (empty, empty), 0, inv_freq,
                                 slice(prompt_len - 1, prompt_len) if last else None, pins=pins)
            kv = tuple(jnp.repeat(c, group, axis=0) for c in kv)
            x_response, _ = block(x_response, response_positions, response_allowed, kv, prompt_len, inv_freq,
                                  slice(0, response_len - 1) if last else None, pins=pins)
            return constrain(x_prompt), constrain(x_response)

        carry = (constrain(self._embed(prompt_ids, prompt_positions)),
                 constrain(self._embed(response_ids, response_positions)))
        inv_freqs = layer_inv_freqs(cfg)
        if cfg.scan_layers:
            x_prompt, x_response = _scan_layers(self.layers, carry, lambda b, c, _, f, w: step(b, c, f, w),
                                                inv_freqs, cfg.sliding_layers, remat)
            x_prompt, x_response = x_prompt[:, -1:], x_response[:, :-1]
        else:
            for i, layer in enumerate(self._each_layer()):
                last = i == cfg.num_layers - 1
                run = functools.partial(step, inv_freq=inv_freqs[i], sliding=i in cfg.sliding_layers, last=last)
                carry = (_checkpointed(layer, run, remat) if remat != "none" and not last else
                         functools.partial(run, layer))(carry)
            x_prompt, x_response = carry
            if not cfg.num_layers:
                x_prompt, x_response = x_prompt[:, -1:], x_response[:, :-1]
        return self.final_norm(jnp.concatenate([jnp.repeat(x_prompt, group, axis=0), x_response], axis=1))

    def _each_layer(self):
        """The blocks in order (under `scan_layers`, each a view of its slice of the stack)."""
        if not self.cfg.scan_layers:
            yield from self.layers
            return
        graphdef, state = nnx.split(self.layers)
        for i in range(self.cfg.num_layers):
            yield nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    @staticmethod
    def _advanced(cache, k, v, key_mask, mask, index, seq):
        return {"k": k, "v": v, "key_mask": key_mask,
                "positions": cache["positions"] + mask.sum(-1).astype(jnp.int32), "index": index + seq}
