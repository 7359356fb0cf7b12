"""The evaluation sets bundled in the package (AIME 2024/2025, AMC 2023, MATH-500) and their loader.

The files live in `jaxdistill/eval/data/` (provenance and licences in its README.md). They are
read through `importlib.resources`, so they load the same way from a checkout and from an
installed wheel.

  load_task("aime24")          -> [{"id": "2024-I-1", "problem": "...", "answer": "204", ...}]
  problem_variants("aime25")   -> {"2025-I-1": ["<AIME-Preview text>", "<QwQ text>"], ...}
"""

from __future__ import annotations

import functools
import json
from importlib import resources

TASKS = ("aime24", "aime25", "amc23", "math500")

# Other transcriptions of the same problems: (file, field holding the problem text). They are
# not tasks. The contamination check uses them, because training data copied from another
# lineage carries that lineage's wording.
_VARIANTS = {
    "aime24": (("aime24_matharena.jsonl", "problem"),),
    "aime25": (("aime25_alt_texts.jsonl", "problem_aime_preview"),
               ("aime25_alt_texts.jsonl", "problem_qwq")),
}


def load_task(name: str) -> list[dict]:
  """The items of the evaluation set `name`, in file order.

  Args:
    name: one of `TASKS`.

  Returns:
    One dict per problem with `id`, `problem` and `answer` as non-empty strings, and the
    file's other fields unchanged (`source`; math500 also has `subject`, `level` and
    `solution`). The dicts are fresh copies, so callers can change them.

  Raises:
    ValueError: `name` is not a bundled task.
  """
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; choose from {', '.join(TASKS)}")
  return [dict(item) for item in _load(name)]


def problem_variants(name: str) -> dict[str, list[str]]:
  """Alternative problem texts of task `name` by item id (an empty dict for tasks with none)."""
  if name not in TASKS:
    raise ValueError(f"unknown evaluation task {name!r}; choose from {', '.join(TASKS)}")
  out: dict[str, list[str]] = {}
  for filename, field in _VARIANTS.get(name, ()):
    for record in _read_jsonl(filename):
      text = record.get(field)
      if isinstance(text, str) and text.strip():
        out.setdefault(str(record["id"]), []).append(text)
  return out


@functools.cache
def _load(name: str) -> tuple[dict, ...]:
  items, seen = [], set()
  for i, record in enumerate(_read_jsonl(f"{name}.jsonl"), 1):
    # Graders compare against string answers; a number here (upstream amc23 stored floats such
    # as 27.0) would grade wrongly rather than fail, so it is refused at load.
    for key in ("id", "problem", "answer"):
      if not isinstance(record.get(key), str) or not record[key].strip():
        raise ValueError(f"{name}.jsonl:{i}: field {key!r} is not a non-empty string")
    if record["id"] in seen:
      raise ValueError(f"{name}.jsonl:{i}: duplicate id {record['id']!r}")
    seen.add(record["id"])
    items.append(record)
  return tuple(items)


def _read_jsonl(filename: str) -> list[dict]:
  text = (resources.files(__package__) / "data" / filename).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]
