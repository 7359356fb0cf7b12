"""Sampled decoding with a KV cache: jitted prefill, then a `lax.while_loop` decode.

Prompts are right-padded to a power-of-two bucket P and prefilled in one call; each row's
cache then continues at its own prompt length, so the padding slots (segment 0, never
attended to) are overwritten by the answer. Decoding runs on device in chunks of steps;
between chunks, prompts whose samples have all finished (a stop id or `max_new_tokens`)
are collected and their rows refilled with waiting prompts (continuous batching): only the
incoming prompts are prefilled (their count rounded up to a power of two) and their rows
written into the decode state in place. Prefill compiles once per (prompt count, P, cache
length); decode once per (batch, cache length, sampling settings).

With `num_samples` > 1 each prompt is prefilled once, as one row, and its cache is then
copied to its `num_samples` rows: the prompt's compute is shared, its cache memory is not.
`samples_at_once` splits a prompt's samples into groups decoded in turn, each prefilled
again, so that the cache need not hold every sample of a prompt at once.

Decode speed (tools/bench_decode.py) rests on these choices: the sampler holds the layer
weights one array per layer and the cache is one array per layer (a scan over [L, ...]
stacks makes XLA:CPU copy each layer's slice every step); the cache is laid out for
attention's matrix products, keys [B, K, H, S] and values [B, K, S, H] (kvcache.py), and a
tied embedding is held as [D, V] for the output head (`Embed`), each contracted axis leading,
the layout XLA:CPU streams fastest into a few rows; greedy and the top-k / top-p cuts avoid
sorting the vocabulary (`sample_token`); and the decode state is donated, so the cache is
updated in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import sharding
from jaxdistill.kvcache import KVCache
from jaxdistill.model import Embed, Transformer


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
                 top_p: float, *, candidates: int = 256) -> jax.Array:
  """One token per row: the first argmax at temperature 0, else a draw from
  softmax(logits / temperature) cut to the top_k likeliest ids, then to the top_p nucleus
  (the fewest likeliest ids whose mass reaches top_p); ids tied with the last one kept stay.

  Sorting the whole vocabulary (152k ids for Qwen) costs more than the rest of a CPU decode
  step, so the cuts are found among the likeliest `candidates` (top_k + 1 with top_k) ids,
  without changing the rule: the cut is a logit threshold, exact as soon as some candidate
  falls below it (always, with top_k). When every id at or above the threshold is a candidate
  the draw is among the candidates, else (ties across the last candidate) over the whole
  vocabulary. Only a nucleus wider than the candidates sorts the whole vocabulary.

  Args:
    logits_BV: [B, V] logits.
    key: [B] keys (one random stream per row) or a single key.
    temperature, top_k, top_p: as in SamplingConfig.
    candidates: how many likeliest ids top_p (without top_k) looks among before sorting.
  Returns:
    [B] int32 ids.
  """
  b, v = logits_BV.shape
  if temperature == 0:
    return _first_argmax(logits_BV)
  keys = key if key.ndim else jax.random.split(key, b)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1.0:
    return _draw(keys, logits)
  c = (top_k if top_k > 0 else candidates) + 1
  if c > v:
    return _draw(keys, _cut_by_sorting(logits, top_k, top_p))
  # Descending. Its columns are read by reductions and gathers, never by static slices: XLA
  # turns a top_k whose output is sliced into a sort of the whole row (~100x slower on CPU),
  # the very cost this avoids.
  vals, ids = jax.lax.top_k(logits, c)
  top = jnp.max(vals, -1, keepdims=True)
  last = jnp.min(vals, -1)
  if top_k > 0:
    first_k = jax.lax.broadcasted_iota(jnp.int32, vals.shape, 1) < top_k
    kth = jnp.min(jnp.where(first_k, vals, jnp.inf), -1, keepdims=True)  # the k-th largest
    kept = vals >= kth
    # Ids tied with the k-th but not among the candidates are kept too: they weigh in the
    # softmax the nucleus is cut from.
    ties_out = jnp.sum(logits == kth, -1, keepdims=True) - jnp.sum(vals == kth, -1,
                                                                    keepdims=True)
    w = jnp.where(kept, jnp.exp(vals - top), 0.0)
    probs = w / (jnp.sum(w, -1, keepdims=True) + ties_out * jnp.exp(kth - top))
  else:
    kept = jnp.ones(vals.shape, bool)
    probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  if top_p < 1.0:
    kept &= (jnp.cumsum(probs, axis=-1) - probs) < top_p
  # The threshold is known once a candidate is cut (with top_k, the (k+1)-th always is).
  threshold = jnp.min(jnp.where(kept, vals, jnp.inf), axis=-1, keepdims=True)
  known = jnp.ones((b,), bool) if top_k > 0 else ~jnp.all(kept, -1)
  inside = last < threshold[:, 0]  # every id at or above the threshold is a candidate

  def among_candidates():
    pick = _draw(keys, jnp.where(vals >= threshold, vals, -jnp.inf))
    return jnp.take_along_axis(ids, pick[:, None], axis=1)[:, 0]

  branch = jnp.where(jnp.all(inside), 0, jnp.where(jnp.all(known), 1, 2))
  return jax.lax.switch(branch, [
      among_candidates,
      lambda: _draw(keys, jnp.where(logits >= threshold, logits, -jnp.inf)),
      lambda: _draw(keys, _cut_by_sorting(logits, top_k, top_p))])


def _cut_by_sorting(logits_BV, top_k: int, top_p: float) -> jax.Array:
  """The top-k and top-p cuts on the whole vocabulary: dropped ids get -inf."""
  logits = logits_BV
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
  return logits


def _draw(keys_B: jax.Array, logits_BC: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.categorical)(keys_B, logits_BC).astype(jnp.int32)


def _first_argmax(x_BV: jax.Array) -> jax.Array:
  """`jnp.argmax` as two plain reductions: XLA:CPU's fused (value, index) reduction is several
  times slower over a 152k vocabulary."""
  top = jnp.max(x_BV, axis=-1, keepdims=True)
  ids = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
  return jnp.min(jnp.where(x_BV == top, ids, x_BV.shape[-1] - 1), axis=-1)


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
  def from_model(cls, model: Transformer, mesh: jax.sharding.Mesh | None = None, *,
                 consume: bool = False) -> Sampler:
    """`mesh`: the mesh the model's parameters live on; rows are then split over its
    data-parallel axes (the batch is padded to a multiple of them).

    The sampler holds the layer weights one array per layer (`_unstack_layers`), a copy of
    the model's [L, ...] stacks: as much memory again as the layers while both live. With
    `consume` the stacks are freed once copied (evaluation of a loaded checkpoint), and the
    model must not be used again.
    """
    graphdef, params = nnx.split(_unstack_layers(model, consume))
    cfg = model.config
    return cls(graphdef, params, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
               cfg.max_position_embeddings, mesh)

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
               num_samples: int = 1, seed: int = 0, batch_size: int | None = None,
               samples_at_once: int = 0, decode_chunk: int = 16,
               timings: dict[str, float] | None = None) -> list[list[Sample]]:
    """Samples `num_samples` continuations of each prompt, with continuous batching.

    Work is cut into groups of `samples_at_once` samples of one prompt (all `num_samples` by
    default), and `batch_size` groups decode together, each in its own slot of rows; whenever
    every row of a slot has finished, the next waiting group is prefilled into it, so
    long-tail samples do not idle the batch. A group's prompt is prefilled once for its rows;
    smaller groups bound the KV cache (64 samples x 32k tokens do not fit one device for most
    models) at the cost of prefilling the prompt once per group. Each sample draws from its own
    random stream (seed, prompt index, sample index, step), so results do not depend on
    `batch_size`, `samples_at_once` or on which rows a sample lands in.

    Args:
      prompts: token ids of each prompt.
      cfg: sampling settings.
      num_samples: continuations per prompt.
      seed: the same seed, prompts and settings give the same samples.
      batch_size: groups decoding at once (default: all).
      samples_at_once: samples of one prompt per group (0 = all); must divide num_samples.
      decode_chunk: decode steps between checks for finished groups.
      timings: if given, its "prefill" and "decode" entries are increased by the seconds each
        phase took (prefill and refills; decode steps), measured to completion.
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
    n = samples_at_once or num_samples
    if num_samples < 1 or n < 1 or num_samples % n:
      raise ValueError(f"samples_at_once={samples_at_once} must divide num_samples="
                       f"{num_samples} (or be 0 for all of them)")
    # Groups: (prompt, first sample), a prompt's groups one after another.
    groups = [(i, j) for i in range(len(prompts)) for j in range(0, num_samples, n)]
    slots = min(batch_size or len(groups), len(groups))
    dp = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    slots += -slots % dp  # prompts (and so rows) must divide over the data axes
    p = bucket(longest)
    static = dict(graphdef=self.graphdef, n=n, cache_len=p + cfg.max_new_tokens,
                  cache_dtype=jnp.bfloat16 if cfg.cache_dtype == "bfloat16" else jnp.float32,
                  cfg=cfg, cache_shape=(self.num_layers, self.num_kv_heads, self.head_dim))
    base_key = jax.random.key(seed)
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    waiting = list(range(len(groups)))
    owner = [-1] * slots  # group decoding in each slot
    state = None
    with self._mesh_context():
      while waiting or any(o >= 0 for o in owner):
        free = [s for s in range(slots) if owner[s] < 0]
        if waiting and free:
          fill = free[:len(waiting)]
          # Only the incoming prompts are prefilled, as a batch of a power-of-two size (one
          # compile each); at the start that is every slot, in order.
          size = bucket(len(fill), 1)
          size = slots if state is None else min(slots, size + -size % dp)
          tokens = np.zeros((size, p), np.int32)
          lengths = np.ones((size,), np.int32)
          ids = np.zeros((size,), np.int32)
          first = np.zeros((size,), np.int32)
          dest = np.full((size,), slots, np.int32)  # padding rows go nowhere
          for r, s in enumerate(fill):
            g = waiting.pop(0)
            i, first[r] = groups[g]
            owner[s], ids[r], dest[r] = g, i, s
            tokens[r, :len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
          start = time.perf_counter()
          fresh = _prefill(self.params, self._put(tokens), self._put(lengths), self._put(ids),
                           self._put(first), base_key, **static)
          state = fresh if state is None else _insert(state, fresh, self._put(dest), n=n)
          if timings is not None:
            jax.block_until_ready(state)
            timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        state = _decode(self.params, state, steps=decode_chunk, **static)
        done = np.asarray(state.done).reshape(slots, n)
        if timings is not None:
          timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - start
        for s in range(slots):
          if owner[s] >= 0 and done[s].all():
            i, j = groups[owner[s]]
            results[i][j:j + n] = self._collect(state, s, n)
            owner[s] = -1
        if not waiting and all(o < 0 for o in owner):
          break
    return results

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

  @staticmethod
  def _collect(state: _DecodeState, slot: int, n: int) -> list[Sample]:
    rows = slice(slot * n, slot * n + n)
    out, counts, stopped = (np.asarray(x[rows]) for x in (state.out, state.count,
                                                         state.stopped))
    return [Sample(out[j, :counts[j]].copy(), "stop" if stopped[j] else "length")
            for j in range(n)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
  """Everything the decode loop carries, one entry per row (R = prompts x samples)."""
  cache: KVCache
  logits: jax.Array  # [R, V] next-token logits
  lengths: jax.Array  # [R] prompt length
  keys: jax.Array  # [R] the row's random stream (prompt index, sample index)
  count: jax.Array  # [R] tokens generated
  done: jax.Array  # [R] bool
  stopped: jax.Array  # [R] bool: ended on a stop id
  out: jax.Array  # [R, N] generated ids


_STATIC = ("graphdef", "n", "cache_len", "cache_dtype", "cfg", "cache_shape")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(params, tokens_SP, lengths_S, prompt_ids_S, first_sample_S, base_key, *, graphdef,
             n, cache_len, cache_dtype, cfg, cache_shape) -> _DecodeState:
  """Prefills S prompts once and lays each out as n sample rows, the samples numbered from
  its `first_sample_S` on."""
  model = nnx.merge(graphdef, params)
  b, p = tokens_SP.shape
  layers, kv_heads, head_dim = cache_shape
  cache = KVCache.zeros(layers, b, cache_len, kv_heads, head_dim, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments = (positions < lengths_S[:, None]).astype(jnp.int32)
  hidden_BPD, cache = model(tokens_SP, positions, segments, cache, return_hidden=True)
  last_B1D = jnp.take_along_axis(hidden_BPD, (lengths_S - 1)[:, None, None], axis=1)
  logits = model.unembed(last_B1D)[:, 0]
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
  cache = jax.tree.map(rep, cache.replace(end_index=lengths_S))
  rows = b * n
  sample_ids = rep(first_sample_S) + jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
  keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j))(
      rep(prompt_ids_S), sample_ids)
  return _DecodeState(cache=cache, logits=rep(logits), lengths=rep(lengths_S), keys=keys,
                      count=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool),
                      stopped=jnp.zeros((rows,), bool),
                      out=jnp.zeros((rows, cfg.max_new_tokens), jnp.int32))


