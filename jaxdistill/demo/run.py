"""Orchestrates the demo: teacher data and tokenizer, SFT through the real trainer, evaluation
of the trained and untrained student on held-out problems, and the report.

Every phase leaves its output in the workdir and is skipped when that output is there, so
running the command again resumes an interrupted run (training resumes from its checkpoint)
or, for a finished one, prints the report.

workdir/
  data/train.jsonl, data/heldout.jsonl, data/tokenizer.model   teacher output
  checkpoints/, metrics.jsonl, manifest.json                   the trainer's
  demo/untrained_greedy.jsonl, demo/greedy.jsonl, demo/maj.jsonl   graded generations
  demo/times.json                                              wall time of each phase
  report.md, summary.json, loss.png
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import time

import jax
import ml_collections

from jaxdistill import checkpoint, generate, model as model_lib, sharding, train
from jaxdistill import run as run_lib
from jaxdistill.data import builder, chat
from jaxdistill.demo import teacher
from jaxdistill.eval import grade as grade_lib
from jaxdistill.model_config import ModelConfig
from jaxdistill.sampler import Sampler, SamplingConfig

SYMBOLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
KIND = "amc"  # signed integer answers


def resolve(c: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `c` with the preset's lengths and the demo's batch filled in, and the data
  paths in `workdir`."""
  c = ml_collections.ConfigDict(c.to_dict())
  d = c.demo
  if d.preset not in d.presets:
    raise ValueError(f"demo.preset={d.preset!r} is not one of {sorted(d.presets)}")
  preset = d.presets[d.preset]
  d.num_steps = d.num_steps or preset.num_steps
  d.num_traces = d.num_traces or preset.num_traces
  c.train.num_steps = d.num_steps
  c.train.global_batch_size = d.batch_size
  c.data.sources = os.path.join(workdir, "data", "train.jsonl")
  c.data.tokenizer = os.path.join(workdir, "data", "tokenizer.model")
  return c


def families(c) -> list[str]:
  return [f.strip() for f in c.demo.families.split(",") if f.strip()]


def student_config(c, vocab_size: int) -> ModelConfig:
  m = c.demo.model
  return ModelConfig(
      model_type="qwen2", vocab_size=vocab_size, d_model=m.d_model, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.d_model // m.num_heads,
      mlp_dim=m.mlp_dim, rms_eps=1e-6, max_position_embeddings=m.max_position_embeddings,
      qkv_bias=True, tie_embeddings=True, compute_dtype=c.model.compute_dtype,
      param_dtype=c.model.param_dtype, attention=c.model.attention,
      attention_block=c.model.attention_block, remat=c.model.remat)


# -- Phases ------------------------------------------------------------------------------------


def make_data(c, workdir: str) -> None:
  """Held-out problems, training traces and the tokenizer, unless already in workdir/data."""
  data_dir = os.path.join(workdir, "data")
  if os.path.exists(c.data.tokenizer):
    return
  os.makedirs(data_dir, exist_ok=True)
  fams = families(c)
  held = teacher.held_out(fams, c.demo.eval_per_family, c.demo.data_seed)
  held_keys = {teacher.key_of(r) for r in held}
  traces = teacher.training(fams, c.demo.num_traces, c.demo.data_seed, held_keys)
  train_problems = {t["messages"][0]["content"] for t in traces}
  overlap = [r["id"] for r in held if teacher.user_turn(r["problem"]) in train_problems]
  assert not overlap, f"held-out problems in the training set: {overlap[:5]}"
  teacher.write_jsonl(held, os.path.join(data_dir, "heldout.jsonl"))
  teacher.write_jsonl(traces, os.path.join(data_dir, "train.jsonl"))
  train_tokenizer([m["content"] for t in traces for m in t["messages"]], c.data.tokenizer,
                  c.demo.vocab_size)


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


def train_student(c, workdir: str, cfg: ModelConfig, mesh) -> int:
  """SFT through the real trainer; returns the final step (resumes, or skips when done)."""
  ckpt = checkpoint.TrainCheckpointer(workdir, async_save=False)
  try:
    steps = ckpt.steps()
  finally:
    ckpt.close()
  if steps and steps[-1] >= c.train.num_steps:
    return steps[-1]
  data = builder.build_training_data(c, workdir)
  run_lib.write_manifest(c, workdir, cfg, mesh, "demo: random init of the student",
                         data.fingerprint)
  model = None if steps else model_lib.create_model(cfg, mesh, seed=c.seed)
  result = train.run(model, cfg, run_lib.optim_config(c, data.num_steps),
                     run_lib.train_config(c, data.num_steps), mesh, data.train, workdir,
                     run_config=json.loads(c.to_json_best_effort()), log=logging.info)
  if result.preempted:
    raise SystemExit(f"stopped by a signal at step {result.step}; run the same command to "
                     "resume")
  return result.step


