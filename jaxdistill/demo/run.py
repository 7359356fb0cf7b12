"""Orchestrates the demo: teacher data and tokenizer, SFT through the real trainer, evaluation
of the trained and untrained student on held-out problems through `jaxdistill/evaluate.py`,
and the report.

Every phase leaves its output in the workdir and is skipped when that output is there, so
running the command again resumes an interrupted run (training resumes from its checkpoint,
sampling from the generations already written) or, for a finished one, prints the report.

workdir/
  data/train.jsonl, data/heldout.jsonl, data/tokenizer.model   teacher output
  checkpoints/, metrics.jsonl, manifest.json                   the trainer's
  demo/untrained/heldout/, demo/trained/heldout/, demo/trained/heldout_maj/
                          evaluate.py's per-task outputs (generations, graded.jsonl, summary)
  demo/times.json                                              wall time of each phase
  report.md, summary.json, loss.png
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time

import jax

from jaxdistill import apps, checkpoint, evaluate as evaluate_lib, startup, storage, train
from jaxdistill.data import builder, chat
from jaxdistill.demo import teacher
from jaxdistill.model_config import ModelConfig
from jaxdistill.settings import Settings

SYMBOLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
KIND = "amc"  # signed integer answers


def resolve(s: Settings, workdir: str) -> Settings:
  """`s` with the demo's length and its data paths in `workdir` filled in."""
  data = dataclasses.replace(s.data, sources=os.path.join(workdir, "data", "train.jsonl"),
                             tokenizer=os.path.join(workdir, "data", "tokenizer.model"))
  return dataclasses.replace(s, data=data).with_num_steps(s.demo.num_steps)


def student_config(s: Settings, vocab_size: int) -> ModelConfig:
  """The model.* student, its vocabulary the demo tokenizer's unless model.vocab_size says."""
  cfg = s.model.preset_config()
  if "vocab_size" not in dict(s.model.architecture):
    cfg = cfg.replace(vocab_size=vocab_size)
  return cfg


# -- Phases ------------------------------------------------------------------------------------


def make_data(s: Settings, workdir: str) -> None:
  """Held-out problems, training traces and the tokenizer, unless already in workdir/data."""
  data_dir = os.path.join(workdir, "data")
  if os.path.exists(s.data.tokenizer):
    return
  os.makedirs(data_dir, exist_ok=True)
  d = s.demo
  held = teacher.held_out(d.families, d.eval_per_family, d.data_seed)
  held_keys = {teacher.key_of(r) for r in held}
  traces = teacher.training(d.families, d.num_traces, d.data_seed, held_keys)
  train_problems = {t["messages"][0]["content"] for t in traces}
  overlap = [r["id"] for r in held if teacher.user_turn(r["problem"]) in train_problems]
  assert not overlap, f"held-out problems in the training set: {overlap[:5]}"
  teacher.write_jsonl(held, os.path.join(data_dir, "heldout.jsonl"))
  teacher.write_jsonl(traces, os.path.join(data_dir, "train.jsonl"))
  train_tokenizer([m["content"] for t in traces for m in t["messages"]], s.data.tokenizer,
                  d.vocab_size)


