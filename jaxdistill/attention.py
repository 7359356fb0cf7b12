"""Attention implementations, all causal and segment-aware (packed rows), chosen by config.

Every implementation computes the same function as `dense_attention`: query t attends to key s
when both carry the same non-zero segment id and s's position is not after t's. Queries whose
every key is masked (padding) get zeros.

  dense       scores [B, N, T, S] materialised. Fastest for short rows on CPU; the decode path.
  blockwise   pure JAX flash attention: an online softmax over key blocks, with its own
              backward pass (custom_vjp), so forward and backward hold O(T x block), never
              O(T^2). A (query block, key block) pair is skipped when the blocks' segment-id
              ranges are disjoint or every key position is after every query position; the
              test is exact from the data, so it needs no assumption about the row's layout.
              Works for any positions, which is what context parallelism needs.
  pallas_gpu  the Pallas (Triton) flash-attention kernel shipped with JAX. It takes segment ids
              directly (no O(T^2) mask) and skips blocks above the diagonal. cuDNN's fused
              attention through `jax.nn.dot_product_attention` only knows sequence lengths, not
              segment ids, so packed rows would need its padded-offset layout; the Pallas kernel
              fits packing as it is. Its causal mask is by index, which equals ours on the rows
              the data pipeline builds (each segment contiguous, positions counting up in it).
  splash      Pallas splash attention on TPU with `SegmentIds`, the same index-causal layout.
  auto        splash on TPU, pallas_gpu on GPU, and on CPU dense up to `DENSE_MAX_T` query
              tokens, blockwise beyond (`resolve`; the names are model_config.ATTENTION_IMPLS).

Fused kernels see whole sequences, so they run inside `shard_map` over batch and heads; with a
"context" mesh axis > 1, `context_parallel_attention` shards the sequence instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdistill import sharding

# `auto` on CPU: dense attention up to here, blockwise beyond. Dense materialises [B, N, T, T]
# scores and, under the training scan over layers, keeps every layer's probabilities as
# residuals ([L, B, N, T, T]: 2.2 GB at SmolLM2-135M, batch 2 x 1,024, which XLA also zero-fills
# every step); blockwise keeps O(T x block) and skips the block pairs above the diagonal.
# Train step at SmolLM2-135M shapes (fp32, AdamW, batch 2; AMD EPYC, 2 cores shared,
# alternating runs, medians of 3; tools/bench_train.py --hf_dir --attention=...):
#   T = 1,024: dense 52.2 s, blockwise (block 512) 33.5 s, (block 128) 28.5 s;
#   T =   512: dense 31.6 s, blockwise 27.2 s, 19.9 s; T = 256: 13.8 s, 12.6 s, 10.5 s;
# the demo student (0.9M params, batch 4 x 384): dense 386-396 ms, blockwise 323-358 ms.
DENSE_MAX_T = 256
# Query/key block when the config's `attention_block` is 0 (`block_size`). Blockwise on CPU:
# 256. Train step at SmolLM2-135M shapes (fp32, batch 2 x 1,024; AMD EPYC, alternating): 13.9
# and 14.4 s against 15.8 and 15.4 s at 512; one layer's attention forward and backward, 94 ms
# at 256, 99 ms at 128, 152 ms at 512 (a [B, K, G*block, block] float32 score tile is 4.7 MB
# at 256 and 19 MB at 512, which no cache holds). Accelerators: 512, splash's usual tile and
# the large blocks XLA's GPU matmuls want; the Pallas GPU kernel caps its block at 128 itself.
CPU_BLOCK, ACCELERATOR_BLOCK = 256, 512
_NEG = -1e30  # finite "minus infinity": masked scores, so max/exp never see inf - inf


def attention_mask(q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS) -> jax.Array:
  """[B, T, S] bool: same non-zero segment and key not after query."""
  same = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  causal = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
  return same & causal & (k_seg_BS != 0)[:, None, :]


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Dense grouped-query attention with a boolean mask; softmax in float32.

  The G query heads sharing a kv head are laid out as G*T rows (M) of one matrix product
  per (batch, kv head): plain batched matmuls, which XLA runs much faster than a dot with
  two free dimensions on each side.
  """
  return dense_attention_cached(q_BTNH, k_BSKH.transpose(0, 2, 3, 1),
                                v_BSKH.transpose(0, 2, 1, 3), mask_BTS)


