"""Sampling over a prompts file: load a model and tokenizer, render prompts, append outputs.

Each input line is `{"prompt": str}` (raw text, or the user turn when the chat template is
on) or `{"messages": [...]}`, plus any other fields, which are copied to the output. Each
output line adds `response`, `completion_token_ids` and `finish_reason`, one entry per
sample. Output lines are appended as blocks of prompts finish and a rerun skips the prompts
already written, so an interrupted run loses at most one block.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from jaxdistill import checkpoint, hf
from jaxdistill.data import chat
from jaxdistill.model import Transformer
from jaxdistill.sampler import Sampler, SamplingConfig

BLOCK_BATCHES = 4  # sampler batches of prompts per output block


def load_model(init: str, mesh=None, **overrides) -> Transformer:
  """A Hugging Face directory (has config.json) or an Orbax checkpoint / training workdir."""
  if os.path.exists(os.path.join(init, "config.json")):
    return hf.load_hf_model(init, mesh, **overrides)
  return checkpoint.load_model(init, mesh, **overrides)


def read_prompts(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not JSON ({e})") from e
      if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str)
                                           or isinstance(row.get("messages"), list)):
        raise ValueError(f"{path}:{i}: needs a string 'prompt' or a 'messages' list")
      rows.append(row)
  return rows


def prompt_tokens(row: dict, renderer: chat.ChatRenderer, use_chat_template: bool) -> list[int]:
  if "messages" in row:
    return renderer.encode_prompt(row["messages"]).tolist()
  if use_chat_template:
    return renderer.encode_prompt([{"role": "user", "content": row["prompt"]}]).tolist()
  return renderer.tokenizer.encode(row["prompt"])


def stop_ids(renderer: chat.ChatRenderer) -> tuple[int, ...]:
  ids = [renderer.turn_end_id]
  if renderer.tokenizer.eos_id is not None:
    ids.append(renderer.tokenizer.eos_id)
  return tuple(dict.fromkeys(ids))


def count_done(output: str, block: int) -> int:
  """Lines already in `output`, cut back to whole blocks (a torn block is dropped), so a
  rerun samples each remaining block with the seed an uninterrupted run would have used."""
  if not os.path.exists(output):
    return 0
  with open(output, "rb") as f:
    lines = f.read().split(b"\n")[:-1]  # the text after the last newline is torn
  keep = len(lines) - len(lines) % block
  with open(output, "wb") as f:
    f.write(b"".join(line + b"\n" for line in lines[:keep]))
  return keep


def generate_file(sampler: Sampler, renderer: chat.ChatRenderer, prompts_path: str,
                  output: str, cfg: SamplingConfig, *, num_samples: int = 1, seed: int = 0,
                  batch_size: int = 8, samples_at_once: int = 0, use_chat_template: bool = True,
                  log: Callable[[str], None] = logging.info) -> int:
  """Samples every prompt of `prompts_path` into `output`; returns the lines written now.
  `batch_size` and `samples_at_once` are Sampler.generate's."""
  rows = read_prompts(prompts_path)
  # Prompts are handed to the sampler in blocks of several batches, so finished rows are
  # refilled from the block (continuous batching); output is written, and resumed, by block.
  block = batch_size * BLOCK_BATCHES
  done = count_done(output, block)
  if done > len(rows):
    raise ValueError(f"{output} has {done} lines but {prompts_path} only {len(rows)} prompts; "
                     "it belongs to another prompts file")
  if done:
    log(f"{output}: {done} of {len(rows)} prompts already done; continuing")
  start, tokens_out = time.perf_counter(), 0
  written = 0
  with open(output, "a", encoding="utf-8") as f:
    for b in range(done, len(rows), block):
      batch = rows[b:b + block]
      ids = [prompt_tokens(r, renderer, use_chat_template) for r in batch]
      # Each block gets its own seed offset: the samples do not depend on where a rerun
      # resumed.
      samples = sampler.generate(ids, cfg, num_samples=num_samples, seed=seed + b,
                                 batch_size=batch_size, samples_at_once=samples_at_once)
      for row, s in zip(batch, samples):
        out = dict(row)
        out["response"] = [renderer.tokenizer.decode(x.tokens.tolist()) for x in s]
        out["completion_token_ids"] = [x.tokens.tolist() for x in s]
        out["finish_reason"] = [x.finish_reason for x in s]
        f.write(json.dumps(out, ensure_ascii=False) + "\n")
        tokens_out += sum(len(x.tokens) for x in s)
      f.flush()
      written += len(batch)
      elapsed = time.perf_counter() - start
      left = len(rows) - done - written
      log(f"{done + written}/{len(rows)} prompts | {tokens_out / elapsed:,.0f} tokens/s | "
          f"ETA {elapsed / written * left:.0f}s")
  return written
