"""Verified traces from a teacher: sample problems, grade, keep by a policy, decontaminate, and
write a `messages` dataset ready for `data.sources`.

Two ways in, one way out:
  - `sample_traces` (mode="distill"): the teacher samples `num_samples` responses per problem
    through `generate.generate_file` (sharded, multi-process, continuous batching, resumable,
    budget forcing from `eval.*`), into `<out_dir>/generations.jsonl`.
  - tools/filter_traces.py: responses produced elsewhere (a vLLM or API dump), read by
    `read_responses`.
Both end in `select` (grade, keep, count) and `write_outputs`: `<out_dir>/traces.jsonl` and
`<out_dir>/stats.json`, each written whole or not at all.

What a response must be to become a trace, in order (the first failing test is its fate):
  1. its problem does not overlap the bundled evaluation sets ("contaminated" otherwise;
     `data/contamination.py`, the problem text is compared; in mode="distill" such problems
     are never sampled);
  2. the grader (`eval/grade.py`, answer kind aime | amc | math) calls it correct; a response
     cut off by the length limit is "truncated", never correct;
  3. it has exactly one final answer: the boxes after its thinking all agree, or form one
     multi-part MATH answer ("several_answers" otherwise);
  4. no stop token inside its text ("stop_token_inside": rendered again, it would end twice);
  5. the keep policy chooses it ("policy" otherwise): `all` correct ones, the first `k` in
     sample order (`at_most_k`), or the `shortest` (fewest tokens; the earlier on a tie).

The assistant turn of a trace is the response without its trailing stop token; when it has a
thinking section (up to the last `think_end`), that section is wrapped again in
`thinking_open` / `thinking_close` (data.thinking_open / data.thinking_close, the delimiters
the s1k reader writes), so that the chat template renders it with exactly one turn end. What
is graded is that turn, as it is written.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from jaxdistill import storage
from jaxdistill.data import chat, contamination, formats
from jaxdistill.eval import extract as extract_lib, grade as grade_lib

if TYPE_CHECKING:  # sampling alone needs JAX: the rest serves tools/filter_traces.py without it
  from jaxdistill.evaluate import EvalConfig
  from jaxdistill.sampler import Sampler

POLICIES = ("all", "at_most_k", "shortest")
# Fields of a problems file, then the extra ones of a file of responses made elsewhere.
PROBLEM_FIELDS = ("id", "problem", "answer")
RESPONSE_FIELDS = PROBLEM_FIELDS + ("prompt", "response", "finish_reason", "num_tokens")
# Fates of a response, in the order they are decided (the module docstring).
DROPS = ("contaminated", "wrong", "no_answer", "truncated", "timeout", "too_complex",
         "several_answers", "stop_token_inside", "policy")


@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """The `traces` section of a run config, typed (defaults: configs/base.py)."""
  problems_file: str  # JSONL of problems: problem text and reference answer per line
  field_map: Mapping[str, str]  # canonical PROBLEM_FIELDS name -> the file's name
  answer_kind: str  # grade.KINDS
  num_samples: int  # responses sampled per problem
  keep: str  # POLICIES
  k: int  # at_most_k: the most traces kept per problem
  decontaminate: bool  # drop problems that overlap the bundled evaluation sets
  output: str  # output directory ("" = <workdir>/traces)

  def problems(self, mode: str, samples_at_once: int) -> list[str]:
    """What the config alone gets wrong, each with what to change."""
    out = []
    if self.answer_kind not in grade_lib.KINDS:
      out.append(f"traces.answer_kind={self.answer_kind!r} is not one of {grade_lib.KINDS}")
    if self.keep not in POLICIES:
      out.append(f"traces.keep={self.keep!r} is not one of {POLICIES}")
    if self.keep == "at_most_k" and self.k < 1:
      out.append(f"traces.k={self.k} must be >= 1 with traces.keep='at_most_k'")
    if self.num_samples < 1:
      out.append(f"traces.num_samples={self.num_samples} must be >= 1")
    elif samples_at_once and self.num_samples % samples_at_once:
      out.append(f"eval.samples_at_once={samples_at_once} must divide traces.num_samples="
                 f"{self.num_samples} (0 = all of them)")
    if mode == "distill" and not self.problems_file:
      out.append("mode='distill' samples the problems of traces.problems_file: set it to a "
                 "JSONL file with a problem and its reference answer per line")
    return out


def parse_fields(fields: str, canonical: Sequence[str] = PROBLEM_FIELDS, *,
                 key: str = "traces.fields") -> dict[str, str]:
  """The renamed fields "canonical=theirs,..." of a problems (or responses) file; ValueError
  names `key` and what to write."""
  field_map, problems = formats.parse_field_map(fields, canonical, key=key,
                                                example="problem=question,answer=gold")
  if problems:
    raise ValueError("; ".join(problems))
  return field_map


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem of a problems file or a dump."""
  id: str
  problem: str
  answer: str  # the reference, valid for the answer kind
  prompt: str  # the user turn the teacher answered


