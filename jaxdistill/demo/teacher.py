"""A programmatic teacher: arithmetic problems and o1-style worked traces, plus held-out sets.

Every step of a trace is determined by the few tokens before it, so a small student can learn
it: numbers are consumed from their last digit ("Step 2: 482 and 36. Last digits 2 and 6"),
the carry is explicit, and the answer grows one digit at a time ("Result so far: 88"), so
the final answer is a copy rather than a reversal. Each trace ends its thinking with a
verification ("Wait, let me verify: ..."), and now and then contains a slip it corrects.
The verification restates the inverse operation; a student learns to copy its expected result
rather than compute it, so it does not catch the student's own errors (see the demo report).

Families, easiest first:
  add2: column addition of two 2-digit numbers (for quick tests);
  add: column addition of two 2-4 digit numbers;
  mul: a 2-4 digit number times a digit 2-9;
  lineq: a x + b = c for integer x in -6..12 (a in 2..9, b in 1..9), solved by subtracting b
    then dividing by a.

The held-out problems are drawn first, from their own stream; training problems are drawn
after and any problem whose key is held out is rejected, so the two never overlap.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FAMILIES = ("add", "mul", "lineq")  # the demo's; "add2" (2-digit addition) is for quick tests
SLIP_RATE = 0.1  # share of traces with one corrected slip


def user_turn(problem: str) -> str:
  """The user message for a problem (training and evaluation use the same)."""
  return f"{problem} {INSTRUCTION}"


# -- Problems ----------------------------------------------------------------------------------


def draw(family: str, rng: random.Random) -> tuple:
  """A problem key: the family and its operands."""
  if family == "add2":  # the "add" family's traces on 2-digit numbers only
    return ("add", rng.randint(10, 99), rng.randint(10, 99))
  if family == "add":
    return ("add", _number(rng), _number(rng))
  if family == "mul":
    return ("mul", _number(rng), rng.randint(2, 9))
  if family == "lineq":
    a, x, b = rng.randint(2, 9), rng.randint(-6, 12), rng.randint(1, 9)
    return ("lineq", a, b, a * x + b)
  raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _number(rng: random.Random) -> int:
  """2 to 4 digits, each length equally likely (uniform numbers would be mostly 4 digits)."""
  digits = rng.randint(2, 4)
  return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def problem_text(key: tuple) -> str:
  family = key[0]
  if family == "add":
    return f"What is {key[1]} + {key[2]}?"
  if family == "mul":
    return f"What is {key[1]} * {key[2]}?"
  a, b, c = key[1:]
  return f"Solve for x: {a}x + {b} = {c}."


def answer(key: tuple) -> int:
  family = key[0]
  if family == "add":
    return key[1] + key[2]
  if family == "mul":
    return key[1] * key[2]
  a, b, c = key[1:]
  return (c - b) // a


# -- Traces ------------------------------------------------------------------------------------


def _add_steps(a: int, b: int, slip_at: int | None) -> list[str]:
  steps, carry, so_far, i = [], 0, "", 1
  while a or b or carry:
    if not (a or b):
      so_far = f"{carry}{so_far}"
      steps.append(f"Step {i}: carry {carry} left, write {carry}, so far {so_far}.")
      break
    x, y = a % 10, b % 10
    s = x + y + carry
    line = f"Step {i}: {a}+{b}, last digits {x}+{y}+{carry}="
    if i == slip_at:
      line += f"{s + 1}. No wait, {x}+{y}+{carry}="
    so_far = f"{s % 10}{so_far}"
    steps.append(line + f"{s}, write {s % 10}, carry {s // 10}, so far {so_far}.")
    a, b, carry, i = a // 10, b // 10, s // 10, i + 1
  return steps


def _mul_steps(a: int, d: int, slip_at: int | None) -> list[str]:
  steps, carry, so_far, i = [], 0, "", 1
  while a or carry:
    if not a:
      so_far = f"{carry}{so_far}"
      steps.append(f"Step {i}: carry {carry} left, write {carry}, so far {so_far}.")
      break
    x = a % 10
    p = x * d + carry
    line = f"Step {i}: {a}*{d}, last digit {x}*{d}="
    if i == slip_at:
      line += f"{x * d + d}. No wait, {x}*{d}="
    so_far = f"{p % 10}{so_far}"
    steps.append(line + f"{x * d}, plus carry {carry} is {p}, write {p % 10}, carry {p // 10}, "
                 f"so far {so_far}.")
    a, carry, i = a // 10, p // 10, i + 1
  return steps


def thinking(key: tuple, slip: bool = False) -> str:
  """The worked steps, a verification and the conclusion (the text inside <think>)."""
  family, result = key[0], answer(key)
  if family == "add":
    a, b = key[1:]
    steps = _add_steps(a, b, 2 if slip else None)
    return "\n".join([
        f"I need {a} + {b}. I add column by column from the last digits, keeping the carry.",
        *steps, f"So {a} + {b} = {result}.",
        f"Wait, let me verify: {result}-{b} should give back {a}, and {result}-{b}={result - b}. "
        "Correct."])
  if family == "mul":
    a, d = key[1:]
    steps = _mul_steps(a, d, 2 if slip else None)
    return "\n".join([
        f"I need {a} * {d}. I multiply digit by digit from the last digit, keeping the carry.",
        *steps, f"So {a} * {d} = {result}.",
        f"Wait, let me verify: {result}/{d} should give back {a}, and {result}/{d}={result // d}. "
        "Correct."])
  a, b, c = key[1:]
  diff = c - b
  first = (f"Subtract {b} from both sides: {a}x = {c} - {b} = {diff + 1}. No wait, "
           f"{c} - {b} = {diff}. So {a}x = {diff}." if slip else
           f"Subtract {b} from both sides: {a}x = {c} - {b} = {diff}.")
  return "\n".join([
      f"I need x with {a}x + {b} = {c}. I undo the + {b}, then the times {a}.",
      first,
      f"Divide both sides by {a}: x = {diff} / {a} = {result}.",
      f"Wait, let me verify: put x = {result} back in. {a} * {result} = {a * result}, and "
      f"{a * result} + {b} = {a * result + b}. Yes, that is {c}. Correct.",
      f"So x = {result}."])


def trace(key: tuple, slip: bool = False) -> list[dict]:
  """The OpenAI-messages conversation for one problem."""
  return [{"role": "user", "content": user_turn(problem_text(key))},
          {"role": "assistant",
           "content": f"<think>\n{thinking(key, slip)}\n</think>\n\n"
                      f"The answer is \\boxed{{{answer(key)}}}."}]


# -- Data sets ---------------------------------------------------------------------------------


def held_out(families: Sequence[str], per_family: int, seed: int) -> list[dict]:
  """Evaluation problems `{"id", "problem", "answer", "family"}`, distinct, per family."""
  rng = random.Random(f"held-out-{seed}")
  rows, seen = [], set()
  for family in families:
    n = 0
    while n < per_family:
      key = draw(family, rng)
      if key in seen:
        continue
      seen.add(key)
      rows.append({"id": f"{family}-{n}", "problem": problem_text(key),
                   "answer": str(answer(key)), "family": family, "key": list(key)})
      n += 1
  return rows


def training(families: Sequence[str], num: int, seed: int, exclude: set[tuple]) -> list[dict]:
  """`num` training conversations, families in turn, none of whose problems is in `exclude`."""
  rng = random.Random(f"train-{seed}")
  out = []
  while len(out) < num:
    key = draw(families[len(out) % len(families)], rng)
    if key in exclude:
      continue
    out.append({"messages": trace(key, slip=rng.random() < SLIP_RATE)})
  return out


def key_of(row: dict) -> tuple:
  return tuple(row["key"])


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
