"""Fused attention for training and scoring forwards: TPU's Pallas splash-attention kernel, and
cuDNN's on GPU through `jax.nn.dot_product_attention`.

`make_attend(config.model.attention, ...)` returns an `attend` function that the transformer calls
instead of its own attention (`model.backbone(..., attend=attend)`), or None for "xla" (the plain
path). A fused kernel never materialises the `[batch, heads, seq, seq]` scores (it works block by
block, splash skipping the blocks the causal or sliding-window mask rules out, in the forward and
the backward), where the plain path keeps f32 scores and probabilities of a layer (and, without
remat, of every layer) for the backward.

Splash takes padding as segment ids (0 for padding, 1 for real tokens): a real query attends to the real
keys before it, exactly as the plain path; a padding query attends to the padding before it, where
the plain path lets it attend to real keys. Nothing reads a padding position's output (it is a
key or value nobody attends to, and its logits are masked), so the results agree where they are used.

On a mesh the splash kernel runs under `shard_map`, each device on its own rows (the batch axes) and, where
they divide, its own KV heads (the tensor axis). Pallas TPU kernels compile for TPU only; `interpret`
runs the same kernel on any backend, slowly (for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlhf_jax.config import ConfigError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.parallel.sharding import BATCH_AXES

BLOCK = 512  # query and key tile of the kernel, forward and backward (MaxText's default for v5e)


def tile_problem(seq_len: int) -> str | None:
    """What `seq_len` must be for the kernel's tiles (None when it is): a multiple of 128 and of the tile."""
    block = min(BLOCK, seq_len)
    return f"a multiple of 128 and of the tile size {block}" if seq_len % 128 or seq_len % block else None


def _block(seq_len: int) -> int:
    problem = tile_problem(seq_len)
    if problem:
        raise ValueError(f"splash attention needs the sequence length ({seq_len}: prompt + response tokens) "
                         f"to be {problem}")
    return min(BLOCK, seq_len)


def _kernel(seq_len: int, groups: int, window: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = _block(seq_len)
    if window:  # its own position and the window - 1 before it, as the plain path's sliding layers
        mask = sa.LocalMask((seq_len, seq_len), (window - 1, 0), offset=0)
    else:
        mask = sa.CausalMask((seq_len, seq_len))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # One KV head and its `groups` query heads per call (grouped-query attention as many MQA calls).
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([mask] * groups), block_sizes=sizes,
                                            interpret=interpret)


def splash_attention(cfg: ModelConfig, seq_len: int, mesh=None, interpret: bool = False):
    """`attend(q, k, v, key_real, sliding) -> out` for `cfg`'s attention over `seq_len` positions.

    q: [batch, kv_heads, groups, seq, head_dim] (already scaled by the caller's softmax scale),
    k, v: [batch, kv_heads, seq, head_dim], key_real: bool[batch, seq], sliding: whether the layer
    attends within `cfg.sliding_window` only (a Python bool, or a traced one under `scan_layers`).
    Returns [batch, kv_heads, groups, seq, head_dim] in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    groups = cfg.num_heads // cfg.num_kv_heads
    kernels = {False: _kernel(seq_len, groups, 0, interpret)}
    if cfg.sliding_layers:
        kernels[True] = _kernel(seq_len, groups, cfg.sliding_window, interpret)

    def local(q, k, v, segments, sliding):
        def rows(kernel):
            def row(q, k, v, ids):
                ids = sa.SegmentIds(q=ids, kv=ids)
                return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
            return jax.vmap(row)(q, k, v, segments)

        if len(kernels) == 1:
            return rows(kernels[False])
        return jax.lax.cond(sliding, lambda: rows(kernels[True]), lambda: rows(kernels[False]))

    def attend(q, k, v, key_real, sliding=False):
        segments = key_real.astype(jnp.int32)
        sliding = jnp.asarray(sliding)
        if mesh is None:
            return local(q, k, v, segments, sliding)
        heads = "tensor" if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
        spec = P(BATCH_AXES, heads)
        run = jax.shard_map(local, mesh=mesh,
                            in_specs=(spec, spec, spec, P(BATCH_AXES), P()), out_specs=spec, check_vma=False)
        return run(q, k, v, segments, sliding)

    return attend


def cudnn_attention(cfg: ModelConfig, implementation: str = "cudnn"):
    """`attend` (as `splash_attention`'s) through `jax.nn.dot_product_attention`: cuDNN's fused
    kernel on GPU; `implementation="xla"` is the same call through XLA (what tests run off GPU).

    The mask (causal, the sliding window, padding) goes in whole, `bool[batch, 1, seq, seq]`, which
    JAX hands to cuDNN as an additive bias: cuDNN's own padding masks take right padding only, and
    prompts here are left-padded. Sharding is JAX's own partitioning of the cuDNN call.
    """
    def attend(q, k, v, key_real, sliding=False):
        b, kv, groups, s, d = q.shape
        query = q.transpose(0, 3, 1, 2, 4).reshape(b, s, kv * groups, d)  # head = kv head * groups + g
        key, value = (x.transpose(0, 2, 1, 3) for x in (k, v))
        position = jnp.arange(s)
        behind = position[:, None] - position[None, :]
        mask = (behind >= 0)[None] & key_real[:, None, :]
        if cfg.sliding_layers:
            mask = jnp.where(sliding, mask & (behind < cfg.sliding_window)[None], mask)
        out = jax.nn.dot_product_attention(query, key, value, mask=mask[:, None], scale=1.0,
                                           implementation=implementation)
        return out.reshape(b, s, kv, groups, d).transpose(0, 2, 3, 1, 4)

    return attend


def make_attend(kind: str, cfg: ModelConfig, seq_len: int, mesh=None):
    """The `attend` of `model.attention` = kind ("xla": None, the plain path; "splash"; "cudnn")."""
    if kind == "splash":
        return splash_attention(cfg, seq_len, mesh)
    if kind == "cudnn":
        return cudnn_attention(cfg)
    if kind != "xla":
        raise ValueError(f"attention {kind!r}: choose xla, splash or cudnn")
    return None


def validate_attention(config, platform: str) -> None:
    """`model.attention = "splash"` compiles for TPU only, over prompt + response tokens in whole tiles;
    "cudnn" for GPU only."""
    if config.model.attention == "cudnn" and platform != "gpu":
        raise ConfigError(f"config.model.attention = 'cudnn' is a GPU kernel; these devices are {platform!r} "
                          "(use 'xla')")
    if config.model.attention != "splash":
        return
    if platform != "tpu":
        raise ConfigError(f"config.model.attention = 'splash' is a TPU kernel; these devices are {platform!r} "
                          "(use 'xla')")
    total = config.data.max_prompt_len + config.sampling.max_new_tokens
    problem = tile_problem(total)
    if problem:
        raise ConfigError(f"config.model.attention = 'splash' needs config.data.max_prompt_len + "
                          f"config.sampling.max_new_tokens = {total} to be {problem}")
