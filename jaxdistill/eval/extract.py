r"""The final answer of a model response: thinking cut off, then the last box, else a cue.

Rules, in order (`extract(response)`):

  1. Thinking. When the response has a thinking section, only the text after it is read: after
     the last `</think>` (R1/QwQ; the opening `<think>` may sit in the prompt) or after the last
     `<|end_of_thought|>` (ShareGPT/Bespoke-Stratos traces; `<|begin_of_solution|>` markers are
     dropped). A `<think>` or `<|begin_of_thought|>` that opens and never closes means the model
     never left its thinking: the outcome is `method="unfinished_thinking"` with no answer, and
     boxes inside that thinking are never read (they are drafts, often of a wrong answer). A box
     that appears only inside a finished thinking section is not an answer either; the flag
     `boxed_only_in_thinking` records it.
  2. Boxes. The last complete `\boxed{...}`, `\fbox{...}` or `\framebox[..]{...}`, found by the
     macro token (a backslash and the name, not followed by a letter), so the word "boxed" in
     prose is never a box. Braces are matched with a stack that skips escaped characters, so
     `\boxed{\frac{a}{b}}` and `\boxed{\{1,2\}}` come out whole. `\boxed 5` (no braces) takes the
     text up to the next `$` or whitespace, as TeX would read a one-token argument written by a
     model. Boxes left open (a truncated `\boxed{12`) and empty boxes are skipped and flagged.
     All complete boxes are kept in `boxes`; when they do not all agree (after whitespace and
     spelling-only differences are removed) `multiple_disagreeing_boxes` is set, so it can be
     counted (for any difference, so `$\boxed{3}$ and $\boxed{4}$` counts too); the last box
     is still the answer. A run of boxes at the end, on one line, joined only by commas,
     "and"/"or" or math delimiters (`$\boxed{1}$ and $\boxed{2}$`) is also kept as `group`: a
     multi-part answer for MATH, while integer tasks use the last box. Boxes on separate lines
     are revisions, not parts.
  3. Cues (secondary, only when there is no box): the last "final answer is X", "final answer:
     X", a "Final Answer" heading with X on the next line, "the answer is X" or a line starting
     "Answer: X", where X is a `$...$`, `$$...$$`,
     `\(...\)` or `\[...\]` math span, or the rest of the line up to a full stop. The Minerva
     tail "I hope it is correct" is dropped. Values longer than `MAX_CUE_CHARS` are prose, not
     answers, and are refused.
  4. Nothing else. There is no fallback to the last number or the last displayed formula: in
     a long chain of thought that is close to a random pick and scores false positives on
     AIME's 0-999 range. Such a response has `method="none"`, an extraction failure to count.

Plain Python; every step is linear in the response length.
"""

from __future__ import annotations

import dataclasses
import re

# Longest natural-language answer accepted after a cue; anything longer is a sentence.
MAX_CUE_CHARS = 120

_UNBRACED_END = re.compile(r"[\s$]")
_THINK_OPEN = ("<think>", "<|begin_of_thought|>")
_THINK_CLOSE = ("</think>", "<|end_of_thought|>")
_SOLUTION_MARKERS = ("<|begin_of_solution|>", "<|end_of_solution|>")

# `\boxed`, `\fbox`, `\framebox` as macros: `(?![A-Za-z])` keeps `\boxedanswer` and friends out.
_BOX_TOKEN = re.compile(r"\\(boxed|fbox|framebox)(?![A-Za-z])")
# What may separate the boxes of one multi-part answer: `$\boxed{1}$, $\boxed{2}$ and ...`.
_GROUP_SEPARATOR = re.compile(
    r"(?:\s|\$|\\[()\[\]]|,|;|\\quad|\\qquad|\\text\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b)*")
_CUE = re.compile(
    r"(?:final\s+answer(?:\s+is|\s*\**\s*[:：]|\s*\**[ \t]*\n)"  # "Final Answer:", a heading
    r"|the\s+answer\s+is|^[ \t>#*]*answer\s*\**\s*[:：])[ \t*:：]*",
    re.IGNORECASE | re.MULTILINE)
