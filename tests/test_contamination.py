"""Bundled eval sets load with their counts, and the contamination check flags copied eval problems
(verbatim or re-spaced) at the right locations, counts bad lines, spares unrelated problems,
and writes a copy without the flagged records, through the library and the CLI."""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from jaxdistill.data import contamination
from jaxdistill.eval import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
AIME_ID = "2024-I-1"
MATH_ID = "test/intermediate_algebra/1994.json"
# MATH_ID's problem as another copy might typeset it: other spacing, \dfrac, \left( \right),
# `$$` for `\[`, braces around exponents, `\,`, no line breaks. Everything differs except the
# mathematics and the words.
MATH_RESPACED = (r"Define $$p=\sum_{k=1}^{\infty}\dfrac{1}{k^{2}}\quad\text{ and }\quad "
                 r"q=\sum_{k=1}^{\infty}\dfrac1{k^{3}}\,.$$ Find a way to  write "
                 r"$$\sum_{j=1}^{\infty}\sum_{k=1}^{\infty}\dfrac{1}{\left(j+k\right)^{3}}$$ "
                 r"in terms of $p$ and $q$.")


@pytest.fixture(scope="module")
def index():
  return contamination.ContaminationIndex.from_tasks()


def _item(task, item_id):
  return next(x for x in tasks.load_task(task) if x["id"] == item_id)


def _train_file(tmp_path):
  """Training JSONL with two contaminated records, three clean ones and two bad lines.

  Returns (path, lines as written, {line number: role}).
  """
  aime = _item("aime24", AIME_ID)["problem"]
  assert MATH_RESPACED not in _item("math500", MATH_ID)["problem"]
  lines = [
      # 1: (a) an AIME 2024 problem verbatim in an OpenAI-messages user turn, with a system
      #    prompt and the usual instruction after it.
      json.dumps({"messages": [
          {"role": "system", "content": "You are a careful mathematician."},
          {"role": "user", "content": aime + "\nPlease reason step by step, and put your "
                                             "final answer within \\boxed{}."},
          {"role": "assistant", "content": "<think>\nLet me set up the equations.\n</think>"
                                           "\n\nThe walk takes \\boxed{204} minutes."}]}),
      # 2: (c) clean: unrelated, in problem/solution form.
      json.dumps({"problem": "How many ways can 5 distinct books be arranged on a shelf if two "
                             "particular books must not be adjacent to each other?",
                  "solution": "All orders minus adjacent ones: 120 - 48 = \\boxed{72}."}),
      # 3: (b) a MATH500 problem re-spaced, in ShareGPT form.
      json.dumps({"system": "", "conversations": [
          {"from": "human", "value": MATH_RESPACED},
          {"from": "gpt", "value": "Count how often 1/n^3 appears: the sum is \\boxed{p - q}."}]}),
      # 4: (d) a malformed line (truncated JSON).
      '{"messages": [{"role": "user", "content": "What is 1+1?"',
      # 5: (c) clean, with AIME boilerplate in it ("relatively prime ... Find m+n"), and a
      #    near twin of the short MATH500 problem "Evaluate $\lceil{\sqrt{20}}\rceil^2$.".
      json.dumps({"messages": [
          {"role": "user", "content": "Evaluate $20^2$. The probability that a fair coin shows "
                                      "heads twice is $\\tfrac{m}{n}$, where $m$ and $n$ are "
                                      "relatively prime positive integers. Find $m+n$."},
          {"role": "assistant", "content": "$400$, and $1/4$ gives $\\boxed{5}$."}]}),
      # 6: valid JSON, but no trace format it could be.
      json.dumps({"text": "no conversation here"}),
      # 7: (c) clean, s1K form.
      json.dumps({"question": "Find the least positive integer $n$ such that $n^2$ ends in 44.",
                  "thinking_trajectories": ["Try n = 12: 144. Yes."], "attempt": "12"}),
  ]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path), lines


