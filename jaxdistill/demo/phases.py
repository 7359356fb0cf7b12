"""The demo's phases that both of its presets run: a student's config, SFT through the real
trainer, sampled and graded evaluation on the held-out problems, the figures a report is
made of, and the record of each phase's wall time."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping

from jaxdistill import evaluate as evaluate_lib, startup, train
from jaxdistill.data import builder, chat
from jaxdistill.demo import teacher
from jaxdistill.model_config import ModelConfig
from jaxdistill.settings import ModelSettings, Settings

KIND = "amc"  # how answers are graded: signed integers


def student_config(model: ModelSettings, vocab_size: int) -> ModelConfig:
  """The random-init model `model` describes, its vocabulary the demo tokenizer's
  (`vocab_size`) unless the settings name one."""
  cfg = model.preset_config()
  if "vocab_size" not in dict(model.architecture):
    cfg = cfg.replace(vocab_size=vocab_size)
  return cfg


def train_student(run: startup.Run) -> int:
  """SFT through the real trainer; returns the final step (resumes, or skips when done)."""
  s, workdir = run.settings, run.workdir
  if run.source.kind == "resume" and run.source.step >= s.train.num_steps:
    return run.source.step
  data = builder.build_training_data(s.data, global_batch_size=s.train.global_batch_size,
                                     num_steps=s.train.num_steps, seed=s.seed,
                                     workdir=workdir)
  startup.write_manifest(run, data.fingerprint)
  model = None if run.source.kind == "resume" else startup.load_weights(
      run.source, run.model_config, run.mesh, s.seed)
  result = train.run(model, run.model_config, s.optim, s.train, run.mesh, data.train, workdir,
                     run_config=json.loads(s.config_json), log=logging.info)
  if result.preempted:
    raise SystemExit(f"stopped by a signal at step {result.step}; run the same command to "
                     "resume")
  return result.step


def evaluate(s: Settings, sampler, renderer: chat.ChatRenderer, held: list[dict], out_dir: str,
             name: str, *, num_samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, description: str = "demo student") -> dict:
  """Samples and grades the held-out problems through evaluate.py into `out_dir/name/`;
  returns its summary (per-family figures under "by_group")."""
  problems = tuple(dict(r, problem=teacher.user_turn(r["problem"])) for r in held)
  task = evaluate_lib.Task(name, KIND, problems, group_by="family")
  cfg = dataclasses.replace(
      s.eval, tasks=(), num_samples=num_samples, temperature=temperature, top_p=top_p,
      top_k=0, greedy=False, max_new_tokens=s.demo.max_new_tokens,
      batch_size=s.demo.eval_batch_size, samples_at_once=0, limit=0, instruction="",
      grading_workers=1)
  return evaluate_lib.evaluate(sampler, renderer, cfg, out_dir, task_list=[task],
                               model_description={"model": description},
                               log=logging.info)[name]


def evaluate_maj(s: Settings, sampler, renderer: chat.ChatRenderer, held: list[dict],
                 out_dir: str, description: str = "demo student") -> dict:
  """maj@k on the first demo.maj_per_family held-out problems of each family, into
  `out_dir/heldout_maj/` (demo.maj_k samples each at demo.maj_temperature)."""
  d = s.demo
  subset = [r for f in d.families for r in [r for r in held if r["family"] == f][
      :d.maj_per_family]]
  return evaluate(s, sampler, renderer, subset, out_dir, "heldout_maj", num_samples=d.maj_k,
                  temperature=d.maj_temperature, top_p=d.maj_top_p, description=description)


def accuracy(summary: dict, fams, field: str = "accuracy") -> dict:
  """Overall and per-family accuracy: of the samples ("accuracy") or the majority vote over
  all of them ("maj")."""
  def score(x):
    return x["maj@k"][str(x["n_min"])] if field == "maj" else x["accuracy"]
  return {"overall": score(summary), **{f: score(summary["by_group"][f]) if f in summary[
      "by_group"] else None for f in fams}}


def thinking_tokens(task_dir: str, end_think_id: int, fams) -> dict[str, float]:
  """Mean tokens before `</think>` (all of them, when it never came) of the samples in
  `task_dir`, overall and per family."""
  by_family: dict[str, list[int]] = {}
  with open(os.path.join(task_dir, "generations.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      for ids in row["completion_token_ids"]:
        n = ids.index(end_think_id) if end_think_id in ids else len(ids)
        by_family.setdefault(row["family"], []).append(n)
  out = {f: mean(by_family.get(f, [])) for f in fams}
  out["overall"] = mean([n for ns in by_family.values() for n in ns])
  return out


def final_loss(workdir: str) -> float:
  """The last training loss the trainer logged in `workdir`."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if "loss" in line][-1]["loss"]


def mean(xs: list) -> float:
  return sum(xs) / len(xs) if xs else 0.0


# -- Report files -------------------------------------------------------------------------------


def finished(workdir: str) -> dict | None:
  """The summary of a finished demo run in `workdir` (its report logged), or None."""
  summary_path = os.path.join(workdir, "summary.json")
  report_path = os.path.join(workdir, "report.md")
  if not (os.path.exists(summary_path) and os.path.exists(report_path)):
    return None
  with open(report_path, encoding="utf-8") as f:
    logging.info("finished run in %s:\n%s", workdir, f.read())
  with open(summary_path) as f:
    return json.load(f)


def write_summary(summary: dict, report: str, workdir: str) -> None:
  """workdir/report.md, then workdir/summary.json: the pair marks the run finished."""
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("demo finished:\n%s", report)


def plot_loss(curves: Mapping[str, str], path: str, title: str) -> None:
  """The training loss logged in each workdir of `curves` ({label: workdir}), one line each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, workdir in curves.items():
    steps, losses = [], []
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        if "loss" in row:
          steps.append(row["step"])
          losses.append(row["loss"])
    ax.plot(steps, losses, marker=".", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats / scored token)")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  if len(curves) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


class Times:
  """Wall time per phase, kept in a JSON file so that resumed runs add up."""

  def __init__(self, path: str):
    self.path = path
    self.times = {}
    if os.path.exists(path):
      with open(path) as f:
        self.times = json.load(f)

  def add(self, phase: str, start: float) -> None:
    """Adds the time since `start` (a `time.perf_counter()` reading) to `phase`."""
    self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start
    with open(self.path, "w") as f:
      json.dump(self.times, f, indent=2)

  def with_total(self) -> dict:
    return dict(self.times, total=sum(self.times.values()))
