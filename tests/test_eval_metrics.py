"""Sampling metrics (pass@k, maj@k, budgets) against hand-computed values; the grade CLI."""

import json
import math
import os
import subprocess
import sys

import pytest

from jaxdistill.eval import grade, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def V(key, correct=None, reason=None):
  """A verdict voting for `key` (None: no vote); correct defaults to key == "gold"."""
  correct = (key == "gold") if correct is None else correct
  reason = reason or ("correct" if correct else ("wrong" if key is not None else "no_answer"))
  return grade.Verdict(correct, reason, extracted=key, vote_key=key, method="boxed")


def test_pass_at_k_hand_computed():
  # n=4, c=2: pass@1 = 2/4; pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; pass@3 = 1 - 0 = 1.
  assert metrics.pass_at_k(4, 2, 1) == pytest.approx(0.5)
  assert metrics.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
  assert metrics.pass_at_k(4, 2, 3) == 1.0
  # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12.
  assert metrics.pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
  # n=64, c=1, k=8: 1 - C(63,8)/C(64,8) = 1 - 56/64 = 1/8 (one correct sample in 8 of 64).
  assert metrics.pass_at_k(64, 1, 8) == pytest.approx(1 / 8)
  # All correct, none correct.
  assert metrics.pass_at_k(5, 5, 1) == 1.0 and metrics.pass_at_k(5, 0, 5) == 0.0


def test_pass_at_k_is_stable_for_large_n():
  # C(2000, 1000) overflows a float; the product form does not. Compare with exact integers.
  n, c, k = 2000, 7, 1000
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact, then one division
  assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_bad_arguments(n, c, k):
  with pytest.raises(ValueError):
    metrics.pass_at_k(n, c, k)


def test_maj_at_k_hand_computed():
  samples = [V("a"), V("gold"), V("gold"), V("a"), V("a"), V(None), V(None), V(None)]
  # k=1: votes {a:1} -> a, wrong.
  assert not metrics.maj_at_k(samples, 1)
  # k=2: {a:1, gold:1} tie -> the key seen first (a), wrong.
  assert not metrics.maj_at_k(samples, 2)
  # k=3: {a:1, gold:2} -> gold, correct.
  assert metrics.maj_at_k(samples, 3)
  # k=4: {a:2, gold:2} tie -> a (first at index 0), wrong.
  assert not metrics.maj_at_k(samples, 4)
  # k=8: {a:3, gold:2}; the three no-answers cast no vote -> a, wrong.
  assert not metrics.maj_at_k(samples, 8)
  tie_gold_first = [V("gold"), V("b")]
  assert metrics.maj_at_k(tie_gold_first, 2)


def test_maj_at_k_no_votes_and_errors():
  # No sample has an answer: the vote fails (scores 0), it is not skipped.
  assert not metrics.maj_at_k([V(None), V(None, reason="truncated")], 2)
  assert metrics.majority_vote([V(None)]) is None
  # A no-answer minority does not change the winner: {gold:1}, two silent samples.
  assert metrics.maj_at_k([V(None), V("gold"), V(None)], 3)
  with pytest.raises(ValueError):
    metrics.maj_at_k([V("gold")], 2)
  with pytest.raises(ValueError):
    metrics.mean_maj_at_k([], 1)


def test_vote_uses_kind_aware_keys():
  # Real verdicts: "033", "33" and "\dfrac{66}{2}" are one AIME answer; 34 twice loses to 33 x3.
  responses = ["\\boxed{34}", "\\boxed{033}", "\\boxed{34}", "\\boxed{33}",
               "\\boxed{\\dfrac{66}{2}}"]
  verdicts = [grade.grade(r, "33", "aime") for r in responses]
  assert [v.vote_key for v in verdicts] == ["34", "33", "34", "33", "33"]
  assert metrics.maj_at_k(verdicts, 5)
  # MATH: 0.5, \frac12 and 1/2 are one (wrong) answer, beating the correct 3/4 written twice.
  responses = ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{1/2}", "\\boxed{0.75}",
               "\\boxed{\\tfrac{3}{4}}"]
  verdicts = [grade.grade(r, "\\frac{3}{4}", "math") for r in responses]
  assert [v.correct for v in verdicts] == [False, False, False, True, True]
  assert not metrics.maj_at_k(verdicts, 5)
  assert metrics.majority_vote(verdicts).vote_key == "1/2"


