"""Offline preparation: the shards hold exactly what the pipeline would render, in input order
whatever the number of workers, stats count what happened, strict mode names the bad line."""

import collections
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from jaxdistill.data import builder, chat, formats, packed_rows, packing, pipeline, prepare, sources
from jaxdistill import settings
from tests import data_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "jaxdistill", "assets")
TOKENIZER = os.path.join(ASSETS, "tiny_tokenizer.model")
SEQ_LEN = 512


@pytest.fixture(scope="module")
def renderer():
  return chat.ChatRenderer(chat.load_tokenizer(TOKENIZER), "chatml")


def _traces(n):
  """(question, thinking, answer) of the first n committed tiny traces."""
  out = []
  with open(os.path.join(ASSETS, "tiny_traces.jsonl")) as f:
    for line in list(f)[:n]:
      user, assistant = json.loads(line)["messages"]
      thinking, answer = assistant["content"].split("\n</think>\n\n")
      out.append((user["content"], thinking.removeprefix("<think>\n"), answer))
  return out


def _mixed_lines():
  """46 JSONL lines: 40 good records in five formats (48 conversations, one of them too long
  for SEQ_LEN), 4 bad ones, one with no verified generation and a blank line.

  Returns (lines, expected counts, the line numbers of the bad records)."""
  lines = []
  for k, (q, think, ans) in enumerate(_traces(40)):
    full = f"<think>\n{think}\n</think>\n\n{ans}"
    kind = k % 5
    if kind == 0:
      record = {"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": full}]}
    elif kind == 1:
      record = {"system": "Be careful.", "conversations": [{"from": "human", "value": q},
                                                           {"from": "gpt", "value": full}]}
    elif kind == 2:
      record = {"question": q, "deepseek_thinking_trajectory": think, "deepseek_attempt": ans}
    elif kind == 3:
      record = {"problem": q, "solution": full, "answer": "1"}
    else:  # two verified generations of three: two examples from one record
      record = {"problem": q, "generations": [full, "wrong", full + " Done."],
                "correctness_math_verify": [True, False, True]}
    if k == 8:  # a problem_solution trace far longer than SEQ_LEN
      record["solution"] = full + ("\nCheck again." + think) * 6
    lines.append(json.dumps(record))
  bad = [
      '{"messages": [{"role": "user", "content": "x"}',  # malformed JSON
      "[1, 2, 3]",  # JSON, not an object
      json.dumps({"text": "no known fields"}),  # format error: unknown schema
      json.dumps({"messages": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a <|im_end|> b"}]}),
  ]
  no_verified = json.dumps({"problem": "p", "generations": ["g"],
                            "correctness_math_verify": [False]})
  # Bad lines spread through the file; line numbers are 1-based and count the blank line.
  for at, line in [(3, bad[0]), (11, bad[1]), (12, ""), (20, bad[2]), (33, bad[3]),
                   (40, no_verified)]:
    lines.insert(at, line)
  bad_lines = [i + 1 for i, line in enumerate(lines) if line in bad]
  expected = {"records": 45, "examples": 48, "kept": 47}
  return lines, expected, bad_lines


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  lines, expected, bad_lines = _mixed_lines()
  path = tmp_path_factory.mktemp("traces") / "mixed.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path), expected, bad_lines


def _direct(path, renderer, seq_len=SEQ_LEN, overlong="drop"):
  """The kept examples of every readable record, rendered without the preparation code."""
  out = []
  for line in open(path, encoding="utf-8"):
    try:
      record = json.loads(line)
      rendered = [renderer.render(c) for c in formats.to_conversations(record)]
    except ValueError:  # malformed JSON, format and template errors
      continue
    for ex in rendered:
      fitted, _ = packing.fit_length(ex.tokens, ex.loss_mask, seq_len, overlong)
      if fitted is not None:
        out.append(fitted)
  return out


def _prepare(path, out, renderer, **kw):
  cfg = prepare.PrepareConfig(inputs=(path,), output=str(out), seq_len=SEQ_LEN, **kw)
  return prepare.prepare(cfg, renderer, progress=None)


def _read(directory, prefix="examples"):
  src = sources.open_source(str(directory))
  assert all(os.path.basename(p).startswith(prefix) for p in src.paths)
  return [src[i].record for i in range(len(src))]


def test_workers_do_not_change_shards_or_stats(mixed, renderer, tmp_path):
  path, _, _ = mixed
  # Small shards, so that several are cut, and small chunks, so that both workers render.
  one = _prepare(path, tmp_path / "one", renderer, workers=1, shard_bytes=20_000)
  two = _prepare(path, tmp_path / "two", renderer, workers=2, shard_bytes=20_000,
                 chunk_records=3)
  assert one == two and len(one["shards"]) > 1
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two"))
  assert names[0] == f"examples-00000-of-{len(one['shards']):05d}.array_record"
  for name in names:
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_stats_count_what_happened(mixed, renderer, tmp_path):
  path, expected, bad_lines = mixed
  progress = io.StringIO()
  stats = prepare.prepare(prepare.PrepareConfig(inputs=(path,), output=str(tmp_path / "p"),
                                                seq_len=SEQ_LEN, log_bad_records=3),
                          renderer, progress=progress, progress_every=0)
  direct = _direct(path, renderer)
  assert len(direct) == expected["kept"]
  for key in ("records", "examples", "kept"):
    assert stats[key] == expected[key], key
  assert stats["truncated"] == 0
  assert stats["dropped"] == {"invalid_record": 2, "format_error": 2, "no_examples": 1,
                              "no_scored_target": 0, "too_long": 1, "prompt_too_long": 0}
  assert stats["tokens"] == sum(len(t) for t, _ in direct)
  assert stats["scored_tokens"] == sum(int(m[1:].sum()) for _, m in direct)
  assert stats["bad_records"]["count"] == 4
  assert [b["location"] for b in stats["bad_records"]["first"]] == [
      f"{path}:{n}" for n in bad_lines[:3]]
  kept_hist = stats["length_histogram"]["kept"]
  assert sum(kept_hist.values()) == 47
  assert sum(stats["length_histogram"]["rendered"].values()) == 48
  for label, count in kept_hist.items():
    low, high = (int(x) for x in label.split("-"))
    assert count == sum(low <= len(t) <= high for t, _ in direct)
  assert max(int(k.split("-")[-1]) for k in stats["length_histogram"]["rendered"]) > SEQ_LEN
  assert stats["tokenizer"]["template"] == "chatml" and stats["seq_len"] == SEQ_LEN
  assert stats["tokenizer"]["path"] == os.path.abspath(TOKENIZER)
  (fingerprint,) = stats["inputs"]
  assert fingerprint["bytes"] == os.path.getsize(path) and len(fingerprint["sha256"]) == 64
  assert json.loads((tmp_path / "p" / "stats.json").read_text()) == stats
  assert "45/45 records" in progress.getvalue() and "ETA" in progress.getvalue()
  with pytest.raises(ValueError, match="already holds prepared data"):
    _prepare(path, tmp_path / "p", renderer)


def test_pipeline_reads_back_what_direct_rendering_gives(mixed, renderer, tmp_path):
  path, _, _ = mixed
  _prepare(path, tmp_path / "p", renderer, overlong="truncate", workers=2)
  got = _read(tmp_path / "p")
  want = _direct(path, renderer, overlong="truncate")
  assert len(got) == len(want) == 48
  for example, (tokens, mask) in zip(got, want):
    np.testing.assert_array_equal(example.tokens, tokens)
    np.testing.assert_array_equal(example.loss_mask, mask)
  # The pipeline over the prepared directory makes the very batches it makes from the JSONL.
  fn = builder.example_fn(renderer, "auto", formats.DEFAULT_SPEC)
  batches = {}
  for name, spec in (("jsonl", path), ("prepared", str(tmp_path / "p"))):
    cfg = pipeline.DataConfig(sources=(spec,), seq_len=SEQ_LEN, global_batch_size=2,
                              shuffle=False, overlong="truncate", num_threads=2,
                              prefetch_batches=0)
    it = pipeline.DataIterator(cfg, fn, process_index=0, process_count=1)
    batches[name], stats = list(it), it.stats
    assert stats["kept"] == 48 and stats["truncated"] == (1 if name == "jsonl" else 0)
  assert len(batches["jsonl"]) == len(batches["prepared"]) > 5
  for a, b in zip(batches["jsonl"], batches["prepared"]):
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_packed_rows_hold_every_example_once(mixed, renderer, tmp_path):
  path, _, _ = mixed
  stats = _prepare(path, tmp_path / "p", renderer, pack=True, pack_bins=4, workers=2)
  direct = _direct(path, renderer)
  rows = packed_rows.PackedRows(str(tmp_path / "p"))
  assert len(rows) == stats["rows"] == packing.count_packed_rows(
      [len(t) for t, _ in direct], SEQ_LEN, num_bins=4)
  segments = []
  for i in range(len(rows)):
    row = rows[i]
    assert row["inputs"].shape == (SEQ_LEN,)
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
      segments.append((tuple(row["inputs"][where]), tuple(row["loss_mask"][where][:-1])))
  want = [(tuple(t), tuple(m[1:])) for t, m in direct]
  assert sorted(segments) == sorted(want)
  assert stats["fill"] == pytest.approx(stats["tokens"] / (len(rows) * SEQ_LEN), abs=1e-6)
  # Read as records, packed rows are refused rather than taken for single examples (the
  # pipeline reads them through PackedRows instead).
  item = sources.open_source(str(tmp_path / "p"))[0]
  assert item.record is None and "unreadable pre-tokenised record" in item.error


def test_strict_mode_stops_at_the_first_bad_line(mixed, renderer, tmp_path):
  path, _, bad_lines = mixed
  with pytest.raises(pipeline.BadRecordError) as e:
    _prepare(path, tmp_path / "p", renderer, strict=True, workers=2, chunk_records=2)
  assert e.value.location == f"{path}:{bad_lines[0]}"
  assert f"{path}:{bad_lines[0]}" in str(e.value)
  assert os.listdir(tmp_path / "p") == []  # no half-written shards


def test_cli(mixed, tmp_path):
  path, _, bad_lines = mixed
  tool = os.path.join(ROOT, "tools", "prepare_traces.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, tool, f"--input={path}", f"--tokenizer={TOKENIZER}",
          f"--seq_len={SEQ_LEN}", "--workers=2"]
  ok = subprocess.run(args + [f"--output={tmp_path / 'ok'}"], capture_output=True, text=True,
                      env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert "kept 47" in ok.stdout and f"{path}:{bad_lines[0]}" in ok.stdout
  assert json.loads((tmp_path / "ok" / "stats.json").read_text())["kept"] == 47
  strict = subprocess.run(args + [f"--output={tmp_path / 'strict'}", "--strict"],
                          capture_output=True, text=True, env=env, timeout=120)
  assert strict.returncode == 1
  assert f"error: bad training record at {path}:{bad_lines[0]}" in strict.stderr


# -- Training from prepared directories -------------------------------------------------------

@pytest.fixture(scope="module")
def packed(mixed, renderer, tmp_path_factory):
  """A packed directory of the mixed traces: (directory, its stats)."""
  out = tmp_path_factory.mktemp("packed") / "p"
  return str(out), _prepare(mixed[0], out, renderer, pack=True, pack_bins=4)


def _no_rendering(record):
  raise AssertionError("pre-packed rows must not be rendered")


def _packed_config(directory, **kw):
  defaults = dict(sources=(directory,), seq_len=SEQ_LEN, global_batch_size=2, num_epochs=1,
                  seed=3, num_threads=2, read_ahead=4, prefetch_batches=0)
  return pipeline.DataConfig(**{**defaults, **kw})


def _iterator(cfg, process_index=0, process_count=1):
  return pipeline.DataIterator(cfg, _no_rendering, process_index=process_index,
                               process_count=process_count)


def _unbatch(batches):
  return [{k: b[k][i] for k in b} for b in batches for i in range(len(b["inputs"]))]


def _key(row):
  return tuple(row[k].tobytes() for k in packing.ROW_KEYS)


def _disk_rows(directory):
  rows = packed_rows.PackedRows(directory)
  return [rows[i] for i in range(len(rows))]


def test_training_batches_are_the_packed_rows_reshuffled_every_epoch(mixed, renderer, packed):
  directory, stats = packed
  disk = _disk_rows(directory)
  n = len(disk)
  cfg = _packed_config(directory, num_epochs=2)
  it = _iterator(cfg)
  batches = list(it)
  assert len(batches) == (2 * n) // 2 == pipeline.plan_steps(cfg, _no_rendering,
                                                             process_count=1).steps
  assert all(b[k].shape == (2, SEQ_LEN) for b in batches for k in packing.ROW_KEYS)
  assert batches[0]["loss_mask"].dtype == bool and batches[0]["segment_ids"].dtype == np.int32
  rows = _unbatch(batches)
  epochs = [[_key(r) for r in rows[:n]], [_key(r) for r in rows[n:]]]
  want = collections.Counter(map(_key, disk))
  assert collections.Counter(epochs[0]) == collections.Counter(epochs[1]) == want
  assert len({tuple(e) for e in epochs + [[_key(r) for r in disk]]}) == 3  # two new orders
  assert it.stats["rows"] == 2 * n and it.stats["kept"] == 2 * stats["kept"]
  assert it.stats["tokens"] == 2 * stats["tokens"]
  assert it.stats["scored_tokens"] == 2 * stats["scored_tokens"]
  # Masks, segments and positions arrive intact: the scored segments of an epoch are exactly
  # the examples rendered directly, each alone in its segment and scored on its own targets.
  segments = []
  for row in rows[:n]:
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      tokens = row["inputs"][where]
      np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
      np.testing.assert_array_equal(row["targets"][where][:-1], tokens[1:])
      assert not row["loss_mask"][where][-1]
      segments.append((tuple(tokens), tuple(row["loss_mask"][where][:-1])))
    assert not row["loss_mask"][row["segment_ids"] == 0].any()
  direct = _direct(mixed[0], renderer)
  assert sorted(segments) == sorted((tuple(t), tuple(m[1:])) for t, m in direct)


def test_processes_split_each_epoch_of_packed_rows(packed):
  directory, _ = packed
  cfg = _packed_config(directory, num_epochs=1)
  plan = pipeline.plan_steps(cfg, _no_rendering, process_count=2)
  per_process = []
  for p in range(2):
    rows = _unbatch(list(_iterator(cfg, p, 2)))
    assert len(rows) == plan.rows_per_process[p]
    per_process.append(collections.Counter(map(_key, rows)))
  assert per_process[0] + per_process[1] == collections.Counter(map(_key, _disk_rows(directory)))
  assert abs(plan.rows_per_process[0] - plan.rows_per_process[1]) <= 1


def test_packed_rows_resume_mid_epoch_exactly(packed):
  directory, _ = packed
  cfg = _packed_config(directory, num_epochs=2, prefetch_batches=2)
  it = _iterator(cfg)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["packer"]["next_index"] == 6 and state["config"]["prepacked"]
  rest, rest_stats = list(it), it.stats  # through the next epoch to the end
  resumed = _iterator(_packed_config(directory, num_epochs=2, num_threads=0))
  resumed.set_state(state)
  got = list(resumed)
  assert len(got) == len(rest) > len(_disk_rows(directory)) // 2
  for a, b in zip(got, rest):
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  assert resumed.stats == rest_stats
  with pytest.raises(ValueError, match="seed: 3 -> 4"):
    _iterator(_packed_config(directory, num_epochs=2, seed=4)).set_state(state)


def test_packed_rows_refuse_another_seq_len_or_a_mixture(mixed, packed):
  directory, _ = packed
  for make in (_iterator, lambda cfg: pipeline.plan_steps(cfg, _no_rendering, process_count=1)):
    with pytest.raises(ValueError, match=(rf"packed to seq_len={SEQ_LEN}, but the data config has "
                                          rf"seq_len=1024: set data.seq_len={SEQ_LEN}")):
      make(_packed_config(directory, seq_len=1024))
  with pytest.raises(ValueError, match="mix pre-packed rows"):
    _iterator(_packed_config(directory, sources=(directory, mixed[0])))
  with pytest.raises(ValueError, match="packing='pad'"):
    _iterator(_packed_config(directory, packing="pad"))


def test_a_run_config_trains_from_a_packed_directory(packed):
  directory, _ = packed
  c = base.get_config()
  c.data.sources, c.data.tokenizer, c.data.chat_template = directory, TOKENIZER, "chatml"
  c.data.seq_len, c.data.prefetch, c.train.global_batch_size = SEQ_LEN, 0, 2
  def build(c):
    s = settings.parse(c)
    return builder.build_training_data(s.data, global_batch_size=s.train.global_batch_size,
                                       num_steps=s.train.num_steps, seed=s.seed)

  data = build(c)
  assert data.num_steps == len(_disk_rows(directory)) // 2
  batch = next(data.train)
  assert batch["inputs"].shape == (2, SEQ_LEN) and batch["loss_mask"].any()
  data.train.close()
  c.data.seq_len = 1024
  with pytest.raises(ValueError, match=f"--config.data.seq_len={SEQ_LEN}"):
    build(c)


def test_prepared_data_from_another_tokenizer_is_refused(mixed, renderer, packed, tmp_path,
                                                         caplog):
  directory, _ = packed
  examples = str(tmp_path / "examples")
  _prepare(mixed[0], examples, renderer)
  for spec in (directory, examples):
    builder.check_prepared([spec, mixed[0]], renderer)  # the tokenizer that made it: fine
  # The same tokenizer file elsewhere is the same tokenizer.
  copy = shutil.copy(TOKENIZER, tmp_path / "copy.model")
  builder.check_prepared([directory], chat.ChatRenderer(chat.load_tokenizer(copy), "chatml"))
  other = chat.ChatRenderer(chat.load_tokenizer(
      data_fixtures.save_sentencepiece_model(tmp_path / "other.model")), "chatml")
  for spec in (directory, examples):
    with pytest.raises(ValueError, match="tokenizer_sha256") as e:
      builder.check_prepared([spec], other)
    assert os.path.abspath(TOKENIZER) in str(e.value) and other.tokenizer.path in str(e.value)
  last_only = chat.ChatRenderer(renderer.tokenizer, "chatml", score="last")
  with pytest.raises(ValueError, match="template_sha256"):
    builder.check_prepared([directory], last_only)
  # No record: a warning. A record from before the hashes: the rest is still checked.
  bare = tmp_path / "bare"
  shutil.copytree(directory, bare, ignore=shutil.ignore_patterns(prepare.STATS_FILE))
  with caplog.at_level(logging.WARNING):
    builder.check_prepared([str(bare)], other)
  assert any("no record of vocab_size" in r.getMessage() for r in caplog.records)
  with open(os.path.join(directory, prepare.STATS_FILE)) as f:
    stats = json.load(f)
  for key in ("tokenizer_sha256", "template_sha256"):
    del stats["tokenizer"][key]
  (bare / prepare.STATS_FILE).write_text(json.dumps(stats))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    builder.check_prepared([str(bare)], last_only)
  assert any("no record of tokenizer_sha256, template_sha256" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(ValueError, match=rf"vocab_size 384 != {other.tokenizer.vocab_size}"):
    builder.check_prepared([str(bare)], other)


# -- Datasets with their own field names, and TFDS datasets -----------------------------------

# The renamed traces' settings, as data.* keys and as the tools' flags of the same names.
RENAMED = {"fields": "question=query,thinking_trajectories=reasoning,attempt=final,"
                     "messages=dialog,role=speaker,content=text",
           "thinking_open": "<reasoning>\n", "thinking_close": "\n</reasoning>\n",
           "system_prompt": "Be brief."}


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
  """The same 8 traces twice: (canonical `messages` JSONL, JSONL in two renamed schemas that
  `RENAMED` reads; neither reads with the default settings)."""
  canonical, renamed = [], []
  for k, (q, think, ans) in enumerate(_traces(8)):
    if k % 2:  # s1K-like, the thinking in its own field and wrapped by the thinking_* keys
      renamed.append({"query": q, "reasoning": think, "final": ans, "id": k})
      reply = f"<reasoning>\n{think.strip()}\n</reasoning>\n{ans.strip()}"
    else:  # a messages list under another key, with other role/content keys
      reply = f"<think>\n{think}\n</think>\n\n{ans}"
      renamed.append({"dialog": [{"speaker": "user", "text": q},
                                 {"speaker": "assistant", "text": reply}]})
    canonical.append({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": q},
                                   {"role": "assistant", "content": reply}]})
  out = tmp_path_factory.mktemp("renamed")
  for name, records in (("canonical", canonical), ("renamed", renamed)):
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(out / "canonical.jsonl"), str(out / "renamed.jsonl")


def _examples(spec, renderer, fmt="auto", format_spec=formats.DEFAULT_SPEC):
  """(tokens, loss mask) of every record of the source `spec`, rendered."""
  src, fn = sources.open_source(spec), builder.example_fn(renderer, fmt, format_spec)
  return [(e.tokens.tolist(), e.loss_mask.tolist()) for i in range(len(src))
          for e in fn(src[i].record)]


def test_a_run_reads_renamed_fields_through_data_keys_alone(renamed):
  canonical, renamed_path = renamed
  c = base.get_config()
  c.data.tokenizer, c.data.chat_template, c.data.seq_len = TOKENIZER, "chatml", SEQ_LEN
  c.data.prefetch, c.train.global_batch_size = 0, 2
  batches = {}
  for name, path in (("canonical", canonical), ("renamed", renamed_path)):
    c.data.sources = path
    for key, value in RENAMED.items():
      c.data[key] = value if name == "renamed" else base.get_config().data[key]
    s = settings.parse(c)
    data = builder.build_training_data(s.data, global_batch_size=2, num_steps=0, seed=0)
    batches[name] = list(data.train)
    assert data.train.stats["kept"] == 8 and data.num_steps == len(batches[name])
  assert len(batches["canonical"]) == len(batches["renamed"]) >= 2
  for a, b in zip(batches["canonical"], batches["renamed"]):
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(formats.FormatError):  # the keys are what made them readable
    formats.to_conversations(json.loads(open(renamed_path).readline()))
  c.data.fields = "query=question"
  with pytest.raises(settings.ConfigError, match=r"data\.fields: unknown canonical field "
                     r"'query' \(the canonical name comes first: question=query\?\)"):
    settings.parse(c)


def test_tfds_dataset_reads_back_as_the_jsonl_it_was_written_from(mixed, renderer, tmp_path,
                                                                  monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  from jaxdistill.data import tfds_traces  # pylint: disable=g-import-not-at-top
  path, _, bad_lines = mixed
  out = tfds_traces.write_dataset([path], str(tmp_path), "mixed_traces", keep_bad=2)
  # 49 conversations from 45 records: the JSONL's 48 examples and the reply holding an
  # <|im_end|>, which only rendering refuses (as it does for the JSONL).
  assert out["records"] == 45 and out["conversations"] == 49 and out["no_conversations"] == 1
  assert out["bad_records"]["count"] == 3
  assert [b["location"] for b in out["bad_records"]["first"]] == [
      f"{path}:{n}" for n in bad_lines[:2]]
  assert out["source"] == "tfds:mixed_traces@train"
  assert os.path.exists(os.path.join(out["path"], "dataset_info.json"))
  with pytest.raises(ValueError, match="already holds a dataset"):
    tfds_traces.write_dataset([path], str(tmp_path), "mixed_traces")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  first = sources.open_source(out["source"])[0]
  assert first.location == "tfds:mixed_traces@train:0"
  assert first.record == {"messages": formats.to_conversations(
      json.loads(open(path).readline()))[0]}
  # The pipeline makes the very batches from the TFDS dataset that it makes from the JSONL
  # (unshuffled: 49 conversations do not shuffle as 45 records do).
  fn = builder.example_fn(renderer, "auto", formats.DEFAULT_SPEC)
  batches = {}
  for spec in (path, out["source"]):
    cfg = pipeline.DataConfig(sources=(pipeline.SourceConfig(spec),), seq_len=SEQ_LEN,
                              global_batch_size=2, shuffle=False, num_threads=2,
                              prefetch_batches=0)
    it = pipeline.DataIterator(cfg, fn, process_index=0, process_count=1)
    batches[spec] = list(it)
    assert it.stats["kept"] == 47
  assert len(batches[path]) == len(batches[out["source"]]) > 5
  for a, b in zip(batches[path], batches[out["source"]]):
    for k in packing.ROW_KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_cli_flags_read_renamed_fields_into_a_tfds_dataset(renamed, renderer, tmp_path,
                                                           monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  canonical, renamed_path = renamed
  tool = os.path.join(ROOT, "tools", "prepare_traces.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  flags = [f"--{k}={v}" for k, v in RENAMED.items()]
  run = subprocess.run([sys.executable, tool, f"--input={renamed_path}", *flags,
                        "--tfds_name=renamed", f"--tfds_dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "records 8: 8 conversations" in run.stdout
  assert f"TFDS_DATA_DIR={tmp_path} --config.data.sources=tfds:renamed@train" in run.stdout
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  want = _examples(canonical, renderer)
  assert len(want) == 8 and _examples("tfds:renamed@train", renderer) == want
  # The same settings, read from flags or from data.* keys, are the same FormatSpec.
  spec = formats.parse_spec(**RENAMED, s1k_variant="auto")
  assert _examples(renamed_path, renderer, format_spec=spec) == want
