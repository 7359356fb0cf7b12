"""The input pipeline: seeded order, per-process shards, exact resume in a new process, bad
records skipped and counted (or raised in strict mode), step planning, and global arrays."""

import collections
import json
import logging
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from etils import epath

from jaxdistill import sharding
from jaxdistill.data import packing, pipeline, sources

BOS, EOS, ID_BASE = 1, 2, 1000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def char_example(record):
  """Stand-in for the chat renderer: [BOS, id token, prompt chars] unscored, then the answer's
  chars and EOS scored. Raises ValueError (as a FormatError would) without a prompt."""
  if not isinstance(record.get("prompt"), str):
    raise ValueError("record has no prompt")
  prompt = [BOS, ID_BASE + record["id"]] + [3 + ord(c) % 250 for c in record["prompt"]]
  answer = [3 + ord(c) % 250 for c in record["answer"]] + [EOS]
  mask = [False] * len(prompt) + [not record.get("unscored", False)] * len(answer)
  return [(np.array(prompt + answer), np.array(mask))]


def _write_records(path, n, start=0):
  rng = np.random.default_rng(start)
  with open(path, "w") as f:
    for i in range(start, start + n):
      f.write(json.dumps({"id": i, "prompt": "q" * int(rng.integers(1, 20)),
                          "answer": "a" * int(rng.integers(1, 30))}) + "\n")
  return str(path)


def _config(path, **kw):
  defaults = dict(sources=(path,), seq_len=64, global_batch_size=1, num_epochs=1, seed=0,
                  num_threads=2, read_ahead=8, prefetch_batches=0)
  return pipeline.DataConfig(**{**defaults, **kw})


def _batches(cfg, n=None, **kw):
  it = pipeline.DataIterator(cfg, char_example, process_index=kw.pop("process_index", 0),
                             process_count=kw.pop("process_count", 1))
  out = [b for _, b in zip(range(n), it)] if n is not None else list(it)
  return out, it


def _ids(batches):
  """Record ids in row order, segment by segment."""
  ids = []
  for batch in batches:
    for inputs, segs in zip(batch["inputs"], batch["segment_ids"]):
      for s in range(1, segs.max() + 1):
        ids.append(int(inputs[np.flatnonzero(segs == s)[1]]) - ID_BASE)
  return ids


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == set(packing.ROW_KEYS)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def data(tmp_path):
  return _write_records(tmp_path / "train.jsonl", 60)


def test_seed_decides_the_order(data):
  a, it = _batches(_config(data, packing="pad"))
  b, _ = _batches(_config(data, packing="pad"))
  c, _ = _batches(_config(data, packing="pad", seed=1))
  _assert_same(a, b)
  assert sorted(_ids(a)) == sorted(_ids(c)) == list(range(60))
  assert _ids(a) != _ids(c)
  assert a[0]["inputs"].shape == (1, 64) and it.stats["rows"] == 60


