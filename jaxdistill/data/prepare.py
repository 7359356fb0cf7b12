"""Offline preparation: trace records rendered once, on every core, into ArrayRecord shards.

`prepare(cfg, renderer)` reads the records of `cfg.inputs` (anything `sources.open_source`
reads), renders each one exactly as the training pipeline would (`pipeline.prepare_record`
over `builder.example_fn`: format -> conversations -> `ChatRenderer.render` ->
`packing.fit_length`), and writes to `cfg.output`:

  examples-00000-of-0000N.array_record  one pre-tokenised example per entry, in the
                                        `jaxdistill.tokens.v1` encoding of `sources`, so
                                        `open_source(DIR)` and `DataIterator` (data.sources =
                                        DIR) read them back without a tokenizer;
  rows-00000-of-0000N.array_record      with `pack`, packed rows instead (encoding below);
  stats.json                            what was kept, dropped and why (see `prepare`).

Order. Examples are written in input order: the inputs in the order given, files in sorted
order, records in file order, a record's conversations in order. Workers render index ranges
("chunks") of the sources in a `multiprocessing` pool; results are consumed in chunk order,
so the shards and stats do not depend on the number of workers or the chunk size. Shards are
cut after `shard_bytes` of (uncompressed) records, which depends on the data alone.

Packed rows (`pack=True`) are made by the pipeline's own best-fit packer (`packing.Bins`, in
input order, `pack_bins` rows open) and stored one row per ArrayRecord entry as a msgpack map

  {"format": "jaxdistill.packed.v1", "seq_len": T,
   "tokens": <int32 LE bytes: the row's examples back to back, no padding>,
   "loss_mask": <uint8 bytes, 0/1, the same length>,
   "lengths": <int32 LE bytes: each example's token count, in row order>}

`packed_rows.decode_packed_row` turns one into the row dict of packing.py, and `PackedRows`
is a Grain random-access source of such rows. The training pipeline (`DataIterator`, with
data.sources = DIR and data.seq_len = T) shuffles, shards and batches them as they are.

stats.json names the tokenizer and chat template that made the tokens (`ChatRenderer.identity`:
vocabulary size, hashes of the vocabulary and of the template); a run with another one is
refused (`builder.check_prepared`), since the ids would stand for other text.

The sources are opened once here and pickled to the workers. Each worker opens its own file
handles, since sources pickle without them. The JSONL newline index is built once, not once
per worker. The renderer pickles too: a Jinja template is recompiled in each worker.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, TextIO

import numpy as np

from jaxdistill import storage
from jaxdistill.data import builder, chat, formats, packing, pipeline, sources
from jaxdistill.data.packed_rows import STATS_FILE, encode_packed_row

STATS_FORMAT = "jaxdistill.prepared.v1"
# The writer options of `sources.write_array_record`: one record per group, so every read
# is one random access. Compression stays at ArrayRecord's default.
_WRITER_OPTIONS = "group_size:1"
# A chunk holds at most this many records: enough to amortise the round trip to a worker,
# few enough that the chunks in flight (4 per worker) stay well under a GiB of 16k-token
# examples, and that no worker is left with one big chunk at the end.
_MAX_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What to prepare and how.

  Attributes:
    inputs: files, globs, directories or `tfds:NAME[@SPLIT]`, read in this order.
    output: directory for the shards and stats.json. It may exist, but it must not already
      hold shards or stats.
    seq_len: row length T that examples are fitted to (`packing.fit_length`).
    format: trace format of the records, "auto" or one of `formats.FORMATS`.
    overlong: "drop" or "truncate" examples longer than seq_len.
    pack: write packed rows instead of examples.
    pack_bins: rows open at once while packing.
    strict: stop at the first bad record (`pipeline.BadRecordError`, with its location)
      instead of skipping and counting it.
    workers: processes that render; 1 renders in this process.
    shard_bytes: a shard is closed once it holds this many bytes of encoded records.
    chunk_records: records per work unit (default: from the input size and `workers`; the
      output does not depend on it).
    log_bad_records: bad records logged and listed in stats.json with their locations.
  """
  inputs: tuple[str, ...]
  output: str
  seq_len: int
  format: str = "auto"
  overlong: str = "drop"
  pack: bool = False
  pack_bins: int = 16
  strict: bool = False
  workers: int = 1
  shard_bytes: int = 256 << 20
  chunk_records: int | None = None
  log_bad_records: int = 5

  def __post_init__(self):
    object.__setattr__(self, "inputs", tuple(self.inputs))
    problems = []
    if not self.inputs:
      problems.append("no inputs given")
    if self.seq_len < 2:
      problems.append(f"seq_len={self.seq_len} must be at least 2")
    if self.format != "auto" and self.format not in formats.FORMATS:
      problems.append(f"format={self.format!r} is not 'auto' or one of {formats.FORMATS}")
    if self.overlong not in packing.OVERLONG_POLICIES:
      problems.append(f"overlong={self.overlong!r} is not one of {packing.OVERLONG_POLICIES}")
    if self.pack_bins < 1 or self.workers < 1 or self.shard_bytes < 1:
      problems.append("pack_bins, workers and shard_bytes must be positive")
    if self.chunk_records is not None and self.chunk_records < 1:
      problems.append(f"chunk_records={self.chunk_records} must be positive")
    if problems:
      raise ValueError("Invalid PrepareConfig: " + "; ".join(problems))


