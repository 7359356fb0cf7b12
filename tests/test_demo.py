"""The distillation demo: teacher traces are right and disjoint from the held-out set, and a short
end-to-end run trains a student that beats its untrained self and writes every report file."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from jaxdistill.demo import teacher
from jaxdistill.eval import grade as grade_lib
from tests import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps_result(text: str) -> str:
  """The last 'so far' number of an add/mul trace: what the digit steps built."""
  return re.findall(r"so far (\d+)\.", text)[-1]


@pytest.mark.parametrize("family", teacher.FAMILIES)
def test_traces_are_correct_and_verified(family):
  rng = random.Random(family)
  for i in range(300):
    key = teacher.draw(family, rng)
    messages = teacher.trace(key, slip=i % 3 == 0)
    user, assistant = messages[0]["content"], messages[1]["content"]
    assert user == teacher.user_turn(teacher.problem_text(key))
    assert user.endswith("put your final answer within \\boxed{}.")
    assert assistant.startswith("<think>\n") and "\n</think>\n\n" in assistant
    thinking, final = assistant.split("</think>")
    assert "Wait, let me verify:" in thinking and "Correct." in thinking
    assert ("No wait" in thinking) == (i % 3 == 0 and (family == "lineq" or "Step 2:" in
                                                        thinking))
    # The boxed answer is the true one, and the grader the demo uses agrees.
    a = key[1:]
    truth = {"add": lambda: a[0] + a[1], "mul": lambda: a[0] * a[1],
             "lineq": lambda: (a[2] - a[1]) / a[0]}[family]()
    assert truth == teacher.answer(key) and f"\\boxed{{{teacher.answer(key)}}}" in final
    assert grade_lib.grade(assistant, str(teacher.answer(key)), "amc").correct
    if family != "lineq":
      assert _steps_result(thinking) == str(teacher.answer(key))
    else:  # the subtraction's result, then a count in a's that stops on |a x| at |x|
      n, target = abs(teacher.answer(key)), abs(a[2] - a[1])
      assert f"So {a[2]} - {a[1]} = {a[2] - a[1]}.\n" in thinking
      count = re.findall(rf"(\d+)\*{a[0]}=(\d+) vs {target} (yes|no)", thinking)
      ks = range(10 if n >= 10 else 1, n + 1) if n else []
      assert count == [(str(k), str(k * a[0]), "yes" if k == n else "no") for k in ks]


def test_held_out_never_in_training():
  held = teacher.held_out(teacher.FAMILIES, 50, seed=3)
  keys = {teacher.key_of(r) for r in held}
  assert len(keys) == len(held) == 150
  assert {r["family"] for r in held} == set(teacher.FAMILIES)
  assert all(r["answer"] == str(teacher.answer(teacher.key_of(r))) for r in held)
  train = teacher.training(teacher.FAMILIES, 5000, seed=3, exclude=keys)
  train_users = {t["messages"][0]["content"] for t in train}
  assert not train_users & {teacher.user_turn(r["problem"]) for r in held}
  # The exclusion is doing work: without it the streams do collide on the small lineq family.
  unfiltered = teacher.training(teacher.FAMILIES, 5000, seed=3, exclude=set())
  assert {t["messages"][0]["content"] for t in unfiltered} & {
      teacher.user_turn(r["problem"]) for r in held}


def test_thinking_is_long_enough():
  traces = teacher.training(teacher.FAMILIES, 300, seed=0, exclude=set())
  # Characters as a proxy for tokens (digits are one token each, words about one per 4 chars).
  assert sum(len(t["messages"][1]["content"]) for t in traces) / len(traces) > 300


def _well_formed(rows):
  """Share of greedy answers that finished and carried a boxed answer."""
  return sum(r["reason"][0] in ("correct", "wrong") for r in rows) / len(rows)


# The add2 demo run, about a minute on 2 cores: 2-digit additions, a 2-layer d_model-64 student,
# 1000 steps of 8 rows. Rows of 240 tokens hold one trace each with little padding (the longest
# rendered add2 trace is 232 tokens). The copies are learnt by step ~500, the digit sums after;
# on eight devices 800 steps left 38-69% held-out greedy accuracy over seeds 0-2 (seed =
# data_seed), 1000 steps 88-100% over seeds 0-3; on the two devices this test runs, 1000 steps
# gave 75%, 100% and 88% for seeds 0-2, hence the 50-point margin asserted.
ADD2 = {
    "demo.families": "add2", "train.num_steps": 1000, "demo.num_traces": 8000,
    "demo.eval_per_family": 16, "demo.maj_k": 2, "demo.maj_per_family": 8,
    "demo.max_new_tokens": 192,
    # the demo_student preset, narrower and shallower
    "model.d_model": 64, "model.num_layers": 2, "model.mlp_dim": 192,
    "data.seq_len": 240, "train.loss_chunk": 240,
    # Blockwise attention in 80-token blocks: a train step in ~47 ms here against ~90 ms dense.
    "model.attention": "blockwise", "model.attention_block": 80,
    "train.lr": 3e-3, "train.global_batch_size": 8,
    "train.checkpoint_every": 1000,  # one save, at the end
}


def _add2_config():
  from configs import demo as demo_config
  c = demo_config.get_config()
  c.update_from_flattened_dict(ADD2)
  return c


@pytest.fixture(scope="module")
def add2_demo(tmp_path_factory):
  """The add2 demo run as a user starts it, through the main job on two devices (eight
  simulated devices on 2 cores made its steps ~40% slower): (config, workdir, summary); the
  distill test's teacher."""
  workdir = tmp_path_factory.mktemp("add2") / "demo"
  with xla.optimized():  # 1000 training steps and sampling repay a full compile
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "jaxdistill.main", "--config=configs/demo.py",
         f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in ADD2.items())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "mesh data=2" in r.stderr
  with open(workdir / "summary.json") as f:
    return _add2_config(), str(workdir), json.load(f)


