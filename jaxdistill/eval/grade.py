r"""Grading one sampled response against its gold answer: AIME/AMC integers, MATH by equivalence.

  grade(response, gold, task_kind, finish_reason=None) -> Verdict

The answer is taken by `extract.extract` (after the thinking section; last box; cue; never the
last number). Then, by `task_kind`:

  aime  Gold is an integer 0-999. The answer must be the same integer: `033` = `33`, `27.0` = 27,
        thousands separators (`1,000`, `1 000`, `1{,}000`, `1,\!000`) are read, a literal `%`,
        `^\circ`, `\text{}` wrapper or trailing unit is dropped, and `m+n=33` reads as its last
        right-hand side. An exact expression (`\dfrac{50}{2}`, `2^{10}-1000`) is evaluated and
        must be that integer. There is no x100 or /100 leniency (`0.33` and `3300` are wrong
        for 33), no tolerance, and any non-integer (`33.5`, `32, 349`, `3,4`) is wrong.
  amc   The same, for signed integers of any size (`-1`, also with the U+2212 minus sign); gold
        may be written `27.0`.
  math  Answers that are not mathematics (words, multiple-choice letters, clock times; see
        `is_text_answer`) compare by one documented key, `normalize_text` (wrappers, spacing,
        case, abbreviation dots and trailing punctuation dropped; `\text{(C)}` = `C`,
        `\text{9:00 a.m.}` = `9:00 \text{ a.m.}`), never symbolically, so an anagram or a
        hedge such as `(C) or (D)` is wrong. Otherwise cheap string canonical forms come first
        (spacing, `\left`/`\right`, `\dfrac`/`\tfrac`, text and unit wrappers, degrees, percent
        sign, numbers as exact fractions). A set written with `\{ \}` never equals a
        parenthesised tuple or interval. Everything else is parsed by math-verify and compared
        symbolically, in a worker process under a time and memory bound (`symbolic.py`);
        a gold that math-verify cannot parse falls back to the `normalize_text` key. Neither
        key reads digits differently: `32, 349` is never 32349.

Percent. A percent sign is a unit and is dropped on both sides (`28\%` = `28` = `28 percent`);
values are never rescaled by 100 in either direction, for any kind.

Outcomes (`Verdict.reason`): "correct"; "wrong"; "no_answer" (extraction failure, including an
unfinished thinking section); "truncated" (finish_reason == "length": scored wrong whatever it
contains, and reported apart); "timeout" (the symbolic comparison hit its time or memory limit:
scored wrong and logged); "too_complex" (the answer exceeds the size bounds checked before any
symbolic work: length, nesting, exponents, factorials; scored wrong).

math-verify (0.9.0) defaults that are overridden here: it falls back to the last bare number
and reads boxes inside an unfinished `<think>` (we only hand it our own extracted answer,
wrapped in one box, with fallback_mode="no_fallback"); its `signal.alarm` timeouts only work on
the main thread and swallow timeouts as parse failures (we disable them and bound the whole
comparison from outside, by killing the worker process); it reads `X%` as both X and X/100 (we
drop the sign first); it compares a set to a relation only when asked (we allow it only when the
gold itself is an interval, relation or membership).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import logging
import re
from collections.abc import Sequence

from jaxdistill.eval import extract as extract_lib
from jaxdistill.eval.symbolic import SymbolicChecker, default_checker

KINDS = ("aime", "amc", "math")
REASONS = ("correct", "wrong", "no_answer", "truncated", "timeout", "too_complex")

# Bounds checked before any answer reaches sympy; `10^{10^{10}}` or `100000!` would otherwise
# be evaluated exactly and hang or exhaust memory.
MAX_ANSWER_CHARS = 500
MAX_NESTING = 12
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The grade of one sample.

  Attributes:
    correct: whether the sample counts as solved.
    reason: one of `REASONS`.
    extracted: the answer that was graded (a MATH multi-box answer is joined with ", "), or None.
    vote_key: the kind-aware canonical answer for majority voting (a correct answer gets the
      gold's key, so equivalent correct forms vote together); None casts no vote (no answer,
      truncated).
    method: how the answer was extracted (`extract.Extraction.method`).
    flags: extraction flags (`extract.Extraction.flags`).
    details: how the comparison was decided, for reports.
  """
  correct: bool
  reason: str
  extracted: str | None
  vote_key: str | None
  method: str
  flags: tuple[str, ...] = ()
  details: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    """The verdict as a JSON-ready dict."""
    return dataclasses.asdict(self) | {"flags": list(self.flags)}


