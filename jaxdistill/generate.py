"""Sampling over a prompts file: load a model and tokenizer, render prompts, append outputs.

Each input line is `{"prompt": str}` (raw text, or the user turn when the chat template is
on) or `{"messages": [...]}`, plus any other fields, which are copied to the output. Each
output line adds `response`, `completion_token_ids` and `finish_reason`, one entry per
sample. Output lines are appended as blocks of prompts finish; a rerun keeps every complete
line and continues at the first prompt not written, refusing outputs that other weights or
settings produced (a provenance record sits beside each output). Paths may be gs:// URLs
(`storage`): there a block's lines are made durable by uploading the whole output again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxdistill import checkpoint, hf, rules, storage
from jaxdistill.data import chat
from jaxdistill.model import Transformer
from jaxdistill.sampler import Sampler, SamplingConfig

BLOCK_BATCHES = 4  # sampler batches of prompts per output block


def load_model(init: str, mesh=None, **overrides) -> Transformer:
  """A Hugging Face directory (has config.json) or an Orbax checkpoint / training workdir."""
  if storage.exists(storage.join(init, "config.json")):
    return hf.load_hf_model(init, mesh, **overrides)
  return checkpoint.load_model(init, mesh, **overrides)


def read_prompts(path: str) -> list[dict]:
  rows = []
  for i, row in storage.json_lines(path):
    if not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
      raise ValueError(f"{path}:{i}: needs a string 'prompt' or a 'messages' list")
    rows.append(row)
  return rows


def prompt_tokens(row: dict, renderer: chat.ChatRenderer, use_chat_template: bool) -> list[int]:
  if "messages" in row:
    return renderer.encode_prompt(row["messages"]).tolist()
  if use_chat_template:
    return renderer.encode_prompt([{"role": "user", "content": row["prompt"]}]).tolist()
  return renderer.tokenizer.encode(row["prompt"])


def budget_forcing(rule: rules.Rule, tokenizer: chat.Tokenizer, *, think_end: str,
                   max_thinking: int = 0, answer_cue: str = "", min_thinking: int = 0,
                   wait: str = "", max_waits: int = 0) -> rules.Rule:
  """`rule` with budget forcing (rules.BudgetForcing: counts, and which tokens are thinking)
  given as text, each text encoded on its own by `tokenizer` (a tokenizer that writes a
  leading space before a text writes it here too); `rule` itself when nothing is forced
  (max_thinking and max_waits 0), so runs without forcing sample and record as before."""
  if not max_thinking and not max_waits:
    return rule
  end = tuple(tokenizer.encode(think_end)) if think_end else ()
  if not end:
    raise ValueError(f"think_end={think_end!r} encodes to no tokens; budget forcing needs the "
                     "end-of-thinking delimiter the model writes (e.g. '</think>')")
  # Texts a setting does not use are left out, so that they do not enter provenance records.
  return rules.BudgetForcing(
      rule, end, max_thinking=max_thinking,
      answer_cue=tuple(tokenizer.encode(answer_cue)) if answer_cue and max_thinking else (),
      min_thinking=min_thinking,
      wait=tuple(tokenizer.encode(wait)) if wait and max_waits else (), max_waits=max_waits)


def stop_ids(renderer: chat.ChatRenderer) -> tuple[int, ...]:
  ids = [renderer.turn_end_id]
  if renderer.tokenizer.eos_id is not None:
    ids.append(renderer.tokenizer.eos_id)
  return tuple(dict.fromkeys(ids))


def count_done(output: str) -> int:
  """Complete lines already in `output`; a torn last line (an interrupted write) is cut off.
  Every complete line is kept: each prompt's samples come from its own random streams, so the
  rerun continues at the first prompt not written, as an uninterrupted run would have."""
  if not storage.exists(output):
    return 0
  with storage.open(output, "rb") as f:
    data = f.read()
  complete = data[:data.rfind(b"\n") + 1]
  if len(complete) < len(data):
    with storage.atomic_write(output, "wb") as f:
      f.write(complete)
  return complete.count(b"\n")


def provenance_path(output: str) -> str:
  return output + ".provenance.json"


def _flat(d, prefix: str = "") -> dict:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def check_provenance(output: str, record: dict, *, restart: bool = False) -> None:
  """Refuses to continue `output` when its provenance record differs from `record` (what
  produces the samples now: weights, tokenizer and template, sampling settings, prompts),
  naming each difference; with `restart` the output is removed and started over. Writes the
  record beside the output."""
  path = provenance_path(output)
  record = json.loads(json.dumps(record, sort_keys=True, default=str))
  if restart:
    for p in (output, path):
      if storage.exists(p):
        storage.remove(p)
  if storage.exists(output) and storage.size(output) > 0:
    if not storage.exists(path):
      raise ValueError(f"{output} holds samples but no record of what produced them ({path} "
                       "is missing); move it away, or restart (eval.restart=True, "
                       "tools/generate.py --restart) to sample it again")
    with storage.open(path, encoding="utf-8") as f:
      old, new = _flat(json.load(f)), _flat(record)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    if diffs:
      raise ValueError(
          f"{output} was sampled with other settings than this run's: {'; '.join(diffs[:8])}"
          f"{' ...' if len(diffs) > 8 else ''}. Rerun with the same settings, or restart "
          "(eval.restart=True, tools/generate.py --restart) to sample it again")
  with storage.atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with storage.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _from_process_0(value: int) -> int:
  """Process 0's `value` on every process (it alone reads and writes the outputs)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def generate_file(sampler: Sampler, renderer: chat.ChatRenderer, prompts_path: str,
                  output: str, cfg: SamplingConfig, *, num_samples: int = 1, seed: int = 0,
                  batch_size: int = 8, samples_at_once: int = 0, use_chat_template: bool = True,
                  provenance: dict | None = None, restart: bool = False,
                  log: Callable[[str], None] = logging.info) -> int:
  """Samples every prompt of `prompts_path` into `output`; returns the lines written now.

  A rerun keeps every complete line and continues at the first prompt not written; prompt i's
  samples come from streams of (seed, i, sample), so the file ends byte-identical to an
  uninterrupted run's. `provenance` (what decides the weights and tokenizer) is recorded
  beside the output with the sampling settings and the prompts' hash, and a rerun with any of
  them different is refused (`check_provenance`; `restart` starts over). With several
  processes all of them sample and process 0 alone reads and writes files (on a filesystem
  every host sees). `batch_size` and `samples_at_once` are Sampler.generate's; they do not
  change the samples.
  """
  rows = read_prompts(prompts_path)
  writer = jax.process_index() == 0
  done = 0
  if writer:
    try:
      if provenance is not None:
        check_provenance(output, dict(
            provenance, sampling=cfg.describe(), num_samples=num_samples, seed=seed,
            use_chat_template=use_chat_template, prompts_sha256=file_sha256(prompts_path)),
                         restart=restart)
      done = count_done(output)
      if done > len(rows):
        raise ValueError(f"{output} has {done} lines but {prompts_path} only {len(rows)} "
                         "prompts; it belongs to another prompts file")
    except ValueError:
      _from_process_0(-1)
      raise
  done = _from_process_0(done)
  if done < 0:
    raise RuntimeError(f"process 0 refused to continue {output}; its log says why")
  if done == len(rows):
    log(f"{output}: all {done} prompts already done")
    return 0
  if done:
    log(f"{output}: {done} of {len(rows)} prompts already done; continuing")
  # Prompts go to the sampler in blocks of several batches, so finished rows are refilled
  # from the block (continuous batching); a block's lines are written when it finishes.
  block = batch_size * BLOCK_BATCHES
  start, tokens_out = time.perf_counter(), 0
  written = 0
  with (storage.Appender(output) if writer else contextlib.nullcontext()) as f:
    for b in range(done, len(rows), block):
      batch = rows[b:b + block]
      ids = [prompt_tokens(r, renderer, use_chat_template) for r in batch]
      samples = sampler.generate(ids, cfg, num_samples=num_samples, seed=seed, first_prompt=b,
                                 batch_size=batch_size, samples_at_once=samples_at_once)
      for row, s in zip(batch, samples):
        out = dict(row)
        out["response"] = [renderer.tokenizer.decode(x.tokens.tolist()) for x in s]
        out["completion_token_ids"] = [x.tokens.tolist() for x in s]
        out["finish_reason"] = [x.finish_reason for x in s]
        if writer:
          f.write(json.dumps(out, ensure_ascii=False) + "\n")
        tokens_out += sum(len(x.tokens) for x in s)
      if writer:
        f.flush()
      written += len(batch)
      elapsed = time.perf_counter() - start
      left = len(rows) - done - written
      log(f"{done + written}/{len(rows)} prompts | {tokens_out / elapsed:,.0f} tokens/s | "
          f"ETA {elapsed / written * left:.0f}s")
  return written