def dense_attention_cached(q_BTNH, k_BKHS, v_BKSH, mask_BTS):
  """`dense_attention` over a KV cache: keys laid out [B, K, H, S], values [B, K, S, H]."""
  b, t, n, h = q_BTNH.shape
  kv, s = v_BKSH.shape[1], v_BKSH.shape[2]
  g = n // kv
  q_BKMH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  s_BKMS = jnp.matmul(q_BKMH, k_BKHS, preferred_element_type=jnp.float32)
  s_BKGTS = s_BKMS.reshape(b, kv, g, t, s) * (h ** -0.5)
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
  p_BKMS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BKSH.dtype).reshape(b, kv, g * t, s)
  out_BKMH = jnp.matmul(p_BKMS, v_BKSH)
  return out_BKMH.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def prefixed_attention_cached(q_BTNH, k_PKHS, v_PKSH, prefix_len_P, k_BKHA, v_BKAH, mask_BTA):
  """`dense_attention_cached` over two caches with one softmax: a prefix shared by B / P
  consecutive rows (a prompt's samples; its first prefix_len_P slots are visible to every
  query of those rows) and each row's own slots (keys [B, K, H, A], values [B, K, A, H],
  visible by `mask_BTA`). The prefix is read once for all of its rows: their queries are
  stacked as rows of one matrix product per (prefix, kv head), rather than its keys and
  values copied to every row and read once each.
  """
  b, t, n, h = q_BTNH.shape
  p, kv, s = k_PKHS.shape[0], k_PKHS.shape[1], k_PKHS.shape[3]
  a, r, g = v_BKAH.shape[2], b // p, n // kv
  low = jnp.finfo(jnp.float32).min
  # Shared part, in the layout [P, K, (R, G, T), S]: the R rows of a prefix stacked.
  q_PKMH = (q_BTNH.reshape(p, r, t, kv, g, h).transpose(0, 3, 1, 4, 2, 5)
            .reshape(p, kv, r * g * t, h))
  s_PKMS = jnp.matmul(q_PKMH, k_PKHS, preferred_element_type=jnp.float32) * (h ** -0.5)
  visible_PS = jnp.arange(s, dtype=jnp.int32) < prefix_len_P[:, None]
  s_PKMS = jnp.where(visible_PS[:, None, None], s_PKMS, low)
  # Own part, [B, K, G, T, A] as in dense_attention_cached.
  q_BKMH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  s_BKGTA = (jnp.matmul(q_BKMH, k_BKHA, preferred_element_type=jnp.float32)
             .reshape(b, kv, g, t, a) * (h ** -0.5))
  s_BKGTA = jnp.where(mask_BTA[:, None, None], s_BKGTA, low)
  to_rows = lambda x: (x.reshape((p, kv, r, g, t) + x.shape[3:])  # noqa: E731
                       .transpose((0, 2, 1, 3, 4) + tuple(range(5, x.ndim + 2)))
                       .reshape((b, kv, g, t) + x.shape[3:]))
  to_prefix = lambda x: (x.reshape((p, r, kv, g, t) + x.shape[4:])  # noqa: E731
                         .transpose((0, 2, 1, 3, 4) + tuple(range(5, x.ndim + 1)))
                         .reshape((p, kv, r * g * t) + x.shape[4:]))
  m_BKGT = jnp.maximum(to_rows(s_PKMS.max(-1)), s_BKGTA.max(-1))
  e_PKMS = jnp.exp(s_PKMS - to_prefix(m_BKGT)[..., None])
  e_BKGTA = jnp.exp(s_BKGTA - m_BKGT[..., None])
  total_BKGT = to_rows(e_PKMS.sum(-1)) + e_BKGTA.sum(-1)
  shared_PKMH = jnp.matmul(e_PKMS.astype(v_PKSH.dtype), v_PKSH,
                           preferred_element_type=jnp.float32)
  own_BKMH = jnp.matmul(e_BKGTA.reshape(b, kv, g * t, a).astype(v_BKAH.dtype), v_BKAH,
                        preferred_element_type=jnp.float32)
  out_BKGTH = (to_rows(shared_PKMH) + own_BKMH.reshape(b, kv, g, t, h)) / total_BKGT[..., None]
  return out_BKGTH.astype(v_BKAH.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# -- Blockwise ---------------------------------------------------------------------------------
#
# Layout inside: queries as [nq, B, K, G*bq, H] (block-major, the G heads of a kv head stacked
# as rows of one matmul, as in dense_attention), keys and values as [nk, B, K, bk, H], and the
# per-block segment ids and positions as [n, B, block].

def _blocks(x_BT, block):
  """[B, T, ...] -> [T/block, B, block, ...]."""
  b, t = x_BT.shape[:2]
  return x_BT.reshape((b, t // block, block) + x_BT.shape[2:]).swapaxes(0, 1)


def _block_ranges(pos_nBb, seg_nBb):
  """Per block and row: min/max segment id and min/max position over non-padding tokens."""
  real = seg_nBb != 0
  big = jnp.iinfo(jnp.int32).max
  seg_lo = jnp.min(jnp.where(real, seg_nBb, big), axis=-1)
  seg_hi = jnp.max(jnp.where(real, seg_nBb, -1), axis=-1)
  pos_lo = jnp.min(jnp.where(real, pos_nBb, big), axis=-1)
  pos_hi = jnp.max(jnp.where(real, pos_nBb, -1), axis=-1)
  return seg_lo, seg_hi, pos_lo, pos_hi


def _needed_pairs(q_pos, q_seg, k_pos, k_seg):
  """[nq, nk] bool: whether any (query, key) pair of the two blocks can be unmasked.

  False only when, in every row, the blocks share no segment id or every key position is
  after every query position: then the block's contribution is exactly zero.
  """
  qs_lo, qs_hi, _, qp_hi = _block_ranges(q_pos, q_seg)
  ks_lo, ks_hi, kp_lo, _ = _block_ranges(k_pos, k_seg)
  overlap = (ks_lo[None] <= qs_hi[:, None]) & (qs_lo[:, None] <= ks_hi[None])
  causal = kp_lo[None] <= qp_hi[:, None]
  return jnp.any(overlap & causal, axis=-1)  # any over the batch rows


def _pair_mask(q_pos_Bb, q_seg_Bb, k_pos_Bc, k_seg_Bc, g):
  """[B, 1, G*bq, bk] mask of one block pair, rows ordered (head in group, query)."""
  m_Bbc = attention_mask(q_pos_Bb, q_seg_Bb, k_pos_Bc, k_seg_Bc)
  b, bq, bk = m_Bbc.shape
  return jnp.broadcast_to(m_Bbc[:, None], (b, g, bq, bk)).reshape(b, 1, g * bq, bk)


def _scores(q_BKMH, k_BKcH, mask, scale):
  s = jnp.matmul(q_BKMH, k_BKcH.swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, s, _NEG)


def _loop(n: int, body, init):
  """body(i, carry) for i in 0..n-1 as a `while_loop` (see `_flash`)."""
  _, out = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])),
                              (jnp.zeros((), jnp.int32), init))
  return out


