r"""Sampling metrics over graded samples: avg@n, unbiased pass@k, maj@k, greedy, token budgets.

Input is one list of `grade.Verdict`s per problem (its n samples, in sampling order), plus
optionally the output token count of each sample and one greedy verdict per problem.

  accuracy      mean of `correct` over all samples (with the same n for every problem this is
                avg@n, the pass@1 estimate; `avg_at_n` is the mean of per-problem means).
  pass@k        the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (c correct out of
                n), averaged over problems; computed as a product so it never overflows.
  maj@k         majority vote over the first k samples of each problem. Each sample votes for
                its `vote_key` (kind-aware: an AIME integer, a MATH canonical string; every
                correct sample carries the gold's key, so equivalent correct forms count
                together). No-answer and truncated samples have no key and cast no vote; they
                still use up a place among the k. The most-voted key wins; a tie goes to the
                key that appeared first among the k (deterministic, and blind to correctness).
                The vote is correct when the first sample of the winning key is. A problem
                with no votes at all scores 0.
  budget        (k, k x mean output tokens per sample, maj@k) for k = 1, 2, 4, ...: accuracy
                against the average token budget, as in the O1-Journey plot.
  stderr        the standard error over problems of each accuracy: the sample standard
                deviation (n - 1) of the per-problem scores (a problem's mean correctness for
                avg@n, its pass@k, its maj@k or greedy 0/1) over sqrt(problems). It measures
                how far the score would move on other problems like these: one AIME problem
                is 1/30 = 3.3 points, and one solved problem of 30 has a standard error of
                exactly that. More samples per problem do not shrink it below the problems'
                own spread.
  thinking      tokens before the first end-of-thinking delimiter (`thinking_tokens`; all of
                a sample that never writes it), averaged per sample.

Equivalent wrong answers are merged only as far as their canonical strings agree (exact
numbers, spacing, `\dfrac`...); a full symbolic merge would cost O(k^2) sympy calls per problem.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from jaxdistill.eval.grade import REASONS, Verdict


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one problem with `c` correct samples out of `n` (Chen et al., 2021).

  1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), which stays in floating-point
  range for any n (the binomials themselves overflow past n ~ 1000).

  Raises:
    ValueError: k < 1, k > n, or c outside 0..n.
  """
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
  if not 0 <= c <= n:
    raise ValueError(f"correct count {c} outside 0..{n}")
  if n - c < k:  # every k-subset holds a correct sample
    return 1.0
  prob_all_wrong = 1.0
  for i in range(n - c + 1, n + 1):
    prob_all_wrong *= 1.0 - k / i
  return 1.0 - prob_all_wrong


def standard_error(scores: Sequence[float]) -> float | None:
  """The standard error of the mean of per-problem `scores`: sqrt(sum((x - mean)^2) / (n - 1))
  / sqrt(n); None for fewer than two problems (no spread to measure)."""
  n = len(scores)
  if n < 2:
    return None
  mean = sum(scores) / n
  return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)


def thinking_tokens(token_ids: Sequence[int], think_end: Sequence[int]) -> int:
  """Tokens before the first occurrence of the delimiter `think_end` (as ids) in a sample;
  the whole sample when it never closes its thinking. The sampler's budget forcing counts
  the same way (rules.BudgetForcing), so a sample forced at budget B has at most B."""
  ids, end = list(token_ids), list(think_end)
  if not end:
    raise ValueError("think_end is empty; give the delimiter's token ids")
  for i in range(len(ids) - len(end) + 1):
    if ids[i:i + len(end)] == end:
      return i
  return len(ids)


def majority_vote(verdicts: Sequence[Verdict]) -> Verdict | None:
  """The first sample of the winning answer among `verdicts` (rules in the module doc), or None
  when no sample has an answer."""
  counts: collections.Counter = collections.Counter()
  first: dict[str, int] = {}
  for i, v in enumerate(verdicts):
    if v.vote_key is not None:
      counts[v.vote_key] += 1
      first.setdefault(v.vote_key, i)
  if not counts:
    return None
  winner = max(counts, key=lambda key: (counts[key], -first[key]))
  return verdicts[first[winner]]


def maj_at_k(verdicts: Sequence[Verdict], k: int) -> bool:
  """Whether the majority vote over the first `k` of one problem's samples is correct."""
  _check_k(len(verdicts), k, "maj")
  winner = majority_vote(verdicts[:k])
  return winner is not None and winner.correct


def mean_pass_at_k(problems: Sequence[Sequence[Verdict]], k: int) -> float:
  """pass@k averaged over problems."""
  _check_problems(problems)
  return sum(pass_at_k(len(vs), sum(v.correct for v in vs), k) for vs in problems) / len(problems)


def mean_maj_at_k(problems: Sequence[Sequence[Verdict]], k: int) -> float:
  """maj@k averaged over problems."""
  _check_problems(problems)
  return sum(maj_at_k(vs, k) for vs in problems) / len(problems)


def powers_of_two(n: int) -> list[int]:
  """1, 2, 4, ... up to n (the k values reported by default)."""
  ks, k = [], 1
  while k <= n:
    ks.append(k)
    k *= 2
  return ks


def budget_points(problems: Sequence[Sequence[Verdict]], tokens: Sequence[Sequence[int]],
                  ks: Sequence[int] | None = None) -> list[dict]:
  """maj@k against the average token budget k x (mean output tokens per sample).

  Args:
    problems: per-problem sample verdicts.
    tokens: per-problem output token counts, shaped like `problems`.
    ks: the k values (default: powers of two up to the smallest n).

  Returns:
    [{"k": k, "tokens": k * mean_tokens, "maj@k": accuracy}, ...] in increasing k.
  """
  mean_tokens = _mean_tokens(problems, tokens)
  ks = ks or powers_of_two(min(len(vs) for vs in problems))
  return [{"k": k, "tokens": k * mean_tokens, "maj@k": mean_maj_at_k(problems, k)} for k in ks]


