"""From a run's data settings to the tokenizer, renderer and training/validation streams."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence

import jax

from jaxdistill import storage
from jaxdistill.data import chat, formats, packed_rows, pipeline, sources

# What must match between the tokenizer that prepared a directory and the run's
# (`ChatRenderer.identity`); the path may differ, a copy is the same tokenizer.
_IDENTITY_KEYS = ("vocab_size", "tokenizer_sha256", "template", "template_sha256",
                  "turn_end_id")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The `data` section of a run config, typed (defaults: configs/base.py)."""
  sources: str  # comma-separated paths/globs, "path@weight" for a mixture, or tfds:NAME
  format: str  # formats.py: "auto" | "messages" | "sharegpt" | ...
  format_spec: formats.FormatSpec  # field names, thinking wrapper, system prompt, s1K variant
  tokenizer: str  # HF tokenizer directory or SentencePiece .model
  chat_template: str
  seq_len: int
  packing: str
  overlong: str
  shuffle: bool
  validation_sources: str
  workers: int
  prefetch: int
  strict: bool
  num_epochs: float  # passes over the data when the step count is derived from it


@dataclasses.dataclass
class TrainingData:
  train: pipeline.DataIterator
  num_steps: int  # optimizer steps the run takes
  validation: Callable[[], Iterator] | None  # fresh validation batches, or None
  renderer: chat.ChatRenderer
  fingerprint: str  # identifies the data and its rendering, for the run manifest


def parse_sources(spec: str) -> tuple[pipeline.SourceConfig, ...]:
  """"a.jsonl,b/*.parquet" or a weighted mixture "a.jsonl@0.7,b.parquet@0.3"."""
  out = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    path, at, weight = part.rpartition("@")
    try:
      out.append(pipeline.SourceConfig(path, weight=float(weight)) if at else
                 pipeline.SourceConfig(part))
    except ValueError:  # an "@" that is part of the path
      out.append(pipeline.SourceConfig(part))
  if not out:
    raise ValueError("data.sources is empty: give one or more JSONL/Parquet/ArrayRecord paths "
                     "or globs (comma-separated, optionally path@weight), or tfds:NAME")
  return tuple(out)


def example_fn(renderer: chat.ChatRenderer, fmt: str, spec: formats.FormatSpec):
  """record -> rendered examples (one per conversation the record holds)."""
  def fn(record):
    return [renderer.render(conv) for conv in formats.to_conversations(record, fmt, spec)]
  return fn


def check_prepared(specs: Sequence[str], renderer: chat.ChatRenderer):
  """Refuses pre-tokenised sources (`prepare_traces.py` examples or packed rows) made with
  another tokenizer or chat template than the run's, since their ids would stand for other
  text and their masks for other turns, and nothing later could tell. Warns about those with
  no record (or an incomplete one, from before the hashes were recorded) of what made them.

  Args:
    specs: data source specs; trace files and TFDS sources are skipped.
    renderer: the run's renderer (`ChatRenderer.identity` is compared with stats.json).
  Raises:
    ValueError: naming the recorded tokenizer and template and the run's, and what differs.
  """
  current = None
  for spec in specs:
    content = packed_rows.prepared_content(spec)
    if content is None:
      continue  # trace records: this run renders them itself
    current = current or renderer.identity()
    recorded = (packed_rows.read_stats(spec) or {}).get("tokenizer") or {}
    missing = [k for k in _IDENTITY_KEYS if k not in recorded]
    changed = [f"{k} {recorded[k]!r} != {current[k]!r}" for k in _IDENTITY_KEYS
               if k in recorded and recorded[k] != current[k]]
    if changed:
      raise ValueError(
          f"{spec} was tokenised with {_describe(recorded)}, but this run uses "
          f"{_describe(current)} ({'; '.join(changed)}). Train with the tokenizer and template "
          f"that prepared it (data.tokenizer={recorded.get('path', '?')}, "
          f"data.chat_template={recorded.get('template', '?')}), or prepare the traces again "
          f"with --tokenizer={current['path']} --chat_template={current['template']}")
    if missing:
      logging.warning(
          "%s holds pre-tokenised %s with no record of %s in %s; cannot check that it was "
          "made by this run's %s", spec, content, ", ".join(missing),
          packed_rows.STATS_FILE, _describe(current))


def _describe(identity: dict) -> str:
  return (f"tokenizer {identity.get('path', '?')} (vocab {identity.get('vocab_size', '?')}, "
          f"sha256 {identity.get('tokenizer_sha256', '?')[:12]}) and the "
          f"{identity.get('template', '?')} template "
          f"(sha256 {identity.get('template_sha256', '?')[:12]})")