def _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, need, g, scale):
  """Returns out [nq, B, K, M, H] (q's dtype) and lse [nq, B, K, M] (float32)."""
  nk = k.shape[0]

  def one_q_block(i, outputs):
    q_i, qp_i, qs_i = q[i], q_pos[i], q_seg[i]
    b, kv, m, h = q_i.shape
    init = (jnp.full((b, kv, m), _NEG, jnp.float32), jnp.zeros((b, kv, m), jnp.float32),
            jnp.zeros((b, kv, m, h), jnp.float32))

    def visit(j, carry):
      def update(carry):
        m_run, l_run, acc = carry
        mask = _pair_mask(qp_i, qs_i, k_pos[j], k_seg[j], g)
        s = _scores(q_i, k[j], mask, scale)
        m_new = jnp.maximum(m_run, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m_run - m_new)
        l_new = l_run * corr + jnp.sum(p, axis=-1)
        pv = jnp.matmul(p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
        return m_new, l_new, acc * corr[..., None] + pv
      return jax.lax.cond(need[i, j], update, lambda c: c, carry)

    m_run, l_run, acc = _loop(nk, visit, init)
    seen = l_run > 0
    out = acc / jnp.where(seen, l_run, 1.0)[..., None]
    lse = jnp.where(seen, m_run + jnp.log(jnp.where(seen, l_run, 1.0)), 0.0)
    return outputs[0].at[i].set(out.astype(q.dtype)), outputs[1].at[i].set(lse)

  out = jnp.zeros(q.shape, q.dtype)
  lse = jnp.zeros(q.shape[:-1], jnp.float32)
  return _loop(q.shape[0], one_q_block, (out, lse))


def _flash_backward(q, k, v, q_pos, q_seg, k_pos, k_seg, need, out, lse, dout, g, scale):
  """Gradients by recomputing each needed block pair's probabilities from the saved lse.

  Key blocks are the outer loop (their dk, dv finish in registers of the loop); dq is
  accumulated into one [nq, ...] float32 buffer, the size of q itself.
  """
  nq = q.shape[0]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq,B,K,M]

  def one_k_block(j, carry):
    dq, dk, dv = carry
    k_j, v_j = k[j], v[j]

    def visit(i, inner):
      def update(inner):
        dq, dk_j, dv_j = inner
        mask = _pair_mask(q_pos[i], q_seg[i], k_pos[j], k_seg[j], g)
        s = _scores(q[i], k_j, mask, scale)
        p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)  # [B, K, M, bk]
        do_i = dout[i]
        dv_j = dv_j + jnp.matmul(p.astype(do_i.dtype).swapaxes(-1, -2), do_i,
                                 preferred_element_type=jnp.float32)
        dp = jnp.matmul(do_i, v_j.swapaxes(-1, -2), preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
        dq = dq.at[i].add(jnp.matmul(ds, k_j, preferred_element_type=jnp.float32))
        dk_j = dk_j + jnp.matmul(ds.swapaxes(-1, -2), q[i], preferred_element_type=jnp.float32)
        return dq, dk_j, dv_j
      return jax.lax.cond(need[i, j], update, lambda c: c, inner)

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dq, dk_j, dv_j = _loop(nq, visit, (dq, zeros, zeros))
    return dq, dk.at[j].set(dk_j.astype(dk.dtype)), dv.at[j].set(dv_j.astype(dv.dtype))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros_like(k), jnp.zeros_like(v))
  dq, dk, dv = _loop(k.shape[0], one_k_block, init)
  return dq.astype(q.dtype), dk, dv


