"""Random-access record sources (JSONL, Parquet, ArrayRecord, TFDS) and their weighted mixtures.

Every source is a Grain `RandomAccessDataSource`: `len(src)` and `src[i] -> Item`, so Grain can
shuffle globally and read in parallel threads or processes (sources pickle without their open
file handles). An `Item` is a raw record with the place it came from:

  JSONL        `path:line`  1-based line number, as an editor shows it
  Parquet      `path:row`   0-based row within the file
  ArrayRecord  `path:index` 0-based record within the file
  TFDS         `tfds:name@split:index`

A record that cannot be read (malformed JSON, invalid UTF-8, a JSON value that is not an object,
an undecodable ArrayRecord entry) is not an exception: the item carries `record=None` and an
`error` string, so one bad line in a 100k-line file costs one record, reported with its location.

Any path may be a gs:// URL (`jaxdistill.storage`), except ArrayRecord files, whose C++ reader
opens local files only (`REMOTE_ARRAY_RECORD` says what to do instead).

ArrayRecord entries are either UTF-8 JSON objects or pre-tokenised examples, stored as msgpack
maps `{"format": "jaxdistill.tokens.v1", "tokens": <int32 little-endian bytes>,
"loss_mask": <uint8 bytes, 0/1>}` (`encode_tokenized` / `decode_tokenized`); a pre-tokenised
entry comes back as a `TokenizedExample`, which the pipeline packs without rendering.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import msgpack
import numpy as np

from jaxdistill import storage

TOKENIZED_FORMAT = "jaxdistill.tokens.v1"
_EXTENSIONS = {".jsonl": "jsonl", ".parquet": "parquet", ".array_record": "array_record"}


class Item(NamedTuple):
  """One record: the decoded record (None when unreadable), its location, and why not."""
  record: dict[str, Any] | TokenizedExample | None
  location: str
  error: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """A pre-tokenised example: tokens int32[n] and loss_mask bool[n] (True = token is scored)."""
  tokens: np.ndarray
  loss_mask: np.ndarray


def encode_tokenized(tokens, loss_mask) -> bytes:
  """Serialises one pre-tokenised example in the `jaxdistill.tokens.v1` schema."""
  tokens = np.asarray(tokens, dtype="<i4")
  loss_mask = np.asarray(loss_mask, dtype=bool)
  if tokens.ndim != 1 or tokens.shape != loss_mask.shape:
    raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal 1-D")
  return msgpack.packb({"format": TOKENIZED_FORMAT, "tokens": tokens.tobytes(),
                        "loss_mask": loss_mask.astype(np.uint8).tobytes()})


def decode_tokenized(data: bytes) -> TokenizedExample:
  """Inverse of `encode_tokenized`; raises ValueError on anything else."""
  try:
    obj = msgpack.unpackb(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f"not a msgpack map ({type(e).__name__})") from e
  if not isinstance(obj, dict) or obj.get("format") != TOKENIZED_FORMAT:
    raise ValueError(f"not a {TOKENIZED_FORMAT} record")
  tokens = np.frombuffer(obj["tokens"], dtype="<i4").astype(np.int32)
  mask = np.frombuffer(obj["loss_mask"], dtype=np.uint8).astype(bool)
  if tokens.shape != mask.shape:
    raise ValueError(f"{len(tokens)} tokens but {len(mask)} loss-mask entries")
  return TokenizedExample(tokens, mask)


def decode_json(data: bytes, location: str) -> Item:
  """A JSON-object record from raw bytes, or an error item saying what is wrong with it."""
  try:
    text = data.decode("utf-8-sig")  # -sig: a BOM on a file's first line is not an error
  except UnicodeDecodeError as e:
    return Item(None, location, f"invalid UTF-8 at byte {e.start}")
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    return Item(None, location, f"malformed JSON: {e.msg} at column {e.colno}")
  if not isinstance(obj, dict):
    return Item(None, location, f"not a JSON object (a JSON {type(obj).__name__})")
  return Item(obj, location)


REMOTE_ARRAY_RECORD = (
    "ArrayRecord files are read by a C++ reader that opens local files only, so gs:// "
    "ArrayRecord sources are refused: copy the directory to local disk (gcloud storage cp -r "
    "URL DIR) or mount the bucket (gcsfuse), and give that path")


def expand_paths(spec: str, extension: str) -> list[str]:
  """A file, a glob or a directory (every `*<extension>` inside it) -> sorted file list.
  Local or gs://; gs:// ArrayRecord files are refused (`REMOTE_ARRAY_RECORD`)."""
  if storage.isdir(spec):
    paths = storage.glob(storage.join(spec, "*" + extension))
  elif storage.has_magic(spec):
    paths = [p for p in storage.glob(spec) if storage.isfile(p)]
  else:
    paths = [spec] if storage.isfile(spec) else []
  if not paths:
    raise FileNotFoundError(f"no {extension} files match {spec!r}")
  if storage.is_url(spec) and any(p.endswith(".array_record") for p in paths):
    raise ValueError(f"{spec}: {REMOTE_ARRAY_RECORD}")
  return paths


