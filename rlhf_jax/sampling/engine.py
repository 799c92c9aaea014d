"""Continuous batching in one jitted program: a fixed number of decode slots works through a queue of
requests, and a slot whose sequence has ended takes the next request.

The static sampler (`rlhf_jax.sampling.generate.generate`) decodes every row until the batch's longest
response ends; a row that ended at token 40 keeps its share of every matmul until the last one ends at
token 250. Here `slots` rows decode at a time, each at its own step of its own request (the KV cache
has one write index per row), and whenever `refill` slots are free and requests remain, the next
`refill` requests' prompts are prefilled into them, all inside one `lax.while_loop`: nothing returns
to the host between tokens. Once every request has started, the live rows move to half as many slots
whenever they fit (`tail_halvings` times at most), so the last long responses stop paying for empty
slots; `schedule` replays the loops on the host.

A request's sample does not depend on its slot, on when it ran or on the number of slots: request r's
token t is drawn with the same random number as in the static sampler (`request_uniforms`), and each
row's keys and values sit at the same cache slots as there (its left-padded prompt from slot 0, its
response after). In float32 the tokens equal the static sampler's and the log-probs agree to the last
bits: XLA:CPU's matmuls and reductions add up in an order that depends on the row count, which
differs between the two (at a real model's size such a difference can decide a draw that lands on a
CDF boundary, and that sequence then goes its own way).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import init_cache
from rlhf_jax.sampling.generate import decoding, output_buffers, request_uniforms, sample_token, truncates


def engine_problem(requests: int, slots: int, refill: int, prompt_group: int = 1) -> str | None:
    """Why this engine shape does not work (None when it does): requests join slots `refill` at a time,
    whole prompt groups at once."""
    if slots < 1 or refill < 1:
        return f"slots ({slots}) and refill ({refill}) must be >= 1"
    if refill % prompt_group:
        return f"refill ({refill}) is not a multiple of the prompt group ({prompt_group})"
    if slots % refill:
        return f"slots ({slots}) is not a multiple of refill ({refill})"
    if requests % refill:
        return f"{requests} requests do not split into refills of {refill}"
    return None


def _rows_set(tree, rows, new):
    """`tree` with `new`'s rows written at the row indices `rows`."""
    return jax.tree.map(lambda old, value: old.at[rows].set(value.astype(old.dtype)), tree, new)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "slots", "refill", "max_new_tokens", "temperature", "top_k", "top_p", "eos_ids",
                     "pad_id", "with_values", "batch_mesh", "shard_prefill", "decode_layout", "prompt_group",
                     "tail_halvings"))