@functools.cache
def _flash(g: int, scale: float):
  """The blockwise attention function for one head grouping and scale, with its own VJP.

  Its loops are `while_loop`s (`_loop`): `fori_loop` with static bounds becomes a `scan`,
  and under the model's `scan` over layers JAX then kept every block pair's scores of the
  forward as residuals (42 GB at T=32k); a `while_loop` is never differentiated, so only the
  custom rule's residuals exist.
  """

  @jax.custom_vjp
  def flash(q, k, v, q_pos, q_seg, k_pos, k_seg):
    need = _needed_pairs(q_pos, q_seg, k_pos, k_seg)
    return _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, need, g, scale)[0]

  def fwd(q, k, v, q_pos, q_seg, k_pos, k_seg):
    need = _needed_pairs(q_pos, q_seg, k_pos, k_seg)
    out, lse = _flash_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, need, g, scale)
    return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, need, out, lse)

  def bwd(res, dout):
    q, k, v, q_pos, q_seg, k_pos, k_seg, need, out, lse = res
    dq, dk, dv = _flash_backward(q, k, v, q_pos, q_seg, k_pos, k_seg, need, out, lse, dout, g,
                                 scale)
    return dq, dk, dv, None, None, None, None

  flash.defvjp(fwd, bwd)
  return flash