@dataclasses.dataclass(frozen=True)
class Response:
  """One response of the teacher to a problem."""
  text: str  # what the teacher wrote, possibly ending in a stop token
  finish_reason: str | None  # "stop" | "length" | None (unknown)
  num_tokens: int  # output tokens


@dataclasses.dataclass(frozen=True)
class Shaping:
  """How a response becomes an assistant turn (module docstring)."""
  think_end: str  # end-of-thinking delimiter in responses ("" = never rewrap)
  thinking_open: str
  thinking_close: str
  stop_texts: tuple[str, ...]  # stop-token strings a response may end with

  @classmethod
  def for_renderer(cls, renderer: chat.ChatRenderer, think_end: str,
                   spec: formats.FormatSpec) -> Shaping:
    """Responses of a teacher sampled through `renderer`: they end in its turn end or its
    tokenizer's eos (generate.stop_ids), and thinking is rewrapped in `spec`'s delimiters."""
    eos = renderer.tokenizer.special_tokens.get("eos_token")
    stops = tuple(dict.fromkeys(t for t in (renderer.turn_end, eos) if t))
    return cls(think_end, spec.thinking_open, spec.thinking_close, stops)


# -- Reading ----------------------------------------------------------------------------------

def _problem(record: dict, number: int, field_map: Mapping[str, str], kind: str) -> Problem:
  name = lambda canonical: field_map.get(canonical, canonical)
  problem, answer = record.get(name("problem")), record.get(name("answer"))
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f"no problem text in field {name('problem')!r} (rename it with "
                     "fields=problem=THEIRS)")
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    answer = str(answer)
  if not isinstance(answer, str) or not answer.strip():
    raise ValueError(f"no reference answer in field {name('answer')!r} (rename it with "
                     "fields=answer=THEIRS)")
  grade_lib.gold_vote_key(answer, kind)  # a reference the kind cannot grade is a data error
  return Problem(str(record.get(name("id"), number)), problem, answer, problem)


def read_problems(path: str, field_map: Mapping[str, str], kind: str,
                  prompt: Callable[[str], str] = lambda problem: problem) -> list[Problem]:
  """The problems of JSONL `path`, each asked by the user turn `prompt(problem)`; an id
  defaults to the line number. Raises ValueError with FILE:LINE at the first bad line, or
  naming repeated ids."""
  out = []
  for number, record in storage.json_lines(path):
    try:
      p = _problem(record, number, field_map, kind)
      out.append(dataclasses.replace(p, prompt=prompt(p.problem)))
    except ValueError as e:
      raise ValueError(f"{path}:{number}: {e}") from None
  _check_ids(path, out)
  return out


