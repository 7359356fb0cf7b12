"""Next-token cross-entropy on scored tokens, computed in sequence chunks.

The output head is applied to one chunk of the sequence at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds the [B, T, V] logits (at T=32k and
V=152k that is ~20 GB in fp32); only [B, C, V] for one chunk C exists at a time.
Sums are returned, not means: the caller divides by the number of scored tokens in the whole
global batch, which keeps packing and gradient accumulation exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdistill import attention


def token_nll(logits_BCV: jax.Array, targets_BC: jax.Array):
  """Per-token negative log-likelihood and log-partition (both float32, [B, C])."""
  logits = logits_BCV.astype(jnp.float32)
  lse_BC = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BC = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0]
  return lse_BC - target_logit_BC, lse_BC


def cross_entropy_sums(unembed: Callable[[jax.Array], jax.Array], hidden_BTD: jax.Array,
                       targets_BT: jax.Array, weights_BT: jax.Array, *, chunk: int = 1024):
  """Sums of masked NLL and of masked log-partition squared (for z-loss) over the batch.

  Args:
    unembed: hidden [B, C, D] -> logits [B, C, V] (the model's output head).
    hidden_BTD: final hidden states.
    targets_BT: next-token ids.
    weights_BT: 1.0 where the target is scored, else 0.0.
    chunk: tokens of the sequence per chunk; T is padded up to a multiple of it.
  Returns:
    (nll_sum, z_sum): float32 scalars.

  With the sequence split over a "context" mesh axis of size C, each chunk takes chunk/C
  tokens from every device's part of the sequence, so chunks never move hidden states
  between devices.
  """
  h, y, w = sequence_chunks(chunk, hidden_BTD, targets_BT, weights_BT.astype(jnp.float32))
  return _scan_chunks(unembed, h, y, w)


def sequence_chunks(chunk: int, *xs_BT: jax.Array) -> tuple[jax.Array, ...]:
  """[B, T, ...] arrays -> [n, B, C, ...]: the chunks of the sequence a chunked loss scans
  (shared by every loss that applies an output head chunk by chunk, e.g. distill.py's KL).

  Without context parallelism T is zero-padded up to a multiple of `chunk` (padded tokens
  must carry weight 0). With the sequence split over a "context" mesh axis of size c, each
  chunk takes gcd(T / c, chunk / c) tokens from every device's part, so chunking never moves
  hidden states between devices.
  """
  b, t = xs_BT[0].shape[:2]
  context = attention.context_size()
  if context > 1:
    local = t // context
    per_device = math.gcd(local, max(1, chunk // context))
    n = local // per_device

    def chunks(x_BT):  # device-major within a chunk
      rest = x_BT.shape[2:]
      x = jnp.moveaxis(x_BT.reshape((b, context, n, per_device) + rest), 2, 0)
      return x.reshape((n, b, context * per_device) + rest)

    return tuple(chunks(x) for x in xs_BT)
  chunk = min(chunk, t)
  pad = -t % chunk
  n = (t + pad) // chunk

  def chunks(x_BT):
    if pad:
      x_BT = jnp.pad(x_BT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT.ndim - 2))
    return x_BT.reshape((b, n, chunk) + x_BT.shape[2:]).swapaxes(0, 1)

  return tuple(chunks(x) for x in xs_BT)


def _scan_chunks(unembed, h, y, w):
  """Sums over chunks [n, B, C, ...] with the output head recomputed in the backward pass."""

  def one_chunk(h_BCD, y_BC, w_BC):
    nll_BC, lse_BC = token_nll(unembed(h_BCD), y_BC)
    return jnp.sum(nll_BC * w_BC), jnp.sum(jnp.square(lse_BC) * w_BC)

  if h.shape[0] == 1:  # one chunk holds what the naive loss would: recomputing costs time only
    return one_chunk(h[0], y[0], w[0])
  one_chunk = jax.checkpoint(one_chunk)

  def body(carry, xs):
    nll, z = one_chunk(*xs)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (h, y, w))
  return nll_sum, z_sum


def naive_cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
                             weights_BT: jax.Array):
  """The same sums from materialised logits by plain autodiff: the reference for tests."""
  logits = logits_BTV.astype(jnp.float32)
  w = weights_BT.astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)
  lse_BT = jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(nll_BT * w), jnp.sum(jnp.square(lse_BT) * w)
