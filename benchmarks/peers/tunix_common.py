"""What the Tunix harnesses share: an integer-id tokenizer and a small random decoder of Tunix's own
model families (nothing downloaded)."""

import time

import jax
from flax import nnx

PAD, BOS, EOS = 0, 1, 2
FIRST_REAL = 3


class IdTokenizer:
  """Minimal tokenizer: text is whitespace-separated integer token ids.

  Tunix's TokenizerAdapter accepts any object with encode/decode/bos_id/eos_id/
  pad_id (TokenizerType.NONE). The sampler prepends bos_id() to each prompt.
  """

  def encode(self, text, **kwargs):
    return [int(t) for t in str(text).split()]

  def decode(self, ids, **kwargs):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return BOS

  def eos_id(self):
    return EOS

  def pad_id(self):
    return PAD


def build_model(args, seed):
  """Smallest decoder of the chosen tunix family, random init, no checkpoint."""
  head_dim = args.width // args.heads
  if args.model == "qwen3":
    from tunix.models.qwen3 import model as mdl
    cfg = mdl.ModelConfig(
        num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.width,
        hidden_dim=args.mlp, num_heads=args.heads, head_dim=head_dim,
        num_kv_heads=args.kv_heads, rope_theta=10_000, norm_eps=1e-6,
        use_tied_embedding=False)  # untied: create_critic_model swaps lm_head
    return mdl.Qwen3(cfg, rngs=nnx.Rngs(params=seed)), cfg
  else:
    from tunix.models.llama3 import model as mdl
    cfg = mdl.ModelConfig(
        num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.width,
        hidden_dim=args.mlp, num_heads=args.heads, head_dim=head_dim,
        num_kv_heads=args.kv_heads, rope_theta=10_000, norm_eps=1e-5,
        weight_tying=False)
    return mdl.Llama3(cfg, rngs=nnx.Rngs(params=seed)), cfg


def count_params(m):
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))


def block_model(m):
  jax.block_until_ready(jax.tree.leaves(nnx.state(m, nnx.Param)))


def timed_phase(phases, name, fn, block_out=True, after=None):
  """fn, appending its seconds (until its outputs are ready, then `after`) to phases[name]."""
  def wrapper(*a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    if block_out:
      jax.block_until_ready(out)
    if after is not None:
      after(out)
    phases[name].append(time.perf_counter() - t0)
    return out
  return wrapper
