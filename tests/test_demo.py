"""The distillation demo: teacher traces are right and disjoint from the held-out set, and a short
end-to-end run trains a student that beats its untrained self and writes every report file."""

import json
import os
import random
import re

import pytest

from jaxdistill.demo import teacher
from jaxdistill.eval import grade as grade_lib


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


def test_demo_end_to_end(tmp_path):
  # About a minute on 2 cores: 2-digit additions, a 2-layer d_model-64 student, 1000 steps of
  # 8 rows. Rows of 240 tokens hold one trace each with little padding (the longest rendered
  # add2 trace is 232 tokens). The copies are learnt by step ~500, the digit sums after;
  # 800 steps left 38-69% held-out greedy accuracy over seeds 0-2 (seed = data_seed), 1000
  # steps 88-100% over seeds 0-3, hence the 50-point margin asserted.
  from configs import demo as demo_config
  from jaxdistill import main as main_lib
  c = demo_config.get_config()
  c.demo.families = "add2"
  c.train.num_steps = 1000
  c.demo.num_traces = 8000
  c.demo.eval_per_family = 16
  c.demo.maj_k = 2
  c.demo.maj_per_family = 8
  c.demo.max_new_tokens = 192
  c.model.d_model = 64  # the demo_student preset, narrower and shallower
  c.model.num_layers = 2
  c.model.mlp_dim = 192
  c.data.seq_len = 240
  c.train.loss_chunk = 240
  # Blockwise attention in 80-token blocks: a train step in ~47 ms here against ~90 ms dense.
  c.model.attention = "blockwise"
  c.model.attention_block = 80
  c.train.lr = 3e-3
  c.train.global_batch_size = 8  # conftest's 8 CPU devices are the data axis
  c.train.checkpoint_every = 1000  # one save, at the end
  workdir = str(tmp_path / "demo")
  summary = main_lib.run(c, workdir)

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
