"""The model computes what transformers computes, packs without leaking, and caches exactly."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdistill import hf, model as model_lib
from jaxdistill.kvcache import KVCache
from jaxdistill.model_config import ModelConfig
from tests import hf_fixtures


# bf16 compute against transformers' bf16 compute on the tiny Qwen2 model (logits up to
# 0.72): measured 0.044 at most; the same model without RoPE is 0.98 off.
BF16_ATOL = 0.1


def _tokens(shape, seed=0, vocab=320):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _hf_logits(model, tokens, **kw):
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw).logits.float().numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers_fp32(kind, request):
  hf_dir = request.getfixturevalue(f"tiny_{kind}_dir")
  ref = hf_fixtures.tiny_hf_model(kind)
  model = hf.load_hf_model(hf_dir)
  assert model.config.tie_embeddings == (kind == "qwen2")
  assert model.config.qkv_bias == (kind == "qwen2")
  assert model.config.num_kv_heads < model.config.num_heads  # GQA exercised
  tokens = _tokens((2, 96))  # > original_max_position_embeddings=64: llama3 bands matter
  got, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), _hf_logits(ref, tokens), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_is_applied(tiny_llama_dir):
  """Guards the parity test: without the llama3 scaling the logits must differ."""
  cfg = ModelConfig.from_hf_config(tiny_llama_dir)
  assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
  plain = model_lib.rope_inv_freq(cfg.replace(rope_scaling=None))
  scaled = model_lib.rope_inv_freq(cfg)
  assert not np.allclose(plain, scaled)
  assert np.isclose(plain[0], scaled[0])  # the highest frequency is untouched


def test_bf16_checkpoint_imports_and_matches(tmp_path, monkeypatch):
  """bf16 weights arrive bit for bit; bf16 compute is within BF16_ATOL of transformers' bf16
  logits, a tolerance that a model without RoPE exceeds (checked here, each run)."""
  ref = hf_fixtures.tiny_hf_model("qwen2", dtype=torch.bfloat16)
  ref.save_pretrained(tmp_path)
  model = hf.load_hf_model(str(tmp_path), param_dtype="bfloat16", compute_dtype="bfloat16")
  # The weights arrive bit for bit, read without torch.
  reader = hf.SafetensorsReader(str(tmp_path))
  emb = reader.get("model.embed_tokens.weight")
  assert emb.dtype == ml_dtypes.bfloat16
  assert np.array_equal(np.asarray(model.embed_tokens.embedding[...]).view(np.uint16),
                        np.asarray(emb).view(np.uint16))
  tokens = _tokens((2, 48), seed=1)
  got, _ = model(jnp.asarray(tokens))
  assert got.dtype == jnp.bfloat16
  want = _hf_logits(ref, tokens)
  error = np.abs(np.asarray(got, np.float32) - want).max()
  assert error <= BF16_ATOL, error
  with monkeypatch.context() as m:  # the same model with RoPE removed
    m.setattr(model_lib, "apply_rope", lambda x, sin, cos: x)
    no_rope, _ = model(jnp.asarray(tokens))
  no_rope_error = np.abs(np.asarray(no_rope, np.float32) - want).max()
  assert no_rope_error > 2 * BF16_ATOL, no_rope_error
  # and fp32 compute on the same bf16 weights is much closer to the fp32 reference (loaded
  # afresh: `ref.float()` would keep the RoPE frequencies its bf16 cast rounded)
  model32 = hf.load_hf_model(str(tmp_path))
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  got32, _ = model32(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got32), _hf_logits(ref32, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_segments_equal_separate_sequences(kind, request):
  model = hf.load_hf_model(request.getfixturevalue(f"tiny_{kind}_dir"))
  a, b = _tokens((1, 23), seed=2), _tokens((1, 17), seed=3)
  packed = np.concatenate([a, b, np.zeros((1, 8), int)], axis=1)  # 8 tokens of padding
  positions = np.concatenate([np.arange(23), np.arange(17), np.zeros(8, int)])[None]
  segments = np.concatenate([np.full(23, 1), np.full(17, 2), np.zeros(8, int)])[None]
  got, _ = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_a, _ = model(jnp.asarray(a))
  alone_b, _ = model(jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(got[0, :23]), np.asarray(alone_a[0]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(got[0, 23:40]), np.asarray(alone_b[0]), atol=2e-5)
  # Changing the first example never changes the second one's logits.
  packed2 = packed.copy()
  packed2[0, :23] = _tokens((23,), seed=9)
  got2, _ = model(jnp.asarray(packed2), jnp.asarray(positions), jnp.asarray(segments))
  np.testing.assert_array_equal(np.asarray(got2[0, 23:40]), np.asarray(got[0, 23:40]))


def test_unrolled_layers_equal_the_scan(tiny_qwen2_dir):
  """`scan_unroll` changes how the layers loop, never what they compute: the loss and every
  parameter's gradient equal those of the one-layer-per-iteration scan (3 layers: unrolled by
  2 leaves a remainder iteration, by 3 none)."""
  tokens = jnp.asarray(_tokens((2, 40), seed=4))

  def loss_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      logits, _ = nnx.merge(graphdef, p)(tokens)
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return jax.value_and_grad(loss)(params)

  base = hf.load_hf_model(tiny_qwen2_dir)
  assert base.config.num_layers == 3 and base.config.scan_unroll == 1
  want_loss, want_grads = loss_and_grads(base)
  for unroll in (2, 3):
    model = hf.load_hf_model(tiny_qwen2_dir, scan_unroll=unroll)
    scans = [e for e in jax.make_jaxpr(lambda t: model(t)[0])(tokens).eqns
             if e.primitive.name == "scan"]
    assert [e.params["unroll"] for e in scans] == [unroll]  # the setting reaches the scan
    got_loss, got_grads = loss_and_grads(model)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("unroll", [99, 1])
def test_kv_cache_prefill_then_decode_equals_full_forward(unroll, tiny_llama_dir):
  # The model's forward (the [L, ...] stack under a scan) against the sampler's cached path
  # through the same blocks, both ways it runs them: every layer unrolled on its own weights
  # and cache (unroll 99), and a loop over layers stacked [L, ...] in weights and cache.
  from jaxdistill import decode_weights, sampler  # pylint: disable=g-import-not-at-top
  model = hf.load_hf_model(tiny_llama_dir)
  cfg = model.config
  tokens = _tokens((2, 20), seed=4)
  full, _ = model(jnp.asarray(tokens))
  stacks = decode_weights.stacks_for(cfg.num_layers, unroll)
  assert stacks == (cfg.num_layers if unroll > cfg.num_layers else 1)
  decoder = decode_weights.decode_model(model, stacks)
  cache = KVCache.zeros(cfg.num_layers, 2, 32, cfg.num_kv_heads, cfg.head_dim, stacks=stacks)
  pos = jnp.asarray(np.broadcast_to(np.arange(20), (2, 20)))
  seg = jnp.ones((2, 20), jnp.int32)

  @jax.jit
  def step(cache, tokens, pos, seg):
    x, cache = sampler._run_layers(  # pylint: disable=protected-access
        decoder.layers, decoder.embed(tokens), pos, seg, cache)
    return decoder.unembed(decoder.norm(x)), cache

  logits, cache = step(cache, jnp.asarray(tokens[:, :12]), pos[:, :12], seg[:, :12])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :12]), atol=1e-5)
  for t in range(12, 20):
    logits, cache = step(cache, jnp.asarray(tokens[:, t:t + 1]), pos[:, t:t + 1],
                         seg[:, t:t + 1])
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, t]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.end_index), [20, 20])


def test_hidden_and_unembed_compose_to_logits(tiny_qwen2_dir):
  model = hf.load_hf_model(tiny_qwen2_dir)
  tokens = jnp.asarray(_tokens((2, 10)))
  logits, _ = model(tokens)
  hidden, _ = model(tokens, return_hidden=True)
  assert hidden.shape == (2, 10, model.config.d_model)
  np.testing.assert_allclose(np.asarray(model.unembed(hidden)), np.asarray(logits), atol=1e-6)