def summarize(problems: Sequence[Sequence[Verdict]], *,
              tokens: Sequence[Sequence[int]] | None = None,
              greedy: Sequence[Verdict | None] | None = None,
              ks: Sequence[int] | None = None,
              thinking: Sequence[Sequence[int]] | None = None) -> dict:
  """Every metric of the module for one evaluation set, as a JSON-ready dict.

  Args:
    problems: per-problem lists of sample verdicts (each non-empty).
    tokens: optional per-problem output token counts, shaped like `problems`.
    greedy: optional greedy verdict per problem (None where a problem has none).
    ks: k values for pass@k and maj@k (default: powers of two up to the smallest n).
    thinking: optional per-problem thinking token counts (`thinking_tokens`), shaped like
      `problems`.

  Returns:
    {"problems", "samples", "n_min", "n_max", "accuracy", "avg@n", "counts" (per reason),
    "extraction_failures", "extraction_failure_rate", "truncations", "truncation_rate",
    "disagreeing_boxes", "pass@k", "maj@k", "stderr"} plus "greedy_accuracy"/"greedy_problems"
    with `greedy`, "mean_output_tokens"/"budget" with `tokens`, and "mean_thinking_tokens"
    with `thinking`. "stderr" holds the standard error over problems (None for one problem)
    of "accuracy" and "avg@n" (both from the per-problem means), of each "pass@k" and
    "maj@k", and of "greedy_accuracy".
  """
  _check_problems(problems)
  samples = [v for vs in problems for v in vs]
  n_min = min(len(vs) for vs in problems)
  ks = list(ks or powers_of_two(n_min))
  counts = collections.Counter(v.reason for v in samples)
  total = len(samples)
  per_problem = [sum(v.correct for v in vs) / len(vs) for vs in problems]
  out = {
      "problems": len(problems),
      "samples": total,
      "n_min": n_min,
      "n_max": max(len(vs) for vs in problems),
      "accuracy": sum(v.correct for v in samples) / total,
      "avg@n": sum(sum(v.correct for v in vs) / len(vs) for vs in problems) / len(problems),
      "counts": {reason: counts.get(reason, 0) for reason in REASONS},
      "extraction_failures": counts.get("no_answer", 0),
      "extraction_failure_rate": counts.get("no_answer", 0) / total,
      "truncations": counts.get("truncated", 0),
      "truncation_rate": counts.get("truncated", 0) / total,
      "disagreeing_boxes": sum("multiple_disagreeing_boxes" in v.flags for v in samples),
      "pass@k": {str(k): mean_pass_at_k(problems, k) for k in ks},
      "maj@k": {str(k): mean_maj_at_k(problems, k) for k in ks},
  }
  se = standard_error(per_problem)
  out["stderr"] = {
      "accuracy": se, "avg@n": se,
      "pass@k": {str(k): standard_error([pass_at_k(len(vs), sum(v.correct for v in vs), k)
                                         for vs in problems]) for k in ks},
      "maj@k": {str(k): standard_error([float(maj_at_k(vs, k)) for vs in problems])
                for k in ks}}
  if greedy is not None:
    if len(greedy) != len(problems):
      raise ValueError(f"{len(greedy)} greedy verdicts for {len(problems)} problems")
    graded = [v for v in greedy if v is not None]
    out["greedy_problems"] = len(graded)
    out["greedy_accuracy"] = sum(v.correct for v in graded) / len(graded) if graded else None
    out["stderr"]["greedy_accuracy"] = standard_error([float(v.correct) for v in graded])
  if tokens is not None:
    out["mean_output_tokens"] = _mean_tokens(problems, tokens)
    out["budget"] = budget_points(problems, tokens, ks)
  if thinking is not None:
    out["mean_thinking_tokens"] = _mean_tokens(problems, thinking)
  return out


def summarize_groups(problems: Sequence[Sequence[Verdict]], labels: Sequence[str], *,
                     tokens: Sequence[Sequence[int]] | None = None,
                     greedy: Sequence[Verdict | None] | None = None) -> dict[str, dict]:
  """`summarize` of each group of problems: {label: summary}, labels in first-seen order.

  Args:
    problems, tokens, greedy: as in `summarize`.
    labels: one group label per problem (a MATH level, a demo family).
  """
  if len(labels) != len(problems):
    raise ValueError(f"{len(labels)} labels for {len(problems)} problems")
  out = {}
  for label in dict.fromkeys(labels):
    idx = [i for i, x in enumerate(labels) if x == label]
    out[label] = summarize([problems[i] for i in idx],
                           tokens=None if tokens is None else [tokens[i] for i in idx],
                           greedy=None if greedy is None else [greedy[i] for i in idx])
  return out


def _mean_tokens(problems: Sequence[Sequence[Verdict]], tokens: Sequence[Sequence[int]]) -> float:
  if len(tokens) != len(problems) or any(len(t) != len(vs) for t, vs in zip(tokens, problems)):
    raise ValueError("tokens must have one count per sample, shaped like the verdicts")
  counts = [t for ts in tokens for t in ts]
  if any(t < 0 for t in counts):
    raise ValueError("token counts must be non-negative")
  return sum(counts) / len(counts)


def _check_problems(problems: Sequence[Sequence[Verdict]]) -> None:
  if not problems or any(len(vs) == 0 for vs in problems):
    raise ValueError("need at least one problem, each with at least one sample")


def _check_k(n: int, k: int, name: str) -> None:
  if not 1 <= k <= n:
    raise ValueError(f"{name}@{k} needs 1 <= k <= n samples, got n={n}")
