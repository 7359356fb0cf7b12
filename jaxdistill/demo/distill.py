"""The demo's distill preset: model-to-model distillation. A finished default-preset demo run
is the teacher; it answers fresh problems, mode=distill's grading and keep policy
(`jaxdistill/traces.py`) keep its verified responses as traces, and a student with at most
half its parameters is trained on them, beside a control student (same preset, same
initialisation, same steps) trained on the programmatic traces of the same problems. The
three are evaluated on the teacher's held-out problems, greedy and by maj@k.

Fresh problems are drawn like the teacher's training problems from a stream of their own,
never held out. They are not kept apart from the teacher's training problems: the lineq
family has only 1,368 problems and the default preset's 4,000 lineq draws cover 93% of
them, so the report counts the overlap instead.

workdir/
  teacher/                      the teacher (demo.teacher_workdir): a default-preset run, made
                                first (demo/run.py) when it is not there or not finished
  data/problems.jsonl           the fresh problems
  traces/                       prompts, generations, traces.jsonl, stats.json (traces.py)
  data/control.jsonl            the programmatic traces of the problems kept in traces/
  student/, control/            the two students' trainer workdirs
  demo/{teacher,student,control}/heldout/, .../heldout_maj/   evaluate.py's outputs
  demo/times.json, report.md, summary.json, loss.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable

import jax

from jaxdistill import apps, checkpoint, sharding, startup, traces
from jaxdistill.data import chat
from jaxdistill.demo import phases, teacher
from jaxdistill.settings import Settings

ROLES = ("teacher", "student", "control")
END_THINK = "</think>"


def teacher_settings(s: Settings) -> Settings:
  """The settings a teacher made here runs with: the default preset's lengths (neither
  train.num_steps nor demo.num_traces, which size the students), everything else as given;
  its checkpoints record the config of that run."""
  d = s.demo
  config = json.loads(s.config_json)
  config["demo"].update(preset="default", num_traces=0)
  config["train"]["num_steps"] = 0
  return dataclasses.replace(s, config_json=json.dumps(config, sort_keys=True),
                             demo=dataclasses.replace(d, preset="default",
                                                      num_steps=d.teacher_num_steps,
                                                      num_traces=d.teacher_num_traces))


def student_settings(s: Settings, tokenizer: str, sources: str) -> Settings:
  """A student's run: the demo.student model on `sources`, the teacher's tokenizer, the
  preset's steps."""
  data = dataclasses.replace(s.data, sources=sources, tokenizer=tokenizer)
  return dataclasses.replace(s, data=data, model=s.demo.student).with_num_steps(
      s.demo.num_steps)


def _check_teacher(s: Settings, summary: dict, teacher_dir: str) -> None:
  if summary.get("preset") not in ("default", "long"):
    raise ValueError(f"demo.teacher_workdir={teacher_dir} holds a {summary.get('preset')!r}-"
                     "preset run; the teacher is a default- (or long-) preset demo run: point "
                     "demo.teacher_workdir at one, or at an empty directory to make one there")
  if summary["families"] != list(s.demo.families):
    raise ValueError(f"the teacher in {teacher_dir} learnt families {summary['families']}, "
                     f"but demo.families={','.join(s.demo.families)}: set demo.families="
                     f"{','.join(summary['families'])} (its held-out problems are theirs)")


def _write_jsonl(rows: list[dict], path: str) -> None:
  """Writes whole or not at all: the file's presence marks its phase done."""
  teacher.write_jsonl(rows, path + ".tmp")
  os.replace(path + ".tmp", path)


# -- Phases ------------------------------------------------------------------------------------


def sample_traces(s: Settings, teacher_dir: str, mesh, renderer: chat.ChatRenderer,
                  problems_path: str, out_dir: str) -> dict:
  """The teacher's final checkpoint answers every problem of `problems_path` through
  mode=distill's library (resumable); its verified responses become `out_dir/traces.jsonl`.
  Returns the stats."""
  d = s.demo
  cfg = dataclasses.replace(s.traces, problems_file=problems_path, answer_kind=phases.KIND,
                            decontaminate=False, output=out_dir)  # arithmetic: no AIME overlap
  problems = traces.read_problems(problems_path, {}, phases.KIND, teacher.user_turn)
  eval_cfg = dataclasses.replace(s.eval, tasks=(), max_new_tokens=d.max_new_tokens,
                                 batch_size=d.eval_batch_size, limit=0, instruction="",
                                 grading_workers=1)
  model_cfg, step = checkpoint.load_model_config(teacher_dir)
  source = startup.WeightSource("checkpoint", teacher_dir, step)
  model = startup.load_weights(source, model_cfg, mesh, s.seed)
  provenance = {"weights": source.identity(model.config, s.seed),
                "compute_dtype": eval_cfg.compute_dtype, "tokenizer": renderer.identity()}
  shaping = traces.Shaping.for_renderer(renderer, s.eval.think_end, s.data.format_spec)
  return traces.sample_traces(
      apps.sampler_for(model, mesh, eval_cfg.compute_dtype), renderer, eval_cfg, cfg,
      problems, traces.check_problems(problems, None), out_dir, shaping=shaping,
      teacher=f"demo teacher {teacher_dir} (step {step})", provenance=provenance,
      log=logging.info)


