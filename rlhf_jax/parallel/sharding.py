"""Device meshes and partition rules: data, FSDP and tensor parallelism with jit + shardings.

- `make_mesh(data, fsdp, tensor)`: -1 means "the rest of the devices".
- `param_shardings(params, mesh)`: a NamedSharding per parameter from its path (`spec_for`): FSDP
  over the embedding dimension, tensor parallelism over heads and the MLP hidden dimension; the
  untied vocabulary projection over its vocabulary ("fsdp"), the embedding table's vocabulary over
  "tensor"; the norms replicated. A dimension that the mesh axis does not divide stays unsharded; a
  parameter no rule names is an error.
- `batch_sharding(mesh)`: the leading (batch) axis over ("data", "fsdp").

The same jitted functions run on one CPU, a simulated 8-device mesh and a pod; GSPMD inserts
the collectives. `jax.pmap`/`shard_map` users pass `axis_name` to `ppo_update` and
`masked_whiten` instead.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# The decoder's model-parallel axes of `decode_mesh`, "tensor" major: a device's slice of the query
# heads then belongs to the KV head it holds.
MODEL_AXES = ("tensor", "fsdp")

# (path suffix, spec of the kernel's axes); the input axis of a projection into the residual
# stream is "tensor" (heads / hidden units), its output axis "fsdp", and the reverse going out.
# lm_head is split over its vocabulary: each device makes its slice of the logits from the whole
# hidden state (split over its input, every logits chunk gathered the whole head, 1 GiB at 8B, and
# reduced vocabulary-sized partial sums).
_KERNEL_RULES = {
    "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
    "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp"),
    "lm_head": ("tensor", "fsdp"), "value_head": ("fsdp", None), "score": ("fsdp", None),
}

# Modules whose parameters every device holds whole (by the end of their name): the norms' scales and
# biases, a few thousand floats per layer. A parameter that no rule names is an error, not replicated
# silently: a new family's renamed weight would otherwise be copied whole onto every chip.
_REPLICATED_OWNERS = ("norm",)

# Tensor parallelism for decoding (`param_shardings(..., decode=True)`): every matmul's weights stay where they
# are, and a block reduces only [batch, hidden] partial sums, once after attention and once after
# the MLP. Both vocabulary tables split by vocabulary.
_DECODE_RULES = {
    "q_proj": (None, MODEL_AXES), "k_proj": (None, MODEL_AXES), "v_proj": (None, MODEL_AXES),
    "gate_proj": (None, MODEL_AXES), "up_proj": (None, MODEL_AXES),
    "o_proj": (MODEL_AXES, None), "down_proj": (MODEL_AXES, None),
    "lm_head": (None, MODEL_AXES), "value_head": (None, None), "score": (None, None),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), one axis may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known} (data*fsdp*tensor = {sizes})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices) or len(devices) % math.prod(sizes):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} does not fit {len(devices)} devices")
    # A fully specified smaller mesh uses the first devices (e.g. 1x1x1 for a single-device run).
    grid = np.asarray(devices[:math.prod(sizes)]).reshape(sizes)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axis) -> int:
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def _fit(spec, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension."""
    fitted = []
    for axis, dim in zip(spec, shape):
        fitted.append(axis if axis is not None and dim % _axis_size(mesh, axis) == 0 else None)
    return P(*fitted)