def read_responses(path: str, field_map: Mapping[str, str], kind: str,
                   count_tokens: Callable[[str], int] | None = None
                   ) -> tuple[list[Problem], list[list[Response]]]:
  """Problems and their responses from a dump made elsewhere: per line a problem, its
  reference, `response` (a string or a list), optionally `prompt` (the user turn; default the
  problem), `finish_reason` and `num_tokens` (each a value or a list, one per response).
  Token counts come from `num_tokens`, else from `completion_token_ids` (tools/generate.py's
  outputs read as they are), else from `count_tokens(text)`."""
  problems, responses = [], []
  name = lambda canonical: field_map.get(canonical, canonical)
  for number, record in storage.json_lines(path):
    try:
      p = _problem(record, number, field_map, kind)
      prompt = record.get(name("prompt"))
      if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"field {name('prompt')!r} must be the user turn's text")
      problems.append(dataclasses.replace(p, prompt=prompt or p.problem))
      texts = _per_response(record, name("response"), None, str, "strings", required=True)
      reasons = _per_response(record, name("finish_reason"), len(texts), (str, type(None)),
                              "strings or nulls")
      counts = _per_response(record, name("num_tokens"), len(texts), int, "integers")
      ids = _per_response(record, "completion_token_ids", len(texts), list, "token id lists")
      counts = counts or (ids and [len(x) for x in ids])
      if not counts and count_tokens is None:
        raise ValueError(f"no token counts: add field {name('num_tokens')!r} (or "
                         "'completion_token_ids', as tools/generate.py writes) or give a "
                         "tokenizer to count them")
      responses.append([
          Response(t, reasons[i] if reasons else None,
                   counts[i] if counts else count_tokens(t)) for i, t in enumerate(texts)])
    except ValueError as e:
      raise ValueError(f"{path}:{number}: {e}") from None
  _check_ids(path, problems)
  return problems, responses


def _per_response(record: dict, field: str, n: int | None, types, what: str, *,
                  required: bool = False) -> list | None:
  """A field holding one value per response: a list of `what`, or one for one response."""
  value = record.get(field)
  if value is None:
    if required:
      raise ValueError(f"no responses in field {field!r} (rename it with fields=response=THEIRS)")
    return None
  values = value if isinstance(value, list) else [value]
  if not values or not all(isinstance(v, types) and not isinstance(v, bool) for v in values):
    raise ValueError(f"field {field!r} must hold {what}, a list with one per response (or a "
                     "single value for a single response)")
  if n is not None and len(values) != n:
    raise ValueError(f"field {field!r} has {len(values)} entries for {n} responses")
  return values


def _check_ids(path: str, problems: Sequence[Problem]) -> None:
  seen = collections.Counter(p.id for p in problems)
  repeated = [i for i, c in seen.items() if c > 1]
  if repeated:
    raise ValueError(f"{path}: problem ids {repeated[:5]} appear more than once; ids must be "
                     "unique (or leave them out: the line number is the id)")
  if not problems:
    raise ValueError(f"{path}: no problems")


def check_problems(problems: Sequence[Problem], index: contamination.ContaminationIndex | None
                   ) -> list[list[dict]]:
  """Per problem, the evaluation items its text overlaps ([] = clean; all [] without
  an index)."""
  if index is None:
    return [[] for _ in problems]
  return [[{"task": t, "eval_id": i, "score": round(s, 4), "method": m}
           for t, i, s, m in index.match([p.problem])] for p in problems]


# -- Grade, keep, count -----------------------------------------------------------------------

def assistant_content(text: str, shaping: Shaping) -> str:
  """The assistant turn of one response: its trailing stop token dropped, its thinking
  section (when it has one) wrapped again in the configured delimiters."""
  for stop in shaping.stop_texts:
    if stop and text.endswith(stop):
      text = text[:-len(stop)]
      break
  if shaping.think_end and shaping.think_end in text:
    thinking, _, answer = text.rpartition(shaping.think_end)
    thinking, opener = thinking.strip(), shaping.thinking_open.strip()
    if opener and thinking.startswith(opener):
      thinking = thinking[len(opener):].strip()
    return shaping.thinking_open + thinking + shaping.thinking_close + answer.strip()
  return text.strip()


def _several_answers(content: str, kind: str) -> bool:
  ex = extract_lib.extract(content)
  one_group = kind == "math" and len(ex.group) == len(ex.boxes)
  return ex.multiple_disagreeing_boxes and not one_group


def _fate(verdict: grade_lib.Verdict, content: str, kind: str, shaping: Shaping) -> str | None:
  """Why a graded response cannot be a trace (None: it can)."""
  if not verdict.correct:
    return verdict.reason
  if _several_answers(content, kind):
    return "several_answers"
  if any(stop and stop in content for stop in shaping.stop_texts):
    return "stop_token_inside"
  return None


def _choose(accepted: list[int], responses: Sequence[Response], keep: str, k: int) -> list[int]:
  if keep == "all":
    return accepted
  if keep == "at_most_k":
    return accepted[:k]
  return [min(accepted, key=lambda j: (responses[j].num_tokens, j))] if accepted else []