def _data_config(d: DataSettings, srcs, *, global_batch_size: int, seed: int, num_epochs,
                 shuffle=None):
  return pipeline.DataConfig(
      sources=srcs, seq_len=d.seq_len, global_batch_size=global_batch_size,
      num_epochs=num_epochs, seed=seed, shuffle=d.shuffle if shuffle is None else shuffle,
      packing=d.packing, overlong=d.overlong, strict=d.strict, num_workers=d.workers,
      prefetch_batches=d.prefetch)


def _fingerprint(cfg: pipeline.DataConfig, renderer: chat.ChatRenderer, d: DataSettings) -> str:
  h = hashlib.sha256(json.dumps(cfg.stream_identity(), sort_keys=True).encode())
  # How records are read changes the examples as much as the files do (hashed only when not
  # the defaults, so that workdirs from before these settings keep their data plan).
  if (d.format, d.format_spec) != ("auto", formats.DEFAULT_SPEC):
    h.update(json.dumps([d.format, dataclasses.asdict(d.format_spec)], sort_keys=True).encode())
  for s in cfg.sources:
    for path in _local_files(s.path):
      h.update(f"{path}:{storage.version(path)}".encode())  # size and mtime or generation
  h.update(f"{renderer.template_name}:{renderer.turn_end_id}".encode())
  return h.hexdigest()[:16]


def _local_files(spec: str) -> list[str]:
  if spec.startswith("tfds:"):
    return []
  for ext in (".jsonl", ".parquet", ".array_record"):
    try:
      return sources.expand_paths(spec, ext)
    except (ValueError, FileNotFoundError):
      continue
  return []


def _planned_steps(cfg, fn, renderer, d: DataSettings, workdir: str | None) -> int:
  key = f"{_fingerprint(cfg, renderer, d)}:{jax.process_count()}"
  path = storage.join(workdir, "data_plan.json") if workdir else None
  if path and storage.exists(path):
    with storage.open(path) as f:
      cached = json.load(f)
    if cached.get("key") == key:
      logging.info("data: %d steps (planned earlier, %s)", cached["steps"], path)
      return cached["steps"]
  plan = pipeline.plan_steps(cfg, fn)
  if plan.steps < 1:
    raise ValueError(f"the data packs into {plan.rows_per_process} rows per process, fewer "
                     f"than one batch of {cfg.global_batch_size}; add data or lower "
                     "train.global_batch_size")
  logging.info("data: %d epoch(s) pack into %s rows per process: %d steps", cfg.num_epochs,
               plan.rows_per_process, plan.steps)
  if path and jax.process_index() == 0:
    storage.makedirs(workdir)
    with storage.open(path, "w") as f:
      json.dump({"key": key, "steps": plan.steps,
                 "rows_per_process": list(plan.rows_per_process)}, f)
  return plan.steps


def build_training_data(d: DataSettings, *, global_batch_size: int, num_steps: int, seed: int,
                        workdir: str | None = None) -> TrainingData:
  """The tokenizer, renderer and streams of a run.

  The number of steps is `num_steps` when positive; otherwise `d.num_epochs` passes over
  the data, counted by packing the whole run's lengths once (`pipeline.plan_steps`, which
  renders every record) and remembered in `workdir/data_plan.json` under the data's
  fingerprint, so a resumed run does not render everything again before its first step.
  Pre-packed sources are counted without reading a row. Pre-tokenised sources made with
  another tokenizer or template than `d.tokenizer`/`d.chat_template` are refused
  (`check_prepared`).
  """
  if not d.tokenizer:
    raise ValueError("no tokenizer: set data.tokenizer (a Hugging Face tokenizer directory or "
                     "a SentencePiece .model) or init.hf_dir")
  tokenizer = chat.load_tokenizer(d.tokenizer)
  renderer = chat.ChatRenderer(tokenizer, d.chat_template)
  fn = example_fn(renderer, d.format, d.format_spec)
  srcs = parse_sources(d.sources)
  val_srcs = parse_sources(d.validation_sources) if d.validation_sources else ()
  check_prepared([s.path for s in srcs + val_srcs], renderer)
  common = dict(global_batch_size=global_batch_size, seed=seed)
  if num_steps > 0:
    cfg = _data_config(d, srcs, num_epochs=None, **common)
  else:
    cfg = _data_config(d, srcs, num_epochs=int(d.num_epochs), **common)
    num_steps = _planned_steps(cfg, fn, renderer, d, workdir)
  validation = None
  if val_srcs:
    val_cfg = _data_config(d, val_srcs, num_epochs=1, shuffle=False, **common)
    validation = lambda: pipeline.DataIterator(val_cfg, fn)  # noqa: E731
  return TrainingData(train=pipeline.DataIterator(cfg, fn), num_steps=num_steps,
                      validation=validation, renderer=renderer,
                      fingerprint=_fingerprint(cfg, renderer, d))