# -- Counting ---------------------------------------------------------------------------------

def _length_bucket(n: int) -> int:
  """The power-of-two bucket of a length: the smallest 2^k >= n (lengths 2^(k-1)+1 .. 2^k)."""
  return 1 << max(0, (int(n) - 1).bit_length())


def _bucket_label(upper: int) -> str:
  return str(upper) if upper <= 2 else f"{upper // 2 + 1}-{upper}"


@dataclasses.dataclass
class Tally:
  """Counters over consecutive records, with the pipeline's meanings (`pipeline.new_stats`):
  records read, examples rendered, kept (truncated ones included), dropped by reason, tokens
  and scored targets (`loss_mask[1:]`) of the kept examples, plus power-of-two histograms of
  the rendered lengths (before the over-length policy) and the kept ones, and the first bad
  records with their locations. Tallies of consecutive ranges merge in order."""
  keep_bad: int = 5
  records: int = 0
  examples: int = 0
  kept: int = 0
  truncated: int = 0
  tokens: int = 0
  scored_tokens: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  rendered_lengths: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kept_lengths: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  bad_count: int = 0
  first_bad: list = dataclasses.field(default_factory=list)  # [(location, reason)]

  def add(self, element: dict[str, Any], rendered: Sequence[int]) -> str | None:
    """Counts one `prepare_record` element whose rendering gave examples of `rendered`
    lengths; returns why the record is bad, or None."""
    self.records += 1
    if element["error"] is not None:
      kind, reason = element["error"]
      self.dropped[kind] += 1
      return self._bad(element["location"], reason)
    self.examples += len(element["outcomes"])
    self.rendered_lengths.update(_length_bucket(n) for n in rendered)
    if not element["outcomes"]:
      self.dropped["no_examples"] += 1
    bad = None
    for outcome in element["outcomes"]:
      if outcome == packing.TRUNCATED:
        self.truncated += 1
      elif outcome != packing.KEPT:
        self.dropped[outcome] += 1
        if outcome == packing.NO_SCORED_TARGET:  # an all-zero loss mask is a data bug
          bad = bad or self._bad(element["location"], "an example has no scored target token")
    for tokens, mask in element["examples"]:
      self.kept += 1
      self.tokens += len(tokens)
      self.scored_tokens += int(np.count_nonzero(mask[1:]))
      self.kept_lengths[_length_bucket(len(tokens))] += 1
    return bad

  def _bad(self, location: str, reason: str) -> str:
    self.bad_count += 1
    if len(self.first_bad) < self.keep_bad:
      self.first_bad.append((location, reason))
    return reason

  def merge(self, later: Tally):
    """Adds the counts of the records that come after this tally's."""
    for f in ("records", "examples", "kept", "truncated", "tokens", "scored_tokens",
              "bad_count"):
      setattr(self, f, getattr(self, f) + getattr(later, f))
    for f in ("dropped", "rendered_lengths", "kept_lengths"):
      getattr(self, f).update(getattr(later, f))
    self.first_bad += later.first_bad[:self.keep_bad - len(self.first_bad)]

  def to_dict(self) -> dict[str, Any]:
    hist = lambda c: {_bucket_label(k): c[k] for k in sorted(c)}  # noqa: E731
    return {"records": self.records, "examples": self.examples, "kept": self.kept,
            "truncated": self.truncated,
            "dropped": {r: self.dropped[r] for r in pipeline.DROP_REASONS},
            "tokens": self.tokens, "scored_tokens": self.scored_tokens,
            "bad_records": {"count": self.bad_count,
                            "first": [{"location": loc, "reason": why}
                                      for loc, why in self.first_bad]},
            "length_histogram": {"rendered": hist(self.rendered_lengths),
                                 "kept": hist(self.kept_lengths)}}


