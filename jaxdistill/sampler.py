"""Sampled decoding with a KV cache: jitted prefill, then a `lax.while_loop` decode.

Prompts are right-padded to a power-of-two bucket P and prefilled in one call; each row's
cache then continues at its own prompt length, so the padding slots (segment 0, never
attended to) are overwritten by the answer. The decode loop runs on device until every row
has produced a stop token or `max_new_tokens`, and compiles once per (batch, P, cache
length, sampling settings). With `num_samples` > 1 each prompt is prefilled once and its
cache rows copied to its samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import sharding
from jaxdistill.kvcache import KVCache
from jaxdistill.model import Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.6  # 0 = greedy
  top_p: float = 0.95  # nucleus mass kept (1 = off)
  top_k: int = 0  # most likely tokens kept (0 = off)
  max_new_tokens: int = 1024
  stop_ids: tuple[int, ...] = ()  # any of these ends a row (it is kept in the output)
  cache_dtype: str = "float32"  # "float32" | "bfloat16"
  # Tokens the tokenizer knows (0 = all). Checkpoints pad the vocabulary (Qwen2.5: 151,936
  # rows for 151,665 tokens); ids past the tokenizer's are never sampled.
  vocab_size: int = 0

  def __post_init__(self):
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"bad sampling settings: temperature={self.temperature} (>= 0), "
                       f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be positive")
    if self.cache_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"cache_dtype={self.cache_dtype!r} is not float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class Sample:
  tokens: np.ndarray  # int32 [n]: generated ids, the stop token included when there is one
  finish_reason: str  # "stop" | "length"


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                 top_p: float) -> jax.Array:
  """One token per row: argmax at temperature 0, else from the filtered softmax."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
    # is still below top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Generates from a model; holds nothing but the model split into graph and parameters."""

  graphdef: nnx.GraphDef
  params: nnx.State
  num_layers: int
  num_kv_heads: int
  head_dim: int
  max_positions: int
  mesh: jax.sharding.Mesh | None = None  # sample sharded like training: batch over data

  @classmethod
  def from_model(cls, model: Transformer, mesh: jax.sharding.Mesh | None = None) -> Sampler:
    """`mesh`: the mesh the model's parameters live on; rows are then split over its
    data-parallel axes (the batch is padded to a multiple of them)."""
    graphdef, params = nnx.split(model)
    cfg = model.config
    return cls(graphdef, params, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
               cfg.max_position_embeddings, mesh)

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
               num_samples: int = 1, seed: int = 0,
               batch_size: int | None = None) -> list[list[Sample]]:
    """Samples `num_samples` continuations of each prompt.

    Args:
      prompts: token ids of each prompt.
      cfg: sampling settings.
      num_samples: continuations per prompt.
      seed: the same seed, prompts and settings give the same samples.
      batch_size: prompts per device batch (default: all at once).
    Returns:
      For each prompt, its samples.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > self.max_positions:
      raise ValueError(
          f"a prompt of {longest} tokens plus max_new_tokens={cfg.max_new_tokens} exceeds the "
          f"model's {self.max_positions} positions; shorten the prompt or max_new_tokens")
    batch_size = batch_size or len(prompts)
    out: list[list[Sample]] = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      key = jax.random.fold_in(jax.random.key(seed), start)
      out.extend(self._generate_batch(chunk, cfg, num_samples, key))
    return out

  def _generate_batch(self, prompts, cfg: SamplingConfig, n: int, key) -> list[list[Sample]]:
    real = len(prompts)
    if self.mesh is not None:  # pad the batch so the data-parallel axes divide it
      dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      prompts = list(prompts) + [[0]] * (-len(prompts) % dp)
    b = len(prompts)
    p = bucket(max(len(x) for x in prompts))
    cache_len = p + cfg.max_new_tokens
    tokens = np.zeros((b, p), np.int32)
    lengths = np.array([len(x) for x in prompts], np.int32)
    for i, x in enumerate(prompts):
      tokens[i, :len(x)] = x
    dtype = jnp.bfloat16 if cfg.cache_dtype == "bfloat16" else jnp.float32
    run = functools.partial(
        _sample, self.graphdef, self.params, key=key, n=n, cache_len=cache_len,
        cache_dtype=dtype, cfg=cfg, cache_shape=(self.num_layers, self.num_kv_heads,
                                                 self.head_dim))
    if self.mesh is None:
      generated, counts, stopped = run(jnp.asarray(tokens), jnp.asarray(lengths))
    else:
      rows = sharding.batch_sharding(self.mesh)
      with jax.set_mesh(self.mesh):
        generated, counts, stopped = run(
            jax.device_put(tokens, rows),
            jax.device_put(lengths, sharding.batch_sharding(self.mesh, 1)))
    generated, counts, stopped = map(np.asarray, (generated, counts, stopped))
    return [[Sample(generated[i * n + j, :counts[i * n + j]].copy(),
                    "stop" if stopped[i * n + j] else "length") for j in range(n)]
            for i in range(real)]


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "cache_len", "cache_dtype", "cfg",
                                             "cache_shape"))
def _sample(graphdef, params, tokens_BP, lengths_B, *, key, n, cache_len, cache_dtype, cfg,
            cache_shape):
  """Prefill the B prompts, copy each to its n samples, decode. Returns (tokens [Bn, N],
  counts [Bn], stopped [Bn])."""
  model = nnx.merge(graphdef, params)
  b, p = tokens_BP.shape
  layers, kv_heads, head_dim = cache_shape
  cache = KVCache.zeros(layers, b, cache_len, kv_heads, head_dim, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments = (positions < lengths_B[:, None]).astype(jnp.int32)
  hidden_BPD, cache = model(tokens_BP, positions, segments, cache, return_hidden=True)
  last_B1D = jnp.take_along_axis(hidden_BPD, (lengths_B - 1)[:, None, None], axis=1)
  logits_BV = model.unembed(last_B1D)[:, 0]
  cache = cache.replace(end_index=lengths_B)
  if n > 1:
    cache = KVCache(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                    positions=jnp.repeat(cache.positions, n, axis=0),
                    segment_ids=jnp.repeat(cache.segment_ids, n, axis=0),
                    end_index=jnp.repeat(cache.end_index, n, axis=0))
    logits_BV = jnp.repeat(logits_BV, n, axis=0)
    lengths_B = jnp.repeat(lengths_B, n, axis=0)
  rows = b * n
  stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < cfg.max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, logits, done, out, counts = state
    if cfg.vocab_size:
      known = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) < cfg.vocab_size
      logits = jnp.where(known, logits, -jnp.inf)
    token = sample_token(logits, jax.random.fold_in(key, step), cfg.temperature, cfg.top_k,
                         cfg.top_p)
    token = jnp.where(done, 0, token)
    out = out.at[:, step].set(token)
    counts = counts + (~done).astype(jnp.int32)
    done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    pos = (lengths_B + step)[:, None]
    seg = jnp.ones((rows, 1), jnp.int32)
    new_logits, cache = model(token[:, None], pos, seg, cache)
    return step + 1, cache, new_logits[:, 0], done, out, counts

  init = (jnp.zeros((), jnp.int32), cache, logits_BV, jnp.zeros((rows,), bool),
          jnp.zeros((rows, cfg.max_new_tokens), jnp.int32), jnp.zeros((rows,), jnp.int32))
  _, _, _, done, out, counts = jax.lax.while_loop(cond, body, init)
  last = jnp.take_along_axis(out, jnp.maximum(counts - 1, 0)[:, None], axis=1)[:, 0]
  stopped = done & jnp.any(last[:, None] == stop_ids[None, :], axis=-1)
  return out, counts, stopped
