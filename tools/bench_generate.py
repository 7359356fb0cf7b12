"""End-to-end sampling throughput: tools/generate.py's library path against transformers generate.

  python tools/bench_generate.py --hf_dir=DIR          # 8 MATH-500 prompts x 4 samples, 256 new
  python tools/bench_generate.py --hf_dir=DIR --repeats=3 --roots=/tmp/before,.
                                                       # older code against this, alternating

DIR is a Hugging Face directory (tests/real_model.py's SmolLM2-135M-Instruct, say). Both
sides sample the same prompts (the first --prompts MATH-500 problems, each followed by the
evaluation instruction, rendered by the tokenizer's chat template; the token ids are made
once and given to both), --num_samples samples each, with the same temperature, top-p and
max_new_tokens, stopping at the template's turn end or the tokenizer's end of sequence.

Each run is a fresh process, so each starts cold: ours counts loading the weights, tracing
and compiling (no persistent compilation cache, as tools/generate.py runs) and sampling, as
`tools/generate.py` does it (`generate.load_model`, `Sampler.from_model`,
`generate.generate_file` writing a JSONL file); transformers counts loading the weights and
one batched `generate` of every prompt's samples (KV cache, sdpa attention, torch threads =
cores, left padding). Tokens are counted per sample up to and including the stop token. The
runs alternate between the sides (the machine may be shared) and the medians are printed:
tokens/s end to end (load included) and of the generation alone (our compile included), and
the ratio of ours to transformers'. With --roots, ours runs once per root (a checkout, e.g.
a `git worktree` of an older commit), each importing jaxdistill from its own root.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

sys.path.insert(0, ROOT)
from configs import base as base_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face directory (weights, config, tokenizer).")
flags.DEFINE_integer("prompts", 8, "The first N MATH-500 problems.")
flags.DEFINE_integer("num_samples", 4, "Samples per prompt.")
flags.DEFINE_integer("max_new_tokens", 256, "Generated tokens per sample at most.")
flags.DEFINE_float("temperature", 0.6, "Sampling temperature.")
flags.DEFINE_float("top_p", 0.95, "Nucleus mass.")
flags.DEFINE_integer("batch_size", 8, "Our sampler's slots (tools/generate.py --batch_size).")
flags.DEFINE_integer("repeats", 1, "Runs of each side (medians printed).")
flags.DEFINE_list("roots", [ROOT], "Checkouts whose jaxdistill runs as 'ours', one each.")
flags.DEFINE_bool("vs_hf", True, "Also time transformers generate.")
flags.DEFINE_string("instruction", base_config.get_config().eval.instruction,
                    "Appended to each problem (default: configs/base.py's eval.instruction).")
flags.DEFINE_string("child", None, "Internal: run one side in this process ('ours' or "
                    "'theirs') on the job file given as the argument.")
flags.mark_flag_as_required("hf_dir")


def _ours(job: dict) -> dict:
  """tools/generate.py's library path, timed from loading the weights; returns counts."""
  sys.path.insert(0, job["root"])
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", None)  # cold, as tools/generate.py runs
  from jaxdistill import generate, rules, sharding  # pylint: disable=g-import-not-at-top
  from jaxdistill.data import chat  # pylint: disable=g-import-not-at-top
  from jaxdistill.sampler import Sampler, SamplingConfig  # pylint: disable=g-import-not-at-top
  assert os.path.realpath(generate.__file__).startswith(os.path.realpath(job["root"])), (
      generate.__file__, job["root"])
  out = os.path.join(tempfile.mkdtemp(), "out.jsonl")
  start = time.perf_counter()
  mesh = sharding.make_mesh([1, -1, 1, 1])
  renderer = chat.ChatRenderer(chat.load_tokenizer(job["hf_dir"]), "auto")
  model = generate.load_model(job["hf_dir"], mesh, compute_dtype="float32")
  cfg = SamplingConfig(rules.rule_from(job["temperature"], top_p=job["top_p"]),
                       max_new_tokens=job["max_new_tokens"],
                       stop_ids=generate.stop_ids(renderer), cache_dtype="float32",
                       vocab_size=renderer.tokenizer.vocab_size)
  sampler = Sampler.from_model(model, mesh, consume=True)
  jax.block_until_ready(sampler.params)
  loaded = time.perf_counter()
  generate.generate_file(sampler, renderer, job["prompts_file"], out, cfg,
                         num_samples=job["num_samples"], seed=0, batch_size=job["batch_size"],
                         log=lambda _: None)
  end = time.perf_counter()
  with open(out, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  # Tokens as written, the stop token included where a sample stopped.
  for row, ids in zip(rows, job["prompt_ids"]):
    if generate.prompt_tokens(row, renderer, True) != ids:
      raise RuntimeError("tools/generate.py rendered other prompt tokens than the benchmark's")
  lengths = [len(t) for row in rows for t in row["completion_token_ids"]]
  return dict(tokens=sum(lengths), samples=len(lengths), load_s=loaded - start,
              generate_s=end - loaded, total_s=end - start,
              stopped=sum(r == "stop" for row in rows for r in row["finish_reason"]))


def _theirs(job: dict) -> dict:
  """transformers generate on the same prompt ids, from loading the weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  stop = job["stop_ids"]
  start = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      job["hf_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
  loaded = time.perf_counter()
  prompts = job["prompt_ids"]
  width = max(len(p) for p in prompts)
  ids = torch.tensor([[stop[0]] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                         temperature=job["temperature"], top_p=job["top_p"], top_k=0,
                         num_return_sequences=job["num_samples"],
                         max_new_tokens=job["max_new_tokens"], eos_token_id=list(stop),
                         pad_token_id=stop[0], use_cache=True)
  end = time.perf_counter()
  lengths, stopped = [], 0
  for row in out[:, width:].tolist():
    hits = [i for i, t in enumerate(row) if t in stop]
    lengths.append(hits[0] + 1 if hits else len(row))
    stopped += bool(hits)
  return dict(tokens=sum(lengths), samples=len(lengths), load_s=loaded - start,
              generate_s=end - loaded, total_s=end - start, stopped=stopped)


def _spawn(side: str, job: dict, scratch: str) -> dict:
  path = os.path.join(scratch, f"job_{side}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(job, f)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={side}",
                         f"--hf_dir={job['hf_dir']}", path], capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"{side} run failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(name: str, runs: list[dict]) -> tuple[str, float, float]:
  med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
  tokens = med("tokens")
  e2e, gen = tokens / med("total_s"), tokens / med("generate_s")
  return (f"{name:<28} {e2e:7.1f} tok/s end to end ({med('total_s'):6.1f} s: load "
          f"{med('load_s'):5.1f} s, generate {med('generate_s'):6.1f} s = {gen:6.1f} tok/s); "
          f"{tokens:.0f} tokens in {runs[0]['samples']} samples, {med('stopped'):.0f} stopped"
          ), e2e, gen


def main(argv):
  if FLAGS.child:
    with open(argv[1], encoding="utf-8") as f:
      job = json.load(f)
    result = _ours(job) if FLAGS.child == "ours" else _theirs(job)
    print(json.dumps(result))
    return
  sys.path.insert(0, ROOT)
  import benchlib  # pylint: disable=g-import-not-at-top
  from jaxdistill import generate  # pylint: disable=g-import-not-at-top
  from jaxdistill.data import chat  # pylint: disable=g-import-not-at-top
  from jaxdistill.eval import tasks  # pylint: disable=g-import-not-at-top
  renderer = chat.ChatRenderer(chat.load_tokenizer(FLAGS.hf_dir), "auto")
  scratch = tempfile.mkdtemp()
  rows = [{"id": r["id"], "prompt": f"{r['problem']}\n{FLAGS.instruction}"}
          for r in tasks.load_task("math500")[:FLAGS.prompts]]
  prompts_file = os.path.join(scratch, "prompts.jsonl")
  with open(prompts_file, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  prompt_ids = [generate.prompt_tokens(r, renderer, True) for r in rows]
  job = dict(hf_dir=os.path.abspath(FLAGS.hf_dir), prompts_file=prompts_file,
             prompt_ids=prompt_ids, stop_ids=list(generate.stop_ids(renderer)),
             num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens,
             temperature=FLAGS.temperature, top_p=FLAGS.top_p, batch_size=FLAGS.batch_size)
  roots = [os.path.abspath(r) for r in FLAGS.roots]
  print(f"{FLAGS.prompts} MATH-500 prompts ({min(map(len, prompt_ids))}-"
        f"{max(map(len, prompt_ids))} tokens) x {FLAGS.num_samples} samples, "
        f"{FLAGS.max_new_tokens} new tokens at most, T={FLAGS.temperature}, "
        f"top-p {FLAGS.top_p}, fp32; {benchlib.cpu_name()}, {os.cpu_count()} cores", flush=True)
  ours = {r: [] for r in roots}
  theirs = []
  for i in range(FLAGS.repeats):
    for r in roots:
      ours[r].append(_spawn("ours", dict(job, root=r), scratch))
      print(f"  run {i + 1} ours ({r}): {ours[r][-1]}", flush=True)
    if FLAGS.vs_hf:
      theirs.append(_spawn("theirs", job, scratch))
      print(f"  run {i + 1} transformers: {theirs[-1]}", flush=True)
  ref = None
  if theirs:
    text, ref, ref_gen = _line("transformers generate", theirs)
    print(text)
  for r in roots:
    text, e2e, gen = _line(f"jaxdistill ({os.path.basename(r) or r})", ours[r])
    if ref:
      text += f" | ratio {e2e / ref:.2f}x end to end, {gen / ref_gen:.2f}x generation"
    print(text, flush=True)


if __name__ == "__main__":
  app.run(main)