_HOPE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_MATH_SPANS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Spelling-only differences between two boxes: they do not make the boxes disagree.
_SPELLING = re.compile(r"\s+|\\left|\\right|\\[,;:! ]|\\displaystyle")


@dataclasses.dataclass(frozen=True)
class Extraction:
  """What `extract` found.

  Attributes:
    answer: the final answer as written inside its box or after its cue (stripped), or None.
    method: "boxed", "cue", "none" (nothing found: an extraction failure) or
      "unfinished_thinking" (a thinking section never closed: no answer by rule).
    boxes: the contents of every complete box after the thinking section, in order.
    group: the trailing run of two or more boxes that together form one answer, else ().
    multiple_disagreeing_boxes: the boxes do not all say the same thing (spacing aside).
    unfinished_thinking: a thinking section opened and never closed.
    boxed_only_in_thinking: no box after the thinking section, but one inside it.
    unclosed_box: a box macro whose braces never close, or an empty box (both skipped).
  """
  answer: str | None
  method: str
  boxes: tuple[str, ...] = ()
  group: tuple[str, ...] = ()
  multiple_disagreeing_boxes: bool = False
  unfinished_thinking: bool = False
  boxed_only_in_thinking: bool = False
  unclosed_box: bool = False

  @property
  def flags(self) -> tuple[str, ...]:
    """Names of the flags that are set, for reports."""
    names = ("multiple_disagreeing_boxes", "unfinished_thinking", "boxed_only_in_thinking",
             "unclosed_box")
    return tuple(name for name in names if getattr(self, name))


def extract(response: str) -> Extraction:
  """The final answer of `response` (one sample's generated text) by the rules in the module doc."""
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  final, thinking, unfinished = split_thinking(response)
  if unfinished:
    return Extraction(None, "unfinished_thinking", unfinished_thinking=True)
  boxes, spans, unclosed = find_boxes(final)
  if boxes:
    distinct = {_SPELLING.sub("", b) for b in boxes}
    return Extraction(boxes[-1], "boxed", tuple(boxes), _trailing_group(final, boxes, spans),
                      multiple_disagreeing_boxes=len(distinct) > 1, unclosed_box=unclosed)
  in_thinking = bool(thinking) and bool(find_boxes(thinking)[0])
  cue = find_cue(final)
  if cue is not None:
    return Extraction(cue, "cue", boxed_only_in_thinking=in_thinking, unclosed_box=unclosed)
  return Extraction(None, "none", boxed_only_in_thinking=in_thinking, unclosed_box=unclosed)


def split_thinking(response: str) -> tuple[str, str, bool]:
  """Splits off the thinking section.

  Returns:
    (final, thinking, unfinished): the text to read answers from, the thinking text before it
    ("" when there is none), and whether a thinking section was left open (then `final` is "").
  """
  close_at, close_len = -1, 0
  for tag in _THINK_CLOSE:
    i = response.rfind(tag)
    if i > close_at:
      close_at, close_len = i, len(tag)
  start = close_at + close_len if close_at >= 0 else 0
  # An opening tag after the last close (or with no close at all) was never finished.
  if any(response.find(tag, start) >= 0 for tag in _THINK_OPEN):
    return "", response, True
  if close_at < 0:
    return response, "", False
  final = response[start:]
  for marker in _SOLUTION_MARKERS:
    final = final.replace(marker, " ")
  return final, response[:close_at], False


