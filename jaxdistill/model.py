"""Decoder-only transformer of the Llama 3 / Qwen2 family in Flax NNX.

Shape legend, used in einsum strings and `_XYZ` suffixes throughout jaxdistill:
  B batch, T sequence (new tokens), S attended length (T, or cache slots), D model,
  N query heads, K kv heads, G query heads per kv head (N // K), H head dim,
  F MLP hidden, V vocab, L layers.

Inputs are `tokens_BT, positions_BT, segment_ids_BT`. A query attends to a key only when
both carry the same non-zero segment id and the key's position is not after the query's, so
packed rows (several examples in one row, positions restarting in each) never attend across
examples, and padding (segment 0) is never attended to.

Every layer has one contract, `block(x_BTD, positions_BT, segment_ids_BT, cache) -> (x_BTD,
cache)`, with two callers: `Transformer.__call__` runs the layers without a cache (each
sequence attends to itself, training and loss evaluation), the sampler runs them with one
`kvcache.LayerCache` each (prefill and decode: the step's keys and values are written into
the cache, then attended to with everything already there).

Parameter names follow Hugging Face's (`layers/self_attn/q_proj/kernel`, ...) so conversion
is a table (hf.py); layers are stacked on a leading L axis and run under `jax.lax.scan`, so
compile time does not grow with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import attention
from jaxdistill.attention import (attention_mask, dense_attention_cached,
                                  prefixed_attention_cached)
from jaxdistill.kvcache import LayerCache
from jaxdistill.model_config import ModelConfig
from jaxdistill.sharding import param_shardings, shard

_BATCH_SEQ = ("batch", "seq")


# -- RoPE -------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32), with linear or llama3 scaling applied."""
  h = cfg.head_dim
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / h))
  rs = cfg.rope_scaling
  if rs is None or rs.rope_type == "default":
    return inv_freq.astype(np.float32)
  if rs.rope_type == "linear":
    return (inv_freq / rs.factor).astype(np.float32)
  # llama3: long wavelengths are slowed by `factor`, short ones kept, and the band between
  # the two cut-offs interpolated smoothly.
  old = rs.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  low_cut = old / rs.low_freq_factor
  high_cut = old / rs.high_freq_factor
  scaled = np.where(wavelen > low_cut, inv_freq / rs.factor, inv_freq)
  smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_cut) & (wavelen <= low_cut)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions_BT: jax.Array, inv_freq: np.ndarray):
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.sin(angles_BTh), jnp.cos(angles_BTh)