def continuous_generate(graphdef, params, prompt_ids, prompt_mask, key, *, slots: int, refill: int = 0,
                        max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        eos_ids: Sequence[int] = (), pad_id: int = 0, with_values: bool = False,
                        batch_mesh=None, shard_prefill: bool = False, decode_layout: str = "batch",
                        prompt_group: int = 1, tail_halvings: int = 2):
    """Sample `max_new_tokens` continuations of each of the N prompts (the requests, in row order) with
    `slots` rows decoding at a time.

    Takes `generate`'s arguments (its `decode_segments` aside: every step reads the whole cache) and
    returns its dict in request order, plus `decode_row_steps`: int32[], the rows the decode steps ran
    (for `sum(lengths) - N` tokens: each request's first token comes from its prefill).

    slots: the rows that decode at once (at most N; `min(slots, N)` are used).
    refill: how many requests join at once, when that many slots are free (a multiple of
      `prompt_group`, dividing `slots` and N; 0: `prompt_group`). The first `slots` requests join
      together.
    prompt_group: the requests hold each prompt that many times in a row; a refill runs each prompt
      once through the model and copies its cache to its group's slots.
    tail_halvings: once every request has started, the live rows move to half as many slots whenever
      they fit, up to this many times (each size compiles its own decode step).
    """
    eos_ids = tuple(eos_ids)
    requests, prompt_len = prompt_ids.shape
    slots = min(slots, requests)
    refill = refill or prompt_group
    problem = engine_problem(requests, slots, refill, prompt_group)
    if problem:
        raise ValueError(f"continuous_generate: {problem}")
    cache_len = prompt_len + max_new_tokens
    sampler = decoding(graphdef, params, slots, cache_len, batch_mesh=batch_mesh, decode_layout=decode_layout,
                       shard_prefill=shard_prefill)
    model, pin, logits_of = sampler.decoder, sampler.pin, sampler.logits_of
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    uniforms = request_uniforms(key, requests, max_new_tokens)

    with_gap = truncates(temperature, top_k, top_p)
    outputs = output_buffers(requests, max_new_tokens, pad_id, with_values, with_gap)

    def emit(hidden, request, step, live, outputs):
        """Sample each row's token `step` of its `request` (rows not `live` write nothing); return the
        tokens and the outputs."""
        uniform = uniforms[jnp.minimum(step, max_new_tokens - 1), jnp.minimum(request, requests - 1)]
        token, logprob, *gap = sample_token(logits_of(hidden), uniform, temperature, top_k, top_p,
                                            with_gap=with_gap)
        token = jnp.where(live, token, pad_id)
        columns = {"response_ids": token, "response_mask": live.astype(jnp.int32), "logprobs": logprob}
        if with_gap:
            columns["truncation_gap"] = gap[0]
        if with_values:
            columns["values"] = model.values(hidden)
        row = jnp.where(live, request, requests)  # out of bounds: dropped
        outputs = {name: buf.at[row, step].set(columns[name].astype(buf.dtype), mode="drop")
                   for name, buf in outputs.items()}
        return token, outputs

    def admit(state, rows, count: int):
        """Start the next `count` requests in the slots `rows` int32[count]: prefill their prompts and
        sample their first tokens."""
        cache, slot, outputs = state["cache"], state["slot"], state["outputs"]
        first = state["next"]
        request = first + jnp.arange(count, dtype=jnp.int32)
        ids = jax.lax.dynamic_slice_in_dim(prompt_ids, first, count)
        mask = jax.lax.dynamic_slice_in_dim(prompt_mask, first, count)
        hidden, fresh = sampler.prefill(ids, mask, cache_len, prompt_group)
        fresh = _per_layer(fresh)
        live = jnp.ones((count,), bool)
        token, outputs = emit(hidden, request, jnp.zeros((count,), jnp.int32), live, outputs)
        cache = pin({"k": _rows_set(cache["k"], rows, fresh["k"]), "v": _rows_set(cache["v"], rows, fresh["v"]),
                     "key_mask": _rows_set(cache["key_mask"], rows, fresh["key_mask"]),
                     "positions": _rows_set(cache["positions"], rows, fresh["positions"]),
                     "index": _rows_set(cache["index"], rows, jnp.full((count,), prompt_len, jnp.int32))})
        new = {"request": request, "step": jnp.ones((count,), jnp.int32), "token": token,
               "live": ~jnp.isin(token, eos) & (max_new_tokens > 1)}
        slot = {name: _rows_set(slot[name], rows, value) for name, value in new.items()}
        return {**state, "cache": cache, "slot": slot, "outputs": outputs, "next": first + count}

    def decode(state):
        """One token for every slot."""
        slot = state["slot"]
        hidden, cache = model.backbone(slot["token"][:, None], slot["live"][:, None].astype(jnp.int32),
                                       pin(state["cache"]), pins=sampler.decode_pins)
        token, outputs = emit(hidden[:, 0], slot["request"], slot["step"], slot["live"], state["outputs"])
        step = slot["step"] + slot["live"]
        live = slot["live"] & ~jnp.isin(token, eos) & (step < max_new_tokens)
        slot = {**slot, "token": token, "step": step, "live": live}
        return {**state, "cache": pin(cache), "slot": slot, "outputs": outputs,
                "row_steps": state["row_steps"] + live.shape[0]}

    def can_refill(state):
        return (state["next"] < requests) & (jnp.sum(~state["slot"]["live"]) >= refill)

    def refill_free(state):
        rows = jnp.nonzero(~state["slot"]["live"], size=refill)[0].astype(jnp.int32)
        return admit(state, rows, refill)

    empty = pin(_empty_cache(model.cfg, slots, cache_len))
    state = {"cache": empty, "outputs": outputs, "next": jnp.zeros((), jnp.int32),
             "row_steps": jnp.zeros((), jnp.int32),
             "slot": {"request": jnp.zeros((slots,), jnp.int32), "step": jnp.zeros((slots,), jnp.int32),
                      "token": jnp.zeros((slots,), jnp.int32), "live": jnp.zeros((slots,), bool)}}
    state = admit(state, jnp.arange(slots, dtype=jnp.int32), slots)

    def body(state):
        state = decode(state)
        return jax.lax.while_loop(can_refill, refill_free, state)

    # The tail: once the queue is empty, the live rows move to a cache of half the slots whenever they
    # fit, so that the last long responses do not keep every slot's matmuls busy.
    sizes = tail_sizes(slots, tail_halvings, sampler.row_unit)
    for size, smaller in zip(sizes, sizes[1:] + [None]):
        def running(state, smaller=smaller):
            busy = jnp.any(state["slot"]["live"]) | (state["next"] < requests)
            if smaller is None:
                return busy
            return busy & ~((state["next"] >= requests) & (jnp.sum(state["slot"]["live"]) <= smaller))

        with jax.named_scope("decode"):
            state = jax.lax.while_loop(running, body if size == slots else decode, state)
        if smaller is not None:
            state = _keep_rows(state, jnp.argsort(~state["slot"]["live"], stable=True)[:smaller], pin)
    result = dict(state["outputs"])  # only live rows wrote: zeros after each EOS
    result["lengths"] = result["response_mask"].sum(-1)
    result["decode_row_steps"] = state["row_steps"]
    return result


