"""The KV cache: an explicit pytree of per-layer keys/values plus slot positions and segments.

Shapes use model.py's legend: L layers, B batch, S cache slots, K kv heads, H head dim.
A slot whose segment id is 0 is empty and never attended to; the model writes T new entries
per row at `end_index` and advances it, so the sampler controls where each row continues.

Keys and values are L separate arrays, not one [L, ...] stack: a decode step writes one slot
per row in each layer, and XLA updates a loop-carried buffer of its own in place, whereas
pulling a layer out of a stack (and putting it back) copies the whole layer every step.
Batch and kv head lead, so a decode step reads the cache where it lies; values are laid out
[B, K, S, H] and keys [B, K, H, S]: each then enters its matrix product with the contracted
axis leading (queries x keys over H, weights x values over S), the layout XLA:CPU streams
fastest into a few rows (the Qwen2.5-0.5B batch-8 step's key product ~1.7x faster than over
[B, K, S, H] keys).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: tuple[jax.Array, ...]  # L x [B, K, H, S]
  v: tuple[jax.Array, ...]  # L x [B, K, S, H]
  positions: jax.Array  # [B, S] int32: RoPE position of the token in each slot
  segment_ids: jax.Array  # [B, S] int32: 0 = empty slot
  end_index: jax.Array  # [B] int32: next slot to write in each row

  @classmethod
  def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> KVCache:
    k_shape = (batch, num_kv_heads, head_dim, length)
    v_shape = (batch, num_kv_heads, length, head_dim)
    return cls(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers)),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers)),
        positions=jnp.zeros((batch, length), jnp.int32),
        segment_ids=jnp.zeros((batch, length), jnp.int32),
        end_index=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def length(self) -> int:
    return self.v[0].shape[2]

  def replace(self, **changes) -> KVCache:
    return dataclasses.replace(self, **changes)


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