def grade(response: str, gold: str, task_kind: str, finish_reason: str | None = None, *,
          checker: SymbolicChecker | None = None) -> Verdict:
  """Grades one response.

  Args:
    response: the generated text of one sample.
    gold: the gold answer (a string; AIME/AMC integers may be written `033` or `27.0`).
    task_kind: "aime", "amc" or "math".
    finish_reason: the engine's reason for stopping; "length" marks a truncated sample.
    checker: the symbolic checker to use (default: `default_checker()`).

  Returns:
    A `Verdict`.

  Raises:
    ValueError: unknown `task_kind`, or a gold answer that is not valid for it.
  """
  gold_key = gold_vote_key(gold, task_kind)
  ex = extract_lib.extract(response)
  answer = ex.answer
  if task_kind == "math" and ex.group:
    answer = ", ".join(ex.group)
  verdict = dict(extracted=answer, method=ex.method, flags=ex.flags)
  if finish_reason == "length":
    return Verdict(False, "truncated", vote_key=None, details={"finish_reason": finish_reason},
                   **verdict)
  if answer is None:
    return Verdict(False, "no_answer", vote_key=None, **verdict)
  reason, details = compare_answers(answer, gold, task_kind, checker=checker)
  key = gold_key if reason == "correct" else vote_key(answer, task_kind)
  return Verdict(reason == "correct", reason, vote_key=key, details=details, **verdict)


def grade_all(samples: Sequence[tuple[str, str, str | None]], task_kind: str, *,
              checker: SymbolicChecker | None = None, threads: int = 1) -> list[Verdict]:
  """Grades many (response, gold, finish_reason) samples, in order.

  With `threads` > 1 they are graded concurrently; give a `checker` with as many workers so
  the symbolic comparisons run in parallel too.
  """
  def one(sample):
    response, gold, finish_reason = sample
    return grade(response, gold, task_kind, finish_reason, checker=checker)
  if threads <= 1:
    return [one(s) for s in samples]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(one, samples))


def compare_answers(answer: str, gold: str, task_kind: str, *,
                    checker: SymbolicChecker | None = None) -> tuple[str, dict]:
  """Compares an extracted answer with the gold answer.

  Returns:
    (reason, details): reason is "correct", "wrong", "timeout" or "too_complex"; details say
    which rule decided ("by": integer, string, text, shape or symbolic) and any notes.
  """
  gold_key = gold_vote_key(gold, task_kind)
  if len(answer) > MAX_ANSWER_CHARS:  # before any regex: the rules below assume short strings
    return "too_complex", {"by": "bounds", "note": f"longer than {MAX_ANSWER_CHARS} characters"}
  if task_kind in ("aime", "amc"):
    return _compare_integer(answer, int(gold_key), task_kind, checker)
  if is_text_answer(gold):
    if normalize_text(answer) == gold_key:
      return "correct", {"by": "text"}
    # A bare word gold (`Tuesday`) may still meet a formula; a wrapped one never does.
    if _TEXT_WRAPPER.search(gold) or is_text_answer(answer):
      return "wrong", {"by": "text"}
  gold_norm, pred_norm = normalize_math(gold), normalize_math(answer)
  if gold_norm == pred_norm:
    return "correct", {"by": "string"}
  shapes = _outer_shape(gold_norm), _outer_shape(pred_norm)
  if None not in shapes and shapes[0] != shapes[1]:
    return "wrong", {"by": "shape", "note": f"gold is a {shapes[0]}, answer a {shapes[1]}"}
  gold_sym, pred_sym = strip_decorations(gold), strip_decorations(answer)
  problem = too_complex(pred_sym) or too_complex(gold_sym)
  if problem:
    return "too_complex", {"by": "bounds", "note": problem}
  relation = bool(re.search(r"\\in\b|\\[lg]eq?\b|[<>]|\\[lg]t\b|\\cup|\\cap|\\infty", gold))
  status, value = (checker or default_checker()).run(("equal", gold_sym, pred_sym, relation))
  if status != "ok":
    log.warning("symbolic comparison %s: gold %r, answer %r", status, gold, answer[:200])
    return "timeout", {"by": "symbolic", "note": status}
  equal, note = value
  if note == "gold did not parse" and normalize_text(answer) == normalize_text(gold):
    return "correct", {"by": "text", "note": note}
  return ("correct" if equal else "wrong"), {"by": "symbolic"} | ({"note": note} if note else {})


