"""A programmatic teacher: arithmetic problems and o1-style worked traces, plus held-out sets.

Every step of a trace is determined by the few tokens before it, so a small student can learn
it: numbers are consumed from their last digit ("Step 2: 48+3, last digits 8+3+0=11"), the
carry is explicit, and the answer grows one digit at a time ("so far 18"), so the final
answer is a copy rather than a reversal. Each trace ends its thinking with a verification
("Wait, let me verify: ..."), and now and then contains a slip it corrects.
The verification restates the inverse operation; a student learns to copy its expected result
rather than compute it, so it does not catch the student's own errors (see the demo report).

Families, easiest first:
  add2: column addition of two 2-digit numbers (for quick tests);
  add: column addition of two 2-4 digit numbers;
  mul: a 2-4 digit number times a digit 2-9;
  lineq: a x + b = c for integer x in -6..12 (a in 2..9, b in 1..9). Subtracting b takes
    only add-family digit facts, "10-b" and a decrement (the last digit by complement,
    (10 - b) + u, a one-digit sum meaning a borrow from the rest); dividing by a counts
    1*a, 2*a, ... (from 10*a when x >= 10), each product set beside the target, so the stop
    compares neighbours. One-shot "c - b = d" and "d / a = x" steps left lineq at 50% on the
    default preset.

The held-out problems are drawn first, from their own stream; training problems are drawn
after and any problem whose key is held out is rejected, so the two never overlap. The
distill preset's fresh problems come from a third stream, with the same rejection.
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
    steps.append(line + f"{x * d}, {_plus_carry(x * d, carry)}, so far {so_far}.")
    a, carry, i = a // 10, p // 10, i + 1
  return steps


def _plus_carry(product: int, carry: int) -> str:
  """The carry added to a digit product one fact at a time, then what to write and carry:
  the last digit first, then the tens when that overflows ("plus carry 8: 4+8=12, tens
  2+1=3, write 2, carry 3" for 24 + 8)."""
  total = product + carry
  if not carry:
    return f"write {total % 10}, carry {total // 10}"
  units = product % 10 + carry
  text = f"plus carry {carry}: {product % 10}+{carry}={units}"
  if units >= 10:
    text += f", tens {product // 10}+1={product // 10 + 1}"
  return text + f", write {total % 10}, carry {total // 10}"


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
  return "\n".join([
      f"I need x with {a}x + {b} = {c}. I undo the + {b}, then the times {a}.",
      f"Subtract {b} from both sides: {a}x = {c} - {b}.",
      _subtract_line(c, b, slip),
      _divide_line(c - b, a),
      f"Wait, let me verify: put x = {result} back in. {a} * {result} = {a * result}, and "
      f"{a * result} + {b} = {c}. Yes, that is {c}. Correct.",
      f"So x = {result}."])


def _fact(expr: str, value: int, slip: bool) -> str:
  """"expr=value", or with slip a wrong value first, then the correction."""
  return f"{expr}={value + 1}. No wait, {expr}={value}" if slip else f"{expr}={value}"


def _subtract_line(c: int, b: int, slip: bool) -> str:
  """c - b (b a digit 1-9) in add-family digit facts ("8+7+0=15") and "10-b": the last digit
  by complement, u - b = (10 - b) + u - 10, so the sum's last digit is written and a one-digit
  sum means a borrow from the rest of c (c // 10); a result below zero is worked as |c| + b,
  or as b - c when c < b."""
  if c < 0:  # c - b = -(|c| + b)
    m = -c
    u, rest = m % 10, m // 10
    line = (f"{c} is below zero, so the result is minus {m}+{b}: last digits "
            f"{_fact(f'{u}+{b}+0', u + b, slip)}")
    if rest:
      carry = (u + b) // 10
      line += (f", write {(u + b) % 10}, carry {carry}; the rest {rest}+0+{carry}="
               f"{rest + carry}")
    return f"{line}. So {c} - {b} = {c - b}."
  if c < b:  # b - c on single digits, then the minus sign
    u, d, rest = b, c, 0
    line = f"{c} is less than {b}, so the result is minus {b}-{c}: "
  else:
    u, d, rest = c % 10, b, c // 10
    line = f"Last digit {u}-{b}: "
  total = 10 - d + u
  line += f"10-{d}={10 - d}, {_fact(f'{10 - d}+{u}+0', total, slip)}, write {total % 10}, "
  if total >= 10:
    line += "no borrow" + (f"; the rest {rest} stays" if rest else "")
  else:
    line += f"borrow 1; the rest {rest}-1={rest - 1}"
  return f"{line}. So {c} - {b} = {c - b}."


def _divide_line(diff: int, a: int) -> str:
  """x = diff / a by counting in a's up to |diff| (a multiple of a). Each product k*a (the
  mul family's digit facts, same order) is set beside the target, so whether to stop is
  decided between adjacent numbers; a count past 9 starts at 10, which a 3-digit target or
  a target's tens digit at least a tells."""
  if diff == 0:
    return f"Divide both sides by {a}: x = 0 / {a} = 0."
  target, n = abs(diff), abs(diff) // a
  start = 10 if n >= 10 else 1
  head = (f"Count in {a}s up to {target}; {target} is at least 10*{a}={10 * a}, so start at 10:"
          if start == 10 else f"Count in {a}s up to {target}:")
  count = ", ".join(f"{k}*{a}={k * a} vs {target} {'yes' if k == n else 'no'}"
                    for k in range(start, n + 1))
  sign = "So" if diff > 0 else "The sign is minus, so"
  return (f"Divide both sides by {a}: x = {diff} / {a}. {head} {count}. {sign} "
          f"x = {diff // a}.")


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


def fresh_problems(families: Sequence[str], num: int, seed: int, exclude: set[tuple]
                   ) -> list[dict]:
  """`num` problems for a trained teacher to answer (the distill preset), as `held_out`'s
  rows: families in turn, drawn like `training`'s problems (repeats included) from a stream of
  their own, none of whose keys is in `exclude` (the held-out ones)."""
  rng = random.Random(f"fresh-{seed}")
  rows = []
  while len(rows) < num:
    family = families[len(rows) % len(families)]
    key = draw(family, rng)
    if key in exclude:
      continue
    rows.append({"id": f"{family}-{len(rows)}", "problem": problem_text(key),
                 "answer": str(answer(key)), "family": family, "key": list(key)})
  return rows


def key_of(row: dict) -> tuple:
  return tuple(row["key"])


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