def write_control(seed: int, problems_path: str, traces_path: str, path: str) -> None:
  """The programmatic trace of each kept trace's problem (slips as in the teacher's own
  training data), in the same order: the control student's data."""
  keys = {r["id"]: teacher.key_of(r) for r in teacher.read_jsonl(problems_path)}
  rng = random.Random(f"control-{seed}")
  _write_jsonl([{"id": t["id"], "messages": teacher.trace(
      keys[t["id"]], slip=rng.random() < teacher.SLIP_RATE)}
                for t in teacher.read_jsonl(traces_path)], path)


def evaluate(s: Settings, model_dir: str, mesh, renderer: chat.ChatRenderer, held: list[dict],
             out_dir: str, role: str) -> dict:
  """Greedy and maj@k accuracy (overall and per family) and greedy thinking tokens of the
  latest checkpoint in `model_dir` on the held-out problems, into `out_dir`."""
  d = s.demo
  sampler = apps.sampler_for(checkpoint.load_model(model_dir, mesh), mesh,
                             s.model.compute_dtype)
  greedy = phases.evaluate(s, sampler, renderer, held, out_dir, "heldout",
                           description=f"demo {role}")
  maj = phases.evaluate_maj(s, sampler, renderer, held, out_dir,
                            description=f"demo {role}") if d.maj_k else None
  logging.info("%s greedy accuracy %s", role, phases.accuracy(greedy, d.families))
  return {"greedy_accuracy": phases.accuracy(greedy, d.families),
          "maj_accuracy": phases.accuracy(maj, d.families, "maj") if maj else None,
          "thinking_tokens": phases.thinking_tokens(
              os.path.join(out_dir, "heldout"), renderer.tokenizer.token_to_id(END_THINK),
              d.families)}


# -- Entry -------------------------------------------------------------------------------------