@functools.partial(jax.jit, static_argnames=("n",), donate_argnums=0)
def _insert(state: _DecodeState, fresh: _DecodeState, dest_F: jax.Array, *, n: int):
  """Writes the F freshly prefilled prompts' rows into slots `dest_F` (in place: the state is
  donated); a slot index past the last slot drops its prompt (batch padding)."""
  rows = (dest_F[:, None] * n + jnp.arange(n, dtype=jnp.int32)).reshape(-1)
  return jax.tree.map(lambda old, new: old.at[rows].set(new, mode="drop"), state, fresh)


@functools.partial(jax.jit, static_argnames=_STATIC + ("steps",), donate_argnums=1)
def _decode(params, state: _DecodeState, *, steps, graphdef, n, cache_len, cache_dtype, cfg,
            cache_shape) -> _DecodeState:
  """Up to `steps` decode steps for every unfinished row."""
  del n, cache_len, cache_dtype, cache_shape
  model = nnx.merge(graphdef, params)
  rows = state.lengths.shape[0]
  stop_ids = jnp.asarray(cfg.stop_ids if cfg.stop_ids else (-1,), jnp.int32)

  def cond(carry):
    i, st = carry
    return (i < steps) & ~jnp.all(st.done)

  def body(carry):
    i, st = carry
    logits = st.logits
    if cfg.vocab_size:
      known = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) < cfg.vocab_size
      logits = jnp.where(known, logits, -jnp.inf)
    step_keys = jax.vmap(jax.random.fold_in)(st.keys, st.count)
    token = _sample_rows(logits, step_keys, cfg)
    active = ~st.done
    token = jnp.where(active, token, 0)
    write_at = jnp.minimum(st.count, cfg.max_new_tokens - 1)
    out = st.out.at[jnp.arange(rows), write_at].set(
        jnp.where(active, token, st.out[jnp.arange(rows), write_at]))
    count = st.count + active.astype(jnp.int32)
    hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    done = st.done | hit_stop | (count >= cfg.max_new_tokens)
    # Finished rows still run through the model (the batch is dense); their cache writes are
    # clamped at the end of their own row and they are refilled before being read again.
    pos = (st.lengths + jnp.minimum(st.count, cfg.max_new_tokens - 1))[:, None]
    cache = st.cache.replace(end_index=jnp.minimum(st.lengths + st.count, _cache_len(st) - 1))
    new_logits, cache = model(token[:, None], pos, jnp.ones((rows, 1), jnp.int32), cache)
    return i + 1, dataclasses.replace(st, cache=cache, logits=new_logits[:, 0], count=count,
                                      done=done, stopped=st.stopped | hit_stop, out=out)

  _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state


