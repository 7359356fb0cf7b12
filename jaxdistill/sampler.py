"""Sampled decoding with a KV cache: jitted prefill, then a `lax.while_loop` decode.

Prompts are packed into rows of a power-of-two bucket P (`pack_prompts`) and prefilled in
one call; each prompt's P slots are then cut from its row into a prefix of its own (a
`PrefixCache` row, its slots after the prompt never attended to), which all of the prompt's
sample rows share, and each row writes its answer into a cache row of its own (`KVCache`,
answer slots only). Decoding runs on device in chunks of steps;
between chunks, prompts whose samples have all finished (a stop id or `max_new_tokens`)
are collected and their rows refilled with waiting prompts (continuous batching): only the
incoming prompts are prefilled (their count rounded up to a power of two) and their rows
written into the decode state in place. Prefill compiles once per (prompt count, P, answer
slots); decode once per (batch, P, answer slots, sampling settings). What is sampled from the
logits is the config's rule (rules.py); the loop carries the rule's per-row state, and a rule
that forces text (budget forcing) may take back a row's last tokens, which the step's token
then overwrites (`_decode`).

With `num_samples` > 1 each prompt is prefilled once, and its keys and values are held
once and read once per step for all of its samples: attention stacks the samples' queries
as rows of one matrix product against the prompt (`attention.prefixed_attention_cached`).
Copying the prompt to every sample instead cost a fifth of a decode step and half its
attention at 8 MATH-500 prompts x 4 samples on SmolLM2-135M (99 -> 78 ms, AMD EPYC).
`samples_at_once` splits a prompt's samples into groups decoded in turn, each prefilled
again, so that the cache need not hold every sample of a prompt at once.

The sampler owns the cached path through the model: `model.embed`, then the layers by the
one block contract (model.py) with a `LayerCache` each (`_run_layers`), then `model.norm`
and `model.unembed`. Up to `UNROLL` layers run unrolled, each its own code reading its own
weight and cache buffers; a deeper model runs a loop over its layers. The loop slices each
layer's weights out of an [L, ...] stack, which XLA:CPU copies on every step: three times
the weight traffic, twice the step time of a Qwen2.5-0.5B-wide layer. Unrolled code instead
compiles in time linear in depth (an 80-layer decode step 8-13x the 8-layer one), the loop in
time independent of it (tools/bench_decode.py --compile_depths; figures in
decode_weights.UNROLL, which holds the sampler's per-layer copy of the weights).

Decode speed (tools/bench_decode.py) rests on these choices: the sampler holds the layer
weights one array per layer (unrolled) and the cache likewise (kvcache.py); the cache is
laid out for attention's matrix products, keys [B, K, H, S] and values [B, K, S, H], and a
tied embedding is held as [D, V] for the output head (`Embed`), each contracted axis leading,
the layout XLA:CPU streams fastest into a few rows; greedy and the top-k / top-p cuts avoid
sorting the vocabulary (rules.py); and the decode state is donated, so the cache is
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill import rules, sharding
from jaxdistill.kvcache import KVCache, LayerCache, PrefixCache
from jaxdistill.decode_weights import UNROLL, decode_model, stacks_for
from jaxdistill.model import Transformer

# Answer slots a generation's KV cache starts with (beside its prompts' own cache); it
# doubles them whenever the longest row could outgrow them within the next decode chunk, up
# to max_new_tokens. Every decode step reads all of the cache's slots, filled or not: with a
# 32k-token budget, a cache of the whole budget from the start reads about twice the slots
# that this one does, on average over a generation that runs to the budget. Each size
# compiles the decode step once (six sizes from 1,024 to 32,768 slots), and growing copies
# the cache once, one layer at a time, so that the old and the new cache never both live
# whole (the memory plan counts the final cache). A sampler that loops over its layers holds
# the cache of every layer in one array, which could not grow without both copies living:
# its cache has every answer slot from the start.
GROW_FROM = 1024


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """What the decode loop needs; hashable (a static argument of the jitted decode)."""
  # Chooses each token from the logits (rules.py); rules.rule_from(temperature, top_k, top_p)
  # for the usual ones.
  rule: rules.Rule = rules.rule_from(temperature=0.6, top_p=0.95)
  max_new_tokens: int = 1024
  stop_ids: tuple[int, ...] = ()  # any of these ends a row (it is kept in the output)
  cache_dtype: str = "float32"  # "float32" | "bfloat16"
  # Tokens the tokenizer knows (0 = all). Checkpoints pad the vocabulary (Qwen2.5: 151,936
  # rows for 151,665 tokens); ids past the tokenizer's are never sampled.
  vocab_size: int = 0

  def __post_init__(self):
    if not callable(self.rule) or not hasattr(self.rule, "init"):
      raise ValueError(f"rule={self.rule!r} is not a sampling rule (init and __call__, "
                       "rules.py); a logit map such as Temperature goes into rules.chain(...)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be positive")
    if self.cache_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"cache_dtype={self.cache_dtype!r} is not float32 or bfloat16")

  def describe(self) -> dict:
    """The settings as plain JSON values, for summaries and reports: temperature, top_k and
    top_p of the rule (rules.describe), and the loop's own fields."""
    return dict(rules.describe(self.rule), max_new_tokens=self.max_new_tokens,
                stop_ids=list(self.stop_ids), cache_dtype=self.cache_dtype,
                vocab_size=self.vocab_size)


