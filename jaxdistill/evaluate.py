"""Evaluation on the bundled tasks or any problem set: sample, grade, and write summary, report
and plot.

For each task, `<out_dir>/<task>/` receives `prompts.jsonl`, `generations.jsonl` (and
`greedy.jsonl`), their grades (`graded.jsonl`, `greedy_graded.jsonl`), `summary.json`, and
`budget.png` (maj@k against average output tokens, the O1-Journey measure);
`<out_dir>/report.md` has one table for all tasks (runs use `workdir/eval`), every accuracy
with its standard error over problems (metrics.py). Generations are appended as batches finish
and a rerun continues from them, so a preempted evaluation loses at most one batch and ends
with the same summary. `out_dir` may be a gs:// URL (`storage`).

Budget forcing (s1; rules.BudgetForcing, the counting documented there): `max_thinking_tokens`,
`min_thinking_tokens` and `max_waits` apply to the main samples and the greedy ones. For each
of `thinking_budgets` the task is sampled again, at most B thinking tokens per sample, into
`<task>/budget_<B>/` (generations, grades, summary); the report gains accuracy against thinking
budget as a table and `<out_dir>/thinking_budget.png` (s1's Figure 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence

import jax

from jaxdistill import generate, storage
from jaxdistill.data import chat
from jaxdistill.eval import grade as grade_lib, metrics, tasks
from jaxdistill.rules import Greedy, rule_from
from jaxdistill.sampler import Sampler, SamplingConfig

TASK_KINDS = {"aime24": "aime", "aime25": "aime", "amc23": "amc", "math500": "math"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The `eval` section of a run config, typed (defaults: configs/base.py)."""
  tasks: tuple[str, ...]  # bundled tasks (TASK_KINDS) that `evaluate` runs by default
  num_samples: int  # samples per problem (pass@1 is averaged over them)
  temperature: float
  top_p: float
  top_k: int
  max_new_tokens: int
  greedy: bool  # also one greedy sample per problem
  batch_size: int  # sampler slots: groups (a prompt x samples_at_once) decoding at once
  samples_at_once: int  # samples of one prompt per slot (0 = all); bounds the KV cache
  limit: int  # first N problems of each task (0 = all)
  instruction: str  # appended to each problem in the user turn ("" = none)
  seed: int
  compute_dtype: str  # the model's compute dtype while sampling
  cache_dtype: str
  grading_workers: int  # processes for symbolic (MATH) comparisons
  restart: bool  # sample again over outputs that other weights or settings produced
  think_end: str  # end-of-thinking delimiter (budget forcing; thinking token counts)
  answer_cue: str  # forced after think_end at a thinking maximum
  max_thinking_tokens: int  # most thinking tokens per sample (0 = off)
  min_thinking_tokens: int  # an earlier think_end is replaced by wait_text (0 = any)
  wait_text: str
  max_waits: int  # most replacements per sample (0 = off)
  thinking_budgets: tuple[int, ...]  # each task sampled again at each (s1's figure)

  def __post_init__(self):
    unknown = [t for t in self.tasks if t not in TASK_KINDS]
    if unknown:
      raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {sorted(TASK_KINDS)}")
    if self.num_samples < 1:
      raise ValueError(f"eval.num_samples={self.num_samples} must be positive")
    if self.samples_at_once < 0 or self.samples_at_once and (
        self.num_samples % self.samples_at_once):
      raise ValueError(f"eval.samples_at_once={self.samples_at_once} must divide "
                       f"eval.num_samples={self.num_samples} (0 = all of them)")
    for name in ("max_thinking_tokens", "min_thinking_tokens", "max_waits"):
      if getattr(self, name) < 0:
        raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0 (0 = off)")
    if self.min_thinking_tokens and not self.max_waits:
      raise ValueError(f"eval.min_thinking_tokens={self.min_thinking_tokens} is kept by "
                       "replacing an early eval.think_end with eval.wait_text: set "
                       "eval.max_waits (how many times at most)")
    if self.max_waits and not self.wait_text:
      raise ValueError(f"eval.max_waits={self.max_waits} needs eval.wait_text (e.g. 'Wait')")
    if (self.max_thinking_tokens or self.max_waits or self.thinking_budgets) and (
        not self.think_end):
      raise ValueError("budget forcing needs eval.think_end, the delimiter the model ends its "
                       "thinking with (e.g. '</think>')")
    for b in ((self.max_thinking_tokens,) if self.max_thinking_tokens else ()) + (
        self.thinking_budgets):
      if not 0 < b < self.max_new_tokens:
        raise ValueError(f"thinking budget {b} (eval.max_thinking_tokens or "
                         f"eval.thinking_budgets) must be positive and leave the answer room "
                         f"within eval.max_new_tokens={self.max_new_tokens}")
      if self.min_thinking_tokens > b:
        raise ValueError(f"eval.min_thinking_tokens={self.min_thinking_tokens} exceeds the "
                         f"thinking budget {b}; lower it")

  def forcing(self, rule, tokenizer, max_thinking: int):
    """`rule` with this config's budget forcing at most `max_thinking` thinking tokens."""
    return generate.budget_forcing(
        rule, tokenizer, think_end=self.think_end, max_thinking=max_thinking,
        answer_cue=self.answer_cue, min_thinking=self.min_thinking_tokens, wait=self.wait_text,
        max_waits=self.max_waits)