def _compare_integer(answer: str, gold: int, kind: str,
                     checker: SymbolicChecker | None) -> tuple[str, dict]:
  value = parse_integer(answer)
  details = {"by": "integer"}
  text = strip_decorations(answer)
  exact = _exact_number(re.sub(r"\s+", "", text))
  if value is None and exact is not None:  # a plain decimal or fraction: no sympy needed
    if "/" in exact:
      return "wrong", details | {"note": "not an integer"}
    value = int(exact)
  if value is None:
    if "," in text:  # `32, 349`, `3,4`, `1,22`: a list (or a decimal comma), never one integer
      return "wrong", details | {"note": "a list, not an integer"}
    if not _looks_numeric(text):
      return "wrong", details | {"note": "not an integer"}
    problem = too_complex(text)
    if problem:
      return "too_complex", {"by": "bounds", "note": problem}
    status, result = (checker or default_checker()).run(("integer", "", text, False))
    if status != "ok":
      log.warning("symbolic evaluation %s: answer %r", status, answer[:200])
      return "timeout", {"by": "symbolic", "note": status}
    value, note = result
    details = {"by": "symbolic"}
    if value is None:
      return "wrong", details | {"note": note or "not an integer"}
  if kind == "aime" and not 0 <= value <= 999:
    details["note"] = "outside 0-999"
  return ("correct" if value == gold else "wrong"), details


def gold_vote_key(gold: str, task_kind: str) -> str:
  """The vote key of the gold answer; also validates it.

  Raises:
    ValueError: unknown `task_kind`, or a gold that is not an integer (aime: in 0-999) for an
      integer task, or empty.
  """
  if task_kind not in KINDS:
    raise ValueError(f"unknown task kind {task_kind!r}; choose from {', '.join(KINDS)}")
  if not isinstance(gold, str) or not gold.strip():
    raise ValueError(f"gold answer must be a non-empty string, got {gold!r}")
  if task_kind == "math":
    return _math_vote_key(gold)
  value = parse_integer(gold)
  if value is None or (task_kind == "aime" and not 0 <= value <= 999):
    kind_rule = "an integer 0-999" if task_kind == "aime" else "an integer"
    raise ValueError(f"{task_kind} gold answer {gold!r} is not {kind_rule}; grade it as 'math'")
  return str(value)


def vote_key(answer: str, task_kind: str) -> str:
  """The canonical form of `answer` under which majority voting counts it: for MATH, the
  `normalize_text` key of a text answer (so `(C)`, `\\textbf{(C)}` and `C` vote together), else
  `normalize_math`; the same function gives the gold's key, so equal keys grade equal."""
  if len(answer) > MAX_ANSWER_CHARS:
    return answer
  if task_kind in ("aime", "amc"):
    value = parse_integer(answer)
    if value is not None:
      return str(value)
    return normalize_math(answer)
  return _math_vote_key(answer)


def _math_vote_key(answer: str) -> str:
  # Words, choices and clock times vote by `normalize_text`, everything else by `normalize_math`.
  return normalize_text(answer) if is_text_answer(answer) else normalize_math(answer)


# ----------------------------------------------------------------------------- string rules

_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
_WRAPPERS = r"text|textbf|textnormal|textrm|mbox|mathrm|mathbf|boldsymbol"
# A unit at the end: `\text{ cm}^2`, `\mbox{ inches}`; one letter (`\mathrm{e}`) is no unit.
_UNIT_TAIL = re.compile(rf"\\(?:{_WRAPPERS})\{{(\s*[A-Za-z][^{{}}]*[A-Za-z.][^{{}}]*)\}}"
                        r"(?:\^\{?\d\}?)?\s*$")
_WRAPPER = re.compile(rf"\\(?:{_WRAPPERS})\{{([^{{}}]*)\}}")
_SUBSTITUTIONS = (
    (re.compile(r"\\[dtc]frac"), r"\\frac"),
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), ""),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\displaystyle|\\!"), ""),
    (re.compile(r"\\[,;: ]|~|\\quad|\\qquad"), " "),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree"), ""),
    (re.compile(r"\\%|%|\s(?:percent|pct)\.?\s*$"), ""),
    (re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]"), ""),
    (re.compile(r"\\le(?![A-Za-z])"), r"\\leq"),
    (re.compile(r"\\ge(?![A-Za-z])"), r"\\geq"),
)
_INTEGER = re.compile(r"[+-]?\d+")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d{1,3}(?: \d{3})+")
_INTEGRAL_DECIMAL = re.compile(r"([+-]?\d+)\.0*")