@dataclasses.dataclass(frozen=True)
class Sample:
  tokens: np.ndarray  # int32 [n]: generated ids, the stop token included when there is one
  finish_reason: str  # "stop" | "length"


def bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Generates from a model; holds nothing but the model split into graph and parameters."""

  graphdef: nnx.GraphDef
  params: nnx.State
  num_layers: int
  stacks: int  # blocks the decode step unrolls (stacks_for): num_layers, or 1 in a loop
  num_kv_heads: int
  head_dim: int
  max_positions: int
  mesh: jax.sharding.Mesh | None = None  # sample sharded like training: batch over data

  @classmethod
  def from_model(cls, model: Transformer, mesh: jax.sharding.Mesh | None = None, *,
                 consume: bool = False, unroll: int = UNROLL) -> Sampler:
    """`mesh`: the mesh the model's parameters live on; rows are then split over its
    data-parallel axes (the batch is padded to a multiple of them).

    The sampler holds the layer weights one array per layer (`decode_model`), a copy of
    the model's [L, ...] stacks: as much memory again as the layers while both live. With
    `consume` the stacks are freed once copied (evaluation of a loaded checkpoint), and the
    model must not be used again. `unroll`: the most layers run as unrolled code; a deeper
    model loops over its layers (`UNROLL`), on the model's own stacks (no copy).
    """
    cfg = model.config
    stacks = stacks_for(cfg.num_layers, unroll)
    graphdef, params = nnx.split(decode_model(model, stacks, consume))
    return cls(graphdef, params, cfg.num_layers, stacks, cfg.num_kv_heads, cfg.head_dim,
               cfg.max_position_embeddings, mesh)

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
               num_samples: int = 1, seed: int = 0, batch_size: int | None = None,
               samples_at_once: int = 0, decode_chunk: int = 16, first_prompt: int = 0,
               grow_from: int = GROW_FROM, timings: dict[str, float] | None = None
               ) -> list[list[Sample]]:
    """Samples `num_samples` continuations of each prompt, with continuous batching.

    Work is cut into groups of `samples_at_once` samples of one prompt (all `num_samples` by
    default), and `batch_size` groups decode together, each in its own slot of rows; whenever
    every row of a slot has finished, the next waiting group is prefilled into it, so
    long-tail samples do not idle the batch. A group's prompt is prefilled once for its rows;
    smaller groups bound the KV cache (64 samples x 32k tokens do not fit one device for most
    models) at the cost of prefilling the prompt once per group. Each sample draws from its own
    random stream (seed, prompt index, sample index, step), so results do not depend on
    `batch_size`, `samples_at_once` or on which rows a sample lands in.

    On a mesh that spans processes every process calls this with the same arguments; each
    feeds and reads only the rows on its own devices, and every process returns all samples.

    Args:
      prompts: token ids of each prompt.
      cfg: sampling settings.
      num_samples: continuations per prompt.
      seed: the same seed, prompts and settings give the same samples.
      batch_size: groups decoding at once (default: all).
      samples_at_once: samples of one prompt per group (0 = all); must divide num_samples.
      decode_chunk: decode steps between checks for finished groups.
      grow_from: answer slots the cache starts with (0: all max_new_tokens); it doubles
        them when the longest row needs more (`GROW_FROM`).
      first_prompt: the index of `prompts[0]` in a longer list sampled in parts: prompt i's
        streams are those of prompt `first_prompt + i`, so the parts equal one call.
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
    if grow_from < 0:
      raise ValueError(f"grow_from={grow_from} must be 0 (no growth) or positive")
    if self.stacks < self.num_layers:  # one array for several layers (GROW_FROM)
      grow_from = 0
    answer_slots = min(grow_from or cfg.max_new_tokens, cfg.max_new_tokens)
    static = dict(graphdef=self.graphdef, n=n, cache_len=answer_slots,
                  cache_dtype=jnp.bfloat16 if cfg.cache_dtype == "bfloat16" else jnp.float32,
                  cfg=cfg, cache_shape=(self.num_layers, self.stacks, self.num_kv_heads,
                                        self.head_dim))
    seed_arr = self._put(np.asarray(seed, np.uint32))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    waiting = list(range(len(groups)))
    owner = [-1] * slots  # group decoding in each slot
    # Per slot, the most answer slots its rows can have filled: the steps it has decoded.
    reach = [0] * slots
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
          lengths = np.ones((size,), np.int32)  # a padding row: one token, 0
          ids = np.zeros((size,), np.int32)
          first = np.zeros((size,), np.int32)
          dest = np.full((size,), slots, np.int32)  # padding rows go nowhere
          incoming = [[0]] * size
          for r, s in enumerate(fill):
            g = waiting.pop(0)
            i, first[r] = groups[g]
            owner[s], ids[r], dest[r] = g, first_prompt + i, s
            reach[s] = 0
            incoming[r] = prompts[i]
            lengths[r] = len(prompts[i])
          packed = pack_prompts(incoming, p, dp)
          start = time.perf_counter()
          fresh = _prefill(self.params, *map(self._put, packed), self._put(lengths),
                           self._put(ids), self._put(first), seed_arr, **static)
          state = fresh if state is None else _insert(state, fresh, self._put(dest), n=n)
          if timings is not None:
            jax.block_until_ready(state)
            timings["prefill"] = timings.get("prefill", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        need = max(reach[s] for s in range(slots) if owner[s] >= 0) + decode_chunk
        while answer_slots < need and answer_slots < cfg.max_new_tokens:
          answer_slots = min(2 * answer_slots, cfg.max_new_tokens)
        if state.cache.length < answer_slots:
          state = _grow(state, answer_slots)
        state = _decode(self.params, state, steps=decode_chunk, **static)
        reach = [r + decode_chunk for r in reach]
        done = _to_host(state.done).reshape(slots, n)
        if timings is not None:
          timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - start
        finished = [s for s in range(slots) if owner[s] >= 0 and done[s].all()]
        if finished:
          out, counts, stopped = (_to_host(x) for x in (state.out, state.count, state.stopped))
          for s in finished:
            i, j = groups[owner[s]]
            results[i][j:j + n] = [
                Sample(out[r, :counts[r]].copy(), "stop" if stopped[r] else "length")
                for r in range(s * n, s * n + n)]
            owner[s] = -1
        if not waiting and all(o < 0 for o in owner):
          break
    return results

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _put(self, x: np.ndarray):
    """Host data every process holds whole, as an array over the mesh: rows split over the
    data axes (a scalar replicated); each process places only its own devices' part."""
    if self.mesh is None:
      return jnp.asarray(x)
    spec = sharding.batch_sharding(self.mesh, x.ndim) if x.ndim else (
        jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole of `x` on this host, also when its rows live on other processes' devices."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DecodeState:
  """Everything the decode loop carries, one entry per row (R = prompts x samples), but the
  prompts' keys and values, one entry per prompt (slot)."""
  prefix: PrefixCache  # [slots, ...]: each slot's prompt, shared by its n rows
  cache: KVCache  # [R, ...]: each row's answer
  logits: jax.Array  # [R, V] next-token logits
  rule_state: Any  # the sampling rule's, every leaf [R, ...]
  lengths: jax.Array  # [R] prompt length
  keys: jax.Array  # [R] the row's random stream (prompt index, sample index)
  count: jax.Array  # [R] tokens generated
  done: jax.Array  # [R] bool
  stopped: jax.Array  # [R] bool: ended on a stop id
  out: jax.Array  # [R, N] generated ids


_STATIC = ("graphdef", "n", "cache_len", "cache_dtype", "cfg", "cache_shape")


def pack_prompts(prompts: Sequence[Sequence[int]], width: int, multiple: int = 1
                 ) -> tuple[np.ndarray, ...]:
  """The prompts packed into rows of `width` tokens, longest first, each into the first row
  with room (first-fit decreasing), for one prefill of their tokens rather than of a padded
  row each (8 MATH-500 prompts of 63-449 tokens: 3 rows of 512, not 8).

  The row count is rounded up to a power of two or three times one (1, 2, 3, 4, 6, 8, 12,
  ...: one prefill compile per count, at most a third of the rows padding) and to a
  `multiple` (the rows divide over the data axes), but is never more than one row per prompt.
  Returns (tokens [R, W], positions [R, W] (each prompt's own, from 0), segment ids [R, W]
  (1, 2, ... for the prompts of a row, 0 after them), each prompt's row [S] and the offset of
  its first token in the row [S]).
  """
  rows_of, offsets = np.zeros((len(prompts),), np.int32), np.zeros((len(prompts),), np.int32)
  room: list[int] = []
  for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
    n = len(prompts[i])
    if not 0 < n <= width:
      raise ValueError(f"prompt {i} has {n} tokens; rows hold 1 to {width}")
    r = next((r for r, free in enumerate(room) if free >= n), len(room))
    if r == len(room):
      room.append(width)
    rows_of[i], offsets[i] = r, width - room[r]
    room[r] -= n
  rows = min(_round_rows(len(room)), len(prompts))
  rows += -rows % multiple
  tokens, positions, segments = (np.zeros((rows, width), np.int32) for _ in range(3))
  in_row = np.zeros((rows,), np.int32)
  for i in np.argsort(offsets, kind="stable"):
    r, o, n = rows_of[i], offsets[i], len(prompts[i])
    in_row[r] += 1
    tokens[r, o:o + n] = prompts[i]
    positions[r, o:o + n] = np.arange(n)
    segments[r, o:o + n] = in_row[r]
  return tokens, positions, segments, rows_of, offsets


def _round_rows(n: int) -> int:
  """The least of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 x 2^k) that is at least n."""
  power = bucket(n, 1)
  return power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(params, tokens_RP, positions_RP, segments_RP, rows_S, offsets_S, lengths_S,
             prompt_ids_S, first_sample_S, seed, *, graphdef, n, cache_len, cache_dtype, cfg,
             cache_shape) -> _DecodeState:
  """Prefills S prompts packed into R rows (`pack_prompts`) and lays each out as n sample
  rows of its own cache, the samples numbered from its `first_sample_S` on."""
  model = nnx.merge(graphdef, params)
  base_key = jax.random.key(seed)
  b = lengths_S.shape[0]
  p = tokens_RP.shape[1]
  layers, stacks, kv_heads, head_dim = cache_shape
  # The prompts attend among themselves in a cache of their P slots, cut into one prefix per
  # prompt that its n rows share; the rows' answers go into a cache of their own (cache_len
  # answer slots). Attending over both at prefill would cost (P + max_new_tokens) / P times
  # the attention (65x for a 512-token prompt and a 32k-token budget), all on empty slots.
  packed = KVCache.zeros(layers, tokens_RP.shape[0], p, kv_heads, head_dim, cache_dtype,
                         stacks=stacks)
  x_RPD, packed = _run_layers(model.layers, model.embed(tokens_RP), positions_RP, segments_RP,
                              packed)
  # Each prompt's P slots from its row, its own tokens first; the slots after them hold what
  # followed in the row, never attended to (segment 0).
  slots_SP = jnp.minimum(offsets_S[:, None] + jnp.arange(p, dtype=jnp.int32), p - 1)
  cut = lambda x, axis: jnp.take_along_axis(  # noqa: E731
      x[rows_S], jnp.expand_dims(slots_SP, [a for a in range(1, x.ndim) if a != axis]), axis)
  prefix = PrefixCache(k=tuple(cut(k, 4) for k in packed.k),  # [S, n, K, H, P]
                       v=tuple(cut(v, 3) for v in packed.v),  # [S, n, K, P, H]
                       lengths=lengths_S)
  rows = b * n
  cache = _rows_layout(KVCache.zeros(layers, rows, cache_len, kv_heads, head_dim, cache_dtype,
                                     stacks=stacks))
  last_B1D = x_RPD[rows_S, offsets_S + lengths_S - 1][:, None]  # each prompt's last token
  logits = model.unembed(model.norm(last_B1D))[:, 0]
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
  sample_ids = rep(first_sample_S) + jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
  keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j))(
      rep(prompt_ids_S), sample_ids)
  return _DecodeState(prefix=prefix, cache=cache, logits=rep(logits),
                      rule_state=cfg.rule.init(rows),
                      lengths=rep(lengths_S), keys=keys,
                      count=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool),
                      stopped=jnp.zeros((rows,), bool),
                      out=jnp.zeros((rows, cfg.max_new_tokens), jnp.int32))