def test_load_task_counts_and_fields():
  expected = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500}
  assert set(tasks.TASKS) == set(expected)
  for name, count in expected.items():
    items = tasks.load_task(name)
    assert len(items) == count, name
    assert len({x["id"] for x in items}) == count, name
    for x in items:
      assert isinstance(x["problem"], str) and x["problem"].strip(), (name, x["id"])
      assert isinstance(x["answer"], str) and x["answer"].strip(), (name, x["id"])
      if name != "math500":  # AIME/AMC gold is a canonical integer: no padding, no ".0"
        assert str(int(x["answer"])) == x["answer"], (name, x["id"])
  assert [x["id"] for x in tasks.load_task("aime24")][:2] == ["2024-I-1", "2024-I-2"]
  assert _item("amc23", "amc23-17")["answer"] == "-1"
  # Callers get copies: changing one must not change the next load.
  tasks.load_task("aime25")[0]["answer"] = "changed"
  assert tasks.load_task("aime25")[0]["answer"] == "70"
  with pytest.raises(ValueError, match="aime24, aime25, amc23, math500"):
    tasks.load_task("aime23")
  # Every alternative transcription belongs to an item of its task.
  for name in tasks.TASKS:
    ids = {x["id"] for x in tasks.load_task(name)}
    assert set(tasks.problem_variants(name)) <= ids
  assert len(tasks.problem_variants("aime25")["2025-I-1"]) == 2


def test_every_bundled_data_file_ships_in_the_wheel():
  # The loader reads through importlib.resources: a file the package-data globs miss would be
  # in a checkout but not in an installed wheel.
  with open(REPO / "pyproject.toml", "rb") as f:
    globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["jaxdistill"]
  data = REPO / "jaxdistill" / "eval" / "data"
  for file in data.iterdir():
    rel = file.relative_to(REPO / "jaxdistill")
    assert any(rel.match(g) for g in globs), f"{rel} is not in package-data"


def test_normalisation_ignores_spacing_and_typesetting_but_keeps_the_maths():
  same = contamination.normalize
  assert same(r"$x^2 + 3x \le \frac{1}{2}$") == same(r"$x^{2}+3 x\leq\dfrac12$")
  assert same(r"\left( a \right)\,\cdot b") == same("(a)·b")
  assert same("Find $N$.\n\n[asy]draw((0,0)--(1,1));[/asy]") == same("Find $N$.")
  assert same(r"\[\text{Area} = 1{,}000\]") == same("area = 1,000") == same("area = 1000")
  assert same(r"$\log_264 + x^23$") == same(r"$\log_{2} 64 + x^{2}3$")
  # Commands that carry meaning stay, so different problems stay different.
  assert same(r"$\lceil\sqrt{20}\rceil^2$") != same(r"$20^2$")
  assert same(r"$\sin x$") != same(r"$\cos x$")
  assert same("242") != same("2 4 2") and same("2.5") != same("25")


def test_short_problems_match_as_a_whole(index):
  # "Simplify $\sqrt{242}$." has 3 tokens, too few for a 13-gram: it matches by containment.
  hits = index.match(["Return your final response within \\boxed{}. Simplify  $\\sqrt{ 242 }$ ."])
  assert ("math500", "test/prealgebra/1302.json", 1.0, "substring") in hits
  assert index.match(["Simplify $\\sqrt{243}$."]) == []
  assert index.match(["Simplify $\\sqrt{2420}$."]) == []
  assert index.match(["Evaluate $20^2$."]) == []
  # Reworded copies of one AIME problem (another lineage's text) still match through the
  # indexed alternatives; with them left out, the item is still found at a lower score.
  alt = tasks.problem_variants("aime24")["2024-II-8"][0]
  assert index.match([alt])[0][:3] == ("aime24", "2024-II-8", 1.0)
  own = contamination.ContaminationIndex.from_tasks(["aime24"], variants=False)
  assert own.match([alt])[0][:2] == ("aime24", "2024-II-8")
  # No bundled problem is indexed so short that it cannot be searched for, and no two eval
  # problems match each other.
  assert index.unindexed == []
  for name in ("aime24", "amc23"):
    for x in tasks.load_task(name):
      assert [(t, i) for t, i, _, _ in index.match([x["problem"]])] == [(name, x["id"])]


