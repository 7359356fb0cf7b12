"""The training input pipeline: DataConfig, the Grain graph from record sources to per-process
packed batches, its checkpointable iterator and counters, and global arrays on the mesh.

The graph, per process:

  sources --mix--> one mixture epoch --shuffle(seed, epoch)--> repeat(num_epochs)
    --[process_index::process_count]--> map(render + over-length policy, in threads/workers)
    --PackIterDataset--> rows --batch(global_batch // process_count)--> thread prefetch

Everything up to the map is a Grain MapDataset, so the order is a pure function of the config
(seed, sources, epochs) and each process reads a disjoint slice of the whole multi-epoch
stream; together the processes read all of it. Rendering is the caller's "example function",
`record -> [example with .tokens and .loss_mask (or a (tokens, loss_mask) pair)]`, so this
module does not depend on any tokenizer or trace format. A record it cannot use is skipped,
counted and reported with its location (`strict=True` raises at the first instead): a source
that cannot decode it (malformed JSON, invalid UTF-8, not an object) or an example function
raising ValueError (a format error, a conversation with no scored token). Other exceptions are
bugs and propagate.

Pre-packed sources (directories from `tools/prepare_traces.py --pack`, `packed_rows.py`) skip
rendering and packing: their rows, already [T], take the place of records in the same graph

  rows --mix--> one mixture epoch --shuffle(seed, epoch)--> repeat(num_epochs)
    --[process_index::process_count]--> read (in threads) --batch--> thread prefetch

so they are shuffled, sharded, counted and resumed like packed rows, weights and mixture_size
count rows, and the step plan is a length. Their seq_len must be the config's, and they cannot
share a mixture with sources the pipeline packs (`open_sources` says so).

Batches are dicts of [B, T] numpy arrays, B = global_batch_size / process_count, with the row
layout of packing.py: inputs, targets, loss_mask, positions, segment_ids.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxdistill import sharding as sharding_lib
from jaxdistill.data import packed_rows, packing
from jaxdistill.data import sources as sources_lib

ExampleFn = Callable[[dict], Sequence[Any]]
STATE_FORMAT = "jaxdistill.data.v1"
DROP_REASONS = ("invalid_record", "format_error", "no_examples", packing.NO_SCORED_TARGET,
                packing.TOO_LONG, packing.PROMPT_TOO_LONG)
# Fields that decide which rows each process sees; a saved state only fits the same values.
_STREAM_FIELDS = ("sources", "seq_len", "global_batch_size", "num_epochs", "seed", "shuffle",
                  "packing", "pack_bins", "overlong", "mixture_size")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """One data source: a path/glob/directory or `tfds:NAME[@SPLIT]`, and its share of the mix."""
  path: str
  weight: float | None = None  # sampling proportion (all sources or none)
  epochs: float | None = None  # passes per mixture epoch (all sources or none; default 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the input pipeline needs, validated once."""
  sources: tuple[SourceConfig, ...]
  seq_len: int = 2048  # tokens per row
  global_batch_size: int = 8  # rows per step, over all processes
  num_epochs: int | None = 1  # passes over the mixture; None = repeat forever
  seed: int = 0
  shuffle: bool = True  # global shuffle per epoch (and per-source shuffles for the mixture)
  packing: str = "pack"  # "pack": several examples per row; "pad": one example per row
  pack_bins: int = 16  # rows open at once while packing (more: fuller rows, more memory)
  overlong: str = "drop"  # examples longer than seq_len: "drop" or "truncate"
  mixture_size: int | None = None  # records per mixture epoch with weights (default: all)
  strict: bool = False  # raise at the first bad record instead of skipping it
  log_bad_records: int = 5  # bad records logged with their location (all are counted)
  num_threads: int = 8  # threads running the example function
  read_ahead: int = 256  # records rendered ahead of the packer
  num_workers: int = 0  # worker processes for the example function (0: threads only)
  prefetch_batches: int = 2  # batches prepared ahead in a background thread (0: none)

  def __post_init__(self):
    srcs = tuple(SourceConfig(s) if isinstance(s, str) else s for s in self.sources)
    object.__setattr__(self, "sources", srcs)
    problems = []
    if not srcs:
      problems.append("no sources given")
    for field in ("weight", "epochs"):
      given = [getattr(s, field) is not None for s in srcs]
      if any(given) and not all(given):
        problems.append(f"set `{field}` on every source or on none (got "
                        f"{[getattr(s, field) for s in srcs]})")
    if any(s.weight is not None and s.epochs is not None for s in srcs):
      problems.append("a mixture uses either weights or per-source epochs, not both")
    if self.seq_len < 2:
      problems.append(f"seq_len={self.seq_len} must be at least 2")
    if self.global_batch_size < 1:
      problems.append(f"global_batch_size={self.global_batch_size} must be positive")
    if self.num_epochs is not None and self.num_epochs < 1:
      problems.append(f"num_epochs={self.num_epochs} must be positive (or None for forever)")
    if self.packing not in packing.PACKING_MODES:
      problems.append(f"packing={self.packing!r} is not one of {packing.PACKING_MODES}")
    if self.overlong not in packing.OVERLONG_POLICIES:
      problems.append(f"overlong={self.overlong!r} is not one of {packing.OVERLONG_POLICIES}")
    if self.pack_bins < 1:
      problems.append(f"pack_bins={self.pack_bins} must be at least 1")
    if min(self.num_threads, self.read_ahead, self.num_workers, self.prefetch_batches) < 0:
      problems.append("num_threads, read_ahead, num_workers and prefetch_batches must be >= 0")
    if problems:
      raise ValueError("Invalid DataConfig: " + "; ".join(problems))

  def per_process_batch(self, process_count: int) -> int:
    if self.global_batch_size % process_count:
      raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by the "
                       f"{process_count} processes; make it a multiple of {process_count}")
    return self.global_batch_size // process_count

  def stream_identity(self) -> dict[str, Any]:
    """The fields a saved iterator state depends on, as JSON."""
    out = {f: getattr(self, f) for f in _STREAM_FIELDS}
    out["sources"] = [dataclasses.asdict(s) for s in self.sources]
    return out