def spec_for(path: tuple, shape: tuple, mesh: Mesh, decode: bool = False) -> P:
    """The PartitionSpec of one parameter, from its path in the params tree (`decode`: on a
    `decode_mesh`, tensor parallel over all its model devices)."""
    names = [str(p) for p in path]
    leaf = names[-1]
    if len(shape) == 0:
        return P()
    if "layers" in names[:-1] and not names[names.index("layers") + 1].isdigit():
        # `scan_layers`' stack: the layer axis whole on every device, the rest as one layer's.
        after = names.index("layers") + 1
        return P(None, *spec_for(tuple(path[:after]) + (0,) + tuple(path[after:]), shape[1:], mesh, decode))
    rules = _DECODE_RULES if decode else _KERNEL_RULES
    owner = next((n for n in reversed(names[:-1]) if n in rules), None)
    if leaf == "embed":
        return _fit((MODEL_AXES, None) if decode else ("tensor", "fsdp"), shape, mesh)
    if leaf == "pos_embed":
        return _fit((None, None) if decode else (None, "fsdp"), shape, mesh)
    if owner is not None:
        rule = rules[owner]
        if leaf == "kernel":
            return _fit(rule, shape, mesh)
        if leaf == "bias":
            return _fit((rule[1],), shape, mesh)
        if leaf == "lora_a":
            return _fit((rule[0], None), shape, mesh)
        if leaf == "lora_b":
            return _fit((None, rule[1]), shape, mesh)
    if len(names) > 1 and names[-2].endswith(_REPLICATED_OWNERS) and leaf in ("scale", "bias"):
        return P(*([None] * len(shape)))
    raise ValueError(f"no partition rule for the parameter {'/'.join(names)} {tuple(shape)}: add one to "
                     "rlhf_jax.parallel.sharding (_KERNEL_RULES and _DECODE_RULES by the module that owns it, or "
                     "_REPLICATED_OWNERS for a small one every device holds whole)")


def path_keys(path) -> tuple:
    """A jax tree path as plain keys (dict keys, attribute names, indices), ending at the param's name."""
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    # An nnx Variable flattens to its value: drop that last step so the path ends at the param's name.
    return keys[:-1] if keys and keys[-1] == "value" else keys


def param_placement(mesh: Mesh | None):
    """`placement(path, shape) -> NamedSharding` by the partition rules, for `models.load_pretrained`
    (None without a mesh: each tensor on the default device)."""
    if mesh is None:
        return None
    return lambda path, shape: NamedSharding(mesh, spec_for(path, shape, mesh))


def param_shardings(params, mesh: Mesh, decode: bool = False):
    """A NamedSharding for every leaf of a params tree (an nnx.State or a dict of them); `decode`: the
    tensor-parallel rules on a `decode_mesh`."""
    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_keys(path), np.shape(leaf), mesh, decode))
    return jax.tree_util.tree_map_with_path(one, params)


def decode_mesh(mesh: Mesh, num_kv_heads: int) -> Mesh:
    """`mesh`'s devices as the decoder lays them out: its data axis, then its fsdp x tensor devices as
    "tensor" = as many as divide the KV heads (each device holds whole heads of the KV cache) and
    "fsdp" = the rest, which split the cache's rows (8 KV heads on 16 devices: 8 x 2)."""
    model = mesh.shape["fsdp"] * mesh.shape["tensor"]
    tensor = math.gcd(num_kv_heads, model)
    grid = mesh.devices.reshape(mesh.shape["data"], model // tensor, tensor)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_devices(mesh) -> int:
    """How many ways the batch axes (data x fsdp) split the rows."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over (data, fsdp); the other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_constraint(mesh: Mesh):
    """A function that pins an array's leading axis to (data, fsdp) inside jit (scalars pass through):
    XLA otherwise often keeps activations replicated and weights in place, holding the whole batch
    on every device."""
    def constrain(x):
        return x if x.ndim == 0 else jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))
    return constrain


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_like(tree, shardings):
    """device_put every leaf onto its sharding (host arrays go straight to their shards)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def state_shardings(state, mesh: Mesh):
    """Shardings of a trainer TrainState: params and optimizer moments by the partition rules
    (an optimizer leaf shaped like a param follows that param's path), scalars replicated."""
    def one(path, leaf):
        shape = np.shape(leaf)
        if len(shape) == 0:
            return replicated(mesh)
        keys = path_keys(path)
        # Optimizer moments mirror the params' tree below the optimizer's own nesting: find the
        # first key of a model path and apply the rule from there.
        for start, key in enumerate(keys):
            if key in ("backbone", "lm_head", "value_head", "score"):
                return NamedSharding(mesh, spec_for(keys[start:], shape, mesh))
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, state)


def bytes_per_device(tree) -> dict:
    """Bytes of `tree`'s arrays held by each device (from the arrays' addressable shards)."""
    per: dict = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return per