def apply_rope(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
  """Rotates halves (Hugging Face's `rotate_half` layout), in float32."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


# -- Layers -----------------------------------------------------------------------------------

class Dense(nnx.Module):
  """A linear map from an input's last axes `in_dims` to `out_dims`, with an optional bias on
  the output axes: kernel [*in_dims, *out_dims] (e.g. q_proj: [D] -> [N, H], kernel
  [D, N, H]; o_proj: [N, H] -> [D])."""

  def __init__(self, in_dims: tuple[int, ...], out_dims: tuple[int, ...], cfg: ModelConfig, *,
               bias: bool = False, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.initializer_range)
    self.kernel = nnx.Param(init(rngs.params(), in_dims + out_dims, cfg.weight_dtype))
    self.bias = nnx.Param(jnp.zeros(out_dims, cfg.weight_dtype)) if bias else None

  def __call__(self, x):
    # One 2-D matrix product: B and T merge into the rows, the contracted axes (the kernel's
    # leading ones, e.g. N, H of o_proj) into one, the kernel's other axes into the columns;
    # each merge is free in row-major order. Left as a multi-axis einsum, XLA:CPU computes the
    # weight gradient over two row axes several times slower, and in decode lays out o_proj's
    # contraction as (H, N), transposing the whole kernel on every step.
    lead, contracted = x.shape[:2], x.shape[2:]
    kernel = self.kernel[...].astype(x.dtype)
    out = kernel.shape[len(contracted):]
    y = jnp.dot(x.reshape(math.prod(lead), -1), kernel.reshape(math.prod(contracted), -1))
    y = y.reshape(lead + out)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig):
    self.eps = cfg.rms_eps
    self.scale = nnx.Param(jnp.ones((dim,), cfg.weight_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.qkv_bias
    self.q_proj = Dense((d,), (n, h), cfg, bias=bias, rngs=rngs)
    self.k_proj = Dense((d,), (k, h), cfg, bias=bias, rngs=rngs)
    self.v_proj = Dense((d,), (k, h), cfg, bias=bias, rngs=rngs)
    self.o_proj = Dense((n, h), (d,), cfg, rngs=rngs)
    self.impl, self.block = cfg.attention, cfg.attention_block
    # Static (a tuple in the graph definition): each layer makes its own RoPE tables from the
    # positions; unrolled, XLA merges the identical computations, and under the training
    # scan they cost a fraction of a per-mille of the layer.
    self.inv_freq = tuple(rope_inv_freq(cfg).tolist())

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: LayerCache | None = None):
    """Without a cache the sequence attends to itself (`attention.self_attention`, the
    configured implementation); with one, the T tokens' keys and values are written at each
    row's end index and the queries attend densely to the whole cache, and to the prefix its
    rows share when it has one. Returns (out_BTD, the updated cache or None)."""
    sin, cos = rope_sin_cos(positions_BT, np.asarray(self.inv_freq, np.float32))
    q_BTNH = shard(apply_rope(self.q_proj(x_BTD), sin, cos), _BATCH_SEQ + ("heads", None))
    k_BTKH = apply_rope(self.k_proj(x_BTD), sin, cos)
    v_BTKH = self.v_proj(x_BTD)
    if cache is None:
      out_BTNH = attention.self_attention(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT,
                                          impl=self.impl, block=self.block)
    else:
      cache = cache.write(k_BTKH, v_BTKH, positions_BT, segment_ids_BT)
      mask_BTS = attention_mask(positions_BT, segment_ids_BT, cache.positions,
                                cache.segment_ids)
      keys, values = cache.keys().astype(x_BTD.dtype), cache.values().astype(x_BTD.dtype)
      if cache.prefix_k is None:
        out_BTNH = dense_attention_cached(q_BTNH, keys, values, mask_BTS)
      else:
        out_BTNH = prefixed_attention_cached(
            q_BTNH, cache.prefix_keys().astype(x_BTD.dtype),
            cache.prefix_values().astype(x_BTD.dtype), cache.prefix_lengths, keys, values,
            mask_BTS)
    return self.o_proj(out_BTNH), cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate_proj = Dense((d,), (f,), cfg, rngs=rngs)
    self.up_proj = Dense((d,), (f,), cfg, rngs=rngs)
    self.down_proj = Dense((f,), (d,), cfg, rngs=rngs)

  def __call__(self, x_BTD):
    h_BTF = jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
    return self.down_proj(shard(h_BTF, _BATCH_SEQ + ("mlp",)))


class Block(nnx.Module):
  """One decoder layer: the contract every caller runs layers by (module docstring)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.d_model, cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: LayerCache | None = None):
    """x [B, T, D], the T tokens' positions and segment ids [B, T], and optionally the layer's
    cache -> (x [B, T, D], the cache after the step, or None)."""
    attn, cache = self.self_attn(self.input_layernorm(x_BTD), positions_BT, segment_ids_BT,
                                 cache)
    x_BTD = x_BTD + attn
    x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    return shard(x_BTD, _BATCH_SEQ + (None,)), cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # What save_dots_no_batch keeps, kept in host memory instead, copied back for the backward
    # pass: device memory close to "full" without its recomputation of the matmuls.
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device",
                                                                           "pinned_host"),
}