def train_tokenizer(corpus: list[str], path: str, vocab_size: int) -> None:
  """SentencePiece BPE with tools/make_tiny_assets.py's options: digits split, the ChatML and
  thinking tokens as symbols, text kept as is (identity normalisation, no dummy prefix)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", user_defined_symbols=SYMBOLS, byte_fallback=True, split_digits=True,
      character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
  with open(path + ".tmp", "wb") as f:
    f.write(model.getvalue())
  os.replace(path + ".tmp", path)  # its presence marks the data as complete


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
             top_p: float = 1.0) -> dict:
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
                               model_description={"model": "demo student"},
                               log=logging.info)[name]


def accuracy(summary: dict, fams, field: str = "accuracy") -> dict:
  """Overall and per-family accuracy: of the samples ("accuracy") or the majority vote over
  all of them ("maj")."""
  def score(x):
    return x["maj@k"][str(x["n_min"])] if field == "maj" else x["accuracy"]
  return {"overall": score(summary), **{f: score(summary["by_group"][f]) if f in summary[
      "by_group"] else None for f in fams}}


def thinking_tokens(task_dir: str, end_think_id: int) -> dict[str, list[int]]:
  """Tokens before `</think>` (all, when it never came) of each sample, by family."""
  out: dict[str, list[int]] = {}
  with open(os.path.join(task_dir, "generations.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      for ids in row["completion_token_ids"]:
        n = ids.index(end_think_id) if end_think_id in ids else len(ids)
        out.setdefault(row["family"], []).append(n)
  return out


# -- Report ------------------------------------------------------------------------------------


def plot_loss(workdir: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps, losses = [], []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        steps.append(row["step"])
        losses.append(row["loss"])
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, losses, marker=".")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats / scored token)")
  ax.set_yscale("log")
  ax.set_title("demo: student SFT on teacher traces")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(summary: dict, path: str) -> None:
  fams = summary["families"]
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  k = summary["maj_k"]
  lines = [
      f"# Distillation in a box ({summary['preset']} preset)", "",
      f"Student: {summary['model']['num_params']:,} parameters, trained {summary['steps']} "
      f"steps on {summary['num_traces']} teacher traces (mean "
      f"{summary['train_thinking_tokens']:.0f} thinking tokens); "
      f"{summary['heldout_per_family']} held-out problems per family, graded as "
      f"`{KIND}`.", "",
      f"| family | untrained greedy | trained greedy | maj@{k} (T={summary['maj_temperature']}, "
      f"first {summary['maj_per_family']}) | trained thinking tokens (greedy mean) |",
      "|---|---|---|---|---|"]
  for f in [*fams, "overall"]:
    lines.append(f"| {f} | {pct((summary['untrained_accuracy'] or {}).get(f))} | "
                 f"{pct(summary['greedy_accuracy'][f])} | "
                 f"{pct((summary['maj_accuracy'] or {}).get(f))} | "
                 f"{summary['thinking_tokens'][f]:.0f} |")
  times = summary["wall_times_s"]
  lines += ["", f"Wall time (s) on {summary['devices']}: " + ", ".join(
      f"{k} {v:.0f}" for k, v in times.items()) + " (phases only; start-up not counted)", "",
            f"Final training loss {summary['final_loss']:.4f}. Loss curve: `loss.png`; "
            "generations and grades: `demo/<untrained|trained>/<task>/`.", ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


# -- Entry -------------------------------------------------------------------------------------


class _Times:
  """Wall time per phase, kept in workdir/demo/times.json so resumed runs add up."""

  def __init__(self, path: str):
    self.path = path
    self.times = {}
    if os.path.exists(path):
      with open(path) as f:
        self.times = json.load(f)

  def add(self, phase: str, start: float) -> None:
    self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start
    with open(self.path, "w") as f:
      json.dump(self.times, f, indent=2)


def main(s: Settings, workdir: str) -> dict:
  """Runs (or resumes, or reports) the demo in `workdir`; returns the summary."""
  if storage.is_url(workdir):
    raise ValueError(f"--workdir={workdir}: the demo is a one-machine run that writes its data "
                     "and reports with local files; give it a local directory")
  summary_path = os.path.join(workdir, "summary.json")
  report_path = os.path.join(workdir, "report.md")
  if os.path.exists(summary_path) and os.path.exists(report_path):
    with open(report_path, encoding="utf-8") as f:
      logging.info("finished run in %s:\n%s", workdir, f.read())
    with open(summary_path) as f:
      return json.load(f)
  s = resolve(s, workdir)
  d = s.demo
  demo_dir = os.path.join(workdir, "demo")
  os.makedirs(demo_dir, exist_ok=True)
  times = _Times(os.path.join(demo_dir, "times.json"))

  start = time.perf_counter()
  make_data(s, workdir)
  times.add("data", start)
  held = teacher.read_jsonl(os.path.join(workdir, "data", "heldout.jsonl"))
  renderer = chat.ChatRenderer(chat.load_tokenizer(s.data.tokenizer), s.data.chat_template)
  run = startup.start(s, workdir, student_config(s, renderer.tokenizer.vocab_size))
  cfg = run.model_config
  logging.info("demo (%s): %d traces, %d steps; student %s parameters", d.preset,
               d.num_traces, s.train.num_steps, f"{cfg.num_params():,}")

  untrained = None
  if d.untrained:
    start = time.perf_counter()
    untrained_model = startup.load_weights(startup.WeightSource("random", "", None, s.model.preset),
                                           cfg, run.mesh, s.seed)
    untrained = evaluate(s, apps.sampler_for(untrained_model, run.mesh, cfg.compute_dtype),
                         renderer, held, os.path.join(demo_dir, "untrained"), "heldout")
    times.add("eval_untrained", start)
    logging.info("untrained greedy accuracy %s", accuracy(untrained, d.families))

  start = time.perf_counter()
  step = train_student(run)
  times.add("train", start)

  start = time.perf_counter()
  sampler = apps.sampler_for(checkpoint.load_model(workdir, run.mesh), run.mesh,
                             cfg.compute_dtype)
  trained_dir = os.path.join(demo_dir, "trained")
  greedy = evaluate(s, sampler, renderer, held, trained_dir, "heldout")
  times.add("eval_greedy", start)
  logging.info("trained greedy accuracy %s", accuracy(greedy, d.families))
  maj = None
  if d.maj_k:
    start = time.perf_counter()
    maj_held = [r for f in d.families for r in [r for r in held if r["family"] == f][
        :d.maj_per_family]]
    maj = evaluate(s, sampler, renderer, maj_held, trained_dir, "heldout_maj", num_samples=d.maj_k,
                   temperature=d.maj_temperature, top_p=d.maj_top_p)
    times.add("eval_maj", start)

  traces = teacher.read_jsonl(s.data.sources)
  end_think = "</think>"
  train_thinking = sum(len(renderer.tokenizer.encode(t["messages"][1]["content"].split(
      end_think)[0])) for t in traces[:500]) / min(len(traces), 500)
  by_family = thinking_tokens(os.path.join(trained_dir, "heldout"),
                              renderer.tokenizer.token_to_id(end_think))
  thinking = {f: _mean(by_family.get(f, [])) for f in d.families}
  thinking["overall"] = _mean([n for ns in by_family.values() for n in ns])
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    final_loss = [json.loads(line) for line in f if "loss" in line][-1]["loss"]
  summary = {
      "preset": d.preset, "families": list(d.families), "steps": step,
      "num_traces": d.num_traces, "heldout_per_family": d.eval_per_family,
      "model": cfg.to_dict() | {"num_params": cfg.num_params()},
      "greedy_accuracy": accuracy(greedy, d.families),
      "untrained_accuracy": accuracy(untrained, d.families) if untrained else None,
      "maj_accuracy": accuracy(maj, d.families, "maj") if maj else None,
      "maj_k": d.maj_k, "maj_temperature": d.maj_temperature,
      "maj_per_family": d.maj_per_family,
      "thinking_tokens": thinking, "train_thinking_tokens": train_thinking,
      "final_loss": final_loss, "wall_times_s": dict(times.times),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }
  summary["wall_times_s"]["total"] = sum(times.times.values())
  plot_loss(workdir, os.path.join(workdir, "loss.png"))
  write_report(summary, report_path)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
  with open(report_path, encoding="utf-8") as f:
    logging.info("demo finished:\n%s", f.read())
  return summary


def _mean(xs: list) -> float:
  return sum(xs) / len(xs) if xs else 0.0