def main(s: Settings, workdir: str, *, make_teacher: Callable[[Settings, str], dict]) -> dict:
  """Runs (or resumes) the distill preset in `workdir`; returns the summary.

  `make_teacher(settings, teacher_workdir)` runs a default-preset demo and returns its
  summary (demo/run.py's `default`, handed in because run.py is the module that imports
  this one)."""
  d = s.demo
  teacher_dir = d.teacher_workdir or os.path.join(workdir, "teacher")
  if os.path.abspath(teacher_dir) == os.path.abspath(workdir):
    raise ValueError(f"demo.teacher_workdir={teacher_dir} is the distill run's own --workdir; "
                     "give the teacher a directory of its own ('' = <workdir>/teacher)")
  data_dir, demo_dir = os.path.join(workdir, "data"), os.path.join(workdir, "demo")
  os.makedirs(data_dir, exist_ok=True)
  os.makedirs(demo_dir, exist_ok=True)
  times = phases.Times(os.path.join(demo_dir, "times.json"))

  teacher_summary = phases.finished(teacher_dir)
  if teacher_summary is None:
    logging.info("no finished default-preset demo in %s: making the teacher there first",
                 teacher_dir)
    start = time.perf_counter()
    teacher_summary = make_teacher(teacher_settings(s), teacher_dir)
    times.add("teacher", start)
  _check_teacher(s, teacher_summary, teacher_dir)
  tokenizer = os.path.join(teacher_dir, "data", "tokenizer.model")
  renderer = chat.ChatRenderer(chat.load_tokenizer(tokenizer), s.data.chat_template)
  teacher_cfg, _ = checkpoint.load_model_config(teacher_dir)
  student_cfg = phases.student_config(d.student, renderer.tokenizer.vocab_size)
  if 2 * student_cfg.num_params() > teacher_cfg.num_params():
    raise ValueError(
        f"the student (demo.student, preset {d.student.preset!r}: "
        f"{student_cfg.num_params():,} parameters) must have at most half the teacher's "
        f"{teacher_cfg.num_params():,} ({teacher_dir}): choose a smaller demo.student.preset "
        "or lower demo.student.d_model, num_layers or mlp_dim")
  mesh = sharding.make_mesh(list(s.mesh_shape))
  held = teacher.read_jsonl(os.path.join(teacher_dir, "data", "heldout.jsonl"))

  problems_path = os.path.join(data_dir, "problems.jsonl")
  if not os.path.exists(problems_path):
    _write_jsonl(teacher.fresh_problems(d.families, d.num_traces, d.data_seed,
                                        {teacher.key_of(r) for r in held}), problems_path)
  traces_dir = os.path.join(workdir, "traces")
  traces_path = os.path.join(traces_dir, "traces.jsonl")
  if not os.path.exists(os.path.join(traces_dir, "stats.json")):
    start = time.perf_counter()
    sample_traces(s, teacher_dir, mesh, renderer, problems_path, traces_dir)
    times.add("sample_traces", start)
  with open(os.path.join(traces_dir, "stats.json"), encoding="utf-8") as f:
    responses = json.load(f)["responses"]
  if not responses["kept"]:
    raise ValueError(
        f"none of the {responses['graded']} answers sampled from the teacher in {teacher_dir} "
        f"was kept (its held-out greedy accuracy is "
        f"{teacher_summary['greedy_accuracy']['overall']:.1%}): no trace to train on. Use a "
        "teacher trained longer (the default preset: 3000 steps) or sample more answers "
        f"per problem (traces.num_samples; then delete {traces_dir})")
  control_path = os.path.join(data_dir, "control.jsonl")
  if not os.path.exists(control_path):
    write_control(d.data_seed, problems_path, traces_path, control_path)

  steps = {}
  for role, sources in (("student", traces_path), ("control", control_path)):
    start = time.perf_counter()
    run = startup.start(student_settings(s, tokenizer, sources), os.path.join(workdir, role),
                        student_cfg)
    steps[role] = phases.train_student(run)
    times.add(f"train_{role}", start)

  results = {}
  for role in ROLES:
    start = time.perf_counter()
    model_dir = teacher_dir if role == "teacher" else os.path.join(workdir, role)
    results[role] = evaluate(s, model_dir, mesh, renderer, held,
                             os.path.join(demo_dir, role), role)
    times.add(f"eval_{role}", start)

  summary = _summary(s, workdir, teacher_dir, teacher_summary, teacher_cfg, student_cfg,
                     steps, results, times)
  phases.plot_loss({"student (teacher's traces)": os.path.join(workdir, "student"),
                    "control (programmatic traces)": os.path.join(workdir, "control")},
                   os.path.join(workdir, "loss.png"), "demo, distill preset: the two students")
  phases.write_summary(summary, report(summary), workdir)
  return summary


# -- Report ------------------------------------------------------------------------------------


def _summary(s: Settings, workdir: str, teacher_dir: str, teacher_summary: dict, teacher_cfg,
             student_cfg, steps: dict, results: dict, times: phases.Times) -> dict:
  d = s.demo
  with open(os.path.join(workdir, "traces", "stats.json"), encoding="utf-8") as f:
    stats = json.load(f)
  problems = teacher.read_jsonl(os.path.join(workdir, "data", "problems.jsonl"))
  family_of = {r["id"]: r["family"] for r in problems}
  kept = [family_of[t["id"]] for t in teacher.read_jsonl(
      os.path.join(workdir, "traces", "traces.jsonl"))]
  seen = {t["messages"][0]["content"] for t in teacher.read_jsonl(
      os.path.join(teacher_dir, "data", "train.jsonl"))}
  n = s.traces.num_samples
  by_family = {}
  for f in d.families:
    count = sum(r["family"] == f for r in problems)
    by_family[f] = {"problems": count, "kept": kept.count(f),
                    "acceptance": kept.count(f) / (count * n) if count else None}
  responses = stats["responses"]
  teacher_greedy = results["teacher"]["greedy_accuracy"]["overall"]
  ratio = lambda role: (results[role]["greedy_accuracy"]["overall"] / teacher_greedy  # noqa: E731
                        if teacher_greedy else None)
  student = {"num_params": student_cfg.num_params(), "num_traces": len(kept)}
  return {
      "preset": d.preset, "families": list(d.families),
      "heldout_per_family": teacher_summary["heldout_per_family"],
      "maj_k": d.maj_k, "maj_temperature": d.maj_temperature,
      "maj_per_family": d.maj_per_family,
      "teacher": {"workdir": teacher_dir, "num_params": teacher_cfg.num_params(),
                  "steps": teacher_summary["steps"],
                  "num_traces": teacher_summary["num_traces"], **results["teacher"]},
      **{role: dict(student, steps=steps[role],
                    final_loss=phases.final_loss(os.path.join(workdir, role)), **results[role])
         for role in ("student", "control")},
      "student_model": student_cfg.to_dict(),
      "param_ratio": student_cfg.num_params() / teacher_cfg.num_params(),
      "student_to_teacher_greedy": ratio("student"),
      "control_to_teacher_greedy": ratio("control"),
      "traces": {
          "problems": len(problems), "samples_per_problem": n,
          "seen_by_teacher": sum(teacher.user_turn(r["problem"]) in seen for r in problems),
          "sampling": {"temperature": s.eval.temperature, "top_p": s.eval.top_p,
                       "top_k": s.eval.top_k, "seed": s.eval.seed},
          "keep": stats["keep"], "graded": responses["graded"],
          "correct": responses["correct"], "kept": responses["kept"],
          "acceptance": responses["acceptance"], "dropped": responses["dropped"],
          "kept_tokens_mean": (stats["lengths_tokens"]["kept"] or {}).get("mean"),
          "by_family": by_family},
      "wall_times_s": times.with_total(),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }


def report(summary: dict) -> str:
  """report.md of a distill-preset run."""
  fams, t, tr = summary["families"], summary["traces"], summary["teacher"]
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
  keep = t["keep"]["policy"] + (f" (k={t['keep']['k']})" if t["keep"]["k"] else "")
  sampling, n = t["sampling"], t["samples_per_problem"]
  lines = [
      "# Model-to-model distillation (distill preset)", "",
      f"Teacher: the default-preset demo run in `{tr['workdir']}`, {tr['num_params']:,} "
      f"parameters, {tr['steps']} steps on {tr['num_traces']:,} programmatic traces. It "
      f"answered {t['problems']:,} fresh problems (none held out; {t['seen_by_teacher']:,} "
      f"also among its own training problems) {'once' if n == 1 else f'{n} times'} each at "
      f"temperature {sampling['temperature']} (top-p {sampling['top_p']}); the grader kept "
      f"{t['kept']:,} of {t['graded']:,} responses, policy `{keep}`: acceptance "
      f"{pct(t['acceptance'])}.", "",
      f"Students: {summary['student']['num_params']:,} parameters "
      f"({summary['param_ratio']:.2f} of the teacher), {summary['student']['steps']} steps "
      "each from the same initialisation: the student on the teacher's kept traces, the "
      "control on the programmatic traces of the same problems. "
      f"{summary['heldout_per_family']} held-out problems per family, graded as "
      f"`{phases.KIND}`.", "",
      "| model | parameters | trained on | " + " | ".join(fams) + " | greedy | "
      f"maj@{summary['maj_k']} (T={summary['maj_temperature']}, first "
      f"{summary['maj_per_family']}) | thinking tokens (greedy mean) |",
      "|---|---|---|" + "---|" * len(fams) + "---|---|---|"]
  sources = {"teacher": f"{tr['num_traces']:,} programmatic traces",
             "student": f"{summary['student']['num_traces']:,} teacher traces",
             "control": f"{summary['control']['num_traces']:,} programmatic traces"}
  for role in ROLES:
    r = summary[role]
    lines.append(f"| {role} | {r['num_params']:,} | {sources[role]} | " + " | ".join(
        pct(r["greedy_accuracy"][f]) for f in fams) + f" | {pct(r['greedy_accuracy']['overall'])}"
        f" | {pct((r['maj_accuracy'] or {}).get('overall'))} | "
        f"{r['thinking_tokens']['overall']:.0f} |")
  lines += [
      "", f"Held-out greedy accuracy against the teacher's: student "
      f"{ratio(summary['student_to_teacher_greedy'])}, control "
      f"{ratio(summary['control_to_teacher_greedy'])}.", "",
      "| family | problems | traces kept | acceptance |", "|---|---|---|---|"]
  for f in fams:
    b = t["by_family"][f]
    lines.append(f"| {f} | {b['problems']:,} | {b['kept']:,} | {pct(b['acceptance'])} |")
  times = summary["wall_times_s"]
  lines += [
      "", f"Wall time (s) on {summary['devices']}: " + ", ".join(
          f"{k} {v:.0f}" for k, v in times.items()) + " (phases only; start-up not counted)",
      "", f"Final training loss: student {summary['student']['final_loss']:.4f}, control "
      f"{summary['control']['final_loss']:.4f}. Loss curves: `loss.png`; the traces and their "
      "stats: `traces/`; generations and grades: `demo/<teacher|student|control>/<task>/`.", ""]
  return "\n".join(lines)
