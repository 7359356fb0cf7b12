"""Raw trace records (OpenAI, ShareGPT, s1K, LIMO/NuminaMath, OpenR1) turned into conversations.

A record is one parsed JSONL line or Parquet row. `to_conversations` returns a list of
conversations because one record can hold several (OpenR1 keeps every verified generation)
or none (OpenR1 with no verified generation). A conversation is a list of
`{"role": "system" | "user" | "assistant", "content": str}` messages: an optional system
message, then user and assistant turns alternating, ending with an assistant turn whose
content is not blank. Anything else raises `FormatError` with a short reason, which the
caller prefixes with the file and line.

Auto-detection looks at the fields in this order, so that records carrying several layouts
(mirrors add a ready-made `messages` column to many datasets) get the richest one:
  1. `generations`                                    -> openr1 (keeps the verified ones)
  2. `thinking_trajectories` / `deepseek_thinking_trajectory` / `gemini_thinking_trajectory`
                                                      -> s1k
  3. `conversations`                                  -> sharegpt (its `system` column is
                                                         not part of `messages` in mirrors)
  4. `messages`                                       -> messages
  5. `solution` with `question` or `problem`          -> problem_solution
Field names are looked up through `FormatSpec.field_map`, so detection works on renamed
columns too. `parse_spec` makes a FormatSpec from the strings of a run's `data.*` keys or of
the tools' flags, so a dataset with its own field names needs no code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("messages", "sharegpt", "s1k", "problem_solution", "openr1")
S1K_VARIANTS = ("auto", "deepseek", "gemini", "original")
ROLES = ("system", "user", "assistant")

# ShareGPT speaker names as Sky-T1, Bespoke-Stratos, OpenThoughts and older dumps write them.
_SHAREGPT_ROLES = {"system": "system", "user": "user", "human": "user",
                   "assistant": "assistant", "gpt": "assistant"}
# s1K field pairs (thinking, final answer) for each variant; "original" is s1K 1.0.
_S1K_FIELDS = {
    "deepseek": ("deepseek_thinking_trajectory", "deepseek_attempt"),
    "original": ("thinking_trajectories", "attempt"),
    "gemini": ("gemini_thinking_trajectory", "gemini_attempt"),
}

# Names a `FormatSpec.field_map` may rename: record fields, then message keys.
CANONICAL_FIELDS = ("messages", "conversations", "system", "question", "problem", "solution",
                    "generations", "correctness_math_verify",
                    *(name for pair in _S1K_FIELDS.values() for name in pair),
                    "role", "content", "from", "value")

Message = dict[str, str]
Conversation = list[Message]


class FormatError(ValueError):
  """A record that does not make a valid conversation; `str(err)` is a short reason."""


@dataclasses.dataclass(frozen=True)
class FormatSpec:
  """How to read records of one data source.

  Attributes:
    field_map: canonical field name -> the name this source uses, e.g. `{"question":
      "prompt"}`. Applies to top-level fields and to the message keys `role`, `content`
      (messages) and `from`, `value` (sharegpt). It also adapts a format to a
      look-alike: OpenThoughts' `metadata` config reads as s1k with
      `{"question": "problem", "thinking_trajectories": "deepseek_reasoning",
      "attempt": "deepseek_solution"}` and `s1k_variant="original"`.
    thinking_open, thinking_close: for formats whose thinking is a separate field (s1k),
      the assistant turn is `thinking_open + thinking + thinking_close + answer`, both
      stripped of surrounding whitespace. The default is the R1 / QwQ layout; s1's own
      is `"<|im_start|>think\\n"` and `"\\n<|im_start|>answer\\nAnswer: "`.
    system_prompt: prepended as a system message to conversations that have none (a
      record's own system prompt wins).
    s1k_variant: which thinking/answer pair of an s1K record to train on: "deepseek"
      (s1K-1.1), "gemini" (s1K-1.1's other pair), "original" (s1K 1.0's
      `thinking_trajectories` / `attempt`), or "auto": deepseek when the record has it,
      else original, else gemini.

  No field has a default: a run's come from configs/base.py (`data.*`), the tools' from
  their flags, and library callers start from `DEFAULT_SPEC` (`dataclasses.replace`).
  """
  field_map: Mapping[str, str]
  thinking_open: str
  thinking_close: str
  system_prompt: str | None
  s1k_variant: str

  def __post_init__(self):
    if self.s1k_variant not in S1K_VARIANTS:
      raise ValueError(f"s1k_variant must be one of {S1K_VARIANTS}, got {self.s1k_variant!r}")
    unknown = [k for k in self.field_map if k not in CANONICAL_FIELDS]
    if unknown:
      raise ValueError(f"field_map renames unknown fields {unknown}; the canonical names are "
                       f"{', '.join(CANONICAL_FIELDS)}")
    # A private copy, so that mutating the caller's dict later cannot change this spec.
    object.__setattr__(self, "field_map", dict(self.field_map))

  def name(self, canonical: str) -> str:
    """The record's name for the canonical field `canonical`."""
    return self.field_map.get(canonical, canonical)


# The R1 / QwQ layout, the same values as configs/base.py's data.* keys (tests check).
DEFAULT_SPEC = FormatSpec(field_map={}, thinking_open="<think>\n",
                          thinking_close="\n</think>\n\n", system_prompt=None,
                          s1k_variant="auto")


def parse_spec(fields: str, thinking_open: str, thinking_close: str, system_prompt: str,
               s1k_variant: str, *, prefix: str = "") -> FormatSpec:
  """The FormatSpec that a run's `data.*` keys or a tool's flags describe, checked.

  Args:
    fields: "canonical=theirs,...", e.g. "question=query,attempt=final"; "" renames nothing.
    thinking_open, thinking_close, s1k_variant: as in `FormatSpec`, verbatim.
    system_prompt: "" for none.
    prefix: what the settings are called in error messages: "data." (config keys) or "--".

  Raises:
    ValueError: naming each setting that is wrong and what to write instead.
  """
  field_map, problems = parse_field_map(fields, CANONICAL_FIELDS, key=f"{prefix}fields",
                                        example="question=query,solution=final")
  if s1k_variant not in S1K_VARIANTS:
    problems.append(f"{prefix}s1k_variant={s1k_variant!r} is not one of {S1K_VARIANTS}")
  if system_prompt and not system_prompt.strip():
    problems.append(f"{prefix}system_prompt is blank; set it to \"\" for no system prompt")
  if problems:
    raise ValueError("; ".join(problems))
  return FormatSpec(field_map=field_map, thinking_open=thinking_open,
                    thinking_close=thinking_close, system_prompt=system_prompt or None,
                    s1k_variant=s1k_variant)


def parse_field_map(fields: str, canonical: Sequence[str], *, key: str, example: str
                    ) -> tuple[dict[str, str], list[str]]:
  """Renamed fields written "canonical=theirs,..." as {canonical: theirs}, and the problems
  found, each naming `key` (the setting, e.g. "data.fields") and what to write instead
  (`example` is a valid value). Shared by every setting that renames fields: trace formats
  here, problem and response files in `jaxdistill.traces`."""
  problems, field_map, unknown, swapped = [], {}, [], []
  for entry in (e.strip() for e in fields.split(",") if e.strip()):
    name, eq, theirs = (x.strip() for x in entry.partition("="))
    if not eq or not name or not theirs:
      problems.append(f"{key}: {entry!r} is not canonical=theirs (write e.g. {key}={example})")
    elif name not in canonical:
      unknown.append(name)
      if theirs in canonical:
        swapped.append(f"{theirs}={name}")
    elif name in field_map:
      problems.append(f"{key}: {name!r} is renamed twice ({field_map[name]!r} and {theirs!r}); "
                      "keep one")
    else:
      field_map[name] = theirs
  if unknown:
    hint = f" (the canonical name comes first: {','.join(swapped)}?)" if swapped else ""
    problems.append(f"{key}: unknown canonical field {', '.join(map(repr, unknown))}{hint}; "
                    f"the canonical names are {', '.join(canonical)}")
  return field_map, problems


def detect_format(record: Mapping[str, Any], spec: FormatSpec = DEFAULT_SPEC) -> str:
  """The format of `record`, by the fields it has (order in the module docstring)."""
  if not isinstance(record, Mapping):
    raise FormatError(f"record is not an object (got {type(record).__name__})")
  # A null counts as absent: Parquet files that mix sources give every row every column.
  has = lambda canonical: record.get(spec.name(canonical)) is not None
  if has("generations"):
    return "openr1"
  if any(has(thinking) for thinking, _ in _S1K_FIELDS.values()):
    return "s1k"
  if has("conversations"):
    return "sharegpt"
  if has("messages"):
    return "messages"
  if has("solution") and (has("question") or has("problem")):
    return "problem_solution"
  raise FormatError(f"unknown schema: fields {sorted(map(str, record))}")


def to_conversations(record: Mapping[str, Any], fmt: str = "auto",
                     spec: FormatSpec = DEFAULT_SPEC) -> list[Conversation]:
  """Turns one raw record into zero or more validated conversations.

  Args:
    record: one parsed JSONL line or Parquet row (lists may be numpy arrays).
    fmt: one of `FORMATS`, or "auto" to detect it from the fields.
    spec: field names, thinking wrapper, system prompt and s1K variant.

  Returns:
    A list of conversations, each a list of `{"role", "content"}` dicts that starts with
    an optional system message, alternates user/assistant and ends with an assistant turn.
    Only openr1 records can give zero conversations (no verified generation).

  Raises:
    FormatError: the record is malformed; the message says why in a few words.
  """
  if not isinstance(record, Mapping):
    raise FormatError(f"record is not an object (got {type(record).__name__})")
  if fmt == "auto":
    fmt = detect_format(record, spec)
  if fmt not in _READERS:
    raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
  conversations = _READERS[fmt](record, spec)
  out = []
  for conversation in conversations:
    if spec.system_prompt is not None and conversation and conversation[0]["role"] != "system":
      conversation = [{"role": "system", "content": spec.system_prompt}] + conversation
    validate_conversation(conversation)
    out.append(conversation)
  return out


def validate_conversation(conversation: Sequence[Mapping[str, Any]]) -> None:
  """Raises FormatError unless: [system], then user/assistant alternating, ending assistant."""
  if not conversation:
    raise FormatError("empty conversation")
  first_turn = None  # index of the first non-system message
  for i, message in enumerate(conversation):
    if not isinstance(message, Mapping):
      raise FormatError(f"turn {i} is not an object (got {type(message).__name__})")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
      raise FormatError(f"turn {i}: unknown role {role!r}")
    if not isinstance(content, str):
      raise FormatError(f"turn {i}: content is not a string (got {type(content).__name__})")
    if role == "system":
      if i != 0:
        raise FormatError(f"turn {i}: system message after the first turn")
      continue
    first_turn = i if first_turn is None else first_turn
    expected = "user" if (i - first_turn) % 2 == 0 else "assistant"
    if role != expected:
      raise FormatError(f"turn {i}: {role!r} where {expected!r} was expected "
                        "(turns must alternate user/assistant)")
    if not content.strip():
      raise FormatError(f"empty {role} turn (turn {i})")
  if conversation[-1]["role"] != "assistant":
    raise FormatError("conversation does not end with an assistant turn")


# -- Field access -----------------------------------------------------------------------------

def _get(record: Mapping[str, Any], canonical: str, spec: FormatSpec) -> Any:
  name = spec.name(canonical)
  if name not in record or record[name] is None:
    raise FormatError(f"missing field {name!r}")
  return record[name]


def _string(record: Mapping[str, Any], canonical: str, spec: FormatSpec) -> str:
  value = _get(record, canonical, spec)
  if not isinstance(value, str):
    raise FormatError(f"field {spec.name(canonical)!r} is not a string (got "
                      f"{type(value).__name__})")
  return value


def _list(record: Mapping[str, Any], canonical: str, spec: FormatSpec) -> list:
  value = _get(record, canonical, spec)
  # Parquet read through pandas gives numpy object arrays where JSON gives lists.
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if not isinstance(value, (list, tuple)):
    raise FormatError(f"field {spec.name(canonical)!r} is not a list")
  return list(value)


def _text(record: Mapping[str, Any], canonical: str, spec: FormatSpec) -> str:
  """A string field, or a list of strings joined by newlines (s1K's trajectories)."""
  value = _get(record, canonical, spec)
  if isinstance(value, str):
    return value
  parts = _list(record, canonical, spec)
  if not all(isinstance(p, str) for p in parts):
    raise FormatError(f"field {spec.name(canonical)!r} is not a list of strings")
  return "\n".join(parts)


def _question(record: Mapping[str, Any], spec: FormatSpec) -> str:
  for canonical in ("question", "problem"):
    if record.get(spec.name(canonical)) is not None:
      return _string(record, canonical, spec)
  raise FormatError(f"missing field {spec.name('question')!r} (or {spec.name('problem')!r})")


def _message_key(message: Any, canonical: str, spec: FormatSpec, i: int) -> Any:
  if not isinstance(message, Mapping):
    raise FormatError(f"turn {i} is not an object (got {type(message).__name__})")
  name = spec.name(canonical)
  if name not in message:
    raise FormatError(f"turn {i}: missing key {name!r}")
  return message[name]


# -- Readers, one per format ------------------------------------------------------------------

def _read_messages(record, spec) -> list[Conversation]:
  conversation = []
  for i, message in enumerate(_list(record, "messages", spec)):
    role = _message_key(message, "role", spec, i)
    content = _message_key(message, "content", spec, i)
    conversation.append({"role": role, "content": content})
  return [conversation]


def _read_sharegpt(record, spec) -> list[Conversation]:
  conversation = []
  system = record.get(spec.name("system"))
  if system is not None:
    if not isinstance(system, str):
      raise FormatError(f"field {spec.name('system')!r} is not a string")
    # Sky-T1-style dumps carry the column on every row; an empty one means "no system
    # prompt", not "an empty system message" (which some templates render differently).
    if system.strip():
      conversation.append({"role": "system", "content": system})
  for i, turn in enumerate(_list(record, "conversations", spec)):
    speaker = _message_key(turn, "from", spec, i)
    if speaker not in _SHAREGPT_ROLES:
      raise FormatError(f"turn {i}: unknown speaker {speaker!r}")
    conversation.append({"role": _SHAREGPT_ROLES[speaker],
                         "content": _message_key(turn, "value", spec, i)})
  return [conversation]


def _read_s1k(record, spec) -> list[Conversation]:
  variant = spec.s1k_variant
  if variant == "auto":
    variant = next((v for v, (thinking, _) in _S1K_FIELDS.items()
                    if record.get(spec.name(thinking)) is not None), None)
    if variant is None:
      raise FormatError(f"missing field {spec.name('thinking_trajectories')!r}")
  thinking_field, answer_field = _S1K_FIELDS[variant]
  thinking = _text(record, thinking_field, spec).strip()
  answer = _string(record, answer_field, spec).strip()
  if not thinking:
    raise FormatError(f"empty thinking in field {spec.name(thinking_field)!r}")
  if not answer:
    raise FormatError(f"empty answer in field {spec.name(answer_field)!r}")
  assistant = spec.thinking_open + thinking + spec.thinking_close + answer
  return [[{"role": "user", "content": _question(record, spec)},
           {"role": "assistant", "content": assistant}]]


def _read_problem_solution(record, spec) -> list[Conversation]:
  # The short `answer` field is for grading and decontamination; the solution already ends
  # in it (`\boxed{...}`), so the trained turn is the solution alone.
  return [[{"role": "user", "content": _question(record, spec)},
           {"role": "assistant", "content": _string(record, "solution", spec)}]]


def _read_openr1(record, spec) -> list[Conversation]:
  problem = _question(record, spec)
  generations = _list(record, "generations", spec)
  if not all(isinstance(g, str) for g in generations):
    raise FormatError(f"field {spec.name('generations')!r} is not a list of strings")
  keep = [True] * len(generations)
  # Null means the column is absent (a mixed Parquet file), as in `detect_format`.
  if record.get(spec.name("correctness_math_verify")) is not None:
    verdicts = _list(record, "correctness_math_verify", spec)
    if len(verdicts) != len(generations):
      raise FormatError(f"field {spec.name('correctness_math_verify')!r} has {len(verdicts)} "
                        f"entries for {len(generations)} generations")
    if not all(isinstance(v, (bool, np.bool_)) for v in verdicts):
      raise FormatError(f"field {spec.name('correctness_math_verify')!r} is not a list of "
                        "booleans")
    keep = [bool(v) for v in verdicts]
  return [[{"role": "user", "content": problem}, {"role": "assistant", "content": g}]
          for g, k in zip(generations, keep) if k]


_READERS = {
    "messages": _read_messages,
    "sharegpt": _read_sharegpt,
    "s1k": _read_s1k,
    "problem_solution": _read_problem_solution,
    "openr1": _read_openr1,
}
