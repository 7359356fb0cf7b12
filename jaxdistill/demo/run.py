"""The demo's entry: the default (and long) preset, and the hand-off to the distill preset.

The default preset: teacher data and tokenizer, SFT through the real trainer, evaluation of
the trained and untrained student on held-out problems through `jaxdistill/evaluate.py`, and
the report. The distill preset (`demo/distill.py`) takes a finished default-preset run as its
teacher, and runs this module's default preset first to make one when there is none.

Every phase leaves its output in the workdir and is skipped when that output is there, so
running the command again resumes an interrupted run (training resumes from its checkpoint,
sampling from the generations already written) or, for a finished one, prints the report.

workdir/ (default and long presets)
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
import logging
import os
import time

import jax

from jaxdistill import apps, checkpoint, startup, storage
from jaxdistill.data import chat
from jaxdistill.demo import distill, phases, teacher
from jaxdistill.settings import Settings

SYMBOLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def resolve(s: Settings, workdir: str) -> Settings:
  """`s` with the demo's length and its data paths in `workdir` filled in."""
  data = dataclasses.replace(s.data, sources=os.path.join(workdir, "data", "train.jsonl"),
                             tokenizer=os.path.join(workdir, "data", "tokenizer.model"))
  return dataclasses.replace(s, data=data).with_num_steps(s.demo.num_steps)


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


# -- Report ------------------------------------------------------------------------------------


def report(summary: dict) -> str:
  """report.md of a default- or long-preset run."""
  fams = summary["families"]
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  k = summary["maj_k"]
  lines = [
      f"# Distillation in a box ({summary['preset']} preset)", "",
      f"Student: {summary['model']['num_params']:,} parameters, trained {summary['steps']} "
      f"steps on {summary['num_traces']} teacher traces (mean "
      f"{summary['train_thinking_tokens']:.0f} thinking tokens); "
      f"{summary['heldout_per_family']} held-out problems per family, graded as "
      f"`{phases.KIND}`.", "",
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
  return "\n".join(lines)


# -- Entry -------------------------------------------------------------------------------------


def main(s: Settings, workdir: str) -> dict:
  """Runs (or resumes, or reports) the demo's preset in `workdir`; returns the summary."""
  if storage.is_url(workdir):
    raise ValueError(f"--workdir={workdir}: the demo is a one-machine run that writes its data "
                     "and reports with local files; give it a local directory")
  done = phases.finished(workdir)
  if done is not None:
    return done
  if s.demo.preset == "distill":
    return distill.main(s, workdir, make_teacher=default)
  return default(s, workdir)


def default(s: Settings, workdir: str) -> dict:
  """Runs (or resumes, or reports) a default- or long-preset demo in `workdir`."""
  done = phases.finished(workdir)
  if done is not None:
    return done
  s = resolve(s, workdir)
  d = s.demo
  demo_dir = os.path.join(workdir, "demo")
  os.makedirs(demo_dir, exist_ok=True)
  times = phases.Times(os.path.join(demo_dir, "times.json"))

  start = time.perf_counter()
  make_data(s, workdir)
  times.add("data", start)
  held = teacher.read_jsonl(os.path.join(workdir, "data", "heldout.jsonl"))
  renderer = chat.ChatRenderer(chat.load_tokenizer(s.data.tokenizer), s.data.chat_template)
  run = startup.start(s, workdir, phases.student_config(s.model,
                                                        renderer.tokenizer.vocab_size))
  cfg = run.model_config
  logging.info("demo (%s): %d traces, %d steps; student %s parameters", d.preset,
               d.num_traces, s.train.num_steps, f"{cfg.num_params():,}")

  untrained = None
  if d.untrained:
    start = time.perf_counter()
    untrained_model = startup.load_weights(startup.WeightSource("random", "", None, s.model.preset),
                                           cfg, run.mesh, s.seed)
    untrained = phases.evaluate(
        s, apps.sampler_for(untrained_model, run.mesh, cfg.compute_dtype), renderer, held,
        os.path.join(demo_dir, "untrained"), "heldout")
    times.add("eval_untrained", start)
    logging.info("untrained greedy accuracy %s", phases.accuracy(untrained, d.families))

  start = time.perf_counter()
  step = phases.train_student(run)
  times.add("train", start)

  start = time.perf_counter()
  sampler = apps.sampler_for(checkpoint.load_model(workdir, run.mesh), run.mesh,
                             cfg.compute_dtype)
  trained_dir = os.path.join(demo_dir, "trained")
  greedy = phases.evaluate(s, sampler, renderer, held, trained_dir, "heldout")
  times.add("eval_greedy", start)
  logging.info("trained greedy accuracy %s", phases.accuracy(greedy, d.families))
  maj = None
  if d.maj_k:
    start = time.perf_counter()
    maj = phases.evaluate_maj(s, sampler, renderer, held, trained_dir)
    times.add("eval_maj", start)

  traces = teacher.read_jsonl(s.data.sources)
  end_think = "</think>"
  train_thinking = sum(len(renderer.tokenizer.encode(t["messages"][1]["content"].split(
      end_think)[0])) for t in traces[:500]) / min(len(traces), 500)
  summary = {
      "preset": d.preset, "families": list(d.families), "steps": step,
      "num_traces": d.num_traces, "heldout_per_family": d.eval_per_family,
      "model": cfg.to_dict() | {"num_params": cfg.num_params()},
      "greedy_accuracy": phases.accuracy(greedy, d.families),
      "untrained_accuracy": phases.accuracy(untrained, d.families) if untrained else None,
      "maj_accuracy": phases.accuracy(maj, d.families, "maj") if maj else None,
      "maj_k": d.maj_k, "maj_temperature": d.maj_temperature,
      "maj_per_family": d.maj_per_family,
      "thinking_tokens": phases.thinking_tokens(os.path.join(trained_dir, "heldout"),
                                                renderer.tokenizer.token_to_id(end_think),
                                                d.families),
      "train_thinking_tokens": train_thinking,
      "final_loss": phases.final_loss(workdir), "wall_times_s": times.with_total(),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }
  phases.plot_loss({"student": workdir}, os.path.join(workdir, "loss.png"),
                   "demo: student SFT on teacher traces")
  phases.write_summary(summary, report(summary), workdir)
  return summary