def _sample_rows(logits_BV, keys_B, cfg: SamplingConfig) -> jax.Array:
  """`sample_token` with each device drawing for its own rows (`shard_map` over the batch
  axes): a row's cuts need all of its ids, which the model leaves split over tp."""
  draw = lambda l, k: sample_token(l, k, cfg.temperature, cfg.top_k, cfg.top_p)  # noqa: E731
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return draw(logits_BV, keys_B)
  rows = sharding.logical_to_spec(("batch",))
  return jax.shard_map(draw, mesh=mesh, in_specs=(sharding.logical_to_spec(("batch", None)), rows),
                       out_specs=rows)(logits_BV, keys_B)


def _cache_len(state: _DecodeState) -> int:
  return state.cache.length


def _unstack_layers(model: Transformer, consume: bool = False) -> Transformer:
  """A second module over `model`'s weights, its layers L separate Blocks (an nnx.List).

  A decode step reads each weight once; run as a scan over the [L, ...] stack, XLA:CPU first
  copies each layer's slice out of the stack, tripling the step's weight traffic. The split
  copies the layer weights once (the final norm and an untied head stay shared); a tied
  embedding is copied as [D, V], the faster layout for the output head (`Embed`). With
  `consume` the model's stacks and tied embedding are donated to the copies and freed.
  """
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state)
  layer_def, stacked = nnx.split(model.layers)
  if consume:
    with warnings.catch_warnings():  # slices cannot reuse the stack's buffers; it is freed
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      per_layer = _split_stack_donated(stacked, model.config.num_layers)
  else:
    per_layer = _split_stack(stacked, model.config.num_layers)
  model.layers = nnx.List([nnx.merge(layer_def, st) for st in per_layer])
  if model.config.tie_embeddings:
    transpose = _transpose_donated if consume else _transpose
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      model.embed_tokens = Embed(transpose(model.embed_tokens.embedding[...]), vocab_last=True)
  return model


def _split_stack_impl(stacked: nnx.State, n: int) -> list[nnx.State]:
  return [jax.tree.map(lambda a: a[i], stacked) for i in range(n)]


_split_stack = jax.jit(_split_stack_impl, static_argnums=1)
_split_stack_donated = jax.jit(_split_stack_impl, static_argnums=1, donate_argnums=0)
_transpose = jax.jit(jnp.transpose)
_transpose_donated = jax.jit(jnp.transpose, donate_argnums=0)
