"""Verified traces from a teacher (mode="distill", jaxdistill/traces.py) and from a dump made
elsewhere (tools/filter_traces.py): what the grader accepts is what each policy keeps, a
contaminated problem is dropped and counted, and a killed run reruns to the same bytes.

The teacher is a tiny Llama whose layers are switched off (zero output projections), so each
next token depends on the current one alone, through a table written into the embeddings and
the output head: from the assistant header it writes `<think>So[ the]</think>\\n\\n \\boxed{7
or 13}`, then stops or opens another box, each branch a coin flip of the sampler. Its
responses are thus gradable and varied (correct, wrong, several boxes, cut off) while being
sampled for real, through the sampler and the resumable generations file.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from ml_collections import config_flags

from jaxdistill import main as main_lib, settings, traces
from jaxdistill.data import chat, formats
from jaxdistill.eval import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "jaxdistill", "assets", "tiny_tokenizer.model")
NUM_SAMPLES = 6
# The teacher's next tokens, by the text of the current one (tiny_tokenizer.model's pieces);
# two successors are equally likely. "\n" ends the ChatML assistant header.
CHAIN = {"\n": ["<think>"], "<think>": ["So"], "So": ["</think>", "▁the"], "▁the": ["</think>"],
         "</think>": ["\n\n"], "\n\n": ["▁\\"], "▁\\": ["boxed"], "boxed": ["{"],
         "{": ["7", "1"], "7": ["}"], "1": ["3"], "3": ["}"], "}": ["<|im_end|>", "▁\\"]}
AIME_PROBLEM = tasks.load_task("aime24")[0]["problem"]


def _save_chain_teacher(directory) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  tok = chat.load_tokenizer(TOKENIZER)
  cfg = hf_fixtures.tiny_hf_config("llama", vocab_size=tok.vocab_size)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  ids = {piece: tok.token_to_id(piece) for piece in
         set(CHAIN) | {s for successors in CHAIN.values() for s in successors}}
  assert None not in ids.values(), ids
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.01 * torch.randn_like(p))
      if name.endswith(("o_proj.weight", "down_proj.weight")):
        p.zero_()  # no layer writes to the residual stream: the current token decides
      elif "norm" in name:
        p.fill_(1.0)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    head.zero_()
    for slot, (piece, successors) in enumerate(CHAIN.items()):
      embed[ids[piece]] = 0
      embed[ids[piece], slot] = 1  # after the final RMSNorm: 8 in this slot, 0 elsewhere
      for s in successors:
        head[ids[s], slot] = 10  # logit 80 for each successor, 0 for every other token
  model.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return _save_chain_teacher(tmp_path_factory.mktemp("chain_teacher"))


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _config(teacher, problems_file, **traces_overrides):
  c = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      os.path.join(ROOT, "configs", "tiny.py"))
  c.mode = "distill"
  c.init.hf_dir = teacher
  c.mesh.shape = (2, -1, 1, 1)
  c.eval.max_new_tokens = 16
  c.eval.batch_size = 2
  c.eval.seed = 5  # draws where each policy keeps some traces and drops others
  c.traces.problems_file = problems_file
  c.traces.fields = "problem=question,answer=gold"
  c.traces.answer_kind = "aime"
  c.traces.num_samples = NUM_SAMPLES
  for k, v in traces_overrides.items():
    c.traces[k] = v
  return c


def _read(path):
  return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _accepted(text, finish_reason, gold):
  """The test's own reading of a response: not cut off, and every box says the reference."""
  return finish_reason == "stop" and set(re.findall(r"\\boxed\{(\d+)\}", text)) == {gold}


@pytest.fixture(scope="module")
def distilled(teacher_dir, tmp_path_factory):
  """One uninterrupted run (keep=all) over three clean problems and a copy of an AIME one."""
  tmp = tmp_path_factory.mktemp("distilled")
  problems = _write_jsonl(tmp / "problems.jsonl", [
      {"id": "a", "question": "What is 3 + 4?", "gold": "7"},
      {"id": "b", "question": "What is 6 + 7?", "gold": 13},
      {"id": "aime", "question": AIME_PROBLEM, "gold": "7"},
      {"id": "c", "question": "What is 2 + 5?", "gold": "7"}])
  workdir = tmp / "full"
  stats = main_lib.run(_config(teacher_dir, problems), str(workdir))
  out = workdir / "traces"
  snapshot = {name: (out / name).read_bytes()
              for name in ("traces.jsonl", "stats.json", "generations.jsonl")}
  return problems, workdir, stats, snapshot


