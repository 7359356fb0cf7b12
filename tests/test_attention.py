"""Attention implementations equal the dense reference; context parallelism equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdistill import attention, losses, model as model_lib, sharding
from jaxdistill.model_config import ModelConfig
from tests import defaults

B, N, K, H = 2, 4, 2, 16


def packed_layout(lengths_per_row, t):
  """positions, segment ids [B, T] for rows packed with the given example lengths (rest pad)."""
  pos = np.zeros((len(lengths_per_row), t), np.int32)
  seg = np.zeros((len(lengths_per_row), t), np.int32)
  for r, lengths in enumerate(lengths_per_row):
    i = 0
    for s, n in enumerate(lengths, 1):
      pos[r, i:i + n], seg[r, i:i + n] = np.arange(n), s
      i += n
  return jnp.asarray(pos), jnp.asarray(seg)


def qkv(t, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = ((B, t, N, H), (B, t, K, H), (B, t, K, H))
  return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


def dense(q, k, v, pos, seg):
  return attention.dense_attention(q, k, v, attention.attention_mask(pos, seg, pos, seg))


def assert_equal_on_tokens(fn, ref, q, k, v, seg, atol):
  """Outputs and q/k/v gradients agree on real (non-padding) tokens."""
  valid = (seg != 0)[:, :, None, None]
  np.testing.assert_allclose(jnp.where(valid, fn(q, k, v), 0), jnp.where(valid, ref(q, k, v), 0),
                             atol=atol)
  assert not np.any(np.asarray(jnp.where(valid, 0, fn(q, k, v))))  # padding rows give zeros
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * valid
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(
      q, k, v) for f in (fn, ref)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=atol * 4)


@pytest.mark.parametrize("t,block,lengths", [
    (200, 32, [[70, 90, 30], [150]]),       # T not a multiple of the block; padding
    (256, 64, [[256], [1, 100, 155]]),      # a full row; a one-token example
    (96, 128, [[40, 56], [96]]),            # one block holds everything
    (200, 128, [[70, 90, 30], [150]]),      # two even blocks of 112, not two of 128
])
def test_blockwise_equals_dense_with_packing(t, block, lengths):
  q, k, v = qkv(t)
  pos, seg = packed_layout(lengths, t)
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, pos, seg, pos, seg,
                                                            block=block)
  assert_equal_on_tokens(blockwise, lambda q, k, v: dense(q, k, v, pos, seg), q, k, v, seg,
                         atol=2e-6)


def test_blockwise_skips_masked_block_pairs_exactly():
  # Two 64-token examples in 16-token blocks: the pairs across examples and above the
  # diagonal are skipped; 2 x (4 x 5 / 2) = 20 of the 64 pairs are needed.
  pos, seg = packed_layout([[64, 64]], 128)
  blocks = lambda x: attention._blocks(x, 16)  # pylint: disable=protected-access
  need = attention._needed_pairs(blocks(pos), blocks(seg), blocks(pos), blocks(seg))  # pylint: disable=protected-access
  assert int(need.sum()) == 20
  assert bool(need[5, 1]) is False and bool(need[5, 4]) is True and bool(need[1, 2]) is False


def test_blockwise_attends_to_a_cache_with_other_positions():
  # Queries are the last 40 tokens of a 100-token sequence attending to all 100 keys (the
  # prefill-into-cache shape): arbitrary key positions, not the queries' own.
  q, k, v = qkv(100)
  pos, seg = packed_layout([[100], [60, 40]], 100)
  qs = slice(60, 100)
  mask = attention.attention_mask(pos[:, qs], seg[:, qs], pos, seg)
  want = attention.dense_attention(q[:, qs], k, v, mask)
  got = attention.blockwise_attention(q[:, qs], k, v, pos[:, qs], seg[:, qs], pos, seg,
                                      block=16)
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("t", [1, 3])
def test_shared_prefix_attention_equals_dense_over_each_rows_copy(t):
  """Three prompts of 4 samples each: attending to a prompt's keys once for its 4 rows, with
  one softmax over the prompt and the row's own slots, equals dense attention over each row's
  own copy of the prompt followed by its slots. Prompts fill 5, 9 and 1 of 12 prefix slots
  (the rest holds other values, never to be seen); own slots are partly filled, causally."""
  rng = np.random.default_rng(0)
  prompts, share, p_slots, a_slots = 3, 4, 12, 9
  rows = prompts * share
  lengths = np.array([5, 9, 1], np.int32)
  q = rng.normal(size=(rows, t, N, H)).astype(np.float32)
  pk, pv = (rng.normal(size=(prompts, p_slots, K, H)).astype(np.float32) for _ in range(2))
  ak, av = (rng.normal(size=(rows, a_slots, K, H)).astype(np.float32) for _ in range(2))
  # Own slots: row r has filled r % 5 + 1 + t of them (its new tokens last), positions after
  # its prompt; queries are the last t of them.
  filled = np.arange(rows) % 5 + 1 + t
  prompt_of = np.repeat(np.arange(prompts), share)
  a_pos = lengths[prompt_of][:, None] + np.arange(a_slots)[None]
  a_seg = (np.arange(a_slots)[None] < filled[:, None]).astype(np.int32)
  q_pos = a_pos[np.arange(rows)[:, None], filled[:, None] - t + np.arange(t)[None]]
  mask = attention.attention_mask(jnp.asarray(q_pos), jnp.ones((rows, t), jnp.int32),
                                  jnp.asarray(a_pos), jnp.asarray(a_seg))
  got = attention.prefixed_attention_cached(
      jnp.asarray(q), jnp.asarray(pk.transpose(0, 2, 3, 1)), jnp.asarray(pv.transpose(0, 2, 1, 3)),
      jnp.asarray(lengths), jnp.asarray(ak.transpose(0, 2, 3, 1)),
      jnp.asarray(av.transpose(0, 2, 1, 3)), mask)
  # The reference: every row's own copy of its prompt's visible slots, then its own slots.
  k_all = np.concatenate([pk[prompt_of], ak], axis=1)
  v_all = np.concatenate([pv[prompt_of], av], axis=1)
  visible = np.arange(p_slots)[None] < lengths[prompt_of][:, None]
  mask_all = np.concatenate([np.broadcast_to(visible[:, None], (rows, t, p_slots)),
                             np.asarray(mask)], axis=-1)
  want = attention.dense_attention(jnp.asarray(q), jnp.asarray(k_all), jnp.asarray(v_all),
                                   jnp.asarray(mask_all))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The hidden prefix slots matter if seen: showing them changes the answer.
  seen = attention.prefixed_attention_cached(
      jnp.asarray(q), jnp.asarray(pk.transpose(0, 2, 3, 1)), jnp.asarray(pv.transpose(0, 2, 1, 3)),
      jnp.full((prompts,), p_slots, jnp.int32), jnp.asarray(ak.transpose(0, 2, 3, 1)),
      jnp.asarray(av.transpose(0, 2, 1, 3)), mask)
  assert np.abs(np.asarray(seen) - np.asarray(want)).max() > 1e-2


def test_blockwise_bfloat16_close_to_float32_reference():
  q, k, v = qkv(128, dtype=jnp.bfloat16)
  pos, seg = packed_layout([[128], [50, 78]], 128)
  got = attention.blockwise_attention(q, k, v, pos, seg, pos, seg, block=32)
  want = dense(*(x.astype(jnp.float32) for x in (q, k, v)), pos, seg)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize("kernel", [attention.pallas_gpu_attention, attention.splash_attention])
def test_fused_kernels_equal_dense_in_interpret_mode(kernel):
  # The Pallas GPU and TPU kernels, run by the Pallas interpreter on CPU: same function,
  # same gradients, on packed rows with padding.
  t = 256
  q, k, v = qkv(t)
  pos, seg = packed_layout([[70, 90, 30], [150]], t)
  fused = lambda q, k, v: kernel(q, k, v, seg, block=128, interpret=True)
  assert_equal_on_tokens(fused, lambda q, k, v: dense(q, k, v, pos, seg), q, k, v, seg,
                         atol=2e-6)


def test_balanced_order_round_trips_and_balances_causal_work():
  x = jnp.arange(2 * 32).reshape(2, 32)
  for context in (2, 4):
    y = attention.to_balanced(x, context)
    np.testing.assert_array_equal(attention.from_balanced(y, context), x)
    # Each device's contiguous share holds one early and one late chunk: equal causal work.
    work = [int(jnp.sum(part[0] + 1)) for part in jnp.split(y, context, axis=1)]
    assert len(set(work)) == 1, work


CFG = ModelConfig(model_type="qwen2", vocab_size=96, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True, tie_embeddings=True)


def _batch(t, packed):
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, t + 1)), jnp.int32)
  lengths = ([[t // 3, t // 2, t - t // 3 - t // 2 - 5]] * 2 + [[t], [7, t - 7]] if packed
             else [[t]] * 4)
  pos, seg = packed_layout(lengths, t)
  weights = (seg != 0) & (pos >= 2)
  return tokens[:, :-1], tokens[:, 1:], pos, seg, weights.astype(jnp.float32)


def _loss_and_grads(cfg, mesh_shape, batch):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  model = model_lib.create_model(cfg, mesh, seed=0)
  tokens, targets, pos, seg, weights = batch

  def loss(m):
    hidden, _ = m(tokens, pos, seg, return_hidden=True)
    nll, z = losses.cross_entropy_sums(m.unembed, hidden, targets, weights, chunk=16)
    return nll + 1e-2 * z

  with jax.set_mesh(mesh):
    value, grads = jax.jit(nnx.value_and_grad(loss))(model)
  return float(value), {k: np.asarray(v) for k, v in nnx.to_flat_state(grads)}


def test_context_parallel_training_equals_one_device():
  # The batch's rows: two packed with three segments and padding, one unpacked (a single
  # segment filling the row), one of two segments.
  batch = _batch(64, packed=True)
  want_loss, want = _loss_and_grads(CFG.replace(attention="dense"), (1, 1, 1, 1), batch)
  # Context 2 (with data and tp) and 4 (with fsdp under remat).
  cases = [(CFG.replace(attention="blockwise", attention_block=16), (1, 1, 1, 1)),
           (CFG, (2, 1, 2, 2)), (CFG.replace(attention_block=16, remat="full"), (1, 2, 4, 1))]
  for cfg, mesh_shape in cases:
    got_loss, got = _loss_and_grads(cfg, mesh_shape, batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, err_msg=str(mesh_shape))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=2e-6, rtol=1e-5,
                                 err_msg=f"{name} on {mesh_shape}")


def test_context_parallel_rejects_indivisible_sequence():
  batch = _batch(60, packed=False)  # 60 is not a multiple of 2 x context = 16
  with pytest.raises(ValueError, match="not divisible by 2 x context"):
    _loss_and_grads(CFG, (1, 1, 8, 1), batch)


def test_attention_block_defaults_per_platform_and_an_explicit_block_wins():
  assert ModelConfig.attention_block == 0 and CFG.attention_block == 0
  assert attention.block_size(0, "cpu") == 256
  assert attention.block_size(0, "gpu") == attention.block_size(0, "tpu") == 512
  assert attention.block_size(128, "cpu") == attention.block_size(128, "tpu") == 128
  # Blockwise splits T into the fewest blocks of at most the block, as even as 16s allow.
  assert [attention._even_block(256, t) for t in (200, 288, 300, 1024)] == [200, 144, 160, 256]
  for bad in (-16, 24):
    with pytest.raises(ValueError, match=f"attention_block={bad} must be 0"):
      CFG.replace(attention_block=bad)


def test_remat_policies_give_the_same_values_and_gradients():
  batch = _batch(32, packed=True)
  want_loss, want = _loss_and_grads(CFG, (1, 1, 1, 1), batch)
  for remat in ("full", "save_dots", "save_dots_no_batch", "offload_dots"):
    got_loss, got = _loss_and_grads(CFG.replace(remat=remat), (1, 1, 1, 1), batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, err_msg=remat)
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=f"{name} {remat}")


@pytest.mark.optimized
def test_32k_token_packed_row_trains_in_bounded_memory():
  """One 32,768-token packed row (four traces and padding) trains on a tiny model; dense attention's
  scores alone would need 4 x 32768^2 x 4 B = 16 GiB a layer."""
  import optax  # pylint: disable=g-import-not-at-top
  from jaxdistill import train  # pylint: disable=g-import-not-at-top
  t = 32768
  # Attention "auto" is blockwise on CPU at this length, in the CPU default's 256-token blocks:
  # they step in 10.6 s here against 17 s at 512 and 13 s at 128 (2-core AMD EPYC).
  cfg = CFG.replace(remat="full")
  assert attention.resolve(cfg.attention, t) == "blockwise"
  assert attention.block_size(cfg.attention_block) == 256
  model = model_lib.create_model(cfg, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adamw(3e-3)
  state = train.TrainState(jnp.zeros((), jnp.int32), nnx.to_pure_dict(params),
                           optimizer.init(nnx.to_pure_dict(params)))
  train_cfg = defaults.train_config(seq_len=t, loss_chunk=4096)
  step = jax.jit(train.make_train_step(graphdef, optimizer, lambda s: 3e-3, train_cfg),
                 donate_argnums=0)
  pos, seg = packed_layout([[9000, 12000, 7000, 4000]], t)
  starts = np.repeat([3, 17, 41, 5, 0], [9000, 12000, 7000, 4000, t - 32000])  # then padding
  tokens = (starts + pos[0]) % cfg.vocab_size  # counting sequences: learnable in a few steps
  batch = {"inputs": jnp.asarray(tokens[None], jnp.int32),
           "targets": jnp.asarray((tokens[None] + 1) % cfg.vocab_size, jnp.int32),
           "loss_mask": seg != 0, "positions": pos, "segment_ids": seg}
  compiled = step.lower(state, batch).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 2**30, f"{temp / 2**20:.0f} MiB of temporaries"
  state, metrics = compiled(state, batch)
  # The loss after the step, from a forward alone (a quarter of a second step's work).
  nll, scored = jax.jit(train.make_eval_step(graphdef, train_cfg))(state.params, batch)
  curve = [float(metrics["loss"]), float(nll / scored)]
  assert np.all(np.isfinite(curve)) and curve[1] < curve[0], curve


def test_fused_kernel_inside_the_model_on_a_mesh_equals_dense():
  # The shard_map wrapping (batch over data, heads over tp, kv heads repeated when tp does
  # not divide them) that every fused kernel runs in, through the whole model and its
  # gradients; the Pallas GPU kernel stands for both (the splash kernel itself is checked
  # above, and the interpreter makes each one slow on CPU).
  impl = "pallas_gpu"
  batch = _batch(64, packed=True)
  cfg = CFG.replace(num_kv_heads=1)  # tp=2 does not divide one kv head
  want_loss, want = _loss_and_grads(cfg.replace(attention="dense"), (1, 1, 1, 1), batch)
  got_loss, got = _loss_and_grads(cfg.replace(attention=impl, attention_block=128),
                                  (2, 1, 1, 2), batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)
