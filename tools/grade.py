r"""Grades sampled responses in a JSONL file and prints per-line verdicts and a JSON summary.

  python tools/grade.py --input=samples.jsonl --task=aime|amc|math [--show=5] \
      [--output=verdicts.jsonl] [--workers=4] [--timeout=5]

Each input line is an object with:
  answer              the gold answer (string; a number such as 27.0 is read as its text)
  response            one generated text, or a list of them (the n samples, in order)
  finish_reason       optional: a string, or a list with one entry (string or null) per response
  num_tokens          optional: output token count, an int or a list with one per response
  completion_token_ids  optional, instead of num_tokens: the token ids (a list, or a list of
                      lists for several responses); only their count is used
  greedy_response     optional: the greedy decode, graded for greedy accuracy
  greedy_finish_reason  optional
  id                  optional: shown in the per-line output
Any other field is ignored. A line that breaks these rules stops the run with FILE:LINE and
the reason, before anything is graded: grading data is small and must be complete.

Output: the first --show lines' verdicts, then, as the last line of stdout, one JSON object:
accuracy (mean over all samples), counts per outcome (correct, wrong, no_answer, truncated,
timeout, too_complex), extraction failures and truncations (counts and rates), pass@k and maj@k
for k = 1, 2, 4, ... up to n, and, when given, greedy accuracy, mean output tokens and the
maj@k-against-token-budget points. Grading rules: jaxdistill/eval/grade.py; metrics:
jaxdistill/eval/metrics.py.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdistill import storage  # noqa: E402
from jaxdistill.eval import grade, metrics  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL file of samples (see the module doc).")
flags.DEFINE_enum("task", None, list(grade.KINDS), "Answer kind: aime, amc or math.")
flags.DEFINE_integer("show", 5, "How many input lines to print verdicts for.")
flags.DEFINE_string("output", None, "Write every line's verdicts here, as JSONL.")
flags.DEFINE_integer("workers", 1, "Symbolic grading worker processes (and grading threads).")
flags.DEFINE_float("timeout", 5.0, "Seconds allowed for one symbolic comparison.")


class InputError(ValueError):
  """A malformed input line."""


def read_lines(path: str, task: str) -> list[dict]:
  """Parses and validates every line of `path`; raises InputError naming FILE:LINE."""
  records = []
  with storage.open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(_parse_record(line, task) | {"line": number})
      except (InputError, ValueError) as e:
        raise InputError(f"{path}:{number}: {e}") from None
  if not records:
    raise InputError(f"{path}: no samples")
  return records


def _parse_record(line: str, task: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise InputError(f"not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise InputError(f"expected a JSON object, got {type(record).__name__}")
  gold = record.get("answer")
  if isinstance(gold, (int, float)) and not isinstance(gold, bool):
    gold = str(gold)
  if not isinstance(gold, str) or not gold.strip():
    raise InputError(f"'answer' must be a non-empty string or a number, got {gold!r}")
  grade.gold_vote_key(gold, task)  # a gold the task cannot grade is a data error
  responses = record.get("response")
  single = isinstance(responses, str)
  responses = [responses] if single else responses
  if not isinstance(responses, list) or not responses or not all(
      isinstance(x, str) for x in responses):
    raise InputError(f"'response' must be a string or a non-empty list of strings, got "
                     f"{str(record.get('response'))[:80]}")
  n = len(responses)
  reasons = _per_response(record, "finish_reason", lambda x: x is None or isinstance(x, str),
                          "a string or null", n, single)
  tokens = _per_response(record, "num_tokens", _is_count, "a non-negative int", n, single)
  if tokens is None:
    ids = _per_response(record, "completion_token_ids",
                        lambda x: isinstance(x, list) and all(_is_count(t) for t in x),
                        "a list of token ids", n, single)
    tokens = None if ids is None else [len(x) for x in ids]
  greedy = record.get("greedy_response")
  if greedy is not None and not isinstance(greedy, str):
    raise InputError("'greedy_response' must be a string")
  greedy_reason = record.get("greedy_finish_reason")
  if greedy_reason is not None and not isinstance(greedy_reason, str):
    raise InputError("'greedy_finish_reason' must be a string")
  return {"id": record.get("id"), "gold": gold, "responses": responses,
          "finish_reasons": reasons or [None] * n, "tokens": tokens, "greedy": greedy,
          "greedy_finish_reason": greedy_reason}


def _per_response(record: dict, key: str, is_item, what: str, n: int, single: bool):
  """`record[key]` as one item per response, or None when absent. With a single response the
  bare item may stand for its one-element list."""
  value = record.get(key)
  if value is None:
    return None
  if single and is_item(value):
    value = [value]
  if not isinstance(value, list) or not all(is_item(x) for x in value):
    raise InputError(f"{key!r} must be {what}" + ("" if single else ", in a list with one per "
                     "response") + f", got {str(value)[:80]}")
  if len(value) != n:
    raise InputError(f"{key!r} has {len(value)} entries for {n} responses")
  return value


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.input or not FLAGS.task:
    raise app.UsageError("--input and --task are required")
  if FLAGS.workers < 1 or FLAGS.timeout <= 0:
    raise app.UsageError("--workers must be >= 1 and --timeout > 0")
  try:
    records = read_lines(FLAGS.input, FLAGS.task)
  except (InputError, OSError) as e:
    sys.exit(f"error: {e}")

  with grade.SymbolicChecker(workers=FLAGS.workers, timeout_s=FLAGS.timeout) as checker:
    jobs = [(resp, r["gold"], fr) for r in records
            for resp, fr in zip(r["responses"], r["finish_reasons"])]
    flat = grade.grade_all(jobs, FLAGS.task, checker=checker, threads=FLAGS.workers)
    greedy_jobs = [(r["greedy"], r["gold"], r["greedy_finish_reason"]) for r in records
                   if r["greedy"] is not None]
    greedy_flat = iter(grade.grade_all(greedy_jobs, FLAGS.task, checker=checker,
                                       threads=FLAGS.workers))
  problems, greedy, start = [], [], 0
  for r in records:
    problems.append(flat[start:start + len(r["responses"])])
    start += len(r["responses"])
    greedy.append(next(greedy_flat) if r["greedy"] is not None else None)

  for r, verdicts in list(zip(records, problems))[:FLAGS.show]:
    right = sum(v.correct for v in verdicts)
    print(f"line {r['line']}" + (f" ({r['id']})" if r["id"] is not None else "") +
          f": gold {r['gold']!r}, {right}/{len(verdicts)} correct")
    for i, v in enumerate(verdicts):
      shown = "" if v.extracted is None else f" {v.extracted[:60]!r}"
      flagged = f" [{', '.join(v.flags)}]" if v.flags else ""
      print(f"  sample {i}: {v.reason}{shown}{flagged}")

  if FLAGS.output:
    with storage.atomic_write(FLAGS.output, "w", encoding="utf-8") as f:
      for r, verdicts, g in zip(records, problems, greedy):
        out = {"line": r["line"], "id": r["id"], "answer": r["gold"],
               "verdicts": [v.to_dict() for v in verdicts]}
        if g is not None:
          out["greedy"] = g.to_dict()
        f.write(json.dumps(out, ensure_ascii=False) + "\n")

  have_tokens = all(r["tokens"] is not None for r in records)
  summary = metrics.summarize(
      problems, tokens=[r["tokens"] for r in records] if have_tokens else None,
      greedy=greedy if any(g is not None for g in greedy) else None)
  print(json.dumps({"task": FLAGS.task, "input": FLAGS.input} | summary))


if __name__ == "__main__":
  app.run(main)
