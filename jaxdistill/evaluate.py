"""Evaluation on the bundled tasks or any problem set: sample, grade, and write summary, report
and plot.

For each task, `<out_dir>/<task>/` receives `prompts.jsonl`, `generations.jsonl` (and
`greedy.jsonl`), their grades (`graded.jsonl`, `greedy_graded.jsonl`), `summary.json`, and
`budget.png` (maj@k against average output tokens, the O1-Journey measure);
`<out_dir>/report.md` has one table for all tasks (runs use `workdir/eval`). Generations are
appended as batches finish and a rerun continues from them, so a preempted evaluation loses
at most one batch and ends with the same summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence

import jax

from jaxdistill import generate
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
  with open(path, "w", encoding="utf-8") as f:
    for row in out:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return out


def prompt_rows(task: Task, cfg: EvalConfig) -> list[dict]:
  """The task's problems as prompts rows: each problem followed by the instruction."""
  rows = task.problems[:cfg.limit] if cfg.limit else task.problems
  return [dict(r, prompt=f"{r['problem']}\n{cfg.instruction}" if cfg.instruction
               else r["problem"]) for r in rows]


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
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      samples = [(r, row["answer"], fr) for r, fr in zip(row["response"], row["finish_reason"])]
      problems.append(grade_lib.grade_all(samples, kind, checker=checker))
      tokens.append([len(t) for t in row["completion_token_ids"]])
      rows.append(row)
  if graded_path:
    with open(graded_path + ".tmp", "w", encoding="utf-8") as f:
      for row, verdicts in zip(rows, problems):
        f.write(json.dumps({"id": row["id"], "correct": [v.correct for v in verdicts],
                            "reason": [v.reason for v in verdicts],
                            "vote_key": [v.vote_key for v in verdicts]},
                           ensure_ascii=False) + "\n")
    os.replace(graded_path + ".tmp", graded_path)
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
  sampled = SamplingConfig(rule=rule_from(cfg.temperature, cfg.top_k, cfg.top_p),
                           max_new_tokens=cfg.max_new_tokens, stop_ids=stops,
                           cache_dtype=cfg.cache_dtype,
                           vocab_size=renderer.tokenizer.vocab_size)
  greedy = dataclasses.replace(sampled, rule=Greedy())
  checker = grade_lib.SymbolicChecker(workers=cfg.grading_workers) if writer else None
  summaries = {}
  try:
    for task in task_list:
      task_dir = os.path.join(out_dir, task.name)
      prompts = os.path.join(task_dir, "prompts.jsonl")
      if writer:
        os.makedirs(task_dir, exist_ok=True)
        write_prompts(task, cfg, prompts)
      _barrier(f"prompts of {task.name}")
      log(f"{task.name}: sampling {cfg.num_samples} per problem (temperature "
          f"{cfg.temperature}, top-p {cfg.top_p}, up to {cfg.max_new_tokens} tokens)")
      generations = os.path.join(task_dir, "generations.jsonl")
      new = generate.generate_file(
          sampler, renderer, prompts, generations, sampled, num_samples=cfg.num_samples,
          seed=cfg.seed, batch_size=cfg.batch_size, samples_at_once=cfg.samples_at_once,
          provenance=provenance, restart=cfg.restart, log=log)
      greedy_path = os.path.join(task_dir, "greedy.jsonl")
      if cfg.greedy:
        new += generate.generate_file(sampler, renderer, prompts, greedy_path, greedy,
                                      batch_size=cfg.batch_size, provenance=provenance,
                                      restart=cfg.restart, log=log)
      if not writer:
        continue
      summary_path = os.path.join(task_dir, "summary.json")
      if not new and os.path.exists(summary_path):
        with open(summary_path) as f:
          summaries[task.name] = json.load(f)
        log(f"{task.name}: finished earlier, accuracy {summaries[task.name]['accuracy']:.3f}")
        continue
      greedy_verdicts = None
      if cfg.greedy:
        greedy_verdicts = [vs[0] for vs in grade_file(
            greedy_path, task.kind, checker, os.path.join(task_dir, "greedy_graded.jsonl"))[0]]
      problems, tokens, rows = grade_file(generations, task.kind, checker,
                                          os.path.join(task_dir, "graded.jsonl"))
      summary = metrics.summarize(problems, tokens=tokens, greedy=greedy_verdicts)
      if task.group_by:
        summary["by_group"] = metrics.summarize_groups(
            problems, [str(r.get(task.group_by)) for r in rows], tokens=tokens,
            greedy=greedy_verdicts)
      summary.update(task=task.name, kind=task.kind, model=model_description,
                     sampling=sampled.describe(), num_samples=cfg.num_samples,
                     instruction=cfg.instruction)
      with open(summary_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
      os.replace(summary_path + ".tmp", summary_path)
      _plot_budget(summary, task.name, os.path.join(task_dir, "budget.png"))
      log(f"{task.name}: accuracy {summary['accuracy']:.3f} (avg@{cfg.num_samples}), greedy "
          f"{summary.get('greedy_accuracy')}, mean output tokens "
          f"{summary.get('mean_output_tokens', 0):.0f}")
      summaries[task.name] = summary
  finally:
    if checker is not None:
      checker.close()
  if writer:
    write_report(summaries, os.path.join(out_dir, "report.md"))
  return summaries


def _barrier(name: str) -> None:
  """Waits for every process (process 0 has written what the others read next)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def write_report(summaries: dict, path: str) -> None:
  lines = ["| task | problems | n | avg@n | greedy | maj@n | pass@n | mean tokens | truncated "
           "| no answer |", "|---|---|---|---|---|---|---|---|---|---|"]
  for task, s in summaries.items():
    n = str(max(int(k) for k in s["maj@k"]))
    greedy = "-" if s.get("greedy_accuracy") is None else f"{s['greedy_accuracy']:.1%}"
    lines.append(
        f"| {task} | {s['problems']} | {s['n_min']} | {s['avg@n']:.1%} | {greedy} | "
        f"{s['maj@k'][n]:.1%} | {s['pass@k'][n]:.1%} | {s.get('mean_output_tokens', 0):,.0f} | "
        f"{s['truncation_rate']:.1%} | {s['extraction_failure_rate']:.1%} |")
  if summaries:
    any_summary = next(iter(summaries.values()))
    model = any_summary["model"]
    sampling = any_summary["sampling"]
    lines += ["", f"Model: {json.dumps(model)}", "",
              f"Sampling: temperature {sampling['temperature']}, top-p {sampling['top_p']}, "
              f"top-k {sampling['top_k']}, up to {sampling['max_new_tokens']} new tokens, "
              f"KV cache {sampling['cache_dtype']}."]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


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
  fig.savefig(path, dpi=120)
  plt.close(fig)
