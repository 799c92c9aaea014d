"""Shared fixtures: tiny transformers checkpoints, made once per test session."""

import atexit
import os
import shutil
import tempfile

# Tests run on the CPU; keep XLA from grabbing both cores' worth of threads per process twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny programs (each trainer jits its own functions, and the subprocess
# tests start fresh interpreters): a compilation cache for this session only, empty at its start,
# halves the suite's time. The environment reaches the subprocesses too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import numpy as np
import pytest

# `make test` runs two pytest-xdist workers, a file each at a time, in the order collected (--dist
# loadfile --no-loadscope-reorder): the files that run whole programs in subprocesses (minutes each)
# start first, so that neither worker is left with one of them at the end.
FIRST = ("test_sharding.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _save(model, path):
    model.eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{name: folder} of tiny random transformers models saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    rope_llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    models = {
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=1)),
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)),
        "llama3_tied": tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, tie_word_embeddings=True,
                                                          rope_parameters=rope_llama3)),
        "qwen2": tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY)),
        "qwen3": tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, head_dim=8)),
        # Gemma 3 with every option on: a sliding-window layer (window 3 of 10 positions) at its own RoPE
        # base, a global one with linear RoPE scaling, soft-capped logits, a query scale.
        "gemma3": tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **TINY, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=6, final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
        "smollm3": tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**TINY, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        "gpt2_scalar": tf.GPT2ForSequenceClassification(tf.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1, pad_token_id=0)),
        "llama_scalar": tf.LlamaForSequenceClassification(tf.LlamaConfig(**TINY, num_labels=1, pad_token_id=0)),
        "gemma3_scalar": tf.Gemma3TextForSequenceClassification(tf.Gemma3TextConfig(
            **TINY, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"], num_labels=1)),
    }
    # Norm weights start at one (Gemma's at zero, it adds one): make them random, so that a norm read
    # into the wrong place shows.
    for name, param in [*models["qwen3"].named_parameters(), *models["gemma3"].named_parameters()]:
        if "norm" in name:
            param.data.uniform_(0.5, 1.5)
    return {name: _save(model, root / name) for name, model in models.items()}


@pytest.fixture(scope="session")
def left_padded_batch():
    """A batch of three rows, the second and third left-padded."""
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 64, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
    """A workdir holding the demo's tokenizer and a warmed-up "original model" (sft_model)."""
    from transformers import AutoTokenizer

    from rlhf_jax.tasks import reviews
    from rlhf_jax.tasks.demo import warm_up

    root = tmp_path_factory.mktemp("demo")
    tokenizer = AutoTokenizer.from_pretrained(reviews.build_tokenizer(str(root / "tokenizer")))
    warm_up(str(root), tokenizer, steps=200)
    return root