def _rows_layout(cache: KVCache) -> KVCache:
  """`cache` laid out as the prompts' keys and values are: rows over the data axes, kv heads
  over tp where they divide it. Zeros made in place follow no input, and XLA would otherwise
  replicate them on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return cache
  heads = "kv_heads" if cache.k[0].shape[2] % mesh.shape.get("tp", 1) == 0 else None
  kv = lambda x: sharding.shard(x, ("batch", None, heads, None, None))  # noqa: E731
  return cache.replace(k=tuple(map(kv, cache.k)), v=tuple(map(kv, cache.v)),
                       positions=sharding.shard(cache.positions, ("batch", None)),
                       segment_ids=sharding.shard(cache.segment_ids, ("batch", None)),
                       end_index=sharding.shard(cache.end_index, ("batch",)))


def _extend_cache(cache: KVCache, length: int, pad=None) -> KVCache:
  """`cache` with empty slots (zeros, as KVCache.zeros makes them) appended up to `length`,
  by `pad(array, length=, axis=)` on each array's slot axis (`_pad_slots`)."""
  if cache.length == length:
    return cache
  pad = pad or _pad_slots_impl
  return cache.replace(k=tuple(pad(k, length=length, axis=4) for k in cache.k),  # [B,n,K,H,S]
                       v=tuple(pad(v, length=length, axis=3) for v in cache.v),  # [B,n,K,S,H]
                       positions=pad(cache.positions, length=length, axis=1),
                       segment_ids=pad(cache.segment_ids, length=length, axis=1))