def _lengths(values: Sequence[int]) -> dict | None:
  if not values:
    return None
  return {"count": len(values), "mean": round(statistics.fmean(values), 2), "min": min(values),
          "median": statistics.median(values), "max": max(values)}


def select(problems: Sequence[Problem], responses: Sequence[Sequence[Response]],
           matches: Sequence[Sequence[dict]], *, kind: str, keep: str, k: int,
           shaping: Shaping, source: dict, checker=None) -> tuple[list[dict], dict]:
  """Grades every response, keeps traces by the policy and counts what happened.

  Args:
    problems, responses: per problem, its responses (none for a problem never sampled).
    matches: per problem, its overlaps with the evaluation sets (`check_problems`).
    kind, keep, k: answer kind, keep policy and its k.
    shaping: how a response becomes an assistant turn.
    source: the teacher and sampling settings, recorded in every trace and the stats.
    checker: the symbolic checker for MATH answers (`grade.grade`'s).

  Returns:
    (traces in problem then sample order, stats). Both depend on the inputs alone.
  """
  records, fates = [], collections.Counter()
  lengths = {"all": [], "correct": [], "kept": []}
  per_problem, without_correct, contaminated = collections.Counter(), [], []
  for problem, rs, found in zip(problems, responses, matches, strict=True):
    if found:
      contaminated.append({"id": problem.id, "responses": len(rs), "matches": list(found)})
      fates["contaminated"] += len(rs)
      continue
    contents = [assistant_content(r.text, shaping) for r in rs]
    verdicts = [grade_lib.grade(c, problem.answer, kind, r.finish_reason, checker=checker)
                for c, r in zip(contents, rs)]
    why = [_fate(v, c, kind, shaping) for v, c in zip(verdicts, contents)]
    chosen = _choose([j for j, w in enumerate(why) if w is None], rs, keep, k)
    correct = sum(v.correct for v in verdicts)
    per_problem[correct] += 1
    if not correct:
      without_correct.append(problem.id)
    for j, (r, v) in enumerate(zip(rs, verdicts)):
      lengths["all"].append(r.num_tokens)
      if v.correct:
        lengths["correct"].append(r.num_tokens)
      if j not in chosen:
        fates[why[j] or "policy"] += 1
        continue
      lengths["kept"].append(r.num_tokens)
      fates["kept"] += 1
      records.append({
          "id": problem.id, "problem": problem.problem, "answer": problem.answer,
          "messages": [{"role": "user", "content": problem.prompt},
                       {"role": "assistant", "content": contents[j]}],
          "provenance": dict(source, sample=j, finish_reason=r.finish_reason,
                             num_tokens=r.num_tokens, verdict={
                                 "reason": v.reason, "extracted": v.extracted,
                                 "method": v.method, "flags": list(v.flags)},
                             keep=keep if keep != "at_most_k" else f"at_most_{k}")})
  total = sum(len(rs) for rs in responses)
  graded = total - fates["contaminated"]
  correct = len(lengths["correct"])
  sampled = len(problems) - len(contaminated)
  stats = {
      "answer_kind": kind, "keep": {"policy": keep, "k": k if keep == "at_most_k" else None},
      "problems": {"read": len(problems), "contaminated": len(contaminated),
                   "graded": sampled, "with_correct": sampled - len(without_correct),
                   "without_correct": len(without_correct),
                   "with_kept": len({r["id"] for r in records}),
                   "by_correct_responses": {str(c): n for c, n in sorted(per_problem.items())},
                   "without_correct_ids": without_correct},
      "responses": {"total": total, "graded": graded, "correct": correct,
                    "kept": fates["kept"],
                    "correct_rate": round(correct / graded, 6) if graded else None,
                    "acceptance": round(fates["kept"] / graded, 6) if graded else None,
                    "dropped": {d: fates[d] for d in DROPS}},
      "lengths_tokens": {name: _lengths(v) for name, v in lengths.items()},
      "decontamination": {"problems_removed": len(contaminated),
                          "responses_removed": fates["contaminated"], "problems": contaminated},
      "source": source,
  }
  return records, stats


