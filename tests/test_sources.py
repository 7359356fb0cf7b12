"""Record sources: random access returns the right record, bad records carry their location,
globs and directories, Parquet and ArrayRecord round trips, and mixtures draw what they say."""

import collections
import json
import pickle

import numpy as np
import pytest

from jaxdistill.data import sources


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_jsonl_random_access_returns_the_right_record(tmp_path):
  path = str(tmp_path / "a.jsonl")
  _write_jsonl(path, [{"id": i, "text": "é" * i} for i in range(300)])
  src = sources.JsonlSource(path)
  assert len(src) == 300
  for i in np.random.default_rng(0).permutation(300):
    item = src[int(i)]
    assert item.error is None
    assert item.record == {"id": i, "text": "é" * i}
    assert item.location == f"{path}:{i + 1}"
  # Worker processes get the source pickled: it must still read after the round trip.
  assert pickle.loads(pickle.dumps(src))[7].record["id"] == 7


def test_jsonl_bad_lines_are_items_with_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"id": 0}\r\n'  # CRLF
                   b'\r\n'  # blank (CRLF): skipped, not a record
                   b'{"id": 1, \n'  # malformed JSON
                   b'\xff\xfe{"id": 2}\n'  # invalid UTF-8
                   b'[1, 2]\n'  # JSON, not an object
                   b'\n'
                   b'"text"\n'
                   b'{"id": 3}')  # last line without a newline
  src = sources.JsonlSource(str(path))
  items = [src[i] for i in range(len(src))]
  assert [it.location for it in items] == [f"{path}:{n}" for n in (1, 3, 4, 5, 7, 8)]
  assert [it.record for it in items] == [{"id": 0}, None, None, None, None, {"id": 3}]
  assert items[1].error.startswith("malformed JSON")
  assert items[2].error.startswith("invalid UTF-8")
  assert items[3].error == "not a JSON object (a JSON list)"
  assert items[4].error == "not a JSON object (a JSON str)"


def test_jsonl_glob_and_directory(tmp_path):
  _write_jsonl(tmp_path / "b.jsonl", [{"f": "b", "i": i} for i in range(3)])
  _write_jsonl(tmp_path / "a.jsonl", [{"f": "a", "i": i} for i in range(2)])
  (tmp_path / "notes.txt").write_text("not data\n")
  expected = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
  for spec in (str(tmp_path), str(tmp_path / "*.jsonl")):
    src = sources.open_source(spec)
    assert isinstance(src, sources.JsonlSource)
    assert [(src[i].record["f"], src[i].record["i"]) for i in range(len(src))] == expected
    assert src[3].location == f"{tmp_path / 'b.jsonl'}:2"
  with pytest.raises(FileNotFoundError, match="no .jsonl files"):
    sources.open_source(str(tmp_path / "*-missing.jsonl"))


def test_parquet_round_trip_by_row_group(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(50)]
  pq.write_table(pa.Table.from_pylist(rows[:30]), tmp_path / "p0.parquet", row_group_size=7)
  pq.write_table(pa.Table.from_pylist(rows[30:]), tmp_path / "p1.parquet", row_group_size=7)
  src = sources.open_source(str(tmp_path / "*.parquet"))
  assert isinstance(src, sources.ParquetSource) and len(src) == 50
  src = pickle.loads(pickle.dumps(src))
  for i in np.random.default_rng(1).permutation(50):
    item = src[int(i)]
    assert item.record == rows[i]
    f, row = ("p0", i) if i < 30 else ("p1", i - 30)
    assert item.location == f"{tmp_path / f}.parquet:{row}"
  assert len(src._cache) <= 4  # the row-group cache stays small


def test_array_record_round_trip_json_and_pretokenized(tmp_path):
  rng = np.random.default_rng(0)
  tokenized = [sources.TokenizedExample(rng.integers(0, 1 << 20, n).astype(np.int32),
                                        rng.random(n) < 0.5) for n in (1, 5, 300)]
  records = [{"id": 0, "text": "ü"}, tokenized[0], {"id": 1}, tokenized[1], tokenized[2]]
  path = str(tmp_path / "d.array_record")
  assert sources.write_array_record(path, records) == 5
  from array_record.python.array_record_module import ArrayRecordWriter
  bad = ArrayRecordWriter(str(tmp_path / "e.array_record"), "group_size:1")
  bad.write(b"\x81\xa1x\x01")  # a msgpack map, but not our schema
  bad.write(b"{not json")
  bad.close()
  src = sources.open_source(str(tmp_path))
  assert isinstance(src, sources.ArrayRecordSource) and len(src) == 7
  for i, expected in enumerate(records):
    item = src[i]
    assert item.location == f"{path}:{i}"
    if isinstance(expected, dict):
      assert item.record == expected
    else:
      np.testing.assert_array_equal(item.record.tokens, expected.tokens)
      np.testing.assert_array_equal(item.record.loss_mask, expected.loss_mask)
      assert item.record.tokens.dtype == np.int32 and item.record.loss_mask.dtype == bool
  assert src[5].location == f"{tmp_path / 'e.array_record'}:0"
  assert src[5].error.startswith("unreadable pre-tokenised record")
  assert src[6].error.startswith("malformed JSON")