def test_each_epoch_is_a_new_permutation(data):
  batches, _ = _batches(_config(data, packing="pad", num_epochs=3))
  ids = _ids(batches)
  epochs = [ids[:60], ids[60:120], ids[120:]]
  assert all(sorted(e) == list(range(60)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_process_shards_are_disjoint_and_cover_the_data(data, num_epochs):
  per_process = [_ids(_batches(_config(data, global_batch_size=3, num_epochs=num_epochs),
                               process_index=p, process_count=3)[0]) for p in range(3)]
  counts = collections.Counter(i for ids in per_process for i in ids)
  assert counts == {i: num_epochs for i in range(60)}
  if num_epochs == 1:
    assert all(not set(a) & set(b) for a in per_process for b in per_process if a is not b)
  assert all(abs(len(ids) - 20 * num_epochs) <= 2 for ids in per_process)


_RESUME = """
import json, sys
import numpy as np
from tests.test_pipeline import _config, char_example
from jaxdistill.data import pipeline
args = json.load(open(sys.argv[1]))
it = pipeline.DataIterator(_config(args["path"], **args["config"]), char_example,
                           process_index=0, process_count=1)
it.set_state(args["state"])
batches = [next(it) for _ in range(args["n"])]
np.savez(sys.argv[2], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
json.dump(it.stats, open(sys.argv[3], "w"))
it.close()
"""


def test_state_restored_in_a_new_process_gives_the_same_batches(data, tmp_path):
  kw = dict(global_batch_size=4, num_epochs=2, pack_bins=4, prefetch_batches=2)
  it = pipeline.DataIterator(_config(data, **kw), char_example, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  expected_stats = it.stats
  it.close()
  assert state["batches"] == 3 and state["packer"]["open"]  # a resume with rows still open
  args = tmp_path / "args.json"
  args.write_text(json.dumps({"path": data, "config": kw, "state": state, "n": 4}))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  subprocess.run([sys.executable, "-c", _RESUME, str(args), str(tmp_path / "out.npz"),
                  str(tmp_path / "stats.json")], cwd=ROOT, env=env, check=True, timeout=120)
  out = np.load(tmp_path / "out.npz")
  got = [{k: out[f"{i}/{k}"] for k in packing.ROW_KEYS} for i in range(4)]
  _assert_same(got, expected)
  assert json.loads((tmp_path / "stats.json").read_text()) == expected_stats


def test_state_round_trips_through_grains_orbax_handler(data, tmp_path):
  cfg = _config(data, global_batch_size=2, prefetch_batches=2)
  it = pipeline.DataIterator(cfg, char_example, process_index=0, process_count=1)
  next(it)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  resumed = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), item=pipeline.DataIterator(cfg, char_example, process_index=0,
                                                       process_count=1))
  _assert_same([next(resumed) for _ in range(3)], [next(it) for _ in range(3)])
  it.close()
  resumed.close()


def test_state_from_another_setup_is_refused(data):
  it = pipeline.DataIterator(_config(data, global_batch_size=2), char_example, process_index=0,
                             process_count=2)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  with pytest.raises(ValueError, match="saved by 2 processes and this run has 4"):
    pipeline.DataIterator(_config(data, global_batch_size=4), char_example, process_index=0,
                          process_count=4).set_state(state)
  with pytest.raises(ValueError, match="state of process 0"):
    pipeline.DataIterator(_config(data, global_batch_size=2), char_example, process_index=1,
                          process_count=2).set_state(state)
  with pytest.raises(ValueError, match="seed: 0 -> 1"):
    pipeline.DataIterator(_config(data, global_batch_size=2, seed=1), char_example,
                          process_index=0, process_count=2).set_state(state)
  # Reader threads and workers do not change the stream: a state moves between them.
  other = pipeline.DataIterator(_config(data, global_batch_size=2, num_threads=0),
                                char_example, process_index=0, process_count=2)
  other.set_state(state)
  _assert_same([next(other)], [next(it)])


def _messy_file(path):
  """21 records: 10 good, 5 unreadable, 2 format errors, 3 too long, 1 with nothing scored."""
  lines = [json.dumps({"id": i, "prompt": "q", "answer": "a" * 5}) for i in range(10)]
  lines += ['{"id": 10, "prompt": ', "[1, 2]", "7", '{"id": 11 "x"}']
  lines += [json.dumps({"id": 12, "answer": "a"}), json.dumps({"id": 13, "prompt": None})]
  lines += [json.dumps({"id": 14, "prompt": "q", "answer": "a" * 80}),  # truncatable
            json.dumps({"id": 15, "prompt": "q" * 70, "answer": "a"}),  # prompt alone too long
            json.dumps({"id": 16, "prompt": "q" * 61, "answer": "a"}),  # 65 tokens: EOS cut
            json.dumps({"id": 17, "prompt": "q", "answer": "a", "unscored": True})]
  data = "\n".join(lines).encode() + b"\n\xff\xfe{}\n"
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog, overlong):
  path = _messy_file(tmp_path / "messy.jsonl")
  cfg = _config(path, overlong=overlong, log_bad_records=3, shuffle=False)
  with caplog.at_level(logging.INFO):
    batches, it = _batches(cfg)
  stats = it.stats
  truncated = overlong == "truncate"
  assert stats["records"] == 21
  assert stats["examples"] == 14  # records the example function rendered
  assert stats["dropped"] == {
      "invalid_record": 5, "format_error": 2, "no_examples": 0, "no_scored_target": 1,
      "too_long": 0 if truncated else 3, "prompt_too_long": 1 if truncated else 0}
  assert stats["truncated"] == (2 if truncated else 0)
  assert stats["kept"] == 10 + stats["truncated"] == len(_ids(batches))
  assert sorted(_ids(batches)) == list(range(10)) + ([14, 16] if truncated else [])
  assert stats["scored_tokens"] == sum(int(b["loss_mask"].sum()) for b in batches)
  if truncated:  # record 16 keeps its whole prompt and its "a", but never a scored EOS
    segment = [(b["targets"][0], b["loss_mask"][0], b["segment_ids"][0] == s)
               for b in batches for s in range(1, 9)
               if (b["inputs"][0][b["segment_ids"][0] == s][1:2] == ID_BASE + 16).all()
               and (b["segment_ids"][0] == s).any()]
    (targets, mask, where), = segment
    assert where.sum() == 64
    np.testing.assert_array_equal(targets[where & mask], [3 + ord("a")])
    assert EOS not in targets[where]
  bad = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert bad == [f"skipping bad training record at {path}:{n}: {why}" for n, why in [
      (11, "malformed JSON: Expecting value at column 22"),
      (12, "not a JSON object (a JSON list)"),
      (13, "not a JSON object (a JSON int)")]]
  assert any("training data exhausted" in r.getMessage() and "invalid_record 5" in r.getMessage()
             for r in caplog.records)