def find_boxes(text: str) -> tuple[list[str], list[tuple[int, int]], bool]:
  """Every complete box in `text`.

  Returns:
    (contents, spans, unclosed): the stripped contents in order, each box's (start, end) in
    `text`, and whether some box macro never closed or was empty.
  """
  contents, spans, unclosed = [], [], False
  closing = None
  pos = 0
  while (m := _BOX_TOKEN.search(text, pos)) is not None:
    if closing is None:  # one linear pass, so a response full of open braces stays cheap
      closing = brace_pairs(text)
    i = m.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if m.group(1) == "framebox":  # \framebox[width][pos]{...}: skip the optional arguments
      while i < len(text) and text[i] == "[":
        j = text.find("]", i)
        if j < 0:
          break
        i = j + 1
    if i < len(text) and text[i] == "{":
      end = closing.get(i, -1)
      if end < 0:
        unclosed = True
        pos = m.end()
        continue
      body, pos = text[i + 1:end].strip(), end + 1
    else:
      # `\boxed 5`: one unbraced argument, up to `$` or whitespace.
      stop = _UNBRACED_END.search(text, i)
      end = stop.start() if stop else len(text)
      body, pos = text[i:end].rstrip(".,;:").strip(), max(end, m.end())
    body = _unwrap_nested_box(body)
    if body:
      contents.append(body)
      spans.append((m.start(), pos))
    else:
      unclosed = True
  return contents, spans, unclosed


def brace_pairs(text: str) -> dict[int, int]:
  """{index of "{": index of its matching "}"} for every brace group that closes in `text`.
  Escaped characters (`\\{`, `\\}`) are skipped."""
  pairs, stack, i = {}, [], 0
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      stack.append(i)
    elif c == "}" and stack:
      pairs[stack.pop()] = i
    i += 1
  return pairs


def match_brace(text: str, open_at: int) -> int:
  """Index of the `}` closing the `{` at `open_at`, or -1; escaped characters are skipped."""
  depth, i = 0, open_at
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return -1


def find_cue(text: str) -> str | None:
  """The value after the last natural-language answer cue in `text`, or None."""
  matches = list(_CUE.finditer(text))
  for m in reversed(matches):
    value = _read_cue_value(text, m.end())
    if value:
      return value
  return None


def _read_cue_value(text: str, i: int) -> str | None:
  # Only a window after the cue is read, so many cues in a long response stay linear.
  text = text[i:i + 8 * MAX_CUE_CHARS]
  i = len(text) - len(text.lstrip(" \t\n*"))
  for opener, closer in _MATH_SPANS:
    if text.startswith(opener, i):
      j = text.find(closer, i + len(opener))
      if j < 0:
        return None
      value = text[i + len(opener):j].strip()
      break
  else:
    line_end = text.find("\n", i)
    value = text[i:] if line_end < 0 else text[i:line_end]
    value = _HOPE.sub("", value)
    # A full stop followed by a space ends the sentence (a decimal point does not), and so does
    # a comma that starts a clause ("42, which is ...").
    sentence = re.search(r"\.(?:\s|$)|,\s+(?:which|so|since|because|as|and)\b", value)
    value = (value[:sentence.start()] if sentence else value).strip().rstrip(".,;:*").strip()
  value = _HOPE.sub("", value).strip()
  # A box macro here never closed (a closed one would have won): it is no answer either.
  if not value or len(value) > MAX_CUE_CHARS or _BOX_TOKEN.search(value):
    return None
  return value


def _unwrap_nested_box(body: str) -> str:
  # `\boxed{\boxed{5}}`: the inner box is the answer. A few levels at most, so that a
  # pathological tower of boxes costs linear time.
  for _ in range(4):
    m = _BOX_TOKEN.match(body)
    if m is None:
      break
    i = m.end()
    if i < len(body) and body[i] == "{" and match_brace(body, i) == len(body) - 1:
      body = body[i + 1:-1].strip()
    else:
      break
  return body


def _trailing_group(text: str, boxes: list[str], spans: list[tuple[int, int]]) -> tuple[str, ...]:
  count = 1
  while count < len(boxes):
    gap = text[spans[-count - 1][1]:spans[-count][0]]
    if "\n" in gap or _GROUP_SEPARATOR.fullmatch(gap) is None:
      break
    count += 1
  group = boxes[-count:]
  if count < 2 or len({_SPELLING.sub("", b) for b in group}) < 2:
    return ()
  return tuple(group)