def strip_decorations(text: str) -> str:
  r"""Drops what never changes a value: math delimiters, `\left`/`\right`, spacing commands,
  degree marks, percent signs, `$`, a trailing unit in `\text{}`/`\mbox{}`, and text/bold
  wrappers (keeping their contents); maps `\dfrac`/`\tfrac`/`\cfrac` to `\frac`, Unicode
  minus signs to `-`, `\le`/`\ge` to `\leq`/`\geq`, and `\mathrm{e}` to `e`. Spaces are kept."""
  s = text.translate(_MINUS).strip()
  for pattern, repl in _SUBSTITUTIONS:
    s = pattern.sub(repl, s)
  s = s.strip().rstrip(".").strip()
  head = _UNIT_TAIL.sub("", s).strip()
  # Keep the "unit" when it is an operand: `x \in \mathbf{Reals}`, `2 + \text{apples}`.
  if head and head != s and not re.search(r"[-+=*/^_,(]$|\\[A-Za-z]+$", head):
    s = head
  while (unwrapped := _WRAPPER.sub(r"\1", s)) != s:
    s = unwrapped
  return s.strip().rstrip(".").strip()


def parse_integer(text: str) -> int | None:
  """The integer `text` writes, or None: `033`, `-1`, `27.0`, `1,000`, `1 000`, `10{,}000`,
  `\\boxed`-free decorations dropped, the last right-hand side of an `=`, trailing words
  ("204 minutes") dropped. Fractions, decimals with a non-zero fraction and lists are None."""
  s = strip_decorations(text)
  s = s.rsplit("=", 1)[-1].strip()
  # One or two trailing words are a unit ("204 minutes"); "3 and 4" is a list, not 3.
  s = re.sub(r"(?<=\d)\s+(?!(?:and|or)\b)[A-Za-z]+(?:\s+[A-Za-z]+)?\.?$", "", s)
  s = re.sub(r"\s+", " ", s)
  if _INTEGER.fullmatch(s):
    return int(s)
  if _GROUPED.fullmatch(s):
    return int(s.replace(",", "").replace(" ", ""))
  if m := _INTEGRAL_DECIMAL.fullmatch(s):
    return int(m.group(1))
  return None


def normalize_math(text: str) -> str:
  """A canonical string for a MATH answer: decorations stripped (`strip_decorations`), spaces
  removed, a one-letter left-hand side (`x=`) dropped, and exact numbers written as `p/q`
  (`0.5`, `\\frac12`, `1/2` all give `1/2`). Equal strings mean equal answers; unequal strings
  may still be equivalent (that is for the symbolic check)."""
  s = strip_decorations(text)
  grouped = _GROUPED.fullmatch(s.strip())
  if grouped:
    s = s.replace(",", "").replace(" ", "")
  s = re.sub(r"\s+", "", s)
  if s.count("=") == 1 and re.match(r"[A-Za-z]=", s):
    s = s[2:]
  number = _exact_number(s)
  return number if number is not None else s


def _exact_number(s: str) -> str | None:
  m = re.fullmatch(r"([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{([+-]?\d+)\}|(\d))", s)
  try:
    if _INTEGER.fullmatch(s):
      value = fractions.Fraction(int(s))
    elif re.fullmatch(r"[+-]?(?:\d+\.\d*|\.\d+)", s):
      value = fractions.Fraction(s)
    elif m:
      value = fractions.Fraction(int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5)))
      value = -value if m.group(1) == "-" else value
    elif re.fullmatch(r"[+-]?\d+/\d+", s):
      value = fractions.Fraction(s)
    else:
      return None
  except ZeroDivisionError:
    return None
  return str(value)  # Fraction prints "p/q", or "p" when whole


# ------------------------------------------------------------------------------ text answers

# Font wrappers; a font never changes what a word says. The prose ones (not \math*, where a
# lone letter is a symbol such as \mathrm{e}) also mark a lone letter as a choice.
_TEXT_WRAPPER = re.compile(r"\\(?:text(?:bf|it|rm|sf|tt|up|sc|normal)?|emph|mbox"
                           r"|math(?:rm|bf|it|sf|tt)|boldsymbol)\s*\{([^{}]*)\}")
_PROSE_WRAPPER = re.compile(r"\\(?:text(?:bf|it|rm|sf|tt|up|sc|normal)?|emph|mbox)\s*\{")
_TEXT_SPACING = re.compile(r"\$|\\[()\[\]]|\\[,;: ]|~|\\q?quad(?![A-Za-z])|[{}]"
                           r"|\\(?:left|right|[bB]igg?)(?![A-Za-z])")