# -- Workers ----------------------------------------------------------------------------------

class _Chunk(NamedTuple):
  """A worker's result for one index range; fallbacks are the renderer's `counts`."""
  examples: list  # kept examples in order: `tokens.v1` bytes, or (tokens, mask) to pack
  tally: Tally
  renderer_counts: collections.Counter


class _Worker:
  """Renders index ranges of the sources; one per process (or one in-process)."""

  def __init__(self, srcs, renderer: chat.ChatRenderer, fmt: str, spec: formats.FormatSpec,
               cfg: PrepareConfig):
    self.srcs, self.renderer, self.cfg = srcs, renderer, cfg
    self._example_fn = builder.example_fn(renderer, fmt, spec)
    self._rendered: list[int] = []

  def _render(self, record):
    # `prepare_record` hands back only the fitted examples; the lengths before the
    # over-length policy, for the histogram, are caught on the way through.
    examples = self._example_fn(record)
    self._rendered = [len(ex.tokens) for ex in examples]
    return examples

  def run(self, task: tuple[int, int, int]) -> _Chunk:
    s, start, stop = task
    cfg, src = self.cfg, self.srcs[s]
    before = collections.Counter(self.renderer.counts)
    # At least one bad record is kept: in strict mode the parent raises with its location.
    tally, examples = Tally(keep_bad=max(1, cfg.log_bad_records)), []
    for i in range(start, stop):
      item = src[i]
      self._rendered = ([len(item.record.tokens)]
                        if isinstance(item.record, sources.TokenizedExample) else [])
      element = pipeline.prepare_record(item, self._render, cfg.seq_len, cfg.overlong)
      if tally.add(element, self._rendered) is not None and cfg.strict:
        break  # the parent stops here; rendering the rest of the chunk is wasted work
      if cfg.pack:
        examples += element["examples"]
      else:
        examples += [sources.encode_tokenized(t, m) for t, m in element["examples"]]
    return _Chunk(examples, tally, self.renderer.counts - before)


_WORKER: _Worker | None = None  # this process's worker, set by the pool initializer


def _init_worker(*args):
  global _WORKER
  _WORKER = _Worker(*args)


def _run_chunk(task):
  return _WORKER.run(task)


def _chunks(lengths: Sequence[int], size: int) -> list[tuple[int, int, int]]:
  return [(s, i, min(i + size, n)) for s, n in enumerate(lengths) for i in range(0, n, size)]