class JsonlSource:
  """JSON Lines files read line by line at random: a newline index is built once, lines are
  read by offset (`os.pread`, safe from many threads) when asked for. Empty lines are skipped
  and do not count as records.

  A gs:// file is read from a local copy (`storage.local_copy`, once per host and version of
  the object): building the index reads every byte anyway, so the copy costs no more
  transfer, and the shuffled reads then stay local instead of one request per record.
  Locations name the URL.
  """

  def __init__(self, spec: str):
    self.paths = expand_paths(spec, ".jsonl")
    self._local = [storage.local_copy(p) for p in self.paths]
    files, starts, ends, lines = [], [], [], []
    for i, path in enumerate(self._local):
      s, e = _line_spans(path)
      keep = e > s
      files.append(np.full(int(keep.sum()), i, np.int32))
      starts.append(s[keep])
      ends.append(e[keep])
      lines.append(np.flatnonzero(keep) + 1)
    self._file = np.concatenate(files)
    self._start = np.concatenate(starts)
    self._end = np.concatenate(ends)
    self._line = np.concatenate(lines)
    self._files: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self._start)

  def __getitem__(self, index: int) -> Item:
    f, start = int(self._file[index]), int(self._start[index])
    data = os.pread(self._fd(f), int(self._end[index]) - start, start)
    return decode_json(data, f"{self.paths[f]}:{self._line[index]}")

  def _fd(self, f: int) -> int:
    # File objects rather than raw descriptors so they close when the source is collected;
    # two threads racing here each open one, and the loser's is collected.
    file = self._files.get(f) or self._files.setdefault(f, open(self._local[f], "rb"))
    return file.fileno()

  def __getstate__(self):
    return {**self.__dict__, "_files": {}}

  def __repr__(self):
    return f"JsonlSource({len(self.paths)} files, {len(self)} records)"


def _line_spans(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
  """Byte [start, end) of every line, without its LF (or CRLF), scanning the file in chunks."""
  newlines, before, size, last = [], [], 0, 0
  with open(path, "rb") as f:
    while block := f.read(chunk):
      b = np.frombuffer(block, np.uint8)
      nl = np.flatnonzero(b == 10)
      newlines.append(nl + size)
      before.append(np.where(nl > 0, b[nl - 1], last))  # the byte before each LF
      last, size = b[-1], size + len(b)
  nl = np.concatenate(newlines or [np.zeros(0, np.int64)])
  cr = np.concatenate(before or [np.zeros(0, np.uint8)]) == 13
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl - cr, [size]]).astype(np.int64)
  return starts, ends