def test_each_policy_keeps_exactly_what_the_grader_accepts(distilled, teacher_dir, tmp_path):
  problems, full, _, _ = distilled
  workdir = tmp_path / "policies"
  shutil.copytree(full, workdir)
  out = workdir / "traces"
  generations = _read(out / "generations.jsonl")
  assert [r["id"] for r in generations] == ["a", "b", "c"]  # the AIME copy is never sampled
  gold = {"a": "7", "b": "13", "c": "7"}
  accepted = {r["id"]: [j for j in range(NUM_SAMPLES) if _accepted(
      r["response"][j], r["finish_reason"][j], gold[r["id"]])] for r in generations}
  length = {(r["id"], j): len(r["completion_token_ids"][j]) for r in generations
            for j in range(NUM_SAMPLES)}
  expected = {
      "all": accepted,
      "at_most_k": {i: js[:2] for i, js in accepted.items()},
      "shortest": {i: [min(js, key=lambda j: (length[i, j], j))] if js else []
                   for i, js in accepted.items()}}
  reasons = {fr for r in generations for fr in r["finish_reason"]}
  assert reasons == {"stop", "length"}, "the chain teacher should both stop and run out"
  texts = [t for r in generations for t in r["response"]]
  assert any(len(set(re.findall(r"boxed\{(\d+)", t))) > 1 for t in texts)
  for policy in ("all", "at_most_k", "shortest"):
    if policy != "all":  # the samples are there: only the selection runs again
      stats = main_lib.run(_config(teacher_dir, problems, keep=policy, k=2), str(workdir))
    else:
      stats = json.loads((out / "stats.json").read_text())
    kept = _read(out / "traces.jsonl")
    got = {i: [t["provenance"]["sample"] for t in kept if t["id"] == i] for i in gold}
    assert got == expected[policy], policy
    total_kept = sum(map(len, got.values()))
    assert 0 < total_kept < 3 * NUM_SAMPLES, policy
    assert stats["responses"]["kept"] == total_kept
    dropped = stats["responses"]["dropped"]
    assert sum(dropped.values()) + total_kept == 3 * NUM_SAMPLES
    assert dropped["truncated"] == sum(fr == "length" for r in generations
                                       for fr in r["finish_reason"])
    if policy != "all":
      assert dropped["policy"] > 0, policy
    for t in kept:  # the assistant turn alone: no stop token, thinking rewrapped
      row = next(r for r in generations if r["id"] == t["id"])
      response = row["response"][t["provenance"]["sample"]]
      assert response.endswith("<|im_end|>")
      content = t["messages"][1]["content"]
      assert "<|im_end|>" not in content and content.startswith("<think>\nSo")
      assert content.endswith(f"\\boxed{{{gold[t['id']]}}}")
      assert t["messages"][0]["content"].startswith(
          {"a": "What is 3 + 4?", "b": "What is 6 + 7?", "c": "What is 2 + 5?"}[t["id"]])
      assert t["provenance"]["verdict"]["reason"] == "correct"
      assert t["provenance"]["num_tokens"] == length[t["id"], t["provenance"]["sample"]]
      assert t["provenance"]["teacher"] == f"init.hf_dir={teacher_dir}"
      assert t["provenance"]["sampling"]["temperature"] == 0.6
    # The traces are a dataset the training pipeline reads as it is.
    assert all(len(formats.to_conversations(t)) == 1 for t in kept)


def test_contaminated_problem_is_dropped_and_counted(distilled):
  _, _, stats, _ = distilled
  assert stats["problems"]["read"] == 4 and stats["problems"]["contaminated"] == 1
  removed = stats["decontamination"]["problems"]
  assert [p["id"] for p in removed] == ["aime"]
  assert removed[0]["matches"][0]["task"] == "aime24" and removed[0]["responses"] == 0
  assert stats["problems"]["graded"] == 3
  assert stats["responses"]["total"] == 3 * NUM_SAMPLES
  assert stats["lengths_tokens"]["kept"]["count"] == stats["responses"]["kept"]


def test_killed_and_rerun_writes_the_same_bytes(distilled, teacher_dir, tmp_path):
  problems, full, _, snapshot = distilled
  part = tmp_path / "part" / "traces"
  part.mkdir(parents=True)
  lines = snapshot["generations.jsonl"].splitlines(keepends=True)
  (part / "generations.jsonl").write_bytes(lines[0] + lines[1][:40])  # torn mid-line
  record = "generations.jsonl.provenance.json"
  shutil.copy(full / "traces" / record, part / record)
  main_lib.run(_config(teacher_dir, problems), str(tmp_path / "part"))
  for name, data in snapshot.items():
    assert (part / name).read_bytes() == data, name