def _pad_slots_impl(x: jax.Array, *, length: int, axis: int) -> jax.Array:
  """`x` with zeros appended on `axis` up to `length`."""
  return jnp.pad(x, [(0, length - x.shape[axis] if a == axis else 0) for a in range(x.ndim)])


_pad_slots = jax.jit(_pad_slots_impl, static_argnames=("length", "axis"), donate_argnums=0)


def _grow(state: _DecodeState, length: int) -> _DecodeState:
  """The state with its cache extended by empty slots to `length` (`GROW_FROM`): array by
  array, each donated, so the old and the new cache coexist by about one layer's arrays."""
  with warnings.catch_warnings():  # the larger array cannot reuse the donated one
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return dataclasses.replace(state, cache=_extend_cache(state.cache, length, _pad_slots))


@functools.partial(jax.jit, static_argnames=("n",), donate_argnums=0)
def _insert(state: _DecodeState, fresh: _DecodeState, dest_F: jax.Array, *, n: int):
  """Writes the F freshly prefilled prompts into slots `dest_F` (their prefixes) and the
  slots' rows (the rest), in place: the state is donated; a slot index past the last slot
  drops its prompt (batch padding). Their answer cache is first extended to the state's,
  which may have grown since they were prefilled."""
  fresh = dataclasses.replace(fresh, cache=_extend_cache(fresh.cache, state.cache.length))
  rows = (dest_F[:, None] * n + jnp.arange(n, dtype=jnp.int32)).reshape(-1)
  put = lambda at: lambda old, new: old.at[at].set(new, mode="drop")  # noqa: E731
  prefix = jax.tree.map(put(dest_F), state.prefix, fresh.prefix)
  rest = jax.tree.map(put(rows), dataclasses.replace(state, prefix=None),
                      dataclasses.replace(fresh, prefix=None))
  return dataclasses.replace(rest, prefix=prefix)


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
    token, rule_state = _sample_rows(cfg.rule, logits, step_keys, st.rule_state)
    active = ~st.done
    token = jnp.where(active, token, 0)
    at = st.count  # where the token goes: after the row's tokens, less any taken back
    if hasattr(cfg.rule, "take_back"):
      # The token is written over the ones taken back, in `out` and in the cache. The cache
      # slots after it keep their keys until overwritten, never attended to meanwhile: each
      # slot's position is its index, after the new query's (attention_mask is causal on
      # positions).
      at = at - jnp.where(active, cfg.rule.take_back(rule_state), 0)
    write_at = jnp.minimum(at, cfg.max_new_tokens - 1)
    out = st.out.at[jnp.arange(rows), write_at].set(
        jnp.where(active, token, st.out[jnp.arange(rows), write_at]))
    count = at + active.astype(jnp.int32)
    hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    done = st.done | hit_stop | (count >= cfg.max_new_tokens)
    # Finished rows still run through the model (the batch is dense); their cache writes are
    # clamped at the end of their own row and they are refilled before being read again.
    pos = (st.lengths + jnp.minimum(at, cfg.max_new_tokens - 1))[:, None]
    cache = st.cache.replace(end_index=jnp.minimum(at, _cache_len(st) - 1))
    x_B1D, cache = _run_layers(model.layers, model.embed(token[:, None]), pos,
                               jnp.ones((rows, 1), jnp.int32), cache, st.prefix)
    new_logits = model.unembed(model.norm(x_B1D))[:, 0]
    return i + 1, dataclasses.replace(st, cache=cache, logits=new_logits, rule_state=rule_state,
                                      count=count, done=done, stopped=st.stopped | hit_stop,
                                      out=out)

  _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state