class ParquetSource:
  """Parquet files read one row group at a time, the last few kept (a small LRU), so rows of
  the same group read close together cost one read. Global shuffles over very large row groups
  re-read a group per record: convert such files to ArrayRecord first. A gs:// file is read
  in place through ranged reads (a row group is one large read, unlike a JSONL line)."""

  def __init__(self, spec: str, cache_row_groups: int = 4):
    import pyarrow.parquet as pq  # optional: only Parquet users need pyarrow
    self.paths = expand_paths(spec, ".parquet")
    self._groups = []  # (file index, row group, first row of the group within its file)
    counts = []
    for f, path in enumerate(self.paths):
      if storage.is_url(path):
        with storage.open(path, "rb") as file:
          meta = pq.read_metadata(file)
      else:
        meta = pq.read_metadata(path)
      first = 0
      for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n:
          self._groups.append((f, g, first))
          counts.append(n)
        first += n
    self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    self._cache_size = cache_row_groups
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._files: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> Item:
    k = int(np.searchsorted(self._starts, index, side="right")) - 1
    f, _, first = self._groups[k]
    row = index - int(self._starts[k])
    record = self._row_group(k).slice(row, 1).to_pylist()[0]
    return Item(record, f"{self.paths[f]}:{first + row}")

  def _row_group(self, k: int):
    # pyarrow file readers are not documented as thread-safe: reads go one at a time.
    with self._lock:
      table = self._cache.get(k)
      if table is not None:
        self._cache.move_to_end(k)
        return table
      f, g, _ = self._groups[k]
      if f not in self._files:
        self._files[f] = _parquet_file(self.paths[f])
      table = self._files[f].read_row_group(g)
      self._cache[k] = table
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
      return table

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_cache", "_files", "_lock"):
      del state[k]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __repr__(self):
    return f"ParquetSource({len(self.paths)} files, {len(self)} records)"


def _parquet_file(path: str):
  """A pyarrow ParquetFile: by path locally, over a storage file object (ranged reads) on
  gs://."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  return pq.ParquetFile(storage.open(path, "rb") if storage.is_url(path) else path)


class ArrayRecordSource:
  """ArrayRecord files through Grain's reader; entries are JSON objects or pre-tokenised."""

  def __init__(self, spec: str):
    from array_record.python.array_record_module import ArrayRecordReader
    self.paths = expand_paths(spec, ".array_record")
    counts = []
    for path in self.paths:
      reader = ArrayRecordReader(path)
      counts.append(reader.num_records())
      reader.close()
    self._starts = list(np.cumsum([0] + counts))
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Item:
    f = bisect.bisect_right(self._starts, index) - 1
    location = f"{self.paths[f]}:{index - self._starts[f]}"
    data = self._source[index]
    if data and (data[0] in (0xde, 0xdf) or 0x80 <= data[0] <= 0x8f):  # msgpack map headers
      try:
        return Item(decode_tokenized(data), location)
      except ValueError as e:
        return Item(None, location, f"unreadable pre-tokenised record: {e}")
    return decode_json(data, location)

  def __repr__(self):
    return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