def _pad_seq(x_BT, multiple, value=0):
  pad = -x_BT.shape[1] % multiple
  if not pad:
    return x_BT
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2)
  return jnp.pad(x_BT, widths, constant_values=value)


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, q_seg_BT, k_pos_BS, k_seg_BS, *,
                        block: int = 512):
  """Flash attention in pure JAX; equals `dense_attention` with `attention_mask`.

  T and S need not be multiples of `block`: they are split into the fewest blocks of at most
  `block` (`_even_block`), padded with segment 0 (never attended, output zero), and the
  padding is cut off again.
  """
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  g = n // kv
  bq, bk = _even_block(block, t), _even_block(block, s)
  q_BTNH, q_pos_BT, q_seg_BT = (_pad_seq(x, bq) for x in (q_BTNH, q_pos_BT, q_seg_BT))
  k_BSKH, v_BSKH, k_pos_BS, k_seg_BS = (_pad_seq(x, bk) for x in (k_BSKH, v_BSKH, k_pos_BS,
                                                                   k_seg_BS))
  nq = q_BTNH.shape[1] // bq
  # [nq, B, K, G*bq, H]: rows of one block ordered (head in group, query), as dense_attention.
  q = q_BTNH.reshape(b, nq, bq, kv, g, h).transpose(1, 0, 3, 4, 2, 5).reshape(
      nq, b, kv, g * bq, h)
  k = _blocks(k_BSKH, bk).transpose(0, 1, 3, 2, 4)  # [nk, B, K, bk, H]
  v = _blocks(v_BSKH, bk).transpose(0, 1, 3, 2, 4)
  out = _flash(g, h ** -0.5)(q, k, v, _blocks(q_pos_BT, bq), _blocks(q_seg_BT, bq),
                            _blocks(k_pos_BS, bk), _blocks(k_seg_BS, bk))
  out_BTNH = out.reshape(nq, b, kv, g, bq, h).transpose(1, 0, 4, 2, 3, 5).reshape(
      b, nq * bq, n, h)
  return out_BTNH[:, :t]


# -- Fused kernels -----------------------------------------------------------------------------

