"""Sequences of different lengths packed into rows of a fixed token budget, and back.

A batch padded to its longest sequence computes every row to that length; packed, several samples
share a row one after another, each with its own segment id (1, 2, ... within the row; 0 on the
row's unused tail), its positions restarting at 0, and attention that never crosses segments
(`rlhf_jax.models.Transformer`'s `segment_ids`). The assignment is decided on the host
(`first_fit_decreasing`); the arrays are built on the host too (`pack`, `next_tokens`), and the
per-token results are gathered back into the padded layout on the device (`unpack`), so the loss
code sees the layout it always did.

    layout = pack(ids, mask, budget)                # numpy, host side
    hidden, _ = model.backbone(layout.ids, None, segment_ids=layout.segment_ids)
    logits = model.logits(hidden)                   # each position's log-prob of its successor:
    logprobs = unpack(token_logprobs(logits, next_tokens(layout.ids, layout.segment_ids)), layout.index)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def first_fit_decreasing(lengths, budget: int) -> list[list[int]]:
    """The samples (indices into `lengths`) of each row: longest first, each into the first row with
    room for it, a new row where none has. Deterministic: equal lengths keep their index order, and
    each row lists its samples in the order they were placed. Raises ValueError for a sample longer
    than `budget`."""
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the row budget "
                         f"of {budget}")
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(budget - lengths[i])
    return rows


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Samples packed into rows (numpy arrays, built by `pack`).

    ids: int32[rows, budget], the samples' real tokens one after another (`pad_id` after the last);
    segment_ids: int32[rows, budget], 1, 2, ... for the samples of a row in order, 0 on the tail;
    index: int32[n, seq], where each token of the padded layout sits in the packed one, as a flat
      index (row x budget + column), -1 for the padded layout's pads;
    rows: the samples of each packed row (`first_fit_decreasing`).
    """

    ids: np.ndarray
    segment_ids: np.ndarray
    index: np.ndarray
    rows: list

    @property
    def real_fraction(self) -> float:
        """The share of the packed tokens that belong to a sample."""
        return float((self.segment_ids > 0).mean())


def pack(ids, mask, budget: int, pad_id: int = 0) -> PackedLayout:
    """Pack the real tokens of each sample (`mask` 1; they must be contiguous in each row, as a
    left-padded prompt followed by its right-padded response is) into as few rows of `budget` tokens
    as `first_fit_decreasing` finds. Raises ValueError where a sample's tokens are not contiguous or
    do not fit."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    n, seq = ids.shape
    lengths = mask.sum(1)
    starts = mask.argmax(1)
    ends = starts + lengths
    gaps = [i for i in range(n) if lengths[i] and not mask[i, starts[i]:ends[i]].all()]
    if gaps:
        raise ValueError(f"sample {gaps[0]}'s tokens are not contiguous: packing takes one run of real tokens "
                         "per sample")
    assignment = first_fit_decreasing(lengths, budget)
    packed_ids = np.full((len(assignment), budget), pad_id, np.int32)
    segments = np.zeros((len(assignment), budget), np.int32)
    index = np.full((n, seq), -1, np.int32)
    for r, samples in enumerate(assignment):
        column = 0
        for segment, i in enumerate(samples, start=1):
            length = int(lengths[i])
            packed_ids[r, column:column + length] = ids[i, starts[i]:ends[i]]
            segments[r, column:column + length] = segment
            index[i, starts[i]:ends[i]] = r * budget + column + np.arange(length)
            column += length
    return PackedLayout(ids=packed_ids, segment_ids=segments, index=index, rows=assignment)


def unpack(packed, index, fill=0):
    """Per-token values of the packed layout [rows, budget, ...] in the padded layout [n, seq, ...]:
    `fill` where `index` is -1."""
    flat = packed.reshape((-1,) + packed.shape[2:])
    taken = jnp.take(flat, jnp.maximum(index, 0), axis=0)
    valid = (index >= 0).reshape(index.shape + (1,) * (packed.ndim - 2))
    return jnp.where(valid, taken, fill)


def has_successor(segment_ids):
    """bool[rows, budget]: whether each packed token has a successor in its own segment."""
    segment_ids = np.asarray(segment_ids)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return np.pad(same, ((0, 0), (0, 1)))


def next_tokens(ids, segment_ids, pad_id: int = 0):
    """Each packed token's successor in its own segment (`pad_id` at a segment's last token and on the
    tail): the targets a head's log-probs at each packed position are taken of."""
    ids = np.asarray(ids)
    successors = np.pad(ids[:, 1:], ((0, 0), (0, 1)), constant_values=pad_id)
    return np.where(has_successor(segment_ids), successors, pad_id).astype(np.int32)