def _ordered_results(tasks, worker_args, workers: int) -> Iterator[_Chunk]:
  """Each task's result, in task order, rendered by `workers` processes."""
  workers = min(workers, len(tasks))
  if workers <= 1:
    worker = _Worker(*worker_args)
    yield from map(worker.run, tasks)
    return
  # Spawned, not forked: the parent may hold JAX or Grain threads, which fork does not copy.
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, initializer=_init_worker, initargs=worker_args) as pool:
    # A bounded window rather than imap: one slow chunk must not let every later result
    # pile up in memory while it is awaited.
    pending, tasks = collections.deque(), iter(tasks)
    for task in tasks:
      pending.append(pool.apply_async(_run_chunk, (task,)))
      if len(pending) >= 4 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


# -- Output -----------------------------------------------------------------------------------

class _ShardWriter:
  """ArrayRecord shards `<prefix>-0000i-of-0000n.array_record`, each closed after `max_bytes`.

  Shards are written under a temporary directory inside `directory` and moved into place by
  `finish`, when their count is known; `abort` leaves nothing behind.
  """

  def __init__(self, directory: str, prefix: str, max_bytes: int):
    self.directory, self.prefix, self.max_bytes = directory, prefix, max_bytes
    self.tmp = os.path.join(directory, f".prepare-{os.getpid()}.tmp")
    os.makedirs(self.tmp)
    self.counts: list[int] = []  # records per shard
    self._writer, self._bytes = None, 0

  def write(self, data: bytes):
    if self._writer is None:
      from array_record.python.array_record_module import ArrayRecordWriter
      path = os.path.join(self.tmp, f"{len(self.counts):05d}")
      self._writer, self._bytes = ArrayRecordWriter(path, _WRITER_OPTIONS), 0
      self.counts.append(0)
    self._writer.write(data)
    self.counts[-1] += 1
    self._bytes += len(data)
    if self._bytes >= self.max_bytes:
      self._close()

  def _close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self) -> list[dict[str, Any]]:
    """Moves the shards into place; returns [{"file", "records"}] in order."""
    self._close()
    out = []
    for i, count in enumerate(self.counts):
      name = f"{self.prefix}-{i:05d}-of-{len(self.counts):05d}.array_record"
      os.replace(os.path.join(self.tmp, f"{i:05d}"), os.path.join(self.directory, name))
      out.append({"file": name, "records": count})
    os.rmdir(self.tmp)
    return out

  def abort(self):
    self._writer = None  # a half-written shard is deleted, not closed
    shutil.rmtree(self.tmp, ignore_errors=True)


class Progress:
  """Writes `records done/total, tokens, tokens/s, ETA` to `stream` every `every` seconds."""

  def __init__(self, total: int, stream: TextIO | None = sys.stderr, every: float = 5.0):
    self.total, self.stream, self.every = total, stream, every
    self.start = self._last = time.monotonic()

  def update(self, records: int, tokens: int, final: bool = False):
    now = time.monotonic()
    if self.stream is None or (now - self._last < self.every and not final):
      return
    self._last = now
    elapsed = now - self.start
    eta = elapsed * (self.total - records) / records if records else float("nan")
    eta_text = "--" if math.isnan(eta) else _duration(eta)
    self.stream.write(
        f"prepare: {records:,}/{self.total:,} records ({records / max(1, self.total):.1%}), "
        f"{tokens:,} tokens, {tokens / max(elapsed, 1e-9):,.0f} tokens/s, elapsed "
        f"{_duration(elapsed)}, ETA {eta_text}\n")
    self.stream.flush()


