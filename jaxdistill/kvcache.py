"""The KV cache: an explicit pytree of keys/values in per-layer stacks plus slot bookkeeping.

Shapes use model.py's legend: L layers, B batch, S cache slots, K kv heads, H head dim.
A slot whose segment id is 0 is empty and never attended to; each step writes T new entries
per row at `end_index` and advances it, so the sampler controls where each row continues.
A `PrefixCache` beside it holds what several rows share (a prompt, for its samples): read
once per step for all of them, held once in memory.

Keys and values are held in `stacks` separate arrays, stack g holding layers g, g + stacks,
g + 2 * stacks, ... on an axis of L / stacks after the batch: as many stacks as layers (one
layer each) when the sampler unrolls its layers, fewer when it loops over groups of them
(sampler.py). A decode step writes one slot per row in each layer, and XLA updates a
loop-carried buffer of its own in place, so a step writes into the stack where it lies;
reading a layer of a deeper stack costs a copy of that layer, which an unrolled sampler
never makes. Every array leads with the batch, as the rest of the decode state does (rows are
repeated, refilled and split over devices alike). Batch and kv head lead a layer, so a decode
step reads the cache where it lies; values are laid out [B, K, S, H] and keys [B, K, H, S]:
each then enters its matrix product with the
contracted axis leading (queries x keys over H, weights x values over S), the layout XLA:CPU
streams fastest into a few rows (the Qwen2.5-0.5B batch-8 step's key product ~1.7x faster
than over [B, K, S, H] keys).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: tuple[jax.Array, ...]  # stacks x [B, L / stacks, K, H, S]
  v: tuple[jax.Array, ...]  # stacks x [B, L / stacks, K, S, H]
  positions: jax.Array  # [B, S] int32: RoPE position of the token in each slot
  segment_ids: jax.Array  # [B, S] int32: 0 = empty slot
  end_index: jax.Array  # [B] int32: next slot to write in each row

  @classmethod
  def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32, *, stacks: int | None = None) -> KVCache:
    """An empty cache; `stacks` (default: one per layer) must divide `num_layers`."""
    stacks = stacks or num_layers
    if num_layers % stacks:
      raise ValueError(f"stacks={stacks} must divide num_layers={num_layers}")
    depth = num_layers // stacks
    k_shape = (batch, depth, num_kv_heads, head_dim, length)
    v_shape = (batch, depth, num_kv_heads, length, head_dim)
    return cls(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(stacks)),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in range(stacks)),
        positions=jnp.zeros((batch, length), jnp.int32),
        segment_ids=jnp.zeros((batch, length), jnp.int32),
        end_index=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def length(self) -> int:
    return self.v[0].shape[3]  # [B, n, K, S, H]

  def replace(self, **changes) -> KVCache:
    return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixCache:
  """Keys and values that several consecutive rows of a KVCache share: prefix row i serves
  rows i * n to i * n + n - 1 (a prompt's n samples), and its first `lengths[i]` slots are
  visible to every query of those rows. Written once (by prefill), read by every step, in
  stacks as KVCache holds them."""
  k: tuple[jax.Array, ...]  # stacks x [P_rows, L / stacks, K, H, P]
  v: tuple[jax.Array, ...]  # stacks x [P_rows, L / stacks, K, P, H]
  lengths: jax.Array  # [P_rows] int32: the visible slots of each prefix row

  @property
  def length(self) -> int:
    return self.v[0].shape[3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's cache, what `model.Block` reads and returns: the stack holding the layer's
  keys and values, the layer's place in it, and the slots' bookkeeping (shared by every
  layer: a step enters it once per layer, identical work XLA merges in unrolled code).

  The layer is addressed inside its stack rather than cut out of it, so that writing the
  step's keys touches one slot per row of the stack in place, never a copy of the layer.
  """
  k: jax.Array  # [B, n, K, H, S]: the stack of keys holding the layer (n = L / stacks)
  v: jax.Array  # [B, n, K, S, H]
  index: int | jax.Array  # the layer's place on the stack's axis 1 (of n)
  positions: jax.Array  # [B, S]
  segment_ids: jax.Array  # [B, S]
  end_index: jax.Array  # [B]
  # The layer's stacks of a PrefixCache the rows share, if any (PrefixCache.k, .v, .lengths).
  prefix_k: jax.Array | None = None  # [P_rows, n, K, H, P]
  prefix_v: jax.Array | None = None  # [P_rows, n, K, P, H]
  prefix_lengths: jax.Array | None = None  # [P_rows]

  def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array,
            segment_ids_BT: jax.Array) -> LayerCache:
    """The cache after a step of T tokens: their keys, values, positions and segment ids
    written at each row's `end_index`, which advances by T."""
    i = self.end_index
    return dataclasses.replace(
        self,
        k=_write_layer_rows(self.k, k_BTKH.transpose(0, 2, 3, 1), self.index, i, axis=3),
        v=_write_layer_rows(self.v, v_BTKH.swapaxes(1, 2), self.index, i, axis=2),
        positions=write_rows(self.positions, positions_BT, i),
        segment_ids=write_rows(self.segment_ids, segment_ids_BT, i),
        end_index=i + positions_BT.shape[1])

  def keys(self) -> jax.Array:
    """[B, K, H, S]: the layer's keys (a copy when the stack is deeper than one layer)."""
    return jax.lax.dynamic_index_in_dim(self.k, self.index, axis=1, keepdims=False)

  def values(self) -> jax.Array:
    """[B, K, S, H]."""
    return jax.lax.dynamic_index_in_dim(self.v, self.index, axis=1, keepdims=False)

  def prefix_keys(self) -> jax.Array:
    """[P_rows, K, H, P]: the layer's keys of the shared prefix."""
    return jax.lax.dynamic_index_in_dim(self.prefix_k, self.index, axis=1, keepdims=False)

  def prefix_values(self) -> jax.Array:
    """[P_rows, K, P, H]."""
    return jax.lax.dynamic_index_in_dim(self.prefix_v, self.index, axis=1, keepdims=False)


def write_rows(buffer_BS_: jax.Array, new_BT_: jax.Array, index_B: jax.Array,
               axis: int = 0) -> jax.Array:
  """Writes new_BT_[b] into buffer_BS_[b] at slot index_B[b] (along the row's `axis`: 0 for
  [B, S, ...] buffers, 1 for [B, K, S, H] values, 2 for [B, K, H, S] keys), row by row.

  The caller guarantees index_B + T <= S: `dynamic_update_slice` would otherwise clamp the
  start and overwrite earlier slots.
  """
  def one(buf, new, i):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=axis)
  return jax.vmap(one)(buffer_BS_, new_BT_, index_B)


def _write_layer_rows(stack_Bn_: jax.Array, new_B_: jax.Array, layer, index_B: jax.Array,
                      axis: int) -> jax.Array:
  """`write_rows` into layer `layer` of a [B, n, ...] stack; `axis` is the slot axis of one
  row's [n, ...] buffer (3 for keys, 2 for values)."""
  def one(buf, new, i):
    start = [layer] + [0] * (buf.ndim - 1)
    start[axis] = i
    return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), start)
  return jax.vmap(one)(stack_Bn_, new_B_, index_B)
