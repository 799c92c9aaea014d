"""The training forward of a run: the one program that gives the policy's log-probs (and values) to
the loss and, without gradient, the reference's and the policy's own to the scoring pass before it.

    fwd = TrainingForward(config, policy_graphdef, ref_graphdef, value_graphdef, mesh)
    scored = fwd.score(params, frozen, reference, batch, order, policy=True, values=False)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.core.losses import lm_token_stats
from rlhf_jax.core.packing import MICRO_SCORE_SCOPE, sum_micro_batches, unpack
from rlhf_jax.models.transformer import Pins
from rlhf_jax.models.tree import cast_floats
from rlhf_jax.parallel.attention import make_attend
from rlhf_jax.parallel.sharding import batch_constraint
from rlhf_jax.sampling.rollout import Rollout, join, response_positions, sequence_values


def sequence_batch(rollout: Rollout) -> dict:
    """The token arrays of a rollout that a training forward reads, as the minibatch dict."""
    return {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "response_ids": rollout.response_ids, "response_mask": rollout.response_mask}


class TrainingForward:
    """The training forward of a run's policy (and reference, and value model), shared by the loss and
    the scoring pass so that both are one program: on equal params and rows, equal bits."""

    def __init__(self, config, policy_graphdef, ref_graphdef, value_graphdef, mesh, value_head: bool = True,
                 group: int = 1):
        m = config.model
        self.group = group  # rows per prompt run once through the backbone (`prompt_group`)
        self.value_head = value_head
        self.policy_graphdef, self.ref_graphdef, self.value_graphdef = policy_graphdef, ref_graphdef, value_graphdef
        self.param_dtype = jnp.dtype(m.param_dtype)
        self.temperature, self.logits_chunk = config.sampling.temperature, m.logits_chunk
        self.shard_batch = batch_constraint(mesh) if mesh is not None and m.shard_activations else None
        self.backbone_options = dict(remat=m.remat, pins=Pins(residual=self.shard_batch))
        self.attention, self.mesh = m.attention, mesh

    def hidden(self, model, mb):
        """The backbone's hidden states at the positions that predict each response token; for a packed
        minibatch (`rlhf_jax.core.packing.minibatch_layouts`' arrays in `mb`), at every packed position
        (`token_stats` and `unpacked` bring them to the response layout)."""
        if "packed_ids" in mb:
            hidden, _ = model.backbone(mb["packed_ids"], None, segment_ids=mb["segment_ids"], **self.backbone_options)
            return hidden
        if self.group > 1:
            g = self.group
            return model.backbone.grouped(mb["prompt_ids"][::g], mb["prompt_mask"][::g], mb["response_ids"],
                                          mb["response_mask"], g, **self.backbone_options)
        ids, mask = join(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
        prompt_len, response_len = mb["prompt_ids"].shape[1], mb["response_ids"].shape[1]
        # A fused kernel serves the policy's and the reference's forwards (a separate value model
        # keeps the plain attention).
        attend = make_attend(self.attention, model.cfg, ids.shape[1], self.mesh)
        hidden, _ = model.backbone(ids, mask, output_index=response_positions(prompt_len, response_len),
                                   attend=attend, **self.backbone_options)
        return hidden

    def policy(self, params, frozen):
        trainable = cast_floats(params["policy"], self.param_dtype)  # the forward sees the params' storage dtype
        return nnx.merge(self.policy_graphdef, *((trainable,) if frozen is None else (trainable, frozen)))

    def forward(self, frozen):
        """`forward(params, minibatch) -> (hidden states, values)` for `lm_ppo_loss`."""
        def forward(params, mb):
            model = self.policy(params, frozen)
            hidden = self.hidden(model, mb)
            if not self.value_head:
                return hidden, None
            if self.value_graphdef is None:
                return hidden, self.unpacked(model.values(hidden), mb)
            critic = cast_floats(params["value"], self.param_dtype)
            if "packed_ids" in mb:
                values = nnx.merge(self.value_graphdef, critic)(mb["packed_ids"], None, segment_ids=mb["segment_ids"],
                                                                **self.backbone_options)
                return hidden, self.unpacked(values, mb)
            ids, mask = join(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
            return hidden, sequence_values(self.value_graphdef, critic, ids, mask, mb["response_ids"].shape[1],
                                           **self.backbone_options)
        return forward

    @staticmethod
    def unpacked(per_position, mb):
        """A packed forward's per-position values f[rows, budget] in the response layout f32[b, response_len]
        (the identity for an unpacked minibatch)."""
        return unpack(per_position, mb["gather"]) if "packed_ids" in mb else per_position

    def token_stats(self, hidden, mb, head):
        """(log-probs of the response tokens, entropies): f32[b, response_len] each, from `hidden`'s
        forward (`lm_token_stats`; packed, at every packed position of its next token, then unpacked)."""
        tokens = mb["targets"] if "packed_ids" in mb else mb["response_ids"]
        stats = lm_token_stats(hidden, tokens, temperature=self.temperature, head=head, logits_chunk=self.logits_chunk)
        return tuple(self.unpacked(x, mb) for x in stats)

    def reference(self, reference, frozen):
        """The reference model. On the policy's own graph with a frozen part (LoRA), `reference` is a
        snapshot of the trainable part only, over the very frozen buffers: passing the base twice
        would make XLA budget it twice."""
        if self.ref_graphdef is self.policy_graphdef and frozen is not None:
            return nnx.merge(self.ref_graphdef, cast_floats(reference, self.param_dtype), frozen)
        return nnx.merge(self.ref_graphdef, reference)

    def head(self, frozen):
        return lambda params, hidden: self.policy(params, frozen).logits(hidden)

    def score(self, params, frozen, reference, batch, order, *, policy: bool, values: bool, ref: bool = True,
              packed: dict | None = None):
        """The reference's log-probs ("ref_logprobs", if `ref`) and, if asked, the policy's ("logprobs")
        and its values ("values") for a rollout `batch`, one minibatch of `order` (int32[minibatches,
        rows]) at a time, returned in row order. `packed`: each of those minibatches' packed layout
        (leading axis: minibatches; with `micro_steps`, run micro-batch by micro-batch as the update does)."""
        forward = self.forward(frozen)
        shard = (lambda tree: jax.tree.map(self.shard_batch, tree)) if self.shard_batch is not None else (lambda t: t)

        def one(step):
            indices, own = step
            if "micro_steps" in own:
                # Each sample's tokens are in one micro-batch and the others' `gather` fills 0 there:
                # the sum over the micro-batches a minibatch fills is each token's value, bit for bit.
                mb = shard(jax.tree.map(lambda x: x[indices], batch))
                return sum_micro_batches(lambda micro: scored({**mb, **micro}), own, MICRO_SCORE_SCOPE,
                                         self.shard_batch)
            return scored(shard({**jax.tree.map(lambda x: x[indices], batch), **own}))

        def scored(mb):
            out = {}
            if ref:
                ref_model = self.reference(reference, frozen)
                out["ref_logprobs"] = self.token_stats(self.hidden(ref_model, mb), mb, ref_model.logits)[0]
            if policy or values:
                hidden, value_out = forward(params, mb)
                if values:
                    out["values"] = value_out
                if policy:
                    out["logprobs"] = self.token_stats(hidden, mb, lambda h: self.head(frozen)(params, h))[0]
            return out

        results = jax.lax.map(one, (order, packed or {}))
        inverse = jnp.argsort(order.reshape(-1))
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[inverse], results)


def make_scoring(config, *, policy_graphdef, ref_graphdef=None, value_graphdef=None, mesh=None):
    """The update's scoring pass on its own, jitted: `score(params, rollout, frozen=None, reference=None)
    -> {"logprobs", "ref_logprobs", "values"}`, f32[b, response_len] each, through the training forward
    in minibatches of the config's size. `params` as in the train state ({"policy": ..., "value": ...}).
    What the update uses as PPO's old log-probs under `rl.old_logprobs = "recompute"`, for comparing with
    the sampler's (`scripts/precision.py`)."""
    fwd = TrainingForward(config, policy_graphdef, ref_graphdef or policy_graphdef, value_graphdef, mesh)
    minibatches = config.rl.num_mini_batches

    def score(params, rollout: Rollout, frozen=None, reference=None):
        batch = sequence_batch(rollout)
        order = jnp.arange(rollout.prompt_ids.shape[0]).reshape(minibatches, -1)
        return fwd.score(params, frozen, reference, batch, order, policy=True, values=True)

    return jax.jit(score)