class Transformer(nnx.Module):
  """The full model. `__call__` is a pure function of its inputs and the parameters."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    init = nnx.initializers.normal(cfg.initializer_range)
    self.embed_tokens = Embed(init(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                   cfg.weight_dtype))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return Block(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.d_model, cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), cfg, rngs=rngs)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
               return_hidden: bool = False):
    """Runs the model over whole sequences (no cache: the sampler runs the layers itself).

    Args:
      tokens_BT: int token ids.
      positions_BT: RoPE positions (default 0..T-1 in every row).
      segment_ids_BT: example ids for packed rows, 0 for padding (default all 1).
      return_hidden: return the final normalised hidden states [B, T, D] instead of logits,
        so a loss can apply the output head in chunks (`unembed`).
    Returns:
      (logits_BTV or hidden_BTD, None): the pair callers have always unpacked; the second
      place held the cache while the model still ran one.
    """
    cfg = self.config
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    context = attention.context_size()
    if context > 1:  # sequence split over devices: reorder it so causal work is balanced
      attention.check_context_divides(t, context)
      tokens_BT, positions_BT, segment_ids_BT = (
          attention.to_balanced(x, context) for x in (tokens_BT, positions_BT, segment_ids_BT))
    x_BTD = self.embed(tokens_BT)
    graphdef, layer_state = nnx.split(self.layers)

    def body(x, state):
      x, _ = nnx.merge(graphdef, state)(x, positions_BT, segment_ids_BT)
      return x, None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    # `scan_unroll` layers per iteration: a tiny model's step is mostly the loop's own overhead.
    x_BTD, _ = jax.lax.scan(body, x_BTD, layer_state, unroll=min(cfg.scan_unroll, cfg.num_layers))
    if context > 1:
      x_BTD = shard(attention.from_balanced(x_BTD, context), _BATCH_SEQ + (None,))
    hidden_BTD = self.norm(x_BTD)
    if return_hidden:
      return hidden_BTD, None
    return self.unembed(hidden_BTD), None

  def embed(self, tokens_BT: jax.Array) -> jax.Array:
    """Token ids [B, T] -> the first layer's input [B, T, D] in the compute dtype."""
    x_BTD = self.embed_tokens(tokens_BT).astype(self.config.dtype)
    return shard(x_BTD, _BATCH_SEQ + (None,))

  def unembed(self, hidden_BTD: jax.Array) -> jax.Array:
    """Output head: hidden [B, T, D] -> logits [B, T, V] in the compute dtype."""
    if self.config.tie_embeddings:
      b, t, d = hidden_BTD.shape  # rows merged, as in Dense
      logits = self.embed_tokens.attend(hidden_BTD.reshape(b * t, d)).reshape(b, t, -1)
    else:
      logits = self.lm_head(hidden_BTD)
    return shard(logits, _BATCH_SEQ + ("vocab",))


class Embed(nnx.Module):
  """The token embedding, [V, D]; with `vocab_last`, held as [D, V] instead (the sampler's
  copy of a tied model): as the output head, [D, V] is the layout XLA:CPU streams fastest
  into a few rows (the 8-row Qwen2.5 head ~1.4x faster than [V, D]), and a lookup of a few
  columns costs little either way."""

  def __init__(self, embedding: jax.Array, vocab_last: bool = False):
    self.embedding = nnx.Param(embedding)
    self.vocab_last = vocab_last

  def __call__(self, tokens_BT):
    if self.vocab_last:
      return jnp.moveaxis(jnp.take(self.embedding[...], tokens_BT, axis=1), 0, -1)
    return jnp.take(self.embedding[...], tokens_BT, axis=0)

  def attend(self, hidden_MD: jax.Array) -> jax.Array:
    """hidden [M, D] -> logits [M, V] against the embedding (a tied output head)."""
    w = self.embedding[...].astype(hidden_MD.dtype)
    return hidden_MD @ w if self.vocab_last else jnp.einsum("MD,VD->MV", hidden_MD, w)


# -- Building ---------------------------------------------------------------------------------

def flat_params(module: nnx.Module) -> dict[str, jax.Array]:
  """{"layers/self_attn/q_proj/kernel": array, ...}: the parameters under slash-joined paths."""
  return {"/".join(map(str, path)): v.get_value()
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStruct leaves; allocates nothing."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def jitted_init(cfg: ModelConfig, mesh=None, seed: int = 0):
  """(graphdef, init): `init()` returns the model's state from one jitted computation. With
  a mesh each parameter is created already sharded (`out_shardings`), never whole on one
  device; the values do not depend on the mesh."""
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  shardings = None if mesh is None else param_shardings(abstract_state, mesh)

  def init():
    return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

  return graphdef, jax.jit(init, out_shardings=shardings)


def create_model(cfg: ModelConfig, mesh=None, seed: int = 0) -> Transformer:
  """A randomly initialised model (see `jitted_init`)."""
  graphdef, init = jitted_init(cfg, mesh, seed)
  return nnx.merge(graphdef, init())