def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _even_block(block: int, n: int) -> int:
  """The block that covers n tokens in as few blocks of at most `block` as `block` itself
  needs, each as even as multiples of 16 allow: 288 tokens at 256 become two blocks of 144,
  not two of 256 (224 of them padding)."""
  if n <= block:
    return n
  count = -(-n // block)
  return min(block, _round_up(-(-n // count), 16))


def _repeat_kv(x_BSKH, n):
  return jnp.repeat(x_BSKH, n // x_BSKH.shape[2], axis=2)


def pallas_gpu_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, block: int = 128,
                         interpret: bool = False):
  """Pallas GPU flash attention (self-attention over one packed row layout)."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # pylint: disable=g-import-not-at-top
  t, n, h = q_BTNH.shape[1:]
  blk = min(block, 128, _round_up(t, 16))  # Triton tiles beyond 128 overflow shared memory
  q, k, v, seg = (_pad_seq(x, blk) for x in (q_BTNH, _repeat_kv(k_BTKH, n),
                                             _repeat_kv(v_BTKH, n), seg_BT))
  sizes = pallas_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=min(32, blk),
                                      block_kv_dkv=min(32, blk), block_q_dq=min(32, blk),
                                      block_kv_dq=min(32, blk))
  out = pallas_attention.mha(q, k, v, seg, sm_scale=h ** -0.5, causal=True, block_sizes=sizes,
                             interpret=interpret)
  # Padding queries (segment 0) attend to padding keys in the kernel; ours give zeros.
  return jnp.where((seg != 0)[:, :, None, None], out, 0)[:, :t].astype(q_BTNH.dtype)


def splash_attention(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, block: int = 512,
                     interpret: bool = False):
  """TPU splash attention with SegmentIds and a causal mask (self-attention)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
  t, n, h = q_BTNH.shape[1:]
  blk = min(_round_up(block, 128), _round_up(t, 128))  # TPU tiles are multiples of 128
  q, k, v, seg = (_pad_seq(x, blk) for x in (q_BTNH, _repeat_kv(k_BTKH, n),
                                             _repeat_kv(v_BTKH, n), seg_BT))
  tp = q.shape[1]
  mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(n)])
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  scale = h ** -0.5

  def one_row(q_TNH, k_TNH, v_TNH, seg_T):
    out = kernel((q_TNH * scale).swapaxes(0, 1), k_TNH.swapaxes(0, 1), v_TNH.swapaxes(0, 1),
                 segment_ids=sk.SegmentIds(q=seg_T, kv=seg_T))
    return out.swapaxes(0, 1)

  out = jax.vmap(one_row)(q, k, v, seg)
  return jnp.where((seg != 0)[:, :, None, None], out, 0)[:, :t].astype(q_BTNH.dtype)


# -- Dispatch ----------------------------------------------------------------------------------

def resolve(impl: str, t: int, platform: str | None = None, context: int = 1) -> str:
  """What `self_attention` runs for the configured `impl` and T query tokens.

  The one statement of the rule, read by the model and by the memory planner (which plans for
  hardware that is not attached, hence `platform`).

  Args:
    impl: one of model_config.ATTENTION_IMPLS.
    t: query tokens of the whole row.
    platform: "cpu" | "gpu" | "tpu"; None means `jax.default_backend()`.
    context: the mesh's context-parallel size.
  Returns:
    "context" when context > 1 (blockwise over all-gathered keys and values, whatever `impl`
    says), else `impl` with "auto" replaced by what it means on `platform`.
  """
  if context > 1:
    return "context"
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    return "pallas_gpu"
  return "dense" if t <= DENSE_MAX_T else "blockwise"


def block_size(block: int, platform: str | None = None) -> int:
  """The query/key block to run: `block` when set, else the platform's default (0 = auto)."""
  if block:
    return block
  return CPU_BLOCK if (platform or jax.default_backend()) == "cpu" else ACCELERATOR_BLOCK


def _head_axis(mesh, heads):
  """The tp axis when it divides `heads`, else None (replicated, as sharding.param_spec)."""
  tp = mesh.shape.get("tp", 1)
  return "tp" if tp > 1 and heads % tp == 0 else None


def self_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT, *, impl: str, block: int):
  """Attention of a sequence to itself (training and evaluation-loss forward).

  On a mesh, each implementation runs where it can: dense and blockwise are plain JAX that
  XLA partitions; fused kernels are opaque to the partitioner and run inside `shard_map`
  (batch over data x fsdp, heads over tp); a context axis > 1 uses
  `context_parallel_attention`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  context = 1 if mesh.empty else mesh.shape.get("context", 1)
  impl = resolve(impl, q_BTNH.shape[1], context=context)
  block = block_size(block)
  if impl == "context":
    return context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT, block=block)
  if impl == "dense":
    return dense_attention(q_BTNH, k_BTKH, v_BTKH,
                           attention_mask(pos_BT, seg_BT, pos_BT, seg_BT))
  if impl == "blockwise":
    return blockwise_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT, pos_BT, seg_BT,
                               block=block)
  fused = {"pallas_gpu": pallas_gpu_attention, "splash": splash_attention}[impl]
  # Asked for on CPU (tests), a kernel runs under the Pallas interpreter: slow, same result.
  interpret = jax.default_backend() == "cpu"
  kernel = lambda q, k, v, seg: fused(q, k, v, seg, block=block, interpret=interpret)
  if mesh.empty:
    return kernel(q_BTNH, k_BTKH, v_BTKH, seg_BT)
  batch = sharding.LOGICAL_RULES["batch"]
  heads = _head_axis(mesh, q_BTNH.shape[2])
  kv_heads = heads if heads and k_BTKH.shape[2] % mesh.shape["tp"] == 0 else None
  if heads and not kv_heads:  # kv heads replicated: repeat them so every shard has its own
    k_BTKH, v_BTKH = _repeat_kv(k_BTKH, q_BTNH.shape[2]), _repeat_kv(v_BTKH, q_BTNH.shape[2])
    kv_heads = heads
  return jax.shard_map(
      kernel, mesh=mesh,
      in_specs=(P(batch, None, heads, None), P(batch, None, kv_heads, None),
                P(batch, None, kv_heads, None), P(batch, None)),
      out_specs=P(batch, None, heads, None), check_vma=False)(q_BTNH, k_BTKH, v_BTKH, seg_BT)


# -- Context parallelism -----------------------------------------------------------------------
#
# The sequence is split over the "context" mesh axis. Each device keeps its queries and
# all-gathers keys and values (and their positions and segment ids) for the layer, then runs
# blockwise attention locally; the all-gather's transpose (a reduce-scatter of dK, dV) is what
# autodiff makes of it. All-gather rather than a ring: with grouped-query attention K and V
# are G times smaller than Q (G = 7 for Qwen2.5-7B), so gathering them costs little next to the
# layer's matmuls, XLA can overlap it with the previous layer, it works unchanged with any
# mask (packing), and the backward needs no second ring pass. The cost is K/V for the whole
# sequence on every device for one layer at a time, which the planner counts.
#
# Load balance: with a causal mask, contiguous shards would give the last device all the work.
# `to_balanced` reorders the sequence so device i holds chunks i and 2C-1-i of 2C chunks (one
# early, one late), before the first layer; `from_balanced` restores the order at the end.
# Attention masks by position and segment id, and blockwise attention skips block pairs from
# the data, so the reordering changes no result.

def to_balanced(x_BT, context: int):
  """[B, T, ...] natural order -> load-balanced order for `context` shards."""
  b, t = x_BT.shape[:2]
  rest = x_BT.shape[2:]
  c = t // (2 * context)
  halves = x_BT.reshape((b, 2, context, c) + rest)
  first, second = halves[:, 0], jnp.flip(halves[:, 1], axis=1)
  return jnp.stack([first, second], axis=2).reshape((b, t) + rest)


def from_balanced(x_BT, context: int):
  """Inverse of `to_balanced`."""
  b, t = x_BT.shape[:2]
  rest = x_BT.shape[2:]
  c = t // (2 * context)
  pairs = x_BT.reshape((b, context, 2, c) + rest)
  first, second = pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)
  return jnp.stack([first, second], axis=1).reshape((b, t) + rest)


def context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT, *, block: int):
  """Self-attention with T sharded over "context" (see the section comment above)."""
  mesh = jax.sharding.get_abstract_mesh()
  batch = sharding.LOGICAL_RULES["batch"]
  heads = _head_axis(mesh, q_BTNH.shape[2])
  n, kv = q_BTNH.shape[2], k_BTKH.shape[2]
  kv_heads = heads if heads and kv % mesh.shape["tp"] == 0 else None
  if heads and not kv_heads:
    k_BTKH, v_BTKH = _repeat_kv(k_BTKH, n), _repeat_kv(v_BTKH, n)
    kv_heads = heads

  def local(q, k, v, pos, seg):
    gather = lambda x: jax.lax.all_gather(x, "context", axis=1, tiled=True)
    return blockwise_attention(q, gather(k), gather(v), pos, seg, gather(pos), gather(seg),
                               block=block)

  seq = "context"
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(batch, seq, heads, None), P(batch, seq, kv_heads, None),
                P(batch, seq, kv_heads, None), P(batch, seq), P(batch, seq)),
      out_specs=P(batch, seq, heads, None), check_vma=False)(
          q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT)


def context_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.shape.get("context", 1)


def check_context_divides(t: int, context: int) -> None:
  if t % (2 * context):
    raise ValueError(f"sequence length {t} is not divisible by 2 x context ({2 * context}); "
                     "context parallelism splits each row into 2 x context chunks. Choose "
                     "data.seq_len a multiple of it.")