class BadRecordError(ValueError):
  """A record the pipeline cannot use, in strict mode; `location` is `path:line` or similar."""

  def __init__(self, location: str, reason: str):
    super().__init__(f"bad training record at {location}: {reason}")
    self.location, self.reason = location, reason


# -- The graph --------------------------------------------------------------------------------

def open_sources(cfg: DataConfig) -> tuple[list, bool]:
  """The sources of `cfg`, opened, and whether they are pre-packed rows (`PackedRows`).

  Raises ValueError, saying what to change, for pre-packed rows mixed with sources the
  pipeline packs (a row cannot share a packer with examples), rows packed to a seq_len other
  than `cfg.seq_len`, and `packing="pad"` over rows that are packed already.
  """
  prepacked = [packed_rows.prepared_content(s.path) == "packed_rows" for s in cfg.sources]
  if not any(prepacked):
    return [sources_lib.open_source(s.path) for s in cfg.sources], False
  if not all(prepacked):
    rows = [s.path for s, p in zip(cfg.sources, prepacked) if p]
    other = [s.path for s, p in zip(cfg.sources, prepacked) if not p]
    raise ValueError(f"the data sources mix pre-packed rows ({rows}) with sources the pipeline "
                     f"packs ({other}); prepare those with `tools/prepare_traces.py --pack` "
                     "and the same --seq_len too (weights then apply to rows), or prepare the "
                     "packed ones again without --pack")
  if cfg.packing == "pad":
    raise ValueError(f"packing='pad' asks for one example per row, but {cfg.sources[0].path!r} "
                     "holds rows packed already; set data.packing=pack, or prepare the traces "
                     "without --pack")
  srcs = [packed_rows.PackedRows(s.path) for s in cfg.sources]
  for s, src in zip(cfg.sources, srcs):
    if src.seq_len != cfg.seq_len:
      raise ValueError(
          f"{s.path!r} holds rows packed to seq_len={src.seq_len}, but the data config has "
          f"seq_len={cfg.seq_len}: set data.seq_len={src.seq_len} "
          f"(--config.data.seq_len={src.seq_len}), or prepare the traces again with "
          f"`tools/prepare_traces.py --pack --seq_len={cfg.seq_len}`")
  return srcs, True