def write_outputs(out_dir: str, records: Sequence[dict], stats: dict) -> None:
  """`<out_dir>/traces.jsonl` and `<out_dir>/stats.json`, each replaced whole (a kill leaves
  the old file or the new one, never half of one)."""
  storage.makedirs(out_dir)
  with storage.atomic_write(storage.join(out_dir, "traces.jsonl"), "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  with storage.atomic_write(storage.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2, ensure_ascii=False)
    f.write("\n")


def summary_line(stats: dict) -> str:
  """One line for logs: what was kept out of what."""
  p, r = stats["problems"], stats["responses"]
  return (f"kept {r['kept']} of {r['graded']} graded responses ({r['correct']} correct) "
          f"over {p['graded']} problems; {p['without_correct']} problems without a correct "
          f"response; {p['contaminated']} contaminated problems removed")


# -- mode="distill": the teacher samples -------------------------------------------------------

def sample_traces(sampler: Sampler, renderer: chat.ChatRenderer, eval_cfg: EvalConfig,
                  cfg: TraceConfig, problems: Sequence[Problem], matches: Sequence[Sequence[dict]],
                  out_dir: str, *, shaping: Shaping, teacher: str, provenance: dict,
                  log: Callable[[str], None] = logging.info) -> dict | None:
  """Samples the clean problems into `<out_dir>/generations.jsonl` (resumable: a rerun
  continues where a kill stopped it), then selects and writes the traces; returns the stats
  (None on processes other than 0, which only sample).

  Sampling follows `eval_cfg` (temperature, top-p/k, max_new_tokens, batch sizes, seed,
  budget forcing, restart) with `cfg.num_samples` per problem; `provenance` (the weights and
  tokenizer) is checked on a rerun as evaluation outputs are."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdistill import evaluate, generate  # pylint: disable=g-import-not-at-top
  from jaxdistill.rules import rule_from  # pylint: disable=g-import-not-at-top
  from jaxdistill.sampler import SamplingConfig  # pylint: disable=g-import-not-at-top
  writer = jax.process_index() == 0
  clean = [p for p, m in zip(problems, matches) if not m]
  prompts = storage.join(out_dir, "prompts.jsonl")
  if writer:
    storage.makedirs(out_dir)
    # Ids and prompts only: references do not enter the samples' provenance, so corrected
    # answers are graded again without sampling again.
    with storage.atomic_write(prompts, "w", encoding="utf-8") as f:
      for p in clean:
        f.write(json.dumps({"id": p.id, "prompt": p.prompt}, ensure_ascii=False) + "\n")
  evaluate.barrier("traces prompts")
  tok = renderer.tokenizer
  rule = rule_from(eval_cfg.temperature, eval_cfg.top_k, eval_cfg.top_p)
  sampling = SamplingConfig(rule=eval_cfg.forcing(rule, tok, eval_cfg.max_thinking_tokens),
                            max_new_tokens=eval_cfg.max_new_tokens,
                            stop_ids=generate.stop_ids(renderer),
                            cache_dtype=eval_cfg.cache_dtype, vocab_size=tok.vocab_size)
  generations = storage.join(out_dir, "generations.jsonl")
  log(f"sampling {cfg.num_samples} responses for each of {len(clean)} problems "
      f"({len(problems) - len(clean)} contaminated ones skipped)")
  generate.generate_file(sampler, renderer, prompts, generations, sampling,
                         num_samples=cfg.num_samples, seed=eval_cfg.seed,
                         batch_size=eval_cfg.batch_size, samples_at_once=eval_cfg.samples_at_once,
                         provenance=provenance, restart=eval_cfg.restart, log=log)
  if not writer:
    return None
  sampled = {}
  with storage.open(generations, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      sampled[row["id"]] = [Response(t, fr, len(ids)) for t, fr, ids in zip(
          row["response"], row["finish_reason"], row["completion_token_ids"])]
  responses = [sampled.get(p.id, []) for p in problems]
  source = {"teacher": teacher, "sampling": dict(sampling.describe(), seed=eval_cfg.seed,
                                                 num_samples=cfg.num_samples,
                                                 instruction=eval_cfg.instruction)}
  checker = grade_lib.SymbolicChecker(workers=eval_cfg.grading_workers)
  try:
    records, stats = select(problems, responses, matches, kind=cfg.answer_kind, keep=cfg.keep,
                            k=cfg.k, shaping=shaping, source=source, checker=checker)
  finally:
    checker.close()
  write_outputs(out_dir, records, stats)
  log(f"{out_dir}: {summary_line(stats)}")
  return stats