def _sample_rows(rule: rules.Rule, logits_BV, keys_B, state):
  """`rule` with each device choosing for its own rows (`shard_map` over the batch axes): a
  row's cuts need all of its ids, which the model leaves split over tp. The rule's state is
  split with the rows."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return rule(logits_BV, keys_B, state)
  rows = lambda x: sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
  state_specs = jax.tree.map(rows, state)
  return jax.shard_map(rule, mesh=mesh, in_specs=(rows(logits_BV), rows(keys_B), state_specs),
                       out_specs=(rows(keys_B), state_specs))(logits_BV, keys_B, state)


def _run_layers(blocks: nnx.List, x_BTD, positions_BT, segment_ids_BT, cache: KVCache,
                prefix: PrefixCache | None = None) -> tuple[jax.Array, KVCache]:
  """The model's layers over a cache: x [B, T, D] of T new tokens -> (the last layer's
  output, the cache with the tokens written at each row's end index and advanced past them).
  The tokens also attend to `prefix`, if given, which consecutive rows share (read only).

  `blocks` holds G Blocks whose weights are stacked [L / G, ...], as the cache's G stacks hold
  their keys and values ([B, L / G, ...]): layer j * G + g is block g at index j. With one
  layer per stack (G = L) the layers are unrolled, each on weights and a cache of its own;
  otherwise a loop runs j over the stacks, the G blocks unrolled in its body.
  """
  depth = cache.k[0].shape[1]  # layers per stack
  parts = [nnx.split(block) for block in blocks]

  def group(j, x, k, v):
    k, v, after = list(k), list(v), None
    for g, (graphdef, stacked) in enumerate(parts):
      weights = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False),
                             stacked)
      # Every layer enters the step's tokens into the slots as they were before the step.
      layer_cache = LayerCache(k[g], v[g], j, cache.positions, cache.segment_ids,
                               cache.end_index)
      if prefix is not None:
        layer_cache = dataclasses.replace(layer_cache, prefix_k=prefix.k[g],
                                          prefix_v=prefix.v[g], prefix_lengths=prefix.lengths)
      x, after = nnx.merge(graphdef, weights)(x, positions_BT, segment_ids_BT, layer_cache)
      k[g], v[g] = after.k, after.v
    return x, tuple(k), tuple(v), (after.positions, after.segment_ids, after.end_index)

  if depth == 1:
    x_BTD, k, v, slots = group(0, x_BTD, cache.k, cache.v)
  else:
    slots = (cache.positions, cache.segment_ids, cache.end_index)
    x_BTD, k, v, slots = jax.lax.fori_loop(
        0, depth, lambda j, c: group(j, *c[:3]), (x_BTD, cache.k, cache.v, slots))
  positions, segment_ids, end_index = slots
  return x_BTD, cache.replace(k=k, v=v, positions=positions, segment_ids=segment_ids,
                              end_index=end_index)


def _cache_len(state: _DecodeState) -> int:
  return state.cache.length