def tail_sizes(slots: int, halvings: int, unit: int = 1) -> list[int]:
    """The slot counts the engine decodes with, largest first: `slots`, then halved up to `halvings`
    times while the half stays a multiple of `unit` (the devices that split the rows)."""
    sizes = [slots]
    while len(sizes) <= halvings and sizes[-1] % 2 == 0 and (sizes[-1] // 2) % unit == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def _keep_rows(state, rows, pin):
    """The engine's state with only the slots `rows` (its cache and its slot fields)."""
    take = lambda a: jnp.take(a, rows, axis=0)
    return {**state, "cache": pin(jax.tree.map(take, state["cache"])), "slot": jax.tree.map(take, state["slot"])}


def _per_layer(cache):
    """A KV cache with its keys and values one array per layer (tuples), as `scan_layers` stacks them.
    The engine writes each row at its own slot; into the stacked [layers, rows, ...] arrays, XLA:TPU
    copied the whole stack at every layer of every decode step (the 8B PPO rollout on v5e:4x4: 7.4 GB
    of HBM traffic per step at 16 slots, against 1.0 GB one array per layer; its decode loop runs the
    layers one by one either way)."""
    unstack = lambda stack: stack if isinstance(stack, tuple) else tuple(stack[i] for i in range(stack.shape[0]))
    return {**cache, "k": unstack(cache["k"]), "v": unstack(cache["v"])}


def _empty_cache(cfg, rows: int, cache_len: int):
    """`init_cache`, one array per layer, with one write index per row."""
    cache = _per_layer(init_cache(cfg, rows, cache_len))
    return {**cache, "index": jnp.zeros((rows,), jnp.int32)}


def schedule(lengths, slots: int, refill: int = 1, tail_halvings: int = 2, unit: int = 1) -> list[tuple[int, int]]:
    """The engine's decode loops for requests of these `lengths` (tokens each, in request order), as
    (slots, decode steps) per loop, largest first: what `continuous_generate` runs, replayed on the
    host (the planner's estimate from a length distribution). `unit`: the devices that split the rows."""
    requests = len(lengths)
    slots = min(slots, requests)
    remaining = []  # decode steps each busy slot still needs
    admitted = 0

    def admit(count):
        nonlocal admitted
        for length in lengths[admitted:admitted + count]:
            if length > 1:  # the prefill gives the first token
                remaining.append(int(length) - 1)
        admitted += count

    admit(slots)
    loops = []
    sizes = tail_sizes(slots, tail_halvings, unit)
    for size, smaller in zip(sizes, sizes[1:] + [None]):
        steps = 0
        while remaining or admitted < requests:
            if smaller is not None and admitted >= requests and len(remaining) <= smaller:
                break
            steps += 1
            remaining = [r - 1 for r in remaining if r > 1]
            while admitted < requests and size - len(remaining) >= refill and size == slots:
                admit(refill)
        loops.append((size, steps))
    return loops