def _duration(seconds: float) -> str:
  m, s = divmod(int(seconds + 0.5), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def fingerprint_inputs(srcs, stop: threading.Event | None = None) -> list[dict[str, Any]]:
  """{"path", "bytes", "sha256"} of every input file (a TFDS source: {"tfds": name@split});
  gives up (returns what it has) once `stop` is set."""
  out = []
  for src in srcs:
    if isinstance(src, sources.TfdsSource):
      out.append({"tfds": f"{src.name}@{src.split}"})
      continue
    for path in src.paths:
      h = hashlib.sha256()
      with storage.open(path, "rb") as f:
        while (block := f.read(1 << 24)) and not (stop and stop.is_set()):
          h.update(block)
      out.append({"path": storage.absolute(path), "bytes": storage.size(path),
                  "sha256": h.hexdigest()})
  return out


def _check_output(directory: str):
  if storage.is_url(directory):
    raise ValueError(f"output {directory!r}: prepared shards are ArrayRecord files, which are "
                     "written and read on local disk only; write them to a local directory "
                     "(copy it to the bucket for keeping with gcloud storage cp -r)")
  if os.path.isfile(directory):
    raise ValueError(f"output {directory!r} is a file; give a directory")
  if os.path.isdir(directory):
    taken = [n for n in os.listdir(directory) if n.endswith(".array_record") or n == STATS_FILE]
    if taken:
      raise ValueError(f"output directory {directory!r} already holds prepared data "
                       f"({sorted(taken)[0]}, ...); choose a new directory or delete them")
  os.makedirs(directory, exist_ok=True)


# -- Preparing --------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig, renderer: chat.ChatRenderer,
            spec: formats.FormatSpec = formats.DEFAULT_SPEC, *,
            progress: TextIO | None = sys.stderr, progress_every: float = 5.0) -> dict[str, Any]:
  """Renders every record of `cfg.inputs` and writes shards and stats.json to `cfg.output`.

  Args:
    cfg: inputs, output, seq_len and policies.
    renderer: the chat renderer training will use (its tokenizer and template).
    spec: field names and thinking wrapper of the trace format.
    progress: where progress lines go (None: nowhere), at most every `progress_every` s.

  Returns:
    The stats written to stats.json: the `Tally` counts (records, examples, kept, truncated,
    dropped by reason, tokens, scored_tokens, bad_records {count of records, first
    [{location, reason}]}, length_histogram {rendered, kept}), plus "format", "content"
    ("examples" or "packed_rows"), "seq_len", "overlong", "trace_format", "trace_spec"
    (`spec` as a dict), "tokenizer" (path, vocab size, template, turn-end token and hashes:
    `ChatRenderer.identity`), "inputs" (fingerprints), "renderer" (fallback counts),
    "shards" ([{"file", "records"}]), and with `pack`, "rows", "pack_bins" and "fill" (the
    share of row slots holding tokens). Nothing in it depends on the workers.

  Raises:
    pipeline.BadRecordError: in strict mode, at the first bad record in input order; no
      shard is left in the output directory.
    ValueError: an output directory that already holds prepared data.
  """
  srcs = [sources.open_source(s) for s in cfg.inputs]
  _check_output(cfg.output)
  total = sum(len(s) for s in srcs)
  size = cfg.chunk_records or max(1, min(_MAX_CHUNK, math.ceil(total / (16 * cfg.workers))))
  tasks = _chunks([len(s) for s in srcs], size)
  output = _Output(cfg)
  tally, renderer_counts = Tally(keep_bad=cfg.log_bad_records), collections.Counter()
  meter = Progress(total, progress, progress_every)
  stop_hashing = threading.Event()
  # Hashing reads every input once more; it runs beside the rendering, which is far slower.
  with concurrent.futures.ThreadPoolExecutor(1) as hasher:
    fingerprints = hasher.submit(fingerprint_inputs, srcs, stop_hashing)
    try:
      results = _ordered_results(tasks, (srcs, renderer, cfg.format, spec, cfg), cfg.workers)
      with contextlib.closing(results):  # stops the pool at once on an error
        for chunk in results:
          _report_bad(chunk.tally, tally.bad_count, cfg)
          output.add(chunk.examples)
          tally.merge(chunk.tally)
          renderer_counts.update(chunk.renderer_counts)
          meter.update(tally.records, tally.tokens)
      shards = output.finish()
    except BaseException:
      stop_hashing.set()
      output.abort()
      raise
  meter.update(tally.records, tally.tokens, final=True)
  stats = _stats(cfg, renderer, spec, tally, fingerprints.result(), renderer_counts, shards,
                 output.rows)
  tmp = os.path.join(cfg.output, STATS_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=1, ensure_ascii=False)
  os.replace(tmp, os.path.join(cfg.output, STATS_FILE))
  if tally.bad_count > cfg.log_bad_records:
    logging.warning("%d bad records in all; stats.json lists the first %d", tally.bad_count,
                    cfg.log_bad_records)
  return stats