def evaluate(model, mesh, renderer: chat.ChatRenderer, held: list[dict], path: str, *,
             max_new_tokens: int, batch_size: int, num_samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
  """Samples and grades every held-out problem; the graded rows go to `path` (reused when
  there). Each row: id, family, answer, responses, correct (per sample), thinking_tokens
  (per sample), majority_correct."""
  if os.path.exists(path):
    return teacher.read_jsonl(path)
  tokenizer = renderer.tokenizer
  cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                       stop_ids=generate.stop_ids(renderer), vocab_size=tokenizer.vocab_size)
  prompts = [renderer.encode_prompt([{"role": "user", "content": teacher.user_turn(
      r["problem"])}]).tolist() for r in held]
  samples = Sampler.from_model(model, mesh).generate(
      prompts, cfg, num_samples=num_samples, seed=seed, batch_size=batch_size)
  end_think = tokenizer.token_to_id("</think>")
  rows = []
  with grade_lib.SymbolicChecker(workers=1) as checker:
    for problem, outs in zip(held, samples):
      texts = [tokenizer.decode(s.tokens.tolist()) for s in outs]
      verdicts = [grade_lib.grade(t, problem["answer"], KIND, s.finish_reason, checker=checker)
                  for t, s in zip(texts, outs)]
      votes = collections.Counter(v.vote_key for v in verdicts if v.vote_key is not None)
      gold = grade_lib.gold_vote_key(problem["answer"], KIND)
      thinking = [list(s.tokens).index(end_think) if end_think in s.tokens else len(s.tokens)
                  for s in outs]
      rows.append({"id": problem["id"], "family": problem["family"],
                   "answer": problem["answer"], "responses": texts,
                   "correct": [v.correct for v in verdicts],
                   "reasons": [v.reason for v in verdicts], "thinking_tokens": thinking,
                   "majority_correct": bool(votes) and votes.most_common(1)[0][0] == gold})
  teacher.write_jsonl(rows, path + ".tmp")
  os.replace(path + ".tmp", path)
  return rows


def accuracy(rows: list[dict], fams: list[str], field: str = "greedy") -> dict:
  """Overall and per-family accuracy: of the first sample ("greedy") or the majority vote."""
  def score(r):
    return r["majority_correct"] if field == "majority" else r["correct"][0]
  out = {"overall": sum(map(score, rows)) / len(rows)}
  for f in fams:
    sub = [r for r in rows if r["family"] == f]
    out[f] = sum(map(score, sub)) / len(sub) if sub else None
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
            "generations: `demo/*.jsonl`.", ""]
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


def main(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes, or reports) the demo in `workdir`; returns the summary."""
  summary_path = os.path.join(workdir, "summary.json")
  report_path = os.path.join(workdir, "report.md")
  if os.path.exists(summary_path) and os.path.exists(report_path):
    with open(report_path, encoding="utf-8") as f:
      logging.info("finished run in %s:\n%s", workdir, f.read())
    with open(summary_path) as f:
      return json.load(f)
  c = resolve(c, workdir)
  os.makedirs(os.path.join(workdir, "demo"), exist_ok=True)
  times = _Times(os.path.join(workdir, "demo", "times.json"))
  fams = families(c)
  d = c.demo

  start = time.perf_counter()
  make_data(c, workdir)
  times.add("data", start)
  held = teacher.read_jsonl(os.path.join(workdir, "data", "heldout.jsonl"))
  renderer = chat.ChatRenderer(chat.load_tokenizer(c.data.tokenizer), c.data.chat_template)
  cfg = student_config(c, renderer.tokenizer.vocab_size)
  mesh = sharding.make_mesh(list(c.mesh.shape))
  run_lib.validate(c, cfg, tuple(mesh.shape.values()))
  logging.info("demo (%s): %d traces, %d steps; student %s parameters", d.preset,
               d.num_traces, c.train.num_steps, f"{cfg.num_params():,}")
  eval_args = dict(max_new_tokens=d.max_new_tokens, batch_size=d.eval_batch_size)
  demo_dir = os.path.join(workdir, "demo")

  untrained = None
  if d.untrained:
    start = time.perf_counter()
    untrained = evaluate(model_lib.create_model(cfg, mesh, seed=c.seed), mesh, renderer,
                         held, os.path.join(demo_dir, "untrained_greedy.jsonl"), **eval_args)
    times.add("eval_untrained", start)
    logging.info("untrained greedy accuracy %s", accuracy(untrained, fams))

  start = time.perf_counter()
  step = train_student(c, workdir, cfg, mesh)
  times.add("train", start)

  start = time.perf_counter()
  model = checkpoint.load_model(workdir, mesh)
  greedy = evaluate(model, mesh, renderer, held, os.path.join(demo_dir, "greedy.jsonl"),
                    **eval_args)
  times.add("eval_greedy", start)
  logging.info("trained greedy accuracy %s", accuracy(greedy, fams))
  maj = None
  if d.maj_k:
    start = time.perf_counter()
    maj_held = [r for f in fams for r in [r for r in held if r["family"] == f][
        :d.maj_per_family]]
    maj = evaluate(model, mesh, renderer, maj_held, os.path.join(demo_dir, "maj.jsonl"),
                   num_samples=d.maj_k, temperature=d.maj_temperature, top_p=d.maj_top_p,
                   seed=c.eval.seed, **eval_args)
    times.add("eval_maj", start)

  traces = teacher.read_jsonl(c.data.sources)
  end_think = "</think>"
  train_thinking = sum(len(renderer.tokenizer.encode(t["messages"][1]["content"].split(
      end_think)[0])) for t in traces[:500]) / min(len(traces), 500)
  thinking = {f: _mean([n for r in greedy if r["family"] == f for n in r["thinking_tokens"]])
              for f in fams}
  thinking["overall"] = _mean([n for r in greedy for n in r["thinking_tokens"]])
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    final_loss = [json.loads(line) for line in f if "loss" in line][-1]["loss"]
  summary = {
      "preset": d.preset, "families": fams, "steps": step, "num_traces": d.num_traces,
      "heldout_per_family": d.eval_per_family,
      "model": cfg.to_dict() | {"num_params": cfg.num_params()},
      "greedy_accuracy": accuracy(greedy, fams),
      "untrained_accuracy": accuracy(untrained, fams) if untrained else None,
      "maj_accuracy": accuracy(maj, fams, "majority") if maj else None,
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