def test_summarize_hand_computed():
  problems = [
      [V("gold"), V("x"), V(None, reason="truncated"), V("gold")],  # c=2 of 4
      [V("y"), V("y"), V("gold"), V(None)],                         # c=1 of 4
      [V("gold"), V("gold"), V("gold"), V("gold")],                 # c=4 of 4
  ]
  tokens = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 4]]
  greedy = [V("gold"), V("y"), None]
  s = metrics.summarize(problems, tokens=tokens, greedy=greedy)
  assert (s["problems"], s["samples"], s["n_min"], s["n_max"]) == (3, 12, 4, 4)
  assert s["accuracy"] == pytest.approx(7 / 12)  # 2 + 1 + 4 correct of 12
  assert s["avg@n"] == pytest.approx((2 / 4 + 1 / 4 + 1) / 3)
  assert s["counts"] == {"correct": 7, "wrong": 3, "no_answer": 1, "truncated": 1,
                         "timeout": 0, "too_complex": 0}
  assert (s["extraction_failures"], s["truncations"]) == (1, 1)
  assert s["extraction_failure_rate"] == pytest.approx(1 / 12)
  # pass@1 = mean(2/4, 1/4, 1) = 7/12; pass@2 = mean(1 - 1/6, 1 - C(3,2)/C(4,2) = 1/2, 1);
  # pass@4 = mean(1, 1, 1).
  assert s["pass@k"]["1"] == pytest.approx(7 / 12)
  assert s["pass@k"]["2"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
  assert s["pass@k"]["4"] == pytest.approx(1.0)
  # maj@1: gold, y, gold -> 2/3. maj@2: gold|x tie -> gold; y,y -> y; gold -> 2/3.
  # maj@4: {gold:2, x:1} -> gold; {y:2, gold:1} -> y; gold -> 2/3.
  assert s["maj@k"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "4": 2 / 3})
  assert (s["greedy_problems"], s["greedy_accuracy"]) == (2, 0.5)
  # Mean tokens: (100 + 20 + 10) / 12 = 130/12; budget point k -> k * 130/12.
  assert s["mean_output_tokens"] == pytest.approx(130 / 12)
  assert [p["k"] for p in s["budget"]] == [1, 2, 4]
  assert s["budget"][2]["tokens"] == pytest.approx(4 * 130 / 12)
  assert s["budget"][1]["maj@k"] == pytest.approx(2 / 3)


def test_standard_error_over_problems_hand_computed():
  # One AIME problem of 30 solved: mean 1/30, sample variance (1/30)(29/30) * 30/29 = 1/30,
  # standard error sqrt(1/30 / 30) = 1/30: one problem, 3.3 points.
  assert metrics.standard_error([1.0] + [0.0] * 29) == pytest.approx(1 / 30)
  # Per-problem means 1, 0, 1/2, 1/2: mean 1/2, variance (1/4 + 1/4) / 3 = 1/6, over 4.
  assert metrics.standard_error([1.0, 0.0, 0.5, 0.5]) == pytest.approx(math.sqrt(1 / 6 / 4))
  assert metrics.standard_error([0.25, 0.25, 0.25]) == 0.0
  assert metrics.standard_error([0.7]) is None  # one problem: no spread to measure
  # In a summary: over the per-problem scores, not the samples. Problems with 2/4, 1/4 and
  # 4/4 correct (avg@n 7/12) spread as means 1/2, 1/4, 1; greedy (1, 0) as 0/1 scores.
  problems = [[V("gold"), V("x"), V("x"), V("gold")], [V("y"), V("y"), V("gold"), V("y")],
              [V("gold")] * 4]
  s = metrics.summarize(problems, greedy=[V("gold"), V("y"), None],
                        thinking=[[3, 3, 3, 3], [1, 1, 1, 1], [2, 2, 2, 2]])
  se = metrics.standard_error([0.5, 0.25, 1.0])
  assert s["stderr"]["avg@n"] == s["stderr"]["accuracy"] == pytest.approx(se)
  assert se == pytest.approx(math.sqrt(((1 / 12) ** 2 + (1 / 3) ** 2 + (5 / 12) ** 2) / 2 / 3))
  assert s["stderr"]["maj@k"]["4"] == pytest.approx(metrics.standard_error([1, 0, 1]))
  assert s["stderr"]["pass@k"]["1"] == pytest.approx(se)
  assert s["stderr"]["greedy_accuracy"] == pytest.approx(metrics.standard_error([1, 0]))
  assert s["mean_thinking_tokens"] == pytest.approx(2.0)


def test_thinking_tokens_counts_up_to_the_first_delimiter():
  end = [7, 8]
  assert metrics.thinking_tokens([1, 2, 7, 8, 3, 7, 8], end) == 2
  assert metrics.thinking_tokens([1, 7, 2, 8], end) == 4  # never closed: all of it
  assert metrics.thinking_tokens([7, 8], end) == 0 and metrics.thinking_tokens([], end) == 0
  with pytest.raises(ValueError, match="think_end is empty"):
    metrics.thinking_tokens([1], [])


def test_summarize_edges():
  all_right = [[V("gold")] * 3, [V("gold")] * 3]
  s = metrics.summarize(all_right)
  assert s["accuracy"] == s["pass@k"]["2"] == s["maj@k"]["2"] == 1.0 and "budget" not in s
  none_right = [[V("a"), V(None)], [V(None), V(None)]]
  s = metrics.summarize(none_right)
  assert s["accuracy"] == s["pass@k"]["2"] == s["maj@k"]["2"] == 0.0
  assert metrics.powers_of_two(1) == [1] and metrics.powers_of_two(100) == [1, 2, 4, 8, 16, 32, 64]
  # Uneven n: k goes up to the smallest n; asking for more is an error.
  s = metrics.summarize([[V("gold")] * 2, [V("a")] * 5])
  assert list(s["pass@k"]) == ["1", "2"]
  with pytest.raises(ValueError):
    metrics.summarize([[V("gold")] * 2, [V("a")] * 5], ks=[4])
  with pytest.raises(ValueError):
    metrics.summarize([[V("gold")]], tokens=[[1, 2]])
  with pytest.raises(ValueError):
    metrics.summarize([[V("gold")], []])