@dataclasses.dataclass(frozen=True)
class Task:
  """A set of problems to sample and grade: the bundled ones (`bundled_task`) or any other
  (the demo's held-out arithmetic). Each problem has `id`, `problem` and `answer`; its
  other fields are copied into the outputs, and `group_by` names one whose values get their
  own accuracy in the summary (e.g. MATH-500's `level`)."""
  name: str
  kind: str  # how answers are graded: grade.py's "aime" | "amc" | "math"
  problems: tuple[dict, ...]
  group_by: str | None = None


def bundled_task(name: str) -> Task:
  if name not in TASK_KINDS:
    raise ValueError(f"unknown evaluation task {name!r}; choose from {sorted(TASK_KINDS)}")
  return Task(name, TASK_KINDS[name], tuple(tasks.load_task(name)))


def write_prompts(task: Task, cfg: EvalConfig, path: str) -> list[dict]:
  out = prompt_rows(task, cfg)
  with storage.atomic_write(path, "w", encoding="utf-8") as f:
    for row in out:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return out


def prompt_rows(task: Task, cfg: EvalConfig) -> list[dict]:
  """The task's problems as prompts rows: each problem followed by the instruction."""
  rows = task.problems[:cfg.limit] if cfg.limit else task.problems
  return [dict(r, prompt=user_prompt(r["problem"], cfg.instruction)) for r in rows]


def user_prompt(problem: str, instruction: str) -> str:
  """The user turn that asks `problem`: the problem, then the instruction ("" = none)."""
  return f"{problem}\n{instruction}" if instruction else problem


def check_limits(cfg: EvalConfig, renderer: chat.ChatRenderer, max_positions: int,
                 task_list: Sequence[Task] | None = None) -> None:
  """Refuses, before any weights load, an evaluation whose longest rendered prompt plus
  `max_new_tokens` exceeds the model's positions, saying what would fit."""
  task_list = list(task_list) if task_list is not None else [bundled_task(t) for t in cfg.tasks]
  longest, where = 0, ""
  for task in task_list:
    for row in prompt_rows(task, cfg):
      n = len(generate.prompt_tokens(row, renderer, use_chat_template=True))
      if n > longest:
        longest, where = n, f"{task.name} {row['id']}"
  if longest + cfg.max_new_tokens > max_positions:
    raise ValueError(
        f"eval.max_new_tokens={cfg.max_new_tokens} plus the longest prompt ({where}, "
        f"{longest} tokens) exceeds the model's {max_positions} positions; set "
        f"eval.max_new_tokens to at most {max_positions - longest}, or raise "
        "model.max_position_embeddings (and model.rope_theta) if the model was trained "
        "for longer")


def grade_file(path: str, kind: str, checker, graded_path: str | None = None
               ) -> tuple[list[list], list[list[int]], list[dict]]:
  """Per-problem verdicts, output token counts and rows of a generations file; with
  `graded_path`, one line per problem is written there: id, and per sample `correct`,
  `reason` and `vote_key` (the answer as voted on)."""
  problems, tokens, rows = [], [], []
  with storage.open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      samples = [(r, row["answer"], fr) for r, fr in zip(row["response"], row["finish_reason"])]
      problems.append(grade_lib.grade_all(samples, kind, checker=checker))
      tokens.append([len(t) for t in row["completion_token_ids"]])
      rows.append(row)
  if graded_path:
    with storage.atomic_write(graded_path, "w", encoding="utf-8") as f:
      for row, verdicts in zip(rows, problems):
        f.write(json.dumps({"id": row["id"], "correct": [v.correct for v in verdicts],
                            "reason": [v.reason for v in verdicts],
                            "vote_key": [v.vote_key for v in verdicts]},
                           ensure_ascii=False) + "\n")
  return problems, tokens, rows


