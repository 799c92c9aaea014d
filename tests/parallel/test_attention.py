"""The fused attentions give the plain attention's outputs and gradients at every real position:
TPU's splash kernel (run here in Pallas' interpret mode) and the `jax.nn.dot_product_attention`
call of the cuDNN path (run here through XLA: no GPU on this machine; cuDNN itself is not tested
here). Each is refused off its own devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.parallel.attention import cudnn_attention, splash_attention

SEQ = 128  # the kernel's smallest tile

LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, max_position_embeddings=SEQ, qk_norm=True)
GEMMA = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=64, max_position_embeddings=SEQ, qk_norm=True, sliding_window=5,
                    sliding_layers=(0,), rope_local_theta=100.0, query_pre_attn_scalar=6)


def _batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (2, SEQ)), jnp.int32)
    mask = np.ones((2, SEQ), np.int32)
    mask[0, :40] = 0  # a left-padded prompt
    mask[1, 100:] = 0  # a response padded after its EOS
    return ids, jnp.asarray(mask)


@pytest.mark.parametrize("kind,cfg,scan", [("splash", LLAMA, False), ("splash", GEMMA, True), ("cudnn", GEMMA, True)],
                         ids=["splash-llama", "splash-gemma3-scanned", "cudnn-call-gemma3-scanned"])
def test_fused_attention_equals_the_plain_attention_with_gradients(kind, cfg, scan):
    ids, mask = _batch()
    model = CausalLM(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    if kind == "splash":
        attend = splash_attention(model.cfg, SEQ, interpret=True)
    else:
        attend = cudnn_attention(model.cfg, implementation="xla")
    real = np.asarray(mask, bool)

    # A random readout: a squared norm of the final-normed hidden states is nearly constant, its
    # gradients all cancellation noise.
    readout = jnp.asarray(np.random.default_rng(1).normal(size=(cfg.hidden_size,)), jnp.float32)

    def loss(params, attend):
        hidden, _ = nnx.merge(graphdef, params).backbone(ids, mask, remat="full", attend=attend)
        return jnp.sum(jnp.where(mask > 0, jnp.tanh(hidden) @ readout, 0.0)), hidden

    (plain, plain_hidden), plain_grads = jax.value_and_grad(loss, has_aux=True)(params, None)
    (fused, fused_hidden), fused_grads = jax.value_and_grad(loss, has_aux=True)(params, attend)
    np.testing.assert_allclose(np.asarray(fused_hidden)[real], np.asarray(plain_hidden)[real], rtol=1e-4, atol=1e-5)
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(fused_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(a)).max())


def test_fused_kernels_need_their_devices_and_splash_whole_tiles():
    from rlhf_jax.config import ConfigError, base_config
    from rlhf_jax.parallel.attention import validate_attention
    config = base_config()
    config.model.attention = "cudnn"
    with pytest.raises(ConfigError, match="config.model.attention = 'cudnn' is a GPU kernel; these devices are 'tpu'"):
        validate_attention(config, "tpu")
    validate_attention(config, "gpu")
    config.model.attention = "splash"
    config.data.max_prompt_len, config.sampling.max_new_tokens = 64, 64
    with pytest.raises(ConfigError, match="config.model.attention = 'splash' is a TPU kernel; these devices are 'cpu'"):
        validate_attention(config, "cpu")
    validate_attention(config, "tpu")
    config.sampling.max_new_tokens = 60
    with pytest.raises(ConfigError, match="= 124 to be a multiple of 128"):
        validate_attention(config, "tpu")