def test_demo_end_to_end(add2_demo):
  from jaxdistill import main as main_lib
  c, workdir, summary = add2_demo
  untrained, trained = (summary[k]["overall"] for k in ("untrained_accuracy", "greedy_accuracy"))
  assert untrained == 0.0
  assert trained >= untrained + 0.5, summary["greedy_accuracy"]
  def read(*path):
    with open(os.path.join(workdir, "demo", *path)) as f:
      return [json.loads(line) for line in f]
  graded = {name: read(name, "heldout", "graded.jsonl") for name in ("untrained", "trained")}
  assert len(graded["trained"]) == 16 and len(read("trained", "heldout_maj", "graded.jsonl")) == 8
  assert _well_formed(graded["untrained"]) <= 0.1
  assert _well_formed(graded["trained"]) >= 0.8
  assert all(len(r["response"]) == 2 for r in read("trained", "heldout_maj", "generations.jsonl"))
  assert summary["model"]["d_model"] == 64 and summary["model"]["num_layers"] == 2
  for name in ("report.md", "summary.json", "loss.png", "metrics.jsonl", "manifest.json",
               "data/train.jsonl", "data/heldout.jsonl", "data/tokenizer.model"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk["greedy_accuracy"] == summary["greedy_accuracy"]
  assert set(on_disk["greedy_accuracy"]) == {"overall", "add2"}
  assert on_disk["wall_times_s"]["train"] > 0 and on_disk["steps"] == 1000
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| add2 |" in report and "| overall |" in report
  # A second call reports the finished run instead of training again.
  assert main_lib.run(c, workdir) == on_disk


def test_demo_distill(add2_demo, tmp_path):
  # The add2 run above is the teacher (about 90% held-out greedy); it answers 32 fresh
  # problems, and two 35k-parameter students (a quarter of the teacher) take 30 steps each:
  # enough to check the plumbing, not to learn (the full preset's ratio is in the README).
  from jaxdistill import main as main_lib
  from jaxdistill.demo import distill
  base, teacher_dir, teacher_summary = add2_demo
  c = base.copy_and_resolve_references()
  c.demo.preset = "distill"
  c.demo.teacher_workdir = teacher_dir
  c.demo.num_traces = 32
  c.train.num_steps = c.train.checkpoint_every = 30
  c.demo.maj_per_family = 4  # three roles' maj@2 on 4 problems: enough for the plumbing
  c.demo.student.preset = "demo_student"  # 0.9M parameters: more than the teacher's 140k
  with pytest.raises(ValueError, match="at most half the teacher's 139,968"):
    main_lib.run(c, str(tmp_path / "too_big"))
  c.demo.student.update(d_model=32, num_layers=2, num_kv_heads=2, mlp_dim=64)
  workdir = str(tmp_path / "distill")
  summary = main_lib.run(c, workdir)

  def read(*path):
    return teacher.read_jsonl(os.path.join(workdir, *path))
  # Fresh problems, never held out; the kept traces are the teacher's graded-correct answers.
  problems = {r["id"]: r for r in read("data", "problems.jsonl")}
  held = teacher.read_jsonl(os.path.join(teacher_dir, "data", "heldout.jsonl"))
  assert len(problems) == 32 and not ({teacher.key_of(r) for r in problems.values()} &
                                      {teacher.key_of(r) for r in held})
  correct = {(r["id"], j) for r in read("traces", "generations.jsonl")
             for j, text in enumerate(r["response"])
             if grade_lib.grade(text, problems[r["id"]]["answer"], "amc").correct}
  kept = read("traces", "traces.jsonl")
  t = summary["traces"]
  assert {(r["id"], r["provenance"]["sample"]) for r in kept} <= correct
  assert len(correct) - len(kept) == sum(t["dropped"][k] for k in ("several_answers",
                                                                   "stop_token_inside"))
  assert 0 < t["kept"] == len(kept) and t["acceptance"] == pytest.approx(len(kept) / 32, 1e-5)
  assert all(r["messages"][1]["content"].startswith("<think>\n") for r in kept)
  # The control learns from the programmatic traces of exactly the kept problems.
  control = read("data", "control.jsonl")
  assert [r["messages"][0]["content"] for r in control] == [
      r["messages"][0]["content"] for r in kept]
  assert all(f"\\boxed{{{problems[r['id']]['answer']}}}" in r["messages"][1]["content"]
             for r in control)
  # Teacher, student and control on the teacher's held-out problems; the students at most
  # half the teacher's size, trained the same steps on the same number of traces.
  assert summary["teacher"]["greedy_accuracy"] == teacher_summary["greedy_accuracy"]
  assert 2 * summary["student"]["num_params"] <= summary["teacher"]["num_params"] == 139_968
  for role in ("student", "control"):
    assert summary[role]["steps"] == 30 and summary[role]["num_traces"] == len(kept)
    assert set(summary[role]["greedy_accuracy"]) == {"overall", "add2"}
    assert summary[role]["maj_accuracy"] is not None
    assert len(read("demo", role, "heldout", "graded.jsonl")) == 16
  assert summary["student_to_teacher_greedy"] == pytest.approx(
      summary["student"]["greedy_accuracy"]["overall"] /
      teacher_summary["greedy_accuracy"]["overall"])
  assert summary["wall_times_s"]["sample_traces"] > 0 and "teacher" not in summary["wall_times_s"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert report == distill.report(summary)
  for row in ("| teacher | 139,968 |", "| student |", "| control |", "| add2 | 32 |"):
    assert row in report, row
  # A second call reports the finished run instead of training again.
  with open(os.path.join(workdir, "summary.json")) as f:
    assert main_lib.run(c, workdir) == json.load(f) == summary