def test_trace_renders_again_with_one_turn_end_on_smollm2(smollm2_dir):
  """A response as the sampler returns it (stop token included) becomes an assistant turn
  that SmolLM2's own template renders with exactly one turn end, the same tokens after the
  prompt as the teacher wrote."""
  renderer = chat.ChatRenderer(chat.load_tokenizer(smollm2_dir))
  tok = renderer.tokenizer
  shaping = traces.Shaping.for_renderer(renderer, "</think>", formats.DEFAULT_SPEC)
  written = "<think>\nAdd them: 3 + 4 = 7.\n</think>\n\nThe sum is $\\boxed{7}$."
  ids = tok.encode(written) + [renderer.turn_end_id]
  response = tok.decode(ids)
  assert response.endswith("<|im_end|>")
  content = traces.assistant_content(response, shaping)
  assert content == written
  user = {"role": "user", "content": "What is 3 + 4?"}
  example = renderer.render([user, {"role": "assistant", "content": content}])
  turn = example.tokens[example.prompt_len:]
  assert list(turn[example.loss_mask[example.prompt_len:]]).count(renderer.turn_end_id) == 1
  assert list(turn[:len(ids)]) == ids
  assert list(example.tokens[:example.prompt_len]) == renderer.encode_prompt([user]).tolist()


def _filter_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "filter_traces.py"),
                         *args], capture_output=True, text=True, timeout=120)


def test_filter_traces_grades_keeps_and_counts_an_external_dump(tmp_path):
  think = "<think>\nwork\n</think>\n\n"
  dump = _write_jsonl(tmp_path / "dump.jsonl", [
      {"question": "What is 3 + 4?", "gold": "7", "outputs": [
          think + "It is \\boxed{7}.",  # kept by all; not the shortest
          think + "It is \\boxed{8}.",  # wrong
          "<think>\nw</think>\\boxed{7}<|im_end|>",  # kept, the shortest, stop token dropped
          think + "\\boxed{7}",  # cut off: never kept
          think + "\\boxed{5} or \\boxed{7}"],  # two final answers: never kept
       "finish_reason": ["stop", "stop", "stop", "length", "stop"],
       "num_tokens": [12, 12, 6, 9, 14]},
      {"id": "q2", "question": "What is 6 + 7?", "gold": 13,
       "outputs": ["Thinking aloud without an answer."], "num_tokens": 5},
      {"question": AIME_PROBLEM, "gold": "204", "outputs": [think + "\\boxed{204}"],
       "num_tokens": [7]}])
  common = [f"--input={dump}", "--answer_kind=aime", "--teacher=an API",
            "--fields=problem=question,answer=gold,response=outputs"]
  r = _filter_cli(*common, f"--output_dir={tmp_path / 'all'}")
  assert r.returncode == 0, r.stderr[-3000:]
  kept = _read(tmp_path / "all" / "traces.jsonl")
  assert [(t["id"], t["provenance"]["sample"]) for t in kept] == [("1", 0), ("1", 2)]
  assert kept[1]["messages"][1]["content"] == "<think>\nw\n</think>\n\n\\boxed{7}"
  assert kept[0]["provenance"]["teacher"] == "an API"
  stats = json.loads((tmp_path / "all" / "stats.json").read_text())
  assert stats["responses"]["dropped"] == {
      "contaminated": 1, "wrong": 1, "no_answer": 1, "truncated": 1, "timeout": 0,
      "too_complex": 0, "several_answers": 1, "stop_token_inside": 0, "policy": 0}
  assert stats["problems"] | {"by_correct_responses": None} == {
      "read": 3, "contaminated": 1, "graded": 2, "with_correct": 1, "without_correct": 1,
      "with_kept": 1, "by_correct_responses": None, "without_correct_ids": ["q2"]}
  assert stats["responses"]["acceptance"] == round(2 / 6, 6)
  assert stats["decontamination"]["problems"][0]["matches"][0]["task"] == "aime24"
  r = _filter_cli(*common, f"--output_dir={tmp_path / 'short'}", "--keep=shortest")
  assert r.returncode == 0, r.stderr[-3000:]
  assert [t["provenance"]["sample"] for t in _read(tmp_path / "short" / "traces.jsonl")] == [2]
  r = _filter_cli(*common[:-1], f"--output_dir={tmp_path / 'x'}")
  assert r.returncode != 0 and "no problem text in field 'problem'" in r.stderr


def test_distill_mode_refuses_configs_saying_what_to_change():
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.mode = "distill"
  c.traces.keep, c.traces.k, c.traces.answer_kind = "at_most_k", 0, "gsm8k"
  c.traces.fields = "gold=answer"
  with pytest.raises(settings.ConfigError) as e:
    settings.parse(c)
  text = str(e.value)
  for part in ("set init.hf_dir or init.checkpoint", "set it to a JSONL file",
               "traces.k=0 must be >= 1", "traces.answer_kind='gsm8k' is not one of",
               "traces.fields: unknown canonical field 'gold' (the canonical name comes "
               "first: answer=gold?)"):
    assert part in text, (part, text)