_QUOTES = "\"'`\u2018\u2019\u201c\u201d"
_LONE_CHOICE = re.compile(r"\(?\s*([A-Za-z])\s*\)?")
# `(C) Plane`, `C) 12`: a capital and its closing parenthesis, then the option's own text,
# which must not name or hedge towards another option (`(C) or (D)`, `(C) and D`).
_LEAD_CHOICE = re.compile(r"\(?\s*([A-Z])\s*\)\s*(.*)", re.DOTALL)
_HEDGE = re.compile(r"\(\s*[A-Z]\s*\)|\b(?:or|and)\s+\(?[A-Z]\b")
_CLOCK = re.compile(r"\d{1,2}:\d{2}(?::\d{2})?\s*(?:[ap]\.?\s*m\b\.?)?", re.IGNORECASE)
_WORDS = re.compile(r"[^\W\d_](?:[^\W\d_]|[\s.,;:'!?&/()-])*")  # [^\W\d_]: a letter
_BARE_WORDS = re.compile(r"[^\W\d_](?:[^\W\d_]|[\s.,;'!?])*")


def normalize_text(text: str) -> str:
  r"""The canonical form of an answer that is words, a choice or a clock time, not mathematics.

  One function for every text comparison: a gold that `is_text_answer` calls text, or that
  math-verify cannot parse, is compared with the answer by this key, and a text answer votes
  under it, so equal keys mean equal answers in both places. Rules, in order:

    1. Font wrappers give way to their contents, innermost first: `\text`, `\textbf`,
       `\textit`, `\textrm`, `\textsf`, `\texttt`, `\textup`, `\textsc`, `\textnormal`,
       `\emph`, `\mbox`, `\mathrm`, `\mathbf`, `\mathit`, `\mathsf`, `\mathtt`, `\boldsymbol`.
    2. Math delimiters (`$`, `\(`, `\[`), spacing commands (`\ `, `\,`, `\;`, `\:`, `~`,
       `\quad`), sizing commands (`\left`, `\right`, `\big`...) and leftover braces become
       spaces; `\!` is dropped; Unicode minus signs become `-`.
    3. Quotation marks around the whole answer are dropped (`"even"`, ``` ``even'' ```).
    4. Multiple choice (decided here, and returned as is): a lone letter, with or without
       parentheses (`C`, `(C)`, `(c)`), is that capital letter; a capital with its closing
       parenthesis followed by the option's own text (`(C) Plane`, `(B)\ 3(1+r/10)^x=7`) is
       the letter, unless that text names or hedges towards another option (`(C) or (D)`); a
       comma-separated list of choices (`(C), (A)`) is its capitals, sorted, joined by ",".
       This is the key the bare capital `C` has as mathematics, so `C` and `(C)` vote together.
    5. Case is folded (`Tuesday` = `tuesday`, `AM` = `am`).
    6. A full stop after a letter is an abbreviation dot and is dropped (`a.m.` = `am`).
    7. Trailing punctuation (`.`, `,`, `;`, `:`, `!`, `?`) is dropped.
    8. Whitespace is dropped (`9:00 \text{ a.m.}` = `\text{9:00a.m.}`), except between a digit
       or a comma and a following digit, where one space is kept: digits are never regrouped,
       so `32, 349` stays apart from `32,349` and from `32349`.
    9. A clock hour's leading zero is dropped (`09:00` = `9:00`).
   10. The key is marked `\text{...}` (a wrapper `normalize_math` always takes off), so a word
       answer never votes with (or grades equal to) a mathematical one such as `xy`.

  Nothing else is loosened: digits, signs, decimal points and other words stay as written.
  """
  s = _plain_text(text)
  choice = _choice_key(s)
  if choice is not None:
    return choice
  s = s.casefold()
  s = re.sub(r"(?<=[^\W\d_])\.", "", s)
  s = s.rstrip(".,;:!? \t\n")
  s = re.sub(r"\s+", _keep_digit_gap, s)
  s = re.sub(r"(?<!\d)0(\d:\d\d)", r"\1", s)
  return "\\text{" + s + "}"