def test_open_source_rejects_what_it_cannot_read(tmp_path):
  (tmp_path / "x.json").write_text("[]")
  with pytest.raises(ValueError, match="convert it to JSON Lines"):
    sources.open_source(str(tmp_path / "x.json"))
  _write_jsonl(tmp_path / "a.jsonl", [{}])
  sources.write_array_record(str(tmp_path / "a.array_record"), [{}])
  with pytest.raises(ValueError, match="exactly one kind"):
    sources.open_source(str(tmp_path))


def test_tfds_source_is_optional(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'jaxdistill\[tfds\]'"):
    sources.open_source("tfds:s1k@train")


def test_tfds_records_decode_to_json_like_values(monkeypatch):
  # What a real dataset reads back as is in tests/test_prepare.py (the tfds extra); this
  # stand-in returns what `tfds.data_source` can, plus an invalid UTF-8 string, which a
  # dataset written through TFDS cannot hold.
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  records = [
      {"question": "What is 2+2?".encode(), "thinking_trajectories": np.array([b"<t>4</t>"]),
       "attempt": "\\boxed{4}".encode(), "cot_type": b"math", "metadata": np.int64(7)},
      {"question": b"\xff\xfe broken", "thinking_trajectories": np.array([b"x"]),
       "attempt": b"y", "cot_type": b"math", "metadata": np.int64(8)},
  ]
  calls = []
  fake = types.ModuleType("tensorflow_datasets")
  fake.data_source = lambda name, split, data_dir: calls.append((name, split, data_dir)) or records
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src = sources.open_source("tfds:s1k@test")
  assert calls == [("s1k", "test", None)] and len(src) == 2
  first = src[0]
  assert first.record == {"question": "What is 2+2?", "thinking_trajectories": ["<t>4</t>"],
                          "attempt": "\\boxed{4}", "cot_type": "math", "metadata": 7}
  assert first.location == "tfds:s1k@test:0"
  bad = src[1]
  assert bad.record is None and "invalid UTF-8" in bad.error and bad.location.endswith(":1")


class _Ids:
  """A source of n records (tag, index)."""

  def __init__(self, tag, n):
    self.tag, self.n = tag, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.tag, i


def test_mixture_epochs_draw_every_record_the_given_number_of_times():
  a, b = _Ids("a", 10), _Ids("b", 4)
  ds = sources.mix_sources([a, b], epochs=[1, 2], seed=3)
  assert len(ds) == 18
  for epoch in range(3):
    drawn = collections.Counter(ds[epoch * 18 + k] for k in range(18))
    expected = [("a", i) for i in range(10)] + [("b", i) for i in range(4)] * 2
    assert drawn == collections.Counter(expected)
  # Evenly interleaved: b's 8 draws are spread through the epoch, not bunched.
  positions = [k for k in range(18) if ds[k][0] == "b"]
  assert max(np.diff(positions)) <= 3


def test_mixture_weights_give_proportions_and_walk_through_big_sources():
  big, small = _Ids("big", 100), _Ids("small", 5)
  ds = sources.mix_sources([big, small], weights=[3, 1], size=20, seed=0)
  assert len(ds) == 20
  seen = set()
  for epoch in range(5):
    tags = [ds[epoch * 20 + k] for k in range(20)]
    assert collections.Counter(t for t, _ in tags) == {"big": 15, "small": 5}
    seen.update(i for t, i in tags if t == "big")
  # 15 of 100 per mixture epoch, and a new 15 each epoch rather than the same subset again.
  assert len(seen) == 75
  unshuffled = sources.mix_sources([big, small], weights=[3, 1], size=20, shuffle=False)
  assert [i for t, i in (unshuffled[k] for k in range(20)) if t == "big"] == list(range(15))


def test_mixture_rejects_inconsistent_requests():
  with pytest.raises(ValueError, match="not both"):
    sources.mix_sources([_Ids("a", 3)], weights=[1], epochs=[1])
  with pytest.raises(ValueError, match="no records"):
    sources.mix_sources([_Ids("a", 300), _Ids("b", 3)], weights=[1000, 1], size=10)