def record_dataset(sources: Sequence, cfg: DataConfig, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """This process's records, in reading order: the mixture, shuffled per epoch, repeated, and
  sliced to every process_count-th record starting at process_index."""
  weights = [s.weight for s in cfg.sources] if cfg.sources[0].weight is not None else None
  epochs = [s.epochs for s in cfg.sources] if cfg.sources[0].epochs is not None else None
  ds = sources_lib.mix_sources(sources, weights=weights, epochs=epochs, size=cfg.mixture_size,
                               shuffle=cfg.shuffle, seed=cfg.seed)
  if cfg.shuffle:  # Grain folds the epoch into the seed: a new permutation every epoch
    ds = ds.shuffle(sources_lib.derive_seed(cfg.seed, 2))
  return ds.repeat(cfg.num_epochs)[process_index::process_count]


def prepare_record(item: sources_lib.Item, example_fn: ExampleFn, seq_len: int,
                   overlong: str) -> dict[str, Any]:
  """One record -> the element the packer reads (runs in reader threads or workers).

  Returns {"location", "error": None | (kind, reason), "examples": [fitted (tokens, mask)],
  "outcomes": [fit_length outcome per rendered example]}.
  """
  out = {"location": item.location, "error": None, "examples": [], "outcomes": []}
  if item.error is not None:
    out["error"] = ("invalid_record", item.error)
    return out
  if isinstance(item.record, sources_lib.TokenizedExample):
    rendered = [item.record]
  else:
    try:
      rendered = example_fn(item.record)
    except ValueError as e:  # FormatError and the renderer's no-scored-token error
      out["error"] = ("format_error", f"{type(e).__name__}: {e}")
      return out
  for ex in rendered:
    tokens, mask = (ex.tokens, ex.loss_mask) if hasattr(ex, "tokens") else ex
    fitted, outcome = packing.fit_length(tokens, mask, seq_len, overlong)
    out["outcomes"].append(outcome)
    if fitted is not None:
      out["examples"].append(fitted)
  return out


def new_stats() -> dict[str, Any]:
  """The pipeline's counters: records read, examples rendered, kept (incl. truncated), dropped
  by reason, tokens and scored targets packed, rows made."""
  return packing.new_stats(records=0, examples=0, truncated=0,
                           dropped={r: 0 for r in DROP_REASONS})


@dataclasses.dataclass(frozen=True)
class _Accounting:
  """Counts each element as the packer reads it; logs the first bad ones; strict raises."""
  strict: bool
  log_first: int

  def __call__(self, element: dict, stats: dict):
    stats["records"] += 1
    dropped = stats["dropped"]
    if element["error"] is not None:
      kind, reason = element["error"]
      dropped[kind] += 1
      self._bad(element["location"], reason, stats)
      return
    outcomes = element["outcomes"]
    stats["examples"] += len(outcomes)
    if not outcomes:
      dropped["no_examples"] += 1
    for outcome in outcomes:
      if outcome == packing.TRUNCATED:
        stats["truncated"] += 1
      elif outcome != packing.KEPT:
        dropped[outcome] += 1
        if outcome == packing.NO_SCORED_TARGET:  # an all-zero loss mask is a data bug
          self._bad(element["location"], "an example has no scored target token", stats)

  def _bad(self, location: str, reason: str, stats: dict):
    if self.strict:
      raise BadRecordError(location, reason)
    d = stats["dropped"]
    if d["invalid_record"] + d["format_error"] + d[packing.NO_SCORED_TARGET] <= self.log_first:
      logging.warning("skipping bad training record at %s: %s", location, reason)


def format_stats(stats: dict[str, Any], seq_len: int) -> str:
  """One line for logs: records, examples kept/truncated/dropped by reason, rows and fill."""
  dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
  fill = stats["tokens"] / max(1, stats["rows"] * seq_len)
  return (f"records {stats['records']}, examples {stats['examples']}: kept {stats['kept']} "
          f"(truncated {stats['truncated']}), dropped: {dropped}; rows {stats['rows']} "
          f"({fill:.1%} full), tokens {stats['tokens']}, scored {stats['scored_tokens']}")


class DataIterator(grain.DatasetIterator):
  """Per-process batches for the trainer, with JSON state and counters.

  `get_state()` is what the trainer stores in its Orbax checkpoint, one per process (being a
  Grain DatasetIterator, it also fits `grain.checkpoint.CheckpointSave/CheckpointRestore`);
  `set_state()` on a fresh iterator built from the same DataConfig resumes with exactly the
  batches the uninterrupted run would have produced. A state from a different process count,
  process index or stream-deciding config is refused with a message saying which; reader
  threads, workers and prefetch depth may change between runs.
  """

  def __init__(self, cfg: DataConfig, example_fn: ExampleFn, *,
               process_index: int | None = None, process_count: int | None = None):
    super().__init__()
    self.config = cfg
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} is outside [0, {self.process_count})")
    self.batch_size = cfg.per_process_batch(self.process_count)
    srcs, self.prepacked = open_sources(cfg)
    self._identity = {**cfg.stream_identity(), "source_lengths": [len(s) for s in srcs]}
    if self.prepacked:  # only then, so that states saved before pre-packed rows still fit
      self._identity["prepacked"] = True
    records = record_dataset(srcs, cfg, self.process_index, self.process_count)
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.read_ahead)
    if self.prepacked:  # records are rows: nothing to render or pack, no worker needed
      rows = packed_rows.RowIterDataset(records, read_options=read, stats=new_stats())
    else:
      elements = records.map(functools.partial(prepare_record, example_fn=example_fn,
                                               seq_len=cfg.seq_len, overlong=cfg.overlong))
      rows = packing.PackIterDataset(
          elements, seq_len=cfg.seq_len, mode=cfg.packing, num_bins=cfg.pack_bins,
          read_options=read, num_workers=cfg.num_workers,
          on_element=_Accounting(cfg.strict, cfg.log_bad_records), stats=new_stats())
    # A partial last batch would change the step's shape and recompile: it is dropped.
    batches = rows.batch(self.batch_size, drop_remainder=True)
    if cfg.prefetch_batches:
      batches = grain.experimental.ThreadPrefetchIterDataset(
          batches, prefetch_buffer_size=cfg.prefetch_batches)
    self._it = iter(batches)
    self.batches = 0

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      logging.info("training data exhausted after %d batches (process %d): %s", self.batches,
                   self.process_index, format_stats(self.stats, self.config.seq_len))
      raise
    self.batches += 1
    return batch

  @property
  def stats(self) -> dict[str, Any]:
    """Counters up to the last batch returned (a copy); see `new_stats`."""
    return self._it.get_state()["stats"]

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "process_index": self.process_index,
            "process_count": self.process_count, "config": self._identity,
            "batches": self.batches, "packer": self._it.get_state()}

  def set_state(self, state: dict[str, Any]):
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a jaxdistill data-iterator state (format {state.get('format')!r})")
    if state["process_count"] != self.process_count:
      raise ValueError(
          f"the data-iterator state was saved by {state['process_count']} processes and this run "
          f"has {self.process_count}: packed rows are made per process, so the state cannot be "
          "re-sharded exactly. Resume with the same number of processes, or restart the data "
          "(a new DataIterator without set_state).")
    if state["process_index"] != self.process_index:
      raise ValueError(f"process {self.process_index} was given the data-iterator state of "
                       f"process {state['process_index']}; each process restores its own")
    saved = state["config"]
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self._identity.items()
               if saved.get(k) != v]
    if changed:
      raise ValueError("the data-iterator state belongs to a different data stream ("
                       + "; ".join(changed) + "); restore with the original data config and "
                       "files, or restart the data")
    self._it.set_state(state["packer"])
    self.batches = int(state["batches"])

  def start_prefetch(self):
    self._it.start_prefetch()

  def close(self):
    if getattr(self, "_it", None) is not None:  # also reached from __del__ after a failed init
      self._it.close()
    super().close()


