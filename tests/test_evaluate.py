"""Evaluation end to end on a tiny model: files, summary, and resume after an interruption."""

import json
import os

import pytest
from ml_collections import config_flags

from jaxdistill import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**eval_overrides):
  c = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      os.path.join(ROOT, "configs", "tiny.py"))
  c.mode = "eval"
  c.mesh.shape = (1, -1, 1, 1)  # parameters sharded over the 8 test devices
  c.eval.tasks = "aime24,math500"
  c.eval.limit = 3
  c.eval.num_samples = 2
  c.eval.max_new_tokens = 24
  c.eval.batch_size = 2
  for k, v in eval_overrides.items():
    c.eval[k] = v
  return c


def test_eval_writes_reports_and_resumes_to_the_same_summary(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  c = _config()
  full = main_lib.run(c, str(tmp_path / "full"))
  assert set(full) == {"aime24", "math500"}
  for task in full:
    task_dir = tmp_path / "full" / "eval" / task
    summary = json.loads((task_dir / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["samples"] == 6
    assert summary["greedy_problems"] == 3 and 0 <= summary["accuracy"] <= 1
    assert summary["model"]["compute_dtype"] == "float32"
    assert summary["sampling"]["temperature"] == 0.6 and summary["sampling"]["stop_ids"]
    assert (task_dir / "budget.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (task_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["response"]) == 2 for r in rows)
  report = (tmp_path / "full" / "eval" / "report.md").read_text()
  assert "| aime24 | 3 | 2 |" in report and "| math500 | 3 | 2 |" in report
  # Interrupted after one batch and part of the next, then run again.
  part = tmp_path / "part" / "eval" / "aime24"
  part.mkdir(parents=True)
  lines = (tmp_path / "full" / "eval" / "aime24" / "generations.jsonl").read_text()
  cut = lines.splitlines(keepends=True)
  (part / "generations.jsonl").write_text("".join(cut[:2]) + cut[2][:30])
  record = "generations.jsonl.provenance.json"
  (part / record).write_bytes((tmp_path / "full" / "eval" / "aime24" / record).read_bytes())
  again = main_lib.run(c, str(tmp_path / "part"))
  for task in full:
    assert again[task]["accuracy"] == full[task]["accuracy"]
    a = json.loads((tmp_path / "part" / "eval" / task / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "eval" / task / "summary.json").read_text())
    assert a == b
  assert (part / "generations.jsonl").read_text() == lines
  # Finished: a rerun samples nothing and reports the same summaries.
  stamp = (part / "generations.jsonl").stat().st_mtime_ns
  assert main_lib.run(c, str(tmp_path / "part")) == again
  assert (part / "generations.jsonl").stat().st_mtime_ns == stamp
  # Other sampling settings over these outputs are refused, naming the difference.
  with pytest.raises(ValueError, match=r"sampled with other settings.*temperature: 0\.6 -> 0\.7"):
    main_lib.run(_config(temperature=0.7), str(tmp_path / "part"))


def test_unknown_task_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(ValueError, match=r"unknown evaluation task\(s\) \['aime23'\]"):
    main_lib.run(_config(tasks="aime23"), str(tmp_path))


def test_eval_at_thinking_budgets_reports_accuracy_against_them(tmp_path, monkeypatch):
  """eval.max_thinking_tokens forces the main samples; each of eval.thinking_budgets samples
  the task again, forced at that budget: no sample thinks longer, each forced one holds the
  delimiter and the cue once (the random tiny model never closes its thinking itself). The
  report gains the budgets' table and plot; every accuracy carries its standard error."""
  from jaxdistill.data import chat
  from jaxdistill.eval import metrics
  monkeypatch.chdir(ROOT)
  c = _config(tasks="aime24", limit=2, max_new_tokens=16, greedy=False,
              max_thinking_tokens=6, thinking_budgets="2,5")
  summary = main_lib.run(c, str(tmp_path))["aime24"]
  tok = chat.load_tokenizer(c.data.tokenizer)
  end, cue = tok.encode(c.eval.think_end), tok.encode(c.eval.answer_cue)
  task_dir = tmp_path / "eval" / "aime24"
  for budget, directory in [(6, task_dir), (2, task_dir / "budget_2"),
                            (5, task_dir / "budget_5")]:
    rows = [json.loads(x) for x in (directory / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (directory / "graded.jsonl").exists()
    for ids in (ids for r in rows for ids in r["completion_token_ids"]):
      assert metrics.thinking_tokens(ids, end) == budget, ids
      text = tok.decode(ids)
      assert text.count(c.eval.think_end) == 1 and text.count(c.eval.answer_cue.strip()) == 1
      assert ids[budget:budget + len(end) + len(cue)] == end + cue
  points = summary["thinking_budgets"]
  assert [p["budget"] for p in points] == [2, 5]
  assert [p["mean_thinking_tokens"] for p in points] == [2, 5]
  assert summary["mean_thinking_tokens"] == 6 and summary["sampling"]["max_thinking_tokens"] == 6
  assert summary["stderr"]["avg@n"] is not None and all(p["stderr"] is not None for p in points)
  report = (tmp_path / "eval" / "report.md").read_text()
  assert "## Accuracy against thinking budget" in report and "| aime24 | 2 | 2 |" in report
  assert " ± " in report and "Budget forcing: at most 6 thinking tokens" in report
  assert (tmp_path / "eval" / "thinking_budget.png").stat().st_size > 1000