@pytest.mark.parametrize("line,reason", [
    ('{"id": 3, ', "malformed JSON"),
    ('{"id": 3, "answer": "x"}', "ValueError: record has no prompt")])
def test_strict_mode_raises_at_the_bad_record_with_its_location(tmp_path, line, reason):
  path = tmp_path / "strict.jsonl"
  good = [json.dumps({"id": i, "prompt": "q", "answer": "a"}) for i in range(6)]
  path.write_text("\n".join(good[:3] + [line] + good[3:]) + "\n")
  it = pipeline.DataIterator(_config(str(path), strict=True, prefetch_batches=2), char_example,
                             process_index=0, process_count=1)
  with pytest.raises(pipeline.BadRecordError, match=reason) as e:
    list(it)
  assert e.value.location == f"{path}:4"
  assert f"{path}:4" in str(e.value)


def test_plan_steps_counts_the_batches_each_process_gets(data):
  cfg = _config(data, global_batch_size=4, num_epochs=2, pack_bins=3, seq_len=48,
                overlong="truncate")
  plan = pipeline.plan_steps(cfg, char_example, process_count=2)
  for p in range(2):
    batches, it = _batches(cfg, process_index=p, process_count=2)
    assert len(batches) == plan.rows_per_process[p] // 2
  assert plan.steps == min(r // 2 for r in plan.rows_per_process)


def test_worker_processes_give_the_same_batches(data):
  cfg = _config(data, global_batch_size=2, num_epochs=2)
  threads, _ = _batches(cfg)
  workers, it = _batches(_config(data, global_batch_size=2, num_epochs=2, num_workers=2))
  it.close()
  _assert_same(workers, threads)


def test_pretokenized_and_json_sources_mix(tmp_path, data):
  rng = np.random.default_rng(0)
  pre = [sources.TokenizedExample(np.r_[BOS, ID_BASE + 100 + i, rng.integers(3, 250, 10)],
                                  np.r_[np.zeros(6, bool), np.ones(6, bool)]) for i in range(20)]
  sources.write_array_record(str(tmp_path / "pre.array_record"), pre)
  cfg = _config(data, sources=(pipeline.SourceConfig(data, weight=3),
                               pipeline.SourceConfig(str(tmp_path / "pre.array_record"), weight=1)),
                mixture_size=40)
  batches, it = _batches(cfg)
  ids = _ids(batches)
  assert len(ids) == 40 and sum(i >= 100 for i in ids) == 10
  rows = [(b["inputs"][0], b["segment_ids"][0]) for b in batches]
  for inputs, segs in rows:
    for s in range(1, segs.max() + 1):
      tokens = inputs[segs == s]
      if tokens[1] >= ID_BASE + 100:
        np.testing.assert_array_equal(tokens, pre[tokens[1] - ID_BASE - 100].tokens)
  with pytest.raises(ValueError, match="every source or on none"):
    _config(data, sources=(pipeline.SourceConfig(data, weight=1), data))


def test_make_global_batch_shards_rows_over_data_axes():
  mesh = sharding.make_mesh((2, 4, 1, 1))
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 9, (8, 16)).astype(np.int32) for k in packing.ROW_KEYS}
  out = pipeline.make_global_batch(batch, mesh)
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == (8, 16)
    assert v.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    assert {s.data.shape for s in v.addressable_shards} == {(1, 16)}
    np.testing.assert_array_equal(np.asarray(v), batch[k])
  with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
    pipeline.make_global_batch({k: v[:6] for k, v in batch.items()}, mesh)


def test_a_repeating_stream_that_drops_everything_stops_with_what_to_change(data, monkeypatch):
  """Every example longer than seq_len, epochs unbounded (train.num_steps set): the packer
  stops after BARREN_LIMIT records in a row with nothing kept, saying why, rather than spin."""
  monkeypatch.setattr(packing, "BARREN_LIMIT", 150)
  with pytest.raises(ValueError, match=r"the last 150 records read gave no example to pack "
                     r"into rows of 4 tokens \(dropped so far: \{'too_long': 150\}\).*"
                     r"raise data.seq_len or set data.overlong='truncate'"):
    _batches(_config(data, seq_len=4, num_epochs=None), n=1)
  # One example that fits among them resets the count: the stream is thin, not barren.
  batches, _ = _batches(_config(data, seq_len=30, num_epochs=None), n=3)
  assert len(batches) == 3