# -- Planning ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepPlan:
  """How many rows each process packs over the whole run, and the steps all can take."""
  rows_per_process: tuple[int, ...]
  steps: int  # min over processes of rows // per-process batch


class _IndexSource:
  """Stands in for source i in the record graph: yields (i, record index), reads nothing."""

  def __init__(self, i: int, n: int):
    self.i, self.n = i, n

  def __len__(self):
    return self.n

  def __getitem__(self, r):
    return self.i, r


def plan_steps(cfg: DataConfig, example_fn: ExampleFn, *,
               process_count: int | None = None) -> StepPlan:
  """Counts the packed rows of a whole run without packing anything.

  Renders every record once (in `cfg.num_threads` threads), keeps the lengths of its fitted
  examples, then replays each process's record order (the same Grain graph over index-only
  sources) through `packing.count_packed_rows`. Pre-packed rows are neither read nor
  rendered: each process's rows are the length of its slice of that graph. Needs
  `num_epochs` set.
  """
  if cfg.num_epochs is None:
    raise ValueError("plan_steps needs a finite num_epochs")
  process_count = jax.process_count() if process_count is None else process_count
  batch = cfg.per_process_batch(process_count)
  srcs, prepacked = open_sources(cfg)
  index_sources = [_IndexSource(i, len(s)) for i, s in enumerate(srcs)]
  if prepacked:
    rows = [len(record_dataset(index_sources, cfg, p, process_count))
            for p in range(process_count)]
    return StepPlan(tuple(rows), min(rows) // batch)
  prepare = functools.partial(prepare_record, example_fn=example_fn, seq_len=cfg.seq_len,
                              overlong=cfg.overlong)
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.read_ahead)
  lengths = [list(grain.MapDataset.source(src).map(prepare)
                  .map(lambda e: [len(t) for t, _ in e["examples"]]).to_iter_dataset(read))
             for src in srcs]
  rows = []
  for p in range(process_count):
    order = record_dataset(index_sources, cfg, p, process_count)
    rows.append(packing.count_packed_rows(
        (n for i, r in order for n in lengths[i][r]), cfg.seq_len, mode=cfg.packing,
        num_bins=cfg.pack_bins))
  return StepPlan(tuple(rows), min(rows) // batch)


# -- On the mesh ------------------------------------------------------------------------------

def make_global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                      sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
  """Per-process rows [B, T] -> global jax.Arrays [B * process_count, T].

  The default sharding splits the batch over the ("data", "fsdp") mesh axes and replicates T
  (sharding.batch_sharding); each process contributes the rows it read.
  """
  if sharding is None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = next(iter(batch.values())).shape[0] * jax.process_count()
    if rows % data_parallel:
      raise ValueError(f"the global batch of {rows} rows is not divisible by the data-parallel "
                       f"size data*fsdp={data_parallel}; change global_batch_size or the mesh")
    sharding = sharding_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