def bucket_rows(needed: int, rows: int, unit: int = 1, buckets: int = 8) -> int:
    """The packed row count to compile for: the smallest of `buckets` sizes (k/buckets of `rows`, k =
    1..buckets, each rounded up to a multiple of `unit`, the devices the rows split over) that holds
    `needed` rows. At most `buckets` shapes, whatever the lengths."""
    if needed > rows:
        raise ValueError(f"{needed} packed rows for {rows} samples: the row budget is shorter than a sample")
    ceil = lambda a, b: -(-a // b)
    sizes = sorted({ceil(ceil(rows * k, buckets), unit) * unit for k in range(1, buckets + 1)})
    return next(size for size in sizes if size >= needed)


def minibatch_layouts(prompt_ids, prompt_mask, response_ids, response_mask, orders, budget: int, pad_id: int = 0,
                      unit: int = 1, micro_rows: int = 0) -> dict:
    """The packed layout of every minibatch of a rollout (numpy, on the host), for a training forward
    that runs packed rows and returns per-token results in the padded layout.

    prompt_*: [n, prompt_len] left-padded; response_*: [n, response_len]; orders: int[epochs,
    minibatches, rows], the rows of each minibatch (`rlhf_jax.core.minibatch.minibatch_orders`).
    Returns int32 arrays with leading [epochs, minibatches]:
      packed_ids, segment_ids, targets (`next_tokens`): [rows_packed, budget];
      gather: [rows, response_len], the flat packed position (row x budget + column) whose outputs
        predict each response token, -1 under the response mask's zeros (`unpack` fills those).
    With `micro_rows` 0, every minibatch gets the same number of packed rows (`bucket_rows` of the
    most any needs), so one compiled program serves the whole update. With `micro_rows` > 0, each
    minibatch's rows are cut into micro-batches of `micro_rows` x `unit` rows (a token budget per
    device and forward): the arrays gain a micro-batch axis after [epochs, minibatches] (its length a
    bucket of the most any minibatch needs), each micro-batch's `gather` is -1 for the minibatch's
    samples it does not hold, and `micro_steps` int32[epochs, minibatches] counts the micro-batches
    each minibatch fills (they come first; the update runs only those).
    """
    orders = np.asarray(orders)
    ids = np.concatenate([np.asarray(prompt_ids), np.asarray(response_ids)], 1)
    mask = np.concatenate([np.asarray(prompt_mask), np.asarray(response_mask)], 1)
    prompt_len, response_len = np.shape(prompt_ids)[1], np.shape(response_ids)[1]
    response_mask = np.asarray(response_mask).astype(bool)
    epochs, minibatches, rows = orders.shape
    layouts = [[pack(ids[order], mask[order], budget, pad_id) for order in epoch] for epoch in orders]
    needed = max(len(layout.rows) for epoch in layouts for layout in epoch)
    # Without micro-batches, a minibatch is one micro-batch of the bucketed row count (its axis dropped
    # at the end).
    ceil = lambda a, b: -(-a // b)
    per_micro = micro_rows * unit if micro_rows else bucket_rows(needed, rows, unit)
    micros = bucket_rows(ceil(needed, per_micro), ceil(rows, per_micro)) if micro_rows else 1
    lead = (epochs, minibatches, micros)
    shape = lead + (per_micro, budget)
    out = {"packed_ids": np.full(shape, pad_id, np.int32), "segment_ids": np.zeros(shape, np.int32),
           "targets": np.full(shape, pad_id, np.int32), "gather": np.full(lead + (rows, response_len), -1, np.int32),
           "micro_steps": np.zeros((epochs, minibatches), np.int32)}
    for e, epoch in enumerate(layouts):
        for m, layout in enumerate(epoch):
            # The rows after the used ones stay empty: pads, segment 0.
            targets = next_tokens(layout.ids, layout.segment_ids, pad_id)
            predicting = layout.index[:, prompt_len - 1:prompt_len - 1 + response_len]
            predicting = np.where(response_mask[orders[e, m]], predicting, -1)
            row_of = predicting // budget  # each response token's packed row (-1 // budget stays negative)
            steps = ceil(len(layout.rows), per_micro)
            out["micro_steps"][e, m] = steps
            for k in range(steps):
                first, last = k * per_micro, min((k + 1) * per_micro, len(layout.rows))
                out["packed_ids"][e, m, k, :last - first] = layout.ids[first:last]
                out["segment_ids"][e, m, k, :last - first] = layout.segment_ids[first:last]
                out["targets"][e, m, k, :last - first] = targets[first:last]
                held = (row_of >= first) & (row_of < last)
                out["gather"][e, m, k] = np.where(held, predicting - first * budget, -1)
    if not micro_rows:
        out = {name: array[:, :, 0] for name, array in out.items() if name != "micro_steps"}
    return out


# The named scopes of the micro-batch loops (the update's, `rlhf_jax.core.minibatch.ppo_update`, and
# its scoring pass's, `rlhf_jax.step.forward.TrainingForward.score`), by which an HLO reader finds them.
MICRO_LOSS_SCOPE, MICRO_SCORE_SCOPE = "micro_loss", "micro_score"


def sum_micro_batches(fn, micro: dict, scope: str, constrain=None):
    """The sum of `fn(own)` (a pytree of arrays) over a minibatch's micro-batches: `micro` holds
    `micro_steps` (how many it fills; they come first) and arrays with a leading micro-batch axis, of
    which `own` is one micro-batch's entries (each passed through `constrain`, if given). A loop of the
    minibatch's own length under the named `scope`: the micro-batches it does not fill never run."""
    micro = dict(micro)
    steps = micro.pop("micro_steps")
    constrain = constrain or (lambda x: x)

    def add(k, total):
        own = jax.tree.map(lambda x: constrain(jax.lax.dynamic_index_in_dim(x, k, keepdims=False)), micro)
        return jax.tree.map(jnp.add, total, fn(own))

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
    with jax.named_scope(scope):
        return jax.lax.fori_loop(0, steps, add, zeros)


def micro_trips(layouts: dict) -> dict | None:
    """How often each micro-batch loop of a packed update runs, on average over its runs, by loop
    scope (`rlhf_jax.plan.hlo.program_costs`' `trips`: the costs are linear in them, so a mean is
    exact); None without micro-batches. The scoring pass runs the first epoch's layout."""
    if "micro_steps" not in layouts:
        return None
    steps = np.asarray(layouts["micro_steps"], np.float64)
    return {MICRO_LOSS_SCOPE: float(steps.mean()), MICRO_SCORE_SCOPE: float(steps[0].mean())}


def packing_stats(layouts: dict) -> dict:
    """What a packed update computes (`minibatch_layouts`' arrays, over every epoch): the packed rows of
    one forward, the tokens the forwards run (the micro-batches a minibatch fills, where there are),
    and the share of them that belong to a sample."""
    segments = np.asarray(layouts["segment_ids"])
    row_tokens = segments.shape[-1] * segments.shape[-2]
    if "micro_steps" in layouts:
        computed = int(np.asarray(layouts["micro_steps"]).sum()) * row_tokens
    else:
        computed = int(np.prod(segments.shape[:2])) * row_tokens
    real = int((segments > 0).sum())
    return {"rows": segments.shape[-2], "computed_tokens": computed, "real_tokens": real,
            "real_fraction": real / computed}
