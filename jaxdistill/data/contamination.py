r"""Training/evaluation overlap: matches training prompts against the bundled evaluation problems
by normalised n-grams and whole-problem containment, and writes a copy without the hits.

Plain Python, no JAX. It runs before training on any data that `sources.open_source` reads.

What is compared. The user turns of each training record, as `formats.to_conversations` gives
them, are compared with every transcription of every evaluation problem (the task's own text,
plus the alternatives in `eval.tasks.problem_variants`). System prompts and assistant turns are
not compared: the risk is training on the test question itself.

Normalisation (`tokenize`), the same on both sides:
  - NFKC, lowercase, and a few Unicode symbols mapped to their LaTeX names (π, ≤, ×, −, ...).
  - Figure code (`[asy]`, `<asy>`, TikZ) and `\begin{..}`/`\end{..}` are removed. Copies of a
    problem often drop the figure or redraw it, and 200 tokens of coordinates would otherwise
    decide the score of a 50-word problem.
  - Layout-only LaTeX commands (`\left`, `\displaystyle`, `\text`, `\mathrm`, spacing such as
    `\,` and `\quad`) are removed. Aliases are merged (`\dfrac` -> frac, `\leq` -> le). Other
    command names are kept as words (`\sqrt` -> sqrt). Dropping every command would reduce
    "Evaluate $\lceil\sqrt{20}\rceil^2$" to "evaluate 2 0 2", which also matches
    "Evaluate $20^2$".
  - Tokens are runs of letters, numbers (`12`, `2.5`; thousands separators such as `1,000` and
    `1{,}000` are removed), and the math operators `+ - / = < > ^ | ! ( ) [ ] %`. Whitespace,
    braces, `$` and other punctuation are dropped, so `3x` and `3 x` agree: in math mode,
    spacing carries no meaning. An unbraced digit after `^`, `_`, `\frac` or `\binom` is one
    argument, as TeX reads it, so `\frac12` = `\frac{1}{2}` and `\log_264` = `\log_{2}64`.
    Whole numbers are kept as tokens, so that "Simplify $\sqrt{2420}$." does not contain
    "Simplify $\sqrt{242}$.".

Scores, per (training record, evaluation item), as the maximum over the item's transcriptions:
  - An eval text with at least `ngram` tokens scores the fraction of its distinct n-grams that
    occur in the record's user turns ("ngram"). A verbatim copy, even one wrapped in an
    instruction such as "Return your final response within \boxed{}.", scores 1.0. One edited
    word removes up to n n-grams, so a lightly edited copy of a 60-token problem still scores
    about 0.75. A variant with new numbers loses the n-grams around each changed number.
  - A shorter eval text (many MATH problems, such as "Simplify $\sqrt{242}$.") has no n-gram,
    or too few for a fraction to mean much. It scores 1.0 if its whole token sequence occurs
    contiguously in one user turn, and 0 otherwise ("substring"). An eval text with fewer than
    `MIN_TOKENS` tokens is too generic to search for. Such texts are listed in
    `ContaminationIndex.unindexed`, and the bundled sets have none.
A pair is reported when its score is at least `threshold`. The default is 0.5, meaning at least
half of the problem's n-grams are copied. On the bundled sets, two different problems share at
most 0.13 of their 13-grams (AIME boilerplate such as "relatively prime positive integers. Find
m+n"). Independent transcriptions of the same AIME problem, by contrast, score 0.5 or more in 79
of 90 pairs. Decontamination favours recall, because dropping a few extra training records
costs little, while training on a test problem invalidates the evaluation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from jaxdistill import storage
from jaxdistill.data import formats
from jaxdistill.eval import tasks as eval_tasks

DEFAULT_NGRAM = 13
DEFAULT_THRESHOLD = 0.5
MIN_TOKENS = 3

# Figures: closed blocks, or an unclosed one up to the end of the text (a truncated copy).
_FIGURE = re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)|<asy>.*?(?:</asy>|\Z)"
                     r"|\\begin\{tikzpicture\}.*?(?:\\end\{tikzpicture\}|\Z)", re.S | re.I)
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\s*\{[^}]*\}")
_COMMAND = re.compile(r"\\([a-z]+|.)", re.S)  # applied after lowercasing
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))")
_FRACTION_DIGITS = re.compile(r"\\([dtc]?frac|[dt]?binom)\s*(\d)\s*(\d)")
_SCRIPT_DIGIT = re.compile(r"([_^])\s*(\d)")
_TOKEN = re.compile(r"[^\W\d_]+|\d+(?:\.\d+)?|[-+/=<>^|!()\[\]%]")
_SYMBOLS = str.maketrans({
    "−": "-", "–": "-", "—": "-", "≤": r" \le ", "≥": r" \ge ", "≠": r" \ne ",
    "×": r" \times ", "·": r" \cdot ", "⋅": r" \cdot ", "π": r" \pi ", "√": r" \sqrt ",
    "∞": r" \infty ", "°": r" \circ ", "…": r" \dots "})
# Commands that only change how a formula looks. Lowercased, because matching is done on
# lowercased text (so `\Big` is "big").
_LAYOUT = frozenset("""
    left right big bigl bigr bigm bigg biggl biggr biggm middle displaystyle textstyle
    scriptstyle text textbf textit textrm textsf texttt textnormal textup mathrm mathbf mathit
    mathsf mathtt mathbb mathcal mathfrak mathscr mathnormal boldsymbol bm operatorname mathop
    ensuremath mbox hbox emph quad qquad hspace vspace hfill noindent newline linebreak
    limits nolimits lbrace rbrace phantom hphantom vphantom smallskip medskip bigskip centering
    nonumber notag allowbreak nobreak relax strut par indent tag label
    """.split())
_ALIASES = {
    "dfrac": "frac", "tfrac": "frac", "cfrac": "frac", "dbinom": "binom", "tbinom": "binom",
    "leq": "le", "leqslant": "le", "geq": "ge", "geqslant": "ge", "neq": "ne",
    "ldots": "dots", "cdots": "dots", "dotsb": "dots", "dotsc": "dots", "dotsm": "dots",
    "rightarrow": "to", "lvert": "|", "rvert": "|", "vert": "|", "mid": "|", "%": "%", "|": "|",
}


def tokenize(text: str) -> list[str]:
  """The normalised tokens of `text` (the rules are in the module docstring)."""
  text = unicodedata.normalize("NFKC", text).translate(_SYMBOLS)
  text = _ENVIRONMENT.sub(" ", _FIGURE.sub(" ", text))
  text = _FRACTION_DIGITS.sub(r"\\\1{\2}{\3}", _THOUSANDS.sub("", text))
  text = _SCRIPT_DIGIT.sub(r"\1{\2} ", text)
  text = _COMMAND.sub(_command, text.lower())
  return _TOKEN.findall(text)


def normalize(text: str) -> str:
  """`tokenize(text)` joined by single spaces: the form that scores compare, for display."""
  return " ".join(tokenize(text))


def _command(m: re.Match) -> str:
  name = m.group(1)
  if name in _ALIASES:
    return f" {_ALIASES[name]} "
  if name in _LAYOUT or not name.isalpha():
    return " "  # layout, or a control symbol such as `\,` `\\` `\{` `\$` `\[`
  return f" {name} "


# -- The index of evaluation problems ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalText:
  """One transcription of one evaluation problem."""
  task: str
  id: str
  text: str


class ContaminationIndex:
  """Evaluation problems indexed for `match`: n-grams of long texts, whole short texts.

  Args:
    texts: the transcriptions to index. Several may share a (task, id), and the item then
      scores the best of them.
    ngram: n-gram length in tokens.
    threshold: the smallest score that counts as a match, in (0, 1].
  """

  def __init__(self, texts: Iterable[EvalText], ngram: int = DEFAULT_NGRAM,
               threshold: float = DEFAULT_THRESHOLD):
    if ngram < 1:
      raise ValueError(f"ngram must be at least 1, got {ngram}")
    if not 0 < threshold <= 1:
      raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    self.ngram, self.threshold = ngram, threshold
    self.items: dict[str, set[str]] = {}  # task -> item ids, including unindexed ones
    self.unindexed: list[EvalText] = []
    self._keys: list[tuple[str, str]] = []  # per indexed text: (task, id)
    self._num_grams: list[int] = []  # per long text: its distinct n-grams (0 for short ones)
    self._grams: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    self._short: list[tuple[str, ...]] = []  # per text: its tokens when short, else ()
    # Short texts by their first MIN_TOKENS tokens, so that containment is one pass over a
    # training turn plus a comparison at each anchor hit.
    self._anchors: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
    for t in texts:
      self.items.setdefault(t.task, set()).add(t.id)
      tokens = tuple(tokenize(t.text))
      if len(tokens) < MIN_TOKENS:
        self.unindexed.append(t)
        continue
      k = len(self._keys)
      self._keys.append((t.task, t.id))
      if len(tokens) >= ngram:
        grams = set(_ngrams(tokens, ngram))
        for g in grams:
          self._grams[g].append(k)
        self._num_grams.append(len(grams))
        self._short.append(())
      else:
        self._anchors[tokens[:MIN_TOKENS]].append(k)
        self._num_grams.append(0)
        self._short.append(tokens)

  @classmethod
  def from_tasks(cls, names: Sequence[str] = eval_tasks.TASKS, *, ngram: int = DEFAULT_NGRAM,
                 threshold: float = DEFAULT_THRESHOLD,
                 variants: bool = True) -> ContaminationIndex:
    """An index of the bundled tasks `names`, with their alternative transcriptions unless
    `variants` is False."""
    texts = []
    for name in names:
      for item in eval_tasks.load_task(name):
        texts.append(EvalText(name, item["id"], item["problem"]))
      if variants:
        for item_id, alternatives in eval_tasks.problem_variants(name).items():
          texts.extend(EvalText(name, item_id, text) for text in alternatives)
    return cls(texts, ngram=ngram, threshold=threshold)

  def match(self, texts: Sequence[str]) -> list[tuple[str, str, float, str]]:
    """The evaluation items that `texts` (one record's user turns) overlap.

    Returns:
      (task, eval id, score, method) for each item scoring at least `threshold`, best first.
      The method is "ngram" or "substring" (see the module docstring).
    """
    grams: set[tuple[str, ...]] = set()
    contained: set[int] = set()
    for text in texts:
      tokens = tokenize(text)
      grams.update(_ngrams(tokens, self.ngram))
      if self._anchors:
        contained.update(self._contained(tokens))
    shared = collections.Counter(k for g in grams for k in self._grams.get(g, ()))
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for k, count in shared.items():
      best[self._keys[k]] = max(best.get(self._keys[k], (0.0, "")),
                                (count / self._num_grams[k], "ngram"))
    for k in contained:
      best[self._keys[k]] = (1.0, "substring")
    out = [(task, item_id, score, method) for (task, item_id), (score, method) in best.items()
           if score >= self.threshold]
    return sorted(out, key=lambda m: (-m[2], m[0], m[1]))

  def _contained(self, tokens: Sequence[str]) -> Iterable[int]:
    tokens = tuple(tokens)
    for i in range(len(tokens) - MIN_TOKENS + 1):
      for k in self._anchors.get(tokens[i:i + MIN_TOKENS], ()):
        short = self._short[k]
        if tokens[i:i + len(short)] == short:
          yield k

  def __repr__(self):
    sizes = ", ".join(f"{task}: {len(ids)}" for task, ids in self.items.items())
    return f"ContaminationIndex({sizes}; {self.ngram}-grams, threshold {self.threshold})"


def _ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
  tokens = tuple(tokens)
  return (tokens[i:i + n] for i in range(len(tokens) - n + 1))


# -- Checking training records ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Match:
  """One training record overlapping one evaluation item."""
  location: str  # the training record, as its source names it ("path:line" for JSONL)
  task: str
  eval_id: str
  score: float
  method: str  # "ngram" or "substring"


@dataclasses.dataclass
class Report:
  """What `check_records` found. Records are counted once each, however many turns they hold.

  Attributes:
    items: task -> number of evaluation items in the index.
    records: training records read, including the skipped ones.
    matches: every (record, eval item) pair at or above the threshold, in record order.
    skipped: (location, reason) for each record that was not checked. A record is skipped
      when it is unreadable (bad JSON or UTF-8), when `to_conversations` rejects it, or when
      it is pre-tokenised, which leaves no text to compare.
  """
  ngram: int
  threshold: float
  items: dict[str, int]
  records: int = 0
  matches: list[Match] = dataclasses.field(default_factory=list)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def checked(self) -> int:
    return self.records - len(self.skipped)

  @property
  def flagged(self) -> set[str]:
    """Locations of the training records that overlap at least one evaluation item."""
    return {m.location for m in self.matches}

  def per_task(self) -> dict[str, dict[str, Any]]:
    """task -> {"items", "contaminated" (sorted eval ids), "flagged_records"}."""
    out = {task: {"items": n, "contaminated": set(), "flagged_records": set()}
           for task, n in self.items.items()}
    for m in self.matches:
      out[m.task]["contaminated"].add(m.eval_id)
      out[m.task]["flagged_records"].add(m.location)
    return {task: {"items": c["items"], "contaminated": sorted(c["contaminated"]),
                   "flagged_records": len(c["flagged_records"])} for task, c in out.items()}

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready form of the whole report."""
    return {"ngram": self.ngram, "threshold": self.threshold, "records": self.records,
            "checked": self.checked, "flagged_records": len(self.flagged),
            "per_task": self.per_task(),
            "matches": [dataclasses.asdict(m) for m in self.matches],
            "skipped": [{"location": loc, "reason": why} for loc, why in self.skipped]}

  def summary(self, max_matches: int = 10) -> str:
    """A few lines for people: per-task counts, the first matches and the first skips."""
    lines = [f"checked {self.checked} of {self.records} training records "
             f"({len(self.skipped)} skipped) against {sum(self.items.values())} evaluation "
             f"problems ({self.ngram}-grams, threshold {self.threshold:g})"]
    width = max(map(len, self.items), default=0)
    for task, c in self.per_task().items():
      lines.append(f"  {task:<{width}}  {len(c['contaminated'])}/{c['items']} eval items "
                   f"contaminated, {c['flagged_records']} training records flagged")
    lines.append(f"{len(self.flagged)} training records flagged")
    for m in self.matches[:max_matches]:
      lines.append(f"  {m.location}  {m.task} {m.eval_id}  score {m.score:.2f} ({m.method})")
    if len(self.matches) > max_matches:
      lines.append(f"  ... {len(self.matches) - max_matches} more matches")
    for location, reason in self.skipped[:max_matches]:
      lines.append(f"  skipped {location}: {reason}")
    if len(self.skipped) > max_matches:
      lines.append(f"  ... {len(self.skipped) - max_matches} more skipped")
    return "\n".join(lines)


def user_turns(record: Any, fmt: str = "auto",
               spec: formats.FormatSpec = formats.DEFAULT_SPEC) -> list[str]:
  """The distinct user-turn texts of a record's conversations, in order.

  OpenR1 records repeat one problem in each kept generation, and the problem is compared once.

  Raises:
    formats.FormatError: the record is not a valid conversation in `fmt`.
  """
  texts = [m["content"] for conversation in formats.to_conversations(record, fmt, spec)
           for m in conversation if m["role"] == "user"]
  return list(dict.fromkeys(texts))


def check_records(items: Iterable[Any], index: ContaminationIndex, fmt: str = "auto",
                  spec: formats.FormatSpec = formats.DEFAULT_SPEC) -> Report:
  """Checks records against `index`.

  Args:
    items: objects with `record`, `location` and `error` attributes (`sources.Item`). A
      record of None marks an unreadable one, and `error` says why.
    index: the evaluation problems.
    fmt, spec: how to read the records, as in `formats.to_conversations`.

  Returns:
    A `Report`. Bad records are counted in it rather than raised.
  """
  report = Report(index.ngram, index.threshold, {t: len(ids) for t, ids in index.items.items()})
  for item in items:
    report.records += 1
    if item.record is None:
      report.skipped.append((item.location, item.error or "unreadable record"))
      continue
    if not isinstance(item.record, dict):
      report.skipped.append((item.location, "pre-tokenised record: no text to compare"))
      continue
    try:
      texts = user_turns(item.record, fmt, spec)
    except formats.FormatError as e:
      report.skipped.append((item.location, f"format error: {e}"))
      continue
    report.matches.extend(Match(item.location, task, item_id, score, method)
                          for task, item_id, score, method in index.match(texts))
  return report


def check_sources(paths: Sequence[str], index: ContaminationIndex, fmt: str = "auto",
                  spec: formats.FormatSpec = formats.DEFAULT_SPEC) -> Report:
  """`check_records` over the files, globs or directories `paths` (see `sources.open_source`)."""
  return check_records(_read(paths), index, fmt, spec)


def write_filtered(paths: Sequence[str], report: Report, out_path: str) -> dict[str, int]:
  """Writes the records of `paths` that `report` checked and found clean to JSONL `out_path`.

  The records keep their fields, so the copy is in the input's trace format. Flagged records
  are dropped. Skipped records are dropped too: they were not checked, so they cannot be
  called clean, and the training pipeline could not use them as they are anyway.

  Args:
    paths: the same training paths that `report` was made from.
    report: the result of `check_sources(paths, ...)`.
    out_path: the JSONL file to create or overwrite.

  Returns:
    {"written", "dropped_flagged", "dropped_skipped"}.

  Raises:
    ValueError: the data no longer has the number of records that the report saw.
  """
  flagged = report.flagged
  skipped = {location for location, _ in report.skipped}
  counts = {"written": 0, "dropped_flagged": 0, "dropped_skipped": 0}
  seen = 0
  # Written beside the target and renamed at the end (on gs://, uploaded at the end), so that
  # a failure leaves no half file, and an output inside a training directory is not read back
  # as input.
  with storage.atomic_write(out_path, "w", encoding="utf-8") as f:
    for item in _read(paths):
      seen += 1
      if item.location in flagged:
        counts["dropped_flagged"] += 1
      elif item.location in skipped:
        counts["dropped_skipped"] += 1
      else:
        # default=str: Parquet rows can hold dates or decimals, which JSON has no type for.
        f.write(json.dumps(item.record, ensure_ascii=False, default=str) + "\n")
        counts["written"] += 1
    if seen != report.records:
      raise ValueError(f"{list(paths)} now hold {seen} records but the report saw "
                       f"{report.records}; check the data again before filtering")
  return counts


def _read(paths: Sequence[str]) -> Iterable[Any]:
  """The items of every source in `paths`, in order. All are opened first, so that a bad
  path fails before any checking."""
  # sources imports Grain, which imports JAX. It is imported only here, so that the matching
  # above can be used without either.
  from jaxdistill.data import sources
  opened = [sources.open_source(path) for path in paths]
  return (source[i] for source in opened for i in range(len(source)))
