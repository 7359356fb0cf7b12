"""Samples completions for a JSONL file of prompts (output feeds tools/grade.py).

  python tools/generate.py --init=DIR --prompts=FILE.jsonl --output=FILE.jsonl \
      [--tokenizer=DIR] [--temperature=0.6 --top_p=0.95 --top_k=0] [--num_samples=1] \
      [--max_new_tokens=1024] [--chat_template=true] [--batch_size=8] [--samples_at_once=0] \
      [--seed=0] [--max_thinking_tokens=0 --answer_cue=TEXT] \
      [--max_waits=0 --min_thinking_tokens=0 --wait_text=Wait] [--think_end="</think>"]

Budget forcing (s1): --max_thinking_tokens ends each sample's thinking there (then --think_end
and --answer_cue are written and the model answers); --max_waits replaces a --think_end the
model writes with --wait_text, up to that many times (only while fewer than
--min_thinking_tokens thinking tokens precede it, when given). Thinking is counted from the
first generated token (rules.BudgetForcing).

DIR is a Hugging Face directory or an Orbax checkpoint / training workdir (then give
--tokenizer). Lines are appended as batches finish; rerunning continues at the first prompt
not written, and refuses an output that other weights or settings produced (--restart starts
over). Rows are split over the --mesh's data axes; several processes (launch/local.sh
--script tools/generate.py, or --coordinator_address etc.) sample together and process 0
writes.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxdistill import checkpoint, generate, sharding, startup, storage  # noqa: E402
from jaxdistill.data import chat  # noqa: E402
from jaxdistill.rules import rule_from  # noqa: E402
from jaxdistill.sampler import Sampler, SamplingConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("init", None, "Hugging Face directory, Orbax checkpoint or workdir.")
flags.DEFINE_string("prompts", None, "Input JSONL: {'prompt': str} or {'messages': [...]}.")
flags.DEFINE_string("output", None, "Output JSONL (appended; a rerun continues).")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory or .model (default: --init).")
flags.DEFINE_string("chat_template_name", "auto", "auto | tokenizer | chatml | llama3.")
flags.DEFINE_bool("chat_template", True, "Wrap 'prompt' as the user turn of the template.")
flags.DEFINE_float("temperature", 0.6, "0 = greedy.")
flags.DEFINE_float("top_p", 0.95, "Nucleus mass.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
flags.DEFINE_integer("max_new_tokens", 1024, "Generated tokens per sample at most.")
flags.DEFINE_integer("batch_size", 8, "Sampler slots: groups of one prompt's samples decoding "
                     "at once.")
flags.DEFINE_integer("samples_at_once", 0, "Samples of one prompt per slot (0 = all "
                     "num_samples); smaller bounds the KV cache. Must divide num_samples.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("think_end", "</think>", "End-of-thinking delimiter (budget forcing).")
flags.DEFINE_integer("max_thinking_tokens", 0, "Most thinking tokens per sample, counted from "
                     "the first generated one; then --think_end and --answer_cue (0 = off).")
flags.DEFINE_string("answer_cue", "\nFinal Answer:", "Written after --think_end at the most.")
flags.DEFINE_integer("min_thinking_tokens", 0, "A --think_end after fewer thinking tokens is "
                     "replaced by --wait_text (0 = any, while --max_waits allow).")
flags.DEFINE_string("wait_text", "Wait", "What replaces an early --think_end.")
flags.DEFINE_integer("max_waits", 0, "Most replacements per sample (0 = off).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and cache dtype.")
flags.DEFINE_list("mesh", ["1", "-1", "1", "1"], "data,fsdp,context,tp (one may be -1).")
flags.DEFINE_bool("restart", False, "Sample again over an output that other weights or "
                  "settings produced.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Processes sampling together.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["init", "prompts", "output"])


def main(argv):
  del argv
  startup.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:  # gs:// paths: reachable, or a message saying what to change
    for flag in ("init", "prompts", "tokenizer"):
      if getattr(FLAGS, flag):
        storage.check_reachable(getattr(FLAGS, flag), what=f"--{flag}")
    storage.check_reachable(storage.dirname(FLAGS.output), writable=True, what="--output")
  except ValueError as e:
    raise app.UsageError(str(e))
  mesh = sharding.make_mesh([int(x) for x in FLAGS.mesh])
  tokenizer = chat.load_tokenizer(FLAGS.tokenizer or FLAGS.init)
  renderer = chat.ChatRenderer(tokenizer, FLAGS.chat_template_name)
  model = generate.load_model(FLAGS.init, mesh, compute_dtype=FLAGS.dtype)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise app.UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
  if storage.exists(storage.join(FLAGS.init, "config.json")):
    source = startup.WeightSource("hf", FLAGS.init, None)
  else:
    source = startup.WeightSource("checkpoint", FLAGS.init,
                                  checkpoint.load_model_config(FLAGS.init)[1])
  provenance = {"weights": source.identity(model.config, 0), "compute_dtype": FLAGS.dtype,
                "tokenizer": renderer.identity()}
  rule = generate.budget_forcing(
      rule_from(FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p), tokenizer,
      think_end=FLAGS.think_end, max_thinking=FLAGS.max_thinking_tokens,
      answer_cue=FLAGS.answer_cue, min_thinking=FLAGS.min_thinking_tokens,
      wait=FLAGS.wait_text, max_waits=FLAGS.max_waits)
  cfg = SamplingConfig(rule, max_new_tokens=FLAGS.max_new_tokens,
                       stop_ids=generate.stop_ids(renderer), cache_dtype=FLAGS.dtype,
                       vocab_size=tokenizer.vocab_size)
  n = generate.generate_file(Sampler.from_model(model, mesh, consume=True), renderer,
                             FLAGS.prompts, FLAGS.output, cfg, num_samples=FLAGS.num_samples,
                             seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                             samples_at_once=FLAGS.samples_at_once,
                             use_chat_template=FLAGS.chat_template, provenance=provenance,
                             restart=FLAGS.restart, log=logging.info)
  if jax.process_index() == 0:
    print(f"wrote {n} lines to {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
