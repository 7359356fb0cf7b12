"""Pre-packed rows on disk: the `jaxdistill.packed.v1` ArrayRecord entry and a Grain source of them.

An entry is a msgpack map {"format", "seq_len", "tokens" (int32, the row's examples back to
back, no padding), "loss_mask" (uint8), "lengths" (int32 per example)}; decoding gives the
row dict of packing.py (`write_row`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import msgpack
import numpy as np

from jaxdistill.data import packing, sources

PACKED_FORMAT = "jaxdistill.packed.v1"


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


class PackedRows:
  """The packed rows of a prepared directory as a Grain random-access source of row dicts.

  E.g. `grain.MapDataset.source(PackedRows(d)).shuffle(seed).repeat(n).batch(b)`.
  """

  def __init__(self, directory: str):
    self.paths = sources.expand_paths(os.path.join(directory, "rows-*.array_record"),
                                      ".array_record")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return decode_packed_row(self._source[index])

  def __repr__(self):
    return f"PackedRows({len(self.paths)} files, {len(self)} rows)"