def is_text_answer(text: str) -> bool:
  r"""Whether `text` is prose rather than mathematics, and so compares by `normalize_text`.

  Text is: a choice (`(C)`, `\text{C}`, `\textbf{(C)}~12`, `\text{A, C}`; a bare `C` is a
  variable), a clock time with a.m./p.m. (or inside a text wrapper), or words: after the
  wrappers go, letters and punctuation only (no digit, operator or command), with a run of two
  letters inside a wrapper (`\text{even}`, `\mathrm{Tuesday}`) or of three bare (`Tuesday`;
  `p - q`, `ab` and `\mathrm{e}` stay mathematics).
  """
  prose = bool(_PROSE_WRAPPER.search(text))
  wrapped = prose or bool(_TEXT_WRAPPER.search(text))
  s = _plain_text(text)
  if _choice_key(s) is not None and (prose or "(" in s or ")" in s):
    return True
  clock = _CLOCK.fullmatch(s)
  if clock:
    return prose or bool(re.search(r"[ap]\.?\s*m", s, re.IGNORECASE))
  if wrapped:
    return bool(_WORDS.fullmatch(s)) and bool(re.search(r"[^\W\d_]{2}", s))
  return bool(_BARE_WORDS.fullmatch(s)) and bool(re.search(r"[^\W\d_]{3}", s))


def _plain_text(text: str) -> str:
  # Rules 1-3 of `normalize_text`: wrappers, delimiters and spacing, surrounding quotes.
  s = text.translate(_MINUS)
  while (unwrapped := _TEXT_WRAPPER.sub(r" \1 ", s)) != s:
    s = unwrapped
  s = _TEXT_SPACING.sub(" ", s.replace("\\!", "")).strip()
  quoted = len(s) > 1 and s[0] in _QUOTES and s[-1] in _QUOTES
  return s.strip(_QUOTES).strip() if quoted else s


def _choice_key(s: str) -> str | None:
  # Rule 4 of `normalize_text`, on a string already through rules 1-3.
  if m := _LONE_CHOICE.fullmatch(s):
    return m.group(1).upper()
  parts = s.split(",")
  if len(parts) > 1 and all(_LONE_CHOICE.fullmatch(p.strip()) for p in parts):
    return ",".join(sorted(p.strip().strip("() ").upper() for p in parts))
  if (m := _LEAD_CHOICE.fullmatch(s)) and not _HEDGE.search(m.group(2)):
    return m.group(1)
  return None


def _keep_digit_gap(m: re.Match) -> str:
  s, i, j = m.string, m.start(), m.end()
  return " " if 0 < i and j < len(s) and s[i - 1] in "0123456789," and s[j].isdigit() else ""


def _outer_shape(norm: str) -> str | None:
  if norm.startswith("\\{") and norm.endswith("\\}"):
    return "set"
  if norm[:1] in "([" and norm[-1:] in ")]":
    depth = 0
    for c in norm[1:-1]:
      depth += c in "([{"
      depth -= c in ")]}"
      if c == "," and depth == 0:
        return "tuple or interval"
  return None


def _looks_numeric(text: str) -> bool:
  # An exact arithmetic expression without variables, worth evaluating for an integer task.
  bare = re.sub(r"\\(?:frac|sqrt|cdot|times|div|binom|pi)(?![A-Za-z])", "", text)
  return bool(re.search(r"\d", bare)) and not re.search(r"[A-Za-z\\]", bare)


def too_complex(text: str) -> str | None:
  """Why `text` must not reach sympy (it could hang or exhaust memory), or None if it may."""
  if len(text) > MAX_ANSWER_CHARS:
    return f"longer than {MAX_ANSWER_CHARS} characters"
  depth = deepest = 0
  for c in text:
    depth += c in "({["
    depth -= c in ")}]"
    deepest = max(deepest, depth)
  if deepest > MAX_NESTING:
    return f"nested deeper than {MAX_NESTING}"
  for m in re.finditer(r"\^\s*", text):
    i = m.end()
    if text[i:i + 1] == "{":
      end = extract_lib.match_brace(text, i)
      exponent = text[i + 1:end] if end > 0 else text[i + 1:]
    else:
      exponent = re.match(r"\d*", text[i:]).group() or text[i:i + 1]
    if "^" in exponent and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", exponent)):
      return "numeric power tower"
    if "!" in exponent:
      return "factorial in an exponent"
    if any(int(d) > MAX_EXPONENT for d in re.findall(r"\d+", exponent)):
      return f"exponent above {MAX_EXPONENT}"
  for m in re.finditer(r"(\d+)\s*\}?\s*!", text):
    if int(m.group(1)) > MAX_FACTORIAL:
      return f"factorial above {MAX_FACTORIAL}!"
  return None