def evaluate(sampler: Sampler, renderer: chat.ChatRenderer, cfg: EvalConfig, out_dir: str, *,
             model_description: dict, provenance: dict | None = None,
             task_list: Sequence[Task] | None = None,
             log: Callable[[str], None] = logging.info) -> dict:
  """Samples and grades every task (default: `cfg.tasks`, bundled) into `out_dir/<task>/`,
  and writes `out_dir/report.md`; returns {task: summary}.

  `provenance` (weights and tokenizer identity) is recorded beside each generations file and
  checked on a rerun (generate.check_provenance). A task whose generations were all there
  already and whose summary exists is reported, not graded again. With several processes all
  of them sample; process 0 alone writes, grades and returns the summaries ({} elsewhere).
  """
  task_list = list(task_list) if task_list is not None else [bundled_task(t) for t in cfg.tasks]
  writer = jax.process_index() == 0
  stops = generate.stop_ids(renderer)
  rule, tok = rule_from(cfg.temperature, cfg.top_k, cfg.top_p), renderer.tokenizer
  sampled = SamplingConfig(rule=cfg.forcing(rule, tok, cfg.max_thinking_tokens),
                           max_new_tokens=cfg.max_new_tokens, stop_ids=stops,
                           cache_dtype=cfg.cache_dtype,
                           vocab_size=renderer.tokenizer.vocab_size)
  greedy = dataclasses.replace(sampled, rule=cfg.forcing(Greedy(), tok, cfg.max_thinking_tokens))
  at_budget = {b: dataclasses.replace(sampled, rule=cfg.forcing(rule, tok, b))
               for b in cfg.thinking_budgets}
  think_end = tuple(tok.encode(cfg.think_end)) if cfg.think_end else ()
  checker = grade_lib.SymbolicChecker(workers=cfg.grading_workers) if writer else None
  summaries = {}
  try:
    for task in task_list:
      task_dir = storage.join(out_dir, task.name)
      prompts = storage.join(task_dir, "prompts.jsonl")
      if writer:
        storage.makedirs(task_dir)
        write_prompts(task, cfg, prompts)
      barrier(f"prompts of {task.name}")
      log(f"{task.name}: sampling {cfg.num_samples} per problem (temperature "
          f"{cfg.temperature}, top-p {cfg.top_p}, up to {cfg.max_new_tokens} tokens)")
      generations = storage.join(task_dir, "generations.jsonl")
      new = generate.generate_file(
          sampler, renderer, prompts, generations, sampled, num_samples=cfg.num_samples,
          seed=cfg.seed, batch_size=cfg.batch_size, samples_at_once=cfg.samples_at_once,
          provenance=provenance, restart=cfg.restart, log=log)
      greedy_path = storage.join(task_dir, "greedy.jsonl")
      if cfg.greedy:
        new += generate.generate_file(sampler, renderer, prompts, greedy_path, greedy,
                                      batch_size=cfg.batch_size, provenance=provenance,
                                      restart=cfg.restart, log=log)
      budget_paths = {b: storage.join(task_dir, f"budget_{b}", "generations.jsonl")
                      for b in cfg.thinking_budgets}
      for b, path in budget_paths.items():
        if writer:
          storage.makedirs(storage.dirname(path))
        log(f"{task.name}: sampling again at a thinking budget of {b} tokens")
        new += generate.generate_file(
            sampler, renderer, prompts, path, at_budget[b], num_samples=cfg.num_samples,
            seed=cfg.seed, batch_size=cfg.batch_size, samples_at_once=cfg.samples_at_once,
            provenance=provenance, restart=cfg.restart, log=log)
      if not writer:
        continue
      summary_path = storage.join(task_dir, "summary.json")
      if not new and storage.exists(summary_path):
        with storage.open(summary_path) as f:
          earlier = json.load(f)
        if [p["budget"] for p in earlier.get("thinking_budgets", [])] == list(budget_paths):
          summaries[task.name] = earlier
          log(f"{task.name}: finished earlier, accuracy {earlier['accuracy']:.3f}")
          continue
      greedy_verdicts = None
      if cfg.greedy:
        greedy_verdicts = [vs[0] for vs in grade_file(
            greedy_path, task.kind, checker, storage.join(task_dir, "greedy_graded.jsonl"))[0]]
      problems, tokens, rows = grade_file(generations, task.kind, checker,
                                          storage.join(task_dir, "graded.jsonl"))
      summary = metrics.summarize(problems, tokens=tokens, greedy=greedy_verdicts,
                                  thinking=_thinking(rows, think_end))
      if task.group_by:
        summary["by_group"] = metrics.summarize_groups(
            problems, [str(r.get(task.group_by)) for r in rows], tokens=tokens,
            greedy=greedy_verdicts)
      summary.update(task=task.name, kind=task.kind, model=model_description,
                     sampling=sampled.describe(), num_samples=cfg.num_samples,
                     instruction=cfg.instruction, thinking=dict(
                         think_end=cfg.think_end, answer_cue=cfg.answer_cue,
                         max_thinking_tokens=cfg.max_thinking_tokens,
                         min_thinking_tokens=cfg.min_thinking_tokens,
                         wait_text=cfg.wait_text, max_waits=cfg.max_waits),
                     thinking_budgets=[_budget_point(b, path, task, checker, think_end)
                                       for b, path in budget_paths.items()])
      _write_json(summary, summary_path)
      _plot_budget(summary, task.name, storage.join(task_dir, "budget.png"))
      log(f"{task.name}: accuracy {summary['accuracy']:.3f} (avg@{cfg.num_samples}), greedy "
          f"{summary.get('greedy_accuracy')}, mean output tokens "
          f"{summary.get('mean_output_tokens', 0):.0f}")
      summaries[task.name] = summary
  finally:
    if checker is not None:
      checker.close()
  if writer:
    write_report(summaries, storage.join(out_dir, "report.md"))
  return summaries


