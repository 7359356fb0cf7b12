"""Builds a run from its config (typed settings, checks, mesh, initial model, data) and runs
its mode: train, eval, or train then eval."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess

import jax
import ml_collections
from flax import nnx

from jaxdistill import checkpoint, evaluate, hf, model as model_lib, sharding, train
from jaxdistill.data import builder, chat
from jaxdistill.sampler import Sampler
from jaxdistill.model_config import ModelConfig, get_preset
from jaxdistill.optimizer import OptimConfig

MODES = ("train", "eval", "train_and_eval")


def model_overrides(c: ml_collections.ConfigDict) -> dict:
  """ModelConfig fields the run config sets on top of the checkpoint's or preset's."""
  out = {"param_dtype": c.model.param_dtype, "compute_dtype": c.model.compute_dtype,
         "remat": c.model.remat, "attention": c.model.attention,
         "attention_block": c.model.attention_block}
  if c.model.rope_theta > 0:
    out["rope_theta"] = float(c.model.rope_theta)
  if c.model.max_position_embeddings > 0:
    out["max_position_embeddings"] = int(c.model.max_position_embeddings)
  return out


def resolve_model_config(c: ml_collections.ConfigDict, workdir: str) -> tuple[ModelConfig, str]:
  """The model config and where the weights will come from, in the documented order:
  resume from workdir > init.checkpoint > init.hf_dir > random init of model.preset."""
  ckpt = checkpoint.TrainCheckpointer(workdir, async_save=False)
  try:
    steps = ckpt.steps()
    if steps:
      return ckpt.model_config(steps[-1]).replace(**model_overrides(c)), (
          f"resume from {ckpt.root} (latest step {steps[-1]})")
  finally:
    ckpt.close()
  if c.init.checkpoint:
    cfg, _ = checkpoint.load_model_config(c.init.checkpoint)
    return cfg.replace(**model_overrides(c)), f"init.checkpoint={c.init.checkpoint}"
  if c.init.hf_dir:
    return (ModelConfig.from_hf_config(c.init.hf_dir, **model_overrides(c)),
            f"init.hf_dir={c.init.hf_dir}")
  return get_preset(c.model.preset, **model_overrides(c)), (
      f"random init of preset {c.model.preset!r}")


def validate(c: ml_collections.ConfigDict, cfg: ModelConfig, mesh_shape) -> None:
  """Cross-field checks, all reported at once, before anything compiles."""
  problems = []
  if c.mode not in MODES:
    problems.append(f"mode={c.mode!r} is not one of {MODES}")
  data, fsdp, context, tp = mesh_shape
  dp = data * fsdp
  micro = c.train.micro_batches
  if c.train.global_batch_size % (dp * micro):
    problems.append(
        f"train.global_batch_size={c.train.global_batch_size} is not divisible by data x fsdp "
        f"({dp}) x train.micro_batches ({micro}) = {dp * micro}; make it a multiple of "
        f"{dp * micro}")
  if c.data.seq_len % (2 * context):
    problems.append(f"data.seq_len={c.data.seq_len} is not divisible by 2 x mesh context "
                    f"({2 * context}): context parallelism splits each row into that many "
                    "chunks; choose a seq_len that is a multiple of it")
  if cfg.num_heads % tp:
    problems.append(f"the model's {cfg.num_heads} attention heads are not divisible by "
                    f"mesh tp={tp}; choose tp dividing {cfg.num_heads}")
  if c.data.seq_len > cfg.max_position_embeddings:
    problems.append(
        f"data.seq_len={c.data.seq_len} exceeds the model's max_position_embeddings="
        f"{cfg.max_position_embeddings}; lower data.seq_len or raise "
        "model.max_position_embeddings (and model.rope_theta, for long-trace SFT)")
  if c.train.loss_chunk <= 0:
    problems.append(f"train.loss_chunk={c.train.loss_chunk} must be positive")
  if problems:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(problems))


def initial_model(c, cfg: ModelConfig, source: str, mesh):
  """The starting weights on the mesh (None when resuming: the trainer restores them)."""
  if source.startswith("resume"):
    return None
  if c.init.checkpoint:
    return checkpoint.load_model(c.init.checkpoint, mesh, **model_overrides(c))
  if c.init.hf_dir:
    return hf.load_hf_model(c.init.hf_dir, mesh, **model_overrides(c))
  return model_lib.create_model(cfg, mesh, seed=c.seed)


def write_manifest(c, workdir: str, cfg: ModelConfig, mesh, source: str,
                   data_fingerprint: str) -> None:
  """workdir/manifest.json: what ran, on what, from which code and data."""
  if jax.process_index() != 0:
    return
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers",
              "numpy", "jaxdistill"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  try:
    revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    revision = None
  manifest = {
      "config": json.loads(c.to_json_best_effort()),
      "model_config": cfg.to_dict(),
      "init": source,
      "git_revision": revision,
      "versions": versions,
      "mesh": dict(mesh.shape),
      "process_count": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "data_fingerprint": data_fingerprint,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, default=str)


def train_config(c, num_steps: int) -> train.TrainConfig:
  t = c.train
  return train.TrainConfig(
      global_batch_size=t.global_batch_size, micro_batches=t.micro_batches,
      num_steps=num_steps, seq_len=c.data.seq_len, loss_chunk=t.loss_chunk, z_loss=t.z_loss,
      log_every=t.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches,
      checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
      async_checkpoints=t.async_checkpoints, profile_steps=tuple(t.profile_steps),
      inject_nan_at_step=t.inject_nan_at_step)


def optim_config(c, num_steps: int) -> OptimConfig:
  t = c.train
  return OptimConfig(lr=t.lr, total_steps=num_steps,
                     warmup_steps=int(round(t.warmup_ratio * num_steps)),
                     schedule=t.schedule, end_lr_ratio=t.end_lr_ratio,
                     weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
                     grad_clip=t.grad_clip)


def main(c: ml_collections.ConfigDict, workdir: str) -> train.TrainResult | None:
  """Runs `c.mode` in `workdir`."""
  if "demo" in c:  # configs/demo.py: the distillation demo runs its own phases
    from jaxdistill.demo import run as demo_run  # pylint: disable=g-import-not-at-top
    return demo_run.main(c, workdir)
  if c.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
        c.train.compilation_cache_dir))
  cfg, source = resolve_model_config(c, workdir)
  mesh_shape = list(c.mesh.shape)
  mesh = sharding.make_mesh(mesh_shape)
  validate(c, cfg, tuple(mesh.shape.values()))
  logging.info("mesh %s; model %s, %s parameters; init: %s", sharding.describe(mesh),
               cfg.model_type, f"{cfg.num_params():,}", source)
  if c.mode == "eval":
    model = initial_model(c, cfg, source, mesh) if not source.startswith("resume") else (
        checkpoint.load_model(workdir, mesh, **model_overrides(c)))
    return run_eval(c, model, workdir, source, mesh)
  data = builder.build_training_data(c, workdir)
  num_steps = data.num_steps
  logging.info("training %d steps of %d rows x %d tokens", num_steps,
               c.train.global_batch_size, c.data.seq_len)
  write_manifest(c, workdir, cfg, mesh, source, data.fingerprint)
  model = initial_model(c, cfg, source, mesh)
  result = train.run(model, cfg, optim_config(c, num_steps), train_config(c, num_steps), mesh,
                     data.train, workdir, run_config=json.loads(c.to_json_best_effort()),
                     eval_data=data.validation, log=logging.info)
  if result.preempted:
    logging.info("stopped by a signal at step %d; run the same command to resume", result.step)
    return result
  if c.mode == "train_and_eval":
    run_eval(c, checkpoint.load_model(workdir, mesh, **model_overrides(c)), workdir,
             f"{workdir} step {result.step}", mesh)
  return result


def eval_config(c) -> evaluate.EvalConfig:
  e = c.eval
  return evaluate.EvalConfig(
      tasks=tuple(t.strip() for t in e.tasks.split(",") if t.strip()),
      num_samples=e.num_samples, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
      max_new_tokens=e.max_new_tokens, greedy=e.greedy, batch_size=e.batch_size,
      samples_at_once=e.samples_at_once,
      limit=e.limit, instruction=e.instruction, seed=e.seed, cache_dtype=e.cache_dtype,
      grading_workers=e.grading_workers)


def run_eval(c, model, workdir: str, source: str, mesh) -> dict:
  """Evaluates `model` on `eval.tasks` into workdir/eval/ (resumable)."""
  ecfg = eval_config(c)
  tokenizer_path = c.data.tokenizer or c.init.hf_dir
  if not tokenizer_path:
    raise ValueError("evaluation needs a tokenizer: set data.tokenizer or init.hf_dir")
  renderer = chat.ChatRenderer(chat.load_tokenizer(tokenizer_path), c.data.chat_template)
  if renderer.tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"the tokenizer ({tokenizer_path}) has {renderer.tokenizer.vocab_size} "
                     f"tokens but the model only {model.config.vocab_size}: they do not belong "
                     "together")
  if c.eval.compute_dtype != model.config.compute_dtype:
    graphdef_model = model_lib.abstract_model(model.config.replace(
        compute_dtype=c.eval.compute_dtype))
    model = nnx.merge(nnx.graphdef(graphdef_model), nnx.state(model))
  description = {"init": source, "compute_dtype": model.config.compute_dtype,
                 "param_dtype": model.config.param_dtype, "cache_dtype": ecfg.cache_dtype}
  if mesh.shape["context"] > 1:  # decoding is one token a step: the context devices take rows
    mesh = sharding.fold_context(mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, model_lib.state_shardings(state, mesh))
    model = nnx.merge(graphdef, state)
    logging.info("evaluating on mesh %s (context folded into data)", sharding.describe(mesh))
  # The model was loaded for this evaluation: the sampler takes over its weights.
  sampler = Sampler.from_model(model, mesh, consume=True)
  return evaluate.evaluate(sampler, renderer, ecfg, workdir, model_description=description,
                           log=logging.info)