def write_array_record(path: str, records) -> int:
  """Writes dicts (as JSON) or `TokenizedExample`s to one ArrayRecord file; returns the count.

  `group_size:1` so every record is one random read, as Grain's reader recommends.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  n = 0
  try:
    for r in records:
      if isinstance(r, TokenizedExample):
        writer.write(encode_tokenized(r.tokens, r.loss_mask))
      else:
        writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
      n += 1
  finally:
    writer.close()
  return n


class TfdsSource:
  """A TFDS dataset through `tfds.data_source` (ArrayRecord-backed, random access; no
  TensorFlow needed). Byte strings are decoded as UTF-8 and sequences of dicts (which TFDS
  reads as dicts of lists) regrouped, so records look like the JSON ones:
  `tfds_traces.write_dataset`'s `messages` read back as `[{role, content}, ...]`.

  `data_dir` defaults to $TFDS_DATA_DIR as set when the source opens, else TFDS's default.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError(f"reading 'tfds:{name}' needs TensorFlow Datasets: "
                        "pip install 'jaxdistill[tfds]'") from e
    self.name, self.split = name, split
    self._source = tfds.data_source(name, split=split,
                                    data_dir=data_dir or os.environ.get("TFDS_DATA_DIR"))
    info = getattr(self._source, "dataset_info", None)
    self._layout = _layout(info.features) if info is not None else None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Item:
    location = f"tfds:{self.name}@{self.split}:{index}"
    try:
      return Item(_plain(self._source[index], self._layout), location)
    except UnicodeDecodeError as e:
      return Item(None, location, f"invalid UTF-8 in a string feature at byte {e.start}")

  def __repr__(self):
    return f"TfdsSource({self.name}@{self.split}, {len(self)} records)"


def _layout(feature):
  """Where a TFDS feature holds sequences of dicts: None (nowhere), ("rows", layout of the
  dict) for such a sequence, or {key: layout} for a dict with one inside."""
  inner = getattr(feature, "feature", None)  # tfds.features.Sequence
  if inner is not None and hasattr(inner, "keys"):
    return ("rows", _layout(inner))
  if hasattr(feature, "keys"):  # tfds.features.FeaturesDict
    inside = {k: _layout(feature[k]) for k in feature.keys()}
    return {k: v for k, v in inside.items() if v is not None} or None
  return None


def _plain(x, layout=None):
  """TFDS features -> JSON-like Python values (bytes -> str, arrays -> lists, and the
  sequences of dicts that `layout` marks from a dict of lists back to a list of dicts)."""
  if isinstance(layout, tuple) and isinstance(x, dict):
    rows = zip(*x.values())
    return [_plain(dict(zip(x, row)), layout[1]) for row in rows]
  if isinstance(x, dict):
    return {k: _plain(v, (layout or {}).get(k)) for k, v in x.items()}
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [_plain(v) for v in x] if x.ndim else _plain(x.item())
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def open_source(spec: str):
  """A record source for `spec`, chosen by its form.

  `tfds:NAME[@SPLIT]` (split defaults to train; data_dir from TFDS_DATA_DIR), or a file, glob
  or directory of `.jsonl`, `.parquet` or `.array_record` files (a directory must hold exactly
  one of these kinds).
  """
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition("@")
    return TfdsSource(name, split or "train")
  return {"jsonl": JsonlSource, "parquet": ParquetSource,
          "array_record": ArrayRecordSource}[source_kind(spec)](spec)


def source_kind(spec: str) -> str:
  """"jsonl", "parquet" or "array_record": what a file, glob or directory spec holds."""
  if storage.isdir(spec):
    kinds = {_EXTENSIONS[e] for e in _EXTENSIONS
             if storage.glob(storage.join(spec, "*" + e))}
    if len(kinds) != 1:
      raise ValueError(f"directory {spec!r} must hold exactly one kind of "
                       f"{sorted(set(_EXTENSIONS))} files, found {sorted(kinds) or 'none'}")
    return kinds.pop()
  ext = os.path.splitext(spec)[1].lower()
  if ext not in _EXTENSIONS:
    hint = " (a .json array: convert it to JSON Lines)" if ext == ".json" else ""
    raise ValueError(f"unsupported data source {spec!r}{hint}; expected "
                     f"{sorted(_EXTENSIONS)} files, a directory of them, or tfds:NAME[@SPLIT]")
  return _EXTENSIONS[ext]


def source_files(spec: str) -> list[str]:
  """The files a file, glob or directory spec names (none for tfds:); raises when there are
  none, or when they cannot be read from where they are (gs:// ArrayRecord)."""
  if spec.startswith("tfds:"):
    return []
  return expand_paths(spec, "." + source_kind(spec))


# -- Mixtures ---------------------------------------------------------------------------------