def _thinking(rows: list[dict], think_end: tuple[int, ...]) -> list[list[int]] | None:
  """Each sample's thinking tokens (metrics.thinking_tokens), per problem; None without a
  delimiter."""
  if not think_end:
    return None
  return [[metrics.thinking_tokens(ids, think_end) for ids in row["completion_token_ids"]]
          for row in rows]


def _budget_point(budget: int, path: str, task: Task, checker, think_end) -> dict:
  """Grades the samples at one thinking budget (grades and a summary beside them) into the
  point the report's table and plot show."""
  problems, tokens, rows = grade_file(path, task.kind, checker,
                                      storage.join(storage.dirname(path), "graded.jsonl"))
  s = metrics.summarize(problems, tokens=tokens, thinking=_thinking(rows, think_end))
  _write_json(dict(s, task=task.name, thinking_budget=budget),
              storage.join(storage.dirname(path), "summary.json"))
  return {"budget": budget, "avg@n": s["avg@n"], "stderr": s["stderr"]["avg@n"],
          "mean_thinking_tokens": s["mean_thinking_tokens"],
          "mean_output_tokens": s["mean_output_tokens"], "truncation_rate": s["truncation_rate"]}


def _write_json(value: dict, path: str) -> None:
  with storage.atomic_write(path) as f:
    json.dump(value, f, indent=2)


