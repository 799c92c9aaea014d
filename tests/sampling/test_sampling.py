"""generate(): greedy and sampled decoding, logprobs, filters, EOS handling, determinism, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.core.ops import token_logprobs
from rlhf_jax.models import CausalLM, gpt2_config
from rlhf_jax.sampling.generate import categorical, filter_logits, generate

CFG = gpt2_config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def model():
    model = CausalLM(CFG, rngs=nnx.Rngs(0), value_head=True)
    # Sharpen the random model so its distributions are far from uniform.
    model.backbone.embed[...] = model.backbone.embed[...] * 4
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(1)
    ids = rng.randint(2, CFG.vocab_size, (4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :5] = 0
    ids[mask == 0] = PAD
    return jnp.asarray(ids), jnp.asarray(mask)


def run(model, prompts, key=0, **kw):
    graphdef, params = nnx.split(model)
    kw.setdefault("max_new_tokens", 8)
    return jax.device_get(generate(graphdef, params, *prompts, jax.random.key(key), pad_id=PAD, **kw))


def test_greedy_equals_repeated_full_forward_argmax(model, prompts):
    out = run(model, prompts, temperature=0.0)
    ids, mask = map(np.asarray, prompts)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m)["logits"][:, -1])
    for _ in range(8):
        logits = forward(params, jnp.asarray(ids), jnp.asarray(mask))
        ids = np.concatenate([ids, np.asarray(jnp.argmax(logits, -1))[:, None]], 1)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), mask.dtype)], 1)
    np.testing.assert_array_equal(out["response_ids"], ids[:, -8:])
    assert out["response_mask"].all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(model, prompts, temperature):
    out = run(model, prompts, temperature=temperature, eos_ids=(EOS,), with_values=True)
    ids, mask = map(np.asarray, prompts)
    full = np.concatenate([ids, out["response_ids"]], 1)
    full_mask = np.concatenate([mask, out["response_mask"]], 1)
    res = model(jnp.asarray(full), jnp.asarray(full_mask))
    p = ids.shape[1]
    logits = res["logits"][:, p - 1:-1] / temperature
    expected = np.asarray(token_logprobs(logits, jnp.asarray(out["response_ids"])))
    resp_mask = out["response_mask"].astype(bool)
    np.testing.assert_allclose(out["logprobs"][resp_mask], expected[resp_mask], atol=1e-5)
    assert np.all(out["logprobs"][~resp_mask] == 0)
    # The values recorded while sampling are the value head's on the teacher-forced pass.
    np.testing.assert_allclose(out["values"][resp_mask], np.asarray(res["values"][:, p - 1:-1])[resp_mask], atol=1e-5)


def test_top_k_one_is_greedy(model, prompts):
    greedy = run(model, prompts, temperature=0.0)
    top1 = run(model, prompts, temperature=1.0, top_k=1, key=5)
    np.testing.assert_array_equal(greedy["response_ids"], top1["response_ids"])
    np.testing.assert_allclose(top1["logprobs"], 0.0, atol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = jnp.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.log(probs)
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_p=p)))))
    assert kept(0.4) == {1}           # 0.4 alone reaches 0.4
    assert kept(0.5) == {1, 3}        # 0.4 < 0.5 <= 0.7
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 4}
    assert kept(0.99) == {0, 1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_k=2))))) == {1, 3}


def test_sampled_frequencies_match_softmax(model):
    n = 4000
    prompt = jnp.asarray(np.tile(np.array([[5, 9, 3]], np.int32), (n, 1)))
    mask = jnp.ones_like(prompt)
    temperature = 0.8
    out = run(model, (prompt, mask), temperature=temperature, max_new_tokens=1, key=123)
    probs = np.asarray(jax.nn.softmax(model(prompt[:1], mask[:1])["logits"][0, -1] / temperature))
    counts = np.bincount(out["response_ids"][:, 0], minlength=CFG.vocab_size)
    expected = probs * n
    big = expected >= 5  # chi-square needs expected counts of at least ~5; pool the rest
    observed = np.append(counts[big], counts[~big].sum())
    expect = np.append(expected[big], expected[~big].sum())
    chi2 = np.sum((observed - expect) ** 2 / np.maximum(expect, 1e-9))
    dof = len(observed) - 1
    # 99.9% quantile of chi-square (Wilson-Hilferty), so a fixed seed fails only on a real mismatch.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit)
    assert (probs > 0.02).sum() >= 5  # the test distribution is neither uniform nor one-hot
    assert probs.max() > 0.1


def test_rows_stop_at_their_own_eos(model, prompts):
    # Sample without EOS, then declare one of the sampled tokens the EOS: with the same key, each row
    # must reproduce its draws up to the first EOS, then stop (rows stop at different steps).
    kw = dict(temperature=1.0, max_new_tokens=8, key=11)
    sampled = run(model, prompts, **kw)["response_ids"]
    # Candidates end row 0 after 2-7 tokens, so it stops before the rows without that token (at 8).
    candidates = [int(t) for t in np.unique(sampled) if 0 < np.flatnonzero(sampled[0] == t).min(initial=99) < 7]
    eos = max(candidates, key=lambda t: len({(np.flatnonzero(r == t).tolist() or [7])[0] for r in sampled}))
    out = run(model, prompts, eos_ids=(eos,), **kw)
    for row, ids in enumerate(sampled):
        hits = np.flatnonzero(ids == eos)
        length = hits[0] + 1 if len(hits) else 8
        assert out["lengths"][row] == length
        np.testing.assert_array_equal(out["response_mask"][row], np.arange(8) < length)
        np.testing.assert_array_equal(out["response_ids"][row, :length], ids[:length])
        assert np.all(out["response_ids"][row, length:] == PAD)
        assert np.all(out["logprobs"][row, length:] == 0)
    assert len(set(out["lengths"].tolist())) > 1, "the rows should stop at different steps"


def test_stops_early_when_every_row_is_done(model, prompts):
    greedy = run(model, prompts, temperature=0.0, max_new_tokens=8)["response_ids"]
    first = set(greedy[:, 0].tolist())
    out = run(model, prompts, temperature=0.0, max_new_tokens=8, eos_ids=tuple(first))
    assert np.all(out["lengths"] == 1)
    assert np.all(out["response_ids"][:, 1:] == PAD)


def test_same_key_same_output_other_key_other(model, prompts):
    a = run(model, prompts, key=7, temperature=1.0, max_new_tokens=16)
    b = run(model, prompts, key=7, temperature=1.0, max_new_tokens=16)
    c = run(model, prompts, key=8, temperature=1.0, max_new_tokens=16)
    np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
    assert not np.array_equal(a["response_ids"], c["response_ids"])


def test_repeated_calls_do_not_compile_again(model, prompts):
    graphdef, params = nnx.split(model)
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=10, top_p=0.95, eos_ids=(EOS,), pad_id=PAD)
    generate(graphdef, params, *prompts, jax.random.key(0), **kw)
    before = generate._cache_size()
    for seed in range(3):
        params = jax.tree.map(lambda x: x * 1.0, params)  # new buffers, same shapes
        jax.block_until_ready(generate(graphdef, params, *prompts, jax.random.key(seed), **kw))
    assert generate._cache_size() == before


def test_inverse_cdf_never_draws_a_token_without_probability():
    # The extreme uniforms land on the first and the last token that has probability, never on the
    # filtered (-inf) tokens around them, even where uniform x total rounds up to the total.
    logits = jnp.asarray([[-jnp.inf, 0.0, 0.0, -jnp.inf, -jnp.inf]] * 3)
    uniform = jnp.asarray([0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    np.testing.assert_array_equal(np.asarray(categorical(uniform, logits)), [1, 2, 2])
    # Many draws from a distribution with tiny and zero-probability tokens: each drawn token has probability.
    logits = jnp.asarray([[3.0, -jnp.inf, -30.0, 0.5, -jnp.inf]])
    draws = categorical(jax.random.uniform(jax.random.key(0), (4096,)), jnp.repeat(logits, 4096, axis=0))
    assert set(np.unique(np.asarray(draws)).tolist()) <= {0, 2, 3}


def test_decode_segments_sample_what_one_loop_samples(model, prompts, segments=3):
    """Each segment attends to the KV cache only as far as it is filled: the same tokens, log-probs,
    values and stops (rows end at their EOS mid-segment)."""
    stops = tuple(range(1, 12))  # rows end at 1, 6, 2 and 3 tokens
    one = run(model, prompts, key=3, eos_ids=stops, with_values=True, top_k=20)
    split = run(model, prompts, key=3, eos_ids=stops, with_values=True, top_k=20, decode_segments=segments)
    assert sorted(set(one["lengths"])) == [1, 2, 3, 6]
    np.testing.assert_array_equal(one["response_ids"], split["response_ids"])
    np.testing.assert_array_equal(one["lengths"], split["lengths"])
    long = [run(model, prompts, key=4, top_k=20, decode_segments=n) for n in (1, segments)]  # no stops
    np.testing.assert_array_equal(long[0]["response_ids"], long[1]["response_ids"])
    for key in ("logprobs", "values"):
        np.testing.assert_allclose(one[key], split[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decode_segments must be >= 1"):
        run(model, prompts, decode_segments=0)


class _Mesh:
    def __init__(self, data, fsdp, tensor):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_tensor_decode_problem_names_what_does_not_split():
    from rlhf_jax.models import ModelConfig
    from rlhf_jax.sampling.generate import tensor_decode_problem
    llama = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=32, num_kv_heads=8,
                        head_dim=2, intermediate_size=14336, max_position_embeddings=64)
    assert tensor_decode_problem(llama, _Mesh(1, 16, 1), 64) is None  # 8 KV heads x 2 row groups
    assert "32 query heads" in tensor_decode_problem(llama, _Mesh(1, 64, 1), 64)
    assert "intermediate_size 14336" in tensor_decode_problem(llama.replace(num_heads=48), _Mesh(1, 3, 1), 64)
    # 16 model devices for 8 KV heads leave 2 row groups per data replica: 4 x 2 = 8 groups
    assert "60 rows" in tensor_decode_problem(llama, _Mesh(4, 16, 1), 60)
    assert tensor_decode_problem(llama, _Mesh(4, 16, 1), 64) is None


def test_tensor_layout_without_a_mesh_is_refused(model, prompts):
    with pytest.raises(ValueError, match='decode_layout="tensor" needs a batch_mesh'):
        run(model, prompts, decode_layout="tensor")
    with pytest.raises(ValueError, match="decode_layout must be one of"):
        run(model, prompts, decode_layout="rows")


def test_auto_decode_layout_copies_weights_only_where_a_cast_copy_exists_anyway(model):
    """"auto" goes tensor parallel where the projections are stored wider than they compute (the
    decoder reads a cast copy in either layout); a bf16-stored model would pay for a second copy."""
    from rlhf_jax.sampling.generate import _stored_wider
    _, params = nnx.split(model)
    assert _stored_wider(params, jnp.bfloat16)
    assert not _stored_wider(params, jnp.float32)
    assert not _stored_wider(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), jnp.bfloat16)
