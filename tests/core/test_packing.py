"""Packed rows: the host-side assignment and layout, and a packed forward that gives each sample the
log-probs and values it gets alone in the padded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.core.ops import token_logprobs
from rlhf_jax.core.packing import first_fit_decreasing, next_tokens, pack, unpack
from rlhf_jax.models import CausalLM
from rlhf_jax.models.lora import with_lora
from tests.models.test_scan_layers import CONFIGS


def test_first_fit_decreasing_places_the_longest_first_in_the_first_row_with_room():
    assert first_fit_decreasing([3, 7, 2, 5, 5, 1], 10) == [[1, 0], [3, 4], [2, 5]]
    assert first_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    assert first_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than the row budget of 8"):
        first_fit_decreasing([2, 9], 8)


def _ragged(rng, n=6, prompt_len=5, response_len=7, vocab=64):
    """A rollout's layout: left-padded prompts of 2-5 tokens, right-padded responses of 1-7."""
    prompt_lens = rng.integers(2, prompt_len + 1, n)
    response_lens = rng.integers(1, response_len + 1, n)
    ids = rng.integers(1, vocab, (n, prompt_len + response_len)).astype(np.int32)
    columns = np.arange(prompt_len + response_len)
    mask = ((columns >= prompt_len - prompt_lens[:, None])
            & (columns < prompt_len + response_lens[:, None])).astype(np.int32)
    return np.where(mask > 0, ids, 0), mask


def test_pack_places_each_samples_tokens_and_unpack_brings_them_back():
    ids, mask = _ragged(np.random.default_rng(0))
    layout = pack(ids, mask, budget=16, pad_id=0)
    lengths = mask.sum(1)
    assert layout.ids.shape == layout.segment_ids.shape == (len(layout.rows), 16)
    assert sorted(i for row in layout.rows for i in row) == list(range(len(ids)))
    for r, samples in enumerate(layout.rows):
        assert list(np.unique(layout.segment_ids[r][layout.segment_ids[r] > 0])) == list(range(1, len(samples) + 1))
        assert sum(lengths[i] for i in samples) == (layout.segment_ids[r] > 0).sum() <= 16
    assert layout.real_fraction == lengths.sum() / layout.ids.size
    np.testing.assert_array_equal(unpack(jnp.asarray(layout.ids), layout.index, fill=-1), np.where(mask > 0, ids, -1))
    holed = mask.copy()
    holed[3, 4] = 0  # its last prompt token, between the prompt's first and the response's
    with pytest.raises(ValueError, match="sample 3's tokens are not contiguous"):
        pack(ids, holed, budget=16)


@pytest.mark.parametrize("name,lora,scan", [("llama", True, False), ("gemma3", False, True), ("gpt2", False, False)])
def test_a_packed_forward_gives_each_sample_its_own_logprobs_and_values(name, lora, scan):
    """Positions restart per sample and attention stays inside it (sliding windows, RoPE, learned
    positions alike): the log-probs of every real token and the value head's values equal the padded
    batch's, within float32 rounding."""
    model = CausalLM(CONFIGS[name].replace(scan_layers=scan), rngs=nnx.Rngs(0), value_head=True)
    if lora:
        model = with_lora(model, 4, 8.0, ("q_proj", "v_proj", "up_proj"))
    # Non-zero adapters and value head, so that they count.
    state = nnx.state(model, nnx.Param)
    state = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(3), x.shape, x.dtype), state)
    nnx.update(model, state)
    ids, mask = _ragged(np.random.default_rng(1), n=7)
    layout = pack(ids, mask, budget=20)
    assert len(layout.rows) < len(ids)  # several samples share rows

    out = model(jnp.asarray(ids), jnp.asarray(mask))
    padded_logp = np.asarray(token_logprobs(out["logits"][:, :-1], jnp.asarray(ids)[:, 1:]))
    hidden, _ = model.backbone(jnp.asarray(layout.ids), None, segment_ids=jnp.asarray(layout.segment_ids))
    # As the update takes them: each packed position's log-prob of its successor in its segment.
    targets = next_tokens(layout.ids, layout.segment_ids)
    packed_logp = unpack(token_logprobs(model.logits(hidden), jnp.asarray(targets)), layout.index)
    predicted = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)  # tokens with a real token before them
    np.testing.assert_allclose(np.asarray(packed_logp)[:, :-1][predicted], padded_logp[predicted], rtol=1e-5, atol=2e-6)
    values = unpack(model.values(hidden), layout.index)
    np.testing.assert_allclose(np.asarray(values)[mask > 0], np.asarray(out["values"])[mask > 0], rtol=1e-5, atol=2e-6)
    # A sample's last token and the unused tail have no successor in their segment: the pad (0) is
    # their target; every other position's is a real token.
    segments = layout.segment_ids
    no_successor = (segments == 0) | (segments != np.pad(segments[:, 1:], ((0, 0), (0, 1))))
    assert np.all(targets[no_successor] == 0) and np.all(targets[~no_successor] > 0)


def test_segment_ids_take_the_place_of_the_attention_mask():
    model = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model.backbone(ids, jnp.ones_like(ids), segment_ids=jnp.ones_like(ids))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_sft_loss_equals_the_padded_one(name):
    from rlhf_jax.step.sft import next_token_loss, pack_examples, packed_next_token_loss

    graphdef, params = nnx.split(CausalLM(CONFIGS[name], rngs=nnx.Rngs(0)))
    ids, mask = _ragged(np.random.default_rng(3), n=8)
    packed = pack_examples(ids, mask, budget=24)
    assert len(packed["packed_ids"]) < len(ids)  # several examples a row
    assert packed["target_mask"].sum() == (mask.sum(1) - 1).sum()  # every token but each example's first
    # Jitted: run op by op, the backward of even this tiny model takes many seconds.
    padded_fn = jax.jit(jax.value_and_grad(next_token_loss, argnums=1), static_argnums=0)
    packed_fn = jax.jit(jax.value_and_grad(packed_next_token_loss, argnums=1), static_argnums=0)
    padded, expected = padded_fn(graphdef, params, jnp.asarray(ids), jnp.asarray(mask))
    loss, grads = packed_fn(graphdef, params, packed)
    assert float(loss) == pytest.approx(float(padded), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)