def barrier(name: str) -> None:
  """Waits for every process (process 0 has written what the others read next)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def write_report(summaries: dict, path: str) -> None:
  """report.md: a row per task, each accuracy with its standard error over problems (in
  points); with thinking budgets, accuracy against them, as a table and
  thinking_budget.png beside the report."""
  lines = ["| task | problems | n | avg@n | greedy | maj@n | pass@n | mean tokens | truncated "
           "| no answer |", "|---|---|---|---|---|---|---|---|---|---|"]
  for task, s in summaries.items():
    n = str(max(int(k) for k in s["maj@k"]))
    se = s.get("stderr", {})
    lines.append(
        f"| {task} | {s['problems']} | {s['n_min']} | {_pct(s['avg@n'], se.get('avg@n'))} | "
        f"{_pct(s.get('greedy_accuracy'), se.get('greedy_accuracy'))} | "
        f"{_pct(s['maj@k'][n], se.get('maj@k', {}).get(n))} | "
        f"{_pct(s['pass@k'][n], se.get('pass@k', {}).get(n))} | "
        f"{s.get('mean_output_tokens', 0):,.0f} | "
        f"{s['truncation_rate']:.1%} | {s['extraction_failure_rate']:.1%} |")
  if summaries:
    any_summary = next(iter(summaries.values()))
    model = any_summary["model"]
    sampling = any_summary["sampling"]
    lines += ["", "± is the standard error over problems, in points (one AIME problem is 3.3).",
              "", f"Model: {json.dumps(model)}", "",
              f"Sampling: temperature {sampling['temperature']}, top-p {sampling['top_p']}, "
              f"top-k {sampling['top_k']}, up to {sampling['max_new_tokens']} new tokens, "
              f"KV cache {sampling['cache_dtype']}."]
    thinking = any_summary.get("thinking") or {}
    if thinking.get("max_thinking_tokens") or thinking.get("max_waits"):
      lines += ["", f"Budget forcing: {_forcing_text(thinking)}."]
  with_budgets = {t: s for t, s in summaries.items() if s.get("thinking_budgets")}
  if with_budgets:
    thinking = next(iter(with_budgets.values()))["thinking"]
    lines += ["", "## Accuracy against thinking budget", "",
              f"Each task sampled again with at most B thinking tokens per sample (counted from "
              f"the first generated token up to {thinking['think_end']!r}; at B it is forced, "
              f"then {thinking['answer_cue']!r}); the main run for comparison.", "",
              "| task | budget | mean thinking tokens | mean output tokens | avg@n | truncated |",
              "|---|---|---|---|---|---|"]
    for task, s in with_budgets.items():
      rows = [(str(p["budget"]), p) for p in s["thinking_budgets"]]
      rows.append(("main run", {"avg@n": s["avg@n"], "stderr": s.get("stderr", {}).get("avg@n"),
                                "mean_thinking_tokens": s.get("mean_thinking_tokens", 0),
                                "mean_output_tokens": s.get("mean_output_tokens", 0),
                                "truncation_rate": s["truncation_rate"]}))
      for label, p in rows:
        lines.append(f"| {task} | {label} | {p['mean_thinking_tokens']:,.0f} | "
                     f"{p['mean_output_tokens']:,.0f} | "
                     f"{_pct(p['avg@n'], p['stderr'])} | "
                     f"{p['truncation_rate']:.1%} |")
    lines += ["", "![accuracy against thinking budget](thinking_budget.png)"]
  storage.makedirs(storage.dirname(path))
  with storage.atomic_write(path) as f:
    f.write("\n".join(lines) + "\n")
  if with_budgets:
    _plot_thinking_budgets(with_budgets, storage.join(storage.dirname(path),
                                                      "thinking_budget.png"))


def _pct(value: float | None, stderr: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.1%}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def _forcing_text(t: dict) -> str:
  parts = []
  if t["max_thinking_tokens"]:
    parts.append(f"at most {t['max_thinking_tokens']} thinking tokens, then "
                 f"{t['think_end']!r} and {t['answer_cue']!r}")
  if t["max_waits"]:
    when = (f" with fewer than {t['min_thinking_tokens']} thinking tokens"
            if t["min_thinking_tokens"] else "")
    parts.append(f"{t['think_end']!r}{when} replaced by {t['wait_text']!r} up to "
                 f"{t['max_waits']} times")
  return "; ".join(parts)


def _plot_thinking_budgets(summaries: dict, path: str) -> None:
  """Accuracy (± standard error) against mean thinking tokens, a line per task through its
  budgets, the main run's accuracy dashed: s1's Figure 1."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  xs = []
  for task, s in summaries.items():
    points = s["thinking_budgets"]
    x = [p["mean_thinking_tokens"] for p in points]
    xs += x
    line = ax.errorbar(x, [100 * p["avg@n"] for p in points],
                       yerr=[100 * (p["stderr"] or 0) for p in points], marker="o",
                       capsize=3, label=task)
    ax.axhline(100 * s["avg@n"], ls="--", lw=1, color=line[0].get_color(), alpha=0.6)
    for p, xi in zip(points, x):
      ax.annotate(f"B={p['budget']}", (xi, 100 * p["avg@n"]), fontsize=7,
                  textcoords="offset points", xytext=(3, -10))
  if min(xs) > 0:
    ax.set_xscale("log", base=2)
  ax.set_xlabel("mean thinking tokens per sample (at budget B)")
  ax.set_ylabel("accuracy, avg@n (%)")
  ax.set_title("accuracy against thinking budget (dashed: main run)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with storage.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def _plot_budget(summary: dict, task: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  points = summary.get("budget") or []
  if not points:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([p["tokens"] for p in points], [100 * p["maj@k"] for p in points], marker="o")
  for p in points:
    ax.annotate(f"k={p['k']}", (p["tokens"], 100 * p["maj@k"]), fontsize=7,
                textcoords="offset points", xytext=(3, -10))
  ax.set_xscale("log", base=2)
  ax.set_xlabel("average output tokens per problem (k samples)")
  ax.set_ylabel(f"{task} maj@k accuracy (%)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with storage.atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