def test_report_flags_the_copies_and_filtered_copy_drops_them(tmp_path, index):
  path, lines = _train_file(tmp_path)
  report = contamination.check_sources([path], index)

  assert report.records == 7 and report.checked == 5
  assert [(m.location, m.task, m.eval_id, m.score, m.method) for m in report.matches] == [
      (f"{path}:1", "aime24", AIME_ID, 1.0, "ngram"),
      (f"{path}:3", "math500", MATH_ID, 1.0, "ngram")]
  assert report.flagged == {f"{path}:1", f"{path}:3"}
  assert [loc for loc, _ in report.skipped] == [f"{path}:4", f"{path}:6"]
  assert "malformed JSON" in report.skipped[0][1]
  assert "format error" in report.skipped[1][1]
  per_task = report.per_task()
  assert per_task["aime24"] == {"items": 30, "contaminated": [AIME_ID], "flagged_records": 1}
  assert per_task["math500"] == {"items": 500, "contaminated": [MATH_ID], "flagged_records": 1}
  assert per_task["aime25"]["contaminated"] == per_task["amc23"]["contaminated"] == []
  assert json.loads(json.dumps(report.to_dict()))["flagged_records"] == 2

  out = tmp_path / "clean.jsonl"
  counts = contamination.write_filtered([path], report, str(out))
  assert counts == {"written": 3, "dropped_flagged": 2, "dropped_skipped": 2}
  written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert written == [json.loads(lines[i]) for i in (1, 4, 6)]  # lines 2, 5 and 7
  # The copy is clean by the same check, and in the same formats as the input.
  again = contamination.check_sources([str(out)], index)
  assert again.matches == [] and again.skipped == [] and again.records == 3


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO / "tools" / "check_contamination.py"), *args],
                        capture_output=True, text=True, env=env, timeout=120)


def test_cli(tmp_path):
  path, _ = _train_file(tmp_path)
  report, out = tmp_path / "report.json", tmp_path / "clean.jsonl"
  run = _cli(f"--train={path}", f"--report={report}", f"--write_filtered={out}")
  assert run.returncode == 0, run.stderr
  printed = [" ".join(line.split()) for line in run.stdout.splitlines()]
  assert "aime24 1/30 eval items contaminated, 1 training records flagged" in printed
  assert "math500 1/500 eval items contaminated, 1 training records flagged" in printed
  assert "amc23 0/40 eval items contaminated, 0 training records flagged" in printed
  assert f"{path}:1 aime24 {AIME_ID} score 1.00 (ngram)" in printed
  assert any(line.startswith(f"skipped {path}:4: malformed JSON") for line in printed)
  saved = json.loads(report.read_text())
  assert [(m["location"], m["eval_id"]) for m in saved["matches"]] == [
      (f"{path}:1", AIME_ID), (f"{path}:3", MATH_ID)]
  assert len(out.read_text().splitlines()) == 3

  # Only some sets, and a different n: the AIME copy is then the only match.
  run = _cli(f"--train={path}", "--eval=aime24,aime25", "--ngram=8")
  assert run.returncode == 0, run.stderr
  assert "math500" not in run.stdout and f"{path}:1  aime24" in run.stdout

  # Bad arguments are the only failures.
  run = _cli(f"--train={path}", "--eval=aime24,aime23")
  assert run.returncode != 0 and "aime24,aime25,amc23,math500" in run.stderr
  run = _cli(f"--train={tmp_path / 'missing.jsonl'}")
  assert run.returncode != 0 and "missing.jsonl" in run.stderr
  run = _cli(f"--train={path}", f"--write_filtered={path}")
  assert run.returncode != 0 and "--train" in run.stderr
  run = _cli(f"--train={path}", "--fields=query=question")
  assert run.returncode != 0
  assert "--fields: unknown canonical field 'query' (the canonical name comes first: " \
         "question=query?)" in run.stderr


def test_cli_reads_renamed_fields_as_training_does(tmp_path):
  # The --fields flag is the run's data.fields: the copies are found under other names.
  aime = _item("aime24", AIME_ID)["problem"]
  path = tmp_path / "renamed.jsonl"
  path.write_text(json.dumps({"chat": [{"who": "user", "says": aime},
                                       {"who": "assistant", "says": "204"}]}) + "\n"
                  + json.dumps({"query": MATH_RESPACED, "final": "p - q"}) + "\n")
  run = _cli(f"--train={path}", "--eval=aime24,math500",
             "--fields=messages=chat,role=who,content=says,question=query,solution=final")
  assert run.returncode == 0, run.stderr
  assert f"{path}:1  aime24 {AIME_ID}" in run.stdout
  assert f"{path}:2  math500 {MATH_ID}" in run.stdout
  assert "checked 2 of 2 training records (0 skipped)" in run.stdout
