"""Offline preparation: the shards hold exactly what the pipeline would render, in input order
whatever the number of workers, stats count what happened, strict mode names the bad line."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdistill.data import builder, chat, formats, packed_rows, packing, pipeline, prepare, sources

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
  # The pipeline refuses the packed encoding rather than reading rows as single examples.
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