def derive_seed(seed: int, *tags: int) -> int:
  """A 32-bit seed for one use of `seed` (a source's shuffle, the global shuffle), so that
  different uses never share a permutation."""
  return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


class _Interleave(grain.transforms.DatasetSelectionMap):
  """Mixture epoch e takes counts[i] records from source i, spread evenly through the epoch.

  Source i's index keeps counting across mixture epochs (e * counts[i] + j), so a source drawn
  at less (or more) than one pass per mixture epoch walks on through its own reshuffled passes
  rather than repeating one subset.
  """

  def __init__(self, counts: Sequence[int]):
    self.counts = np.asarray(counts, np.int64)
    # The j-th draw of source i sits at (j + 1/2) / counts[i] of the way through the epoch.
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
    order = np.argsort(keys, kind="stable")
    self._source = np.repeat(np.arange(len(counts)), counts)[order].astype(np.int32)
    self._index = np.concatenate([np.arange(n) for n in counts])[order]

  def __len__(self) -> int:
    return int(self.counts.sum())

  def __getitem__(self, index: int) -> tuple[int, int]:
    epoch, j = divmod(int(index), len(self))
    i = int(self._source[j])
    return i, epoch * int(self.counts[i]) + int(self._index[j])


def mixture_counts(lengths: Sequence[int], *, weights: Sequence[float] | None = None,
                   epochs: Sequence[float] | None = None, size: int | None = None) -> list[int]:
  """Records drawn from each source per mixture epoch.

  weights: sampling proportions; the epoch holds `size` records (default: as many as all
    sources hold together), round(w_i / sum(w) * size) of them from source i.
  epochs: passes over each source per mixture epoch (0.5 = a half, 2 = every record twice).
  Neither: every record once.
  """
  if weights is not None and epochs is not None:
    raise ValueError("give a mixture either weights (proportions) or per-source epochs, not both")
  if weights is not None:
    if len(weights) != len(lengths) or min(weights) <= 0:
      raise ValueError(f"weights {list(weights)} must be positive, one per source "
                       f"({len(lengths)} sources)")
    size = sum(lengths) if size is None else size
    counts = [round(w / sum(weights) * size) for w in weights]
  else:
    epochs = [1.0] * len(lengths) if epochs is None else epochs
    if len(epochs) != len(lengths) or min(epochs) <= 0:
      raise ValueError(f"epochs {list(epochs)} must be positive, one per source "
                       f"({len(lengths)} sources)")
    counts = [round(e * n) for e, n in zip(epochs, lengths)]
  empty = [i for i, (c, n) in enumerate(zip(counts, lengths)) if c == 0 or n == 0]
  if empty:
    raise ValueError(f"sources {empty} would contribute no records (lengths {list(lengths)}, "
                     f"draws {counts}); raise their weight/epochs or remove them")
  return counts


def mix_sources(sources: Sequence, *, weights: Sequence[float] | None = None,
                epochs: Sequence[float] | None = None, size: int | None = None,
                shuffle: bool = True, seed: int = 0) -> grain.MapDataset:
  """One Grain MapDataset over several sources; one pass over it is one mixture epoch.

  See `mixture_counts` for `weights`, `epochs` and `size`. With `shuffle`, the records drawn
  from a source follow a seeded permutation of it, a new one for each pass through it (Grain's
  `shuffle` reseeds per pass); otherwise file order. The mixture itself is interleaved evenly,
  not shuffled: the pipeline shuffles it globally per epoch.
  """
  counts = mixture_counts([len(s) for s in sources], weights=weights, epochs=epochs, size=size)
  parts = []
  for i, src in enumerate(sources):
    ds = grain.MapDataset.source(src)
    parts.append(ds.shuffle(derive_seed(seed, 1, i)) if shuffle else ds)
  return grain.MapDataset.select_from_datasets(parts, _Interleave(counts))
