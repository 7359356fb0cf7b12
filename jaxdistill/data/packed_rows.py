"""Prepared directories as training reads them back: the `jaxdistill.packed.v1` encoding of
pre-packed rows, a Grain source of such rows and an iterator that counts them as it reads,
and the stats.json record of what made a directory (`prepare.py` writes both).

An entry is a msgpack map {"format", "seq_len", "tokens" (int32, the row's examples back to
back, no padding), "loss_mask" (uint8), "lengths" (int32 per example)}; decoding gives the
row dict of packing.py (`write_row`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import msgpack
import numpy as np

from jaxdistill.data import packing, sources

PACKED_FORMAT = "jaxdistill.packed.v1"
STATS_FILE = "stats.json"  # beside the shards: what was kept and dropped, and by which tokenizer


def encode_packed_row(examples: Sequence[packing.Example], seq_len: int) -> bytes:
  """One row of fitted examples [(tokens int32[n], loss_mask bool[n])] in the packed encoding."""
  lengths = np.array([len(t) for t, _ in examples], "<i4")
  if lengths.sum() > seq_len:
    raise ValueError(f"examples of lengths {lengths.tolist()} exceed seq_len {seq_len}")
  return msgpack.packb({
      "format": PACKED_FORMAT, "seq_len": int(seq_len),
      "tokens": np.concatenate([t for t, _ in examples]).astype("<i4").tobytes(),
      "loss_mask": np.concatenate([m for _, m in examples]).astype(np.uint8).tobytes(),
      "lengths": lengths.tobytes()})


def decode_packed(data: bytes) -> tuple[int, list[packing.Example]]:
  """(seq_len, the row's examples) of one packed entry; ValueError on anything else."""
  try:
    obj = msgpack.unpackb(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f"not a msgpack map ({type(e).__name__})") from e
  if not isinstance(obj, dict) or obj.get("format") != PACKED_FORMAT:
    raise ValueError(f"not a {PACKED_FORMAT} record")
  tokens = np.frombuffer(obj["tokens"], "<i4").astype(np.int32)
  mask = np.frombuffer(obj["loss_mask"], np.uint8).astype(bool)
  lengths = np.frombuffer(obj["lengths"], "<i4")
  if len(tokens) != len(mask) or len(tokens) != lengths.sum() or len(tokens) > obj["seq_len"]:
    raise ValueError(f"inconsistent packed row: {len(tokens)} tokens, {len(mask)} mask "
                     f"entries, lengths summing to {lengths.sum()}, seq_len {obj['seq_len']}")
  cuts = np.cumsum(lengths)[:-1]
  return int(obj["seq_len"]), list(zip(np.split(tokens, cuts), np.split(mask, cuts)))


def decode_packed_row(data: bytes) -> dict[str, np.ndarray]:
  """One packed entry as the row dict of packing.py: inputs, targets, loss_mask, ... [T]."""
  seq_len, examples = decode_packed(data)
  return packing.write_row(examples, seq_len)


def _array_record_paths(spec: str) -> list[str]:
  """The ArrayRecord files a source spec names; [] for anything else (traces, TFDS)."""
  if spec.startswith("tfds:"):
    return []
  try:
    return [p for p in sources.expand_paths(spec, ".array_record") if p.endswith(".array_record")]
  except FileNotFoundError:
    return []


def prepared_content(spec: str) -> str | None:
  """"packed_rows" or "examples" when `spec` names ArrayRecord files of pre-packed rows or of
  pre-tokenised examples, else None (trace records, which the pipeline renders itself).

  Judged by the first entry, which costs one read: `prepare` writes one kind per directory.
  """
  paths = _array_record_paths(spec)
  source = grain.sources.ArrayRecordDataSource(paths) if paths else []
  if not len(source):
    return None
  try:
    obj = msgpack.unpackb(source[0])
  except Exception:  # a JSON entry, or garbage: not prepared data either way
    return None
  kind = obj.get("format") if isinstance(obj, dict) else None
  return {PACKED_FORMAT: "packed_rows", sources.TOKENIZED_FORMAT: "examples"}.get(kind)


def read_stats(spec: str) -> dict[str, Any] | None:
  """The stats.json of the prepared directory `spec` names (the directory itself, or shards in
  it by path or glob), or None when there is none."""
  paths = _array_record_paths(spec)
  directory = spec if os.path.isdir(spec) else os.path.dirname(paths[0]) if paths else None
  path = None if directory is None else os.path.join(directory, STATS_FILE)
  if path is None or not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class PackedRows:
  """Packed rows as a Grain random-access source of row dicts [T], T = `seq_len`.

  `spec` is a prepared directory (its `rows-*.array_record` shards) or such shards by path or
  glob. Every row must have the first row's seq_len. E.g.
  `grain.MapDataset.source(PackedRows(d)).shuffle(seed).repeat(n).batch(b)`.
  """

  def __init__(self, spec: str):
    pattern = os.path.join(spec, "rows-*.array_record") if os.path.isdir(spec) else spec
    self.paths = sources.expand_paths(pattern, ".array_record")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    if not len(self._source):
      raise ValueError(f"{spec!r} holds no packed rows")
    self.seq_len = self._decode(0)[0]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    seq_len, examples = self._decode(index)
    if seq_len != self.seq_len:
      raise ValueError(f"packed row at {self.location(index)} has seq_len {seq_len}, the first "
                       f"row {self.seq_len}: the shards were not written by one prepare run")
    return packing.write_row(examples, seq_len)

  def _decode(self, index: int) -> tuple[int, list[packing.Example]]:
    try:
      return decode_packed(self._source[index])
    except ValueError as e:
      raise ValueError(f"unreadable packed row at {self.location(index)}: {e}") from e

  def location(self, index: int) -> str:
    """`path:entry` of row `index`; it opens every file to count its rows, so errors only."""
    from array_record.python.array_record_module import ArrayRecordReader
    for path in self.paths:
      reader = ArrayRecordReader(path)
      n = reader.num_records()
      reader.close()
      if index < n:
        return f"{path}:{index}"
      index -= n
    raise IndexError(index)

  def __repr__(self):
    return f"PackedRows({len(self.paths)} files, {len(self)} rows of {self.seq_len})"


def count_row(row: dict[str, np.ndarray], stats: dict[str, Any]):
  """Adds one pre-packed row to the pipeline's counters (`pipeline.new_stats`), with the
  meanings they have when the pipeline packs: a row read is a record, its segments are the
  examples kept, its non-padding slots the tokens, its loss mask the scored targets."""
  segments = int(row["segment_ids"].max())
  stats["records"] += 1
  stats["examples"] += segments
  stats["kept"] += segments
  stats["tokens"] += int(np.count_nonzero(row["segment_ids"]))
  stats["scored_tokens"] += int(row["loss_mask"].sum())
  stats["rows"] += 1


class RowIterDataset(grain.IterDataset):
  """Pre-packed rows read in order from a Grain MapDataset of row dicts, and counted.

  The counterpart of `packing.PackIterDataset` for rows that need no packing: rows are read
  ahead by `read_options` threads, in order, so the output does not depend on them. The
  iterator's state is JSON, the index of the next row and the counters; restoring reads on
  from that row, so a resumed run gets exactly the rows the uninterrupted run would have.
  """

  def __init__(self, rows: grain.MapDataset, *, read_options: grain.ReadOptions | None = None,
               stats: dict[str, Any] | None = None):
    super().__init__(rows)
    self.rows = rows
    self.read_options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    self.initial_stats = packing.new_stats(records=0, examples=0) if stats is None else stats

  def __iter__(self) -> grain.DatasetIterator:
    return _RowIterator(self)

  def __str__(self):
    return "RowIterDataset"


class _RowIterator(packing.ReaderIterator):

  def __init__(self, ds: RowIterDataset):
    super().__init__()
    self._ds = ds
    self._next_index = 0
    self._counts = copy.deepcopy(ds.initial_stats)
    self._reader = None

  def __next__(self) -> dict[str, np.ndarray]:
    if self._reader is None:
      rest = self._ds.rows[self._next_index:].to_iter_dataset(self._ds.read_options)
      self._reader = iter(rest)
    row = next(self._reader)  # its StopIteration ends the rows
    self._next_index += 1
    count_row(row, self._counts)
    return row

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next_index, "stats": copy.deepcopy(self._counts)}

  def set_state(self, state: dict[str, Any]):
    self._close_reader()
    self._next_index = int(state["next_index"])
    self._counts = copy.deepcopy(state["stats"])