def test_budget_points_hand_computed():
  problems = [[V("gold"), V("a"), V("a"), V("gold")], [V("b"), V("gold"), V("gold"), V("c")]]
  tokens = [[100, 100, 100, 100], [300, 300, 300, 300]]
  # Mean 200 tokens per sample. maj@1: gold, b -> 1/2. maj@2: tie gold|a -> gold; tie b|gold
  # -> b -> 1/2. maj@4: tie gold:2 a:2 -> gold; gold:2 b:1 c:1 -> gold -> 1.
  points = metrics.budget_points(problems, tokens)
  assert points == [{"k": 1, "tokens": 200.0, "maj@k": 0.5},
                    {"k": 2, "tokens": 400.0, "maj@k": 0.5},
                    {"k": 4, "tokens": 800.0, "maj@k": 1.0}]


def _run_cli(tmp_path, lines, *flags):
  path = tmp_path / "samples.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "grade.py"),
                         f"--input={path}", *flags], capture_output=True, text=True, timeout=120)


def test_cli_summary(tmp_path):
  lines = [
      json.dumps({"id": "p1", "answer": "33",
                  "response": ["<think>\\boxed{1}</think>\\boxed{033}", "\\boxed{34}",
                               "<think>\\boxed{33}", "so 33"],
                  "finish_reason": ["stop", "stop", "length", "stop"],
                  "num_tokens": [10, 20, 30, 40], "greedy_response": "\\boxed{33}"}),
      json.dumps({"id": "p2", "answer": "204",
                  "response": ["\\framebox{204}", "\\boxed{0.204}", "\\boxed{204}",
                               "\\boxed{2^{10}}"],
                  "completion_token_ids": [[1] * 5, [1] * 6, [1] * 7, [1] * 8]}),
      "",
  ]
  out_path = tmp_path / "verdicts.jsonl"
  r = _run_cli(tmp_path, lines, "--task=aime", "--show=1", f"--output={out_path}")
  assert r.returncode == 0, r.stderr
  stdout = r.stdout.strip().splitlines()
  assert stdout[0].startswith("line 1 (p1)") and not any("p2" in x for x in stdout[:-1])
  s = json.loads(stdout[-1])
  # p1: correct, wrong, truncated, no_answer (no last-number fallback); p2: 2 correct, 2 wrong.
  assert s["accuracy"] == pytest.approx(3 / 8)
  assert s["counts"] == {"correct": 3, "wrong": 3, "no_answer": 1, "truncated": 1,
                         "timeout": 0, "too_complex": 0}
  assert (s["extraction_failures"], s["truncations"]) == (1, 1)
  # pass@2: p1 c=1 -> 1 - C(3,2)/C(4,2) = 1/2; p2 c=2 -> 5/6.
  assert s["pass@k"]["2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
  # maj@4: p1 {33:1, 34:1} tie -> 33 (first); p2 {204:2, 0.204, 1024} -> 204.
  assert s["maj@k"] == pytest.approx({"1": 1.0, "2": 1.0, "4": 1.0})
  assert s["greedy_accuracy"] == 1.0 and s["greedy_problems"] == 1
  # Tokens: (10+20+30+40 + 5+6+7+8) / 8 = 126/8.
  assert s["mean_output_tokens"] == pytest.approx(126 / 8)
  records = [json.loads(x) for x in out_path.read_text().splitlines()]
  assert [r["id"] for r in records] == ["p1", "p2"]
  assert [v["reason"] for v in records[0]["verdicts"]] == ["correct", "wrong", "truncated",
                                                           "no_answer"]


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"response": "x"}', "'answer'"),
    ('{"answer": "12", "response": []}', "'response'"),
    ('{"answer": "12", "response": ["a", 3]}', "'response'"),
    ('{"answer": "12", "response": ["a", "b"], "finish_reason": ["stop"]}', "1 entries for 2"),
    ('{"answer": "12", "response": "a", "num_tokens": -3}', "'num_tokens'"),
    ('{"answer": "1000", "response": "a"}', "not an integer 0-999"),
])
def test_cli_bad_line_is_an_error(tmp_path, bad, message):
  good = json.dumps({"answer": "12", "response": "\\boxed{12}"})
  r = _run_cli(tmp_path, [good, bad], "--task=aime")
  assert r.returncode != 0
  assert "samples.jsonl:2: " in r.stderr and message in r.stderr, r.stderr
  assert "accuracy" not in r.stdout  # nothing graded, no partial summary