def _report_bad(chunk: Tally, seen: int, cfg: PrepareConfig):
  """Strict mode raises at a chunk's first bad record; otherwise the first few are logged."""
  if cfg.strict and chunk.first_bad:
    raise pipeline.BadRecordError(*chunk.first_bad[0])
  for location, reason in chunk.first_bad[:max(0, cfg.log_bad_records - seen)]:
    logging.warning("skipping bad training record at %s: %s", location, reason)


class _Output:
  """Where kept examples go, in input order: into example shards, or through the pipeline's
  packer into row shards."""

  def __init__(self, cfg: PrepareConfig):
    self.cfg = cfg
    self.shards = _ShardWriter(cfg.output, "rows" if cfg.pack else "examples",
                               cfg.shard_bytes)
    self.bins = packing.Bins(cfg.seq_len, cfg.pack_bins)
    self.open: dict[int, packing.Example] = {}  # examples of the open rows, by input position
    self.examples = self.rows = 0

  def add(self, examples: list):
    """Encoded examples (bytes), or with `pack` (tokens, mask) pairs, in order."""
    if not self.cfg.pack:
      for data in examples:
        self.shards.write(data)
      return
    for example in examples:
      key, self.examples = self.examples, self.examples + 1
      self.open[key] = example
      self._write_rows(self.bins.add(key, len(example[0])))

  def _write_rows(self, rows: list[list[int]]):
    for keys in rows:
      self.shards.write(encode_packed_row([self.open.pop(k) for k in keys], self.cfg.seq_len))
    self.rows += len(rows)

  def finish(self) -> list[dict[str, Any]]:
    if self.cfg.pack:
      self._write_rows(self.bins.flush())
    return self.shards.finish()

  def abort(self):
    self.shards.abort()


def _stats(cfg: PrepareConfig, renderer: chat.ChatRenderer, spec: formats.FormatSpec,
           tally: Tally, fingerprints, renderer_counts, shards, rows: int) -> dict[str, Any]:
  stats = {"format": STATS_FORMAT, "content": "packed_rows" if cfg.pack else "examples",
           "seq_len": cfg.seq_len, "overlong": cfg.overlong, "trace_format": cfg.format,
           "trace_spec": dataclasses.asdict(spec),
           "tokenizer": renderer.identity(),
           "inputs": fingerprints, **tally.to_dict(),
           "renderer": {k: renderer_counts[k]
                        for k in ("split_boundary", "unscored_rewritten_turn")},
           "shards": shards}
  if cfg.pack:
    stats.update(rows=rows, pack_bins=cfg.pack_bins,
                 fill=round(tally.tokens / max(1, rows * cfg.seq_len), 6))
  return stats


def summary(stats: dict[str, Any]) -> str:
  """A few lines for the end of a run: what was kept and dropped, and the first bad records."""
  dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
  lines = [f"records {stats['records']:,}, examples {stats['examples']:,}: kept "
           f"{stats['kept']:,} (truncated {stats['truncated']:,}), dropped: {dropped}",
           f"tokens {stats['tokens']:,}, scored {stats['scored_tokens']:,}; "
           f"{len(stats['shards'])} shard(s)"
           + (f", {stats['rows']:,} rows ({stats['fill']:.1%} full)" if "rows" in stats else "")]
  bad = stats["bad_records"]
  if bad["count"]:
    lines.append(f"bad records: {bad['count']:,}, first at "
                 + "; ".join(f"{b['location']} ({b['reason']})" for b in bad["first"]))
  return "\n".join(lines)
