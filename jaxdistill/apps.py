"""The applications `main.py` picks by mode: `train`, `eval`, `train_and_eval` and `distill`
(the demo's is `demo/run.py`). Each takes typed settings and a workdir."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
from flax import nnx

from jaxdistill import checkpoint, distill, evaluate as evaluate_lib, model as model_lib
from jaxdistill import sharding, startup, traces, train as train_lib
from jaxdistill.data import builder, chat, contamination
from jaxdistill.model_config import ModelConfig
from jaxdistill.sampler import Sampler
from jaxdistill.settings import Settings


def train(s: Settings, workdir: str) -> train_lib.TrainResult:
  """Trains to the end (resuming from `workdir` when it holds checkpoints)."""
  return _train(startup.start(s, workdir))


def _train(run: startup.Run) -> train_lib.TrainResult:
  s, workdir = run.settings, run.workdir
  data = builder.build_training_data(s.data, global_batch_size=s.train.global_batch_size,
                                     num_steps=s.train.num_steps, seed=s.seed,
                                     workdir=workdir)
  s = s.with_num_steps(data.num_steps)
  logging.info("training %d steps of %d rows x %d tokens", s.train.num_steps,
               s.train.global_batch_size, s.data.seq_len)
  startup.write_manifest(run, data.fingerprint)
  model = None if run.source.kind == "resume" else startup.load_weights(
      run.source, run.model_config, run.mesh, s.seed)
  objective = frozen = None
  if run.teacher is not None:  # frozen on the mesh beside the student; never checkpointed
    teacher = startup.load_weights(run.teacher.source, run.teacher.config, run.mesh, s.seed)
    frozen = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    objective = distill.DistillObjective(
        nnx.graphdef(teacher), loss_chunk=s.train.loss_chunk, z_loss=s.train.z_loss,
        alpha=s.distill.alpha, temperature=s.distill.temperature,
        vocab_size=run.teacher.vocab_size)
  result = train_lib.run(model, run.model_config, s.optim, s.train, run.mesh, data.train,
                         workdir, run_config=json.loads(s.config_json),
                         eval_data=data.validation, objective=objective, frozen=frozen,
                         log=logging.info)
  if result.preempted:
    logging.info("stopped by a signal at step %d; run the same command to resume", result.step)
  return result


def train_and_eval(s: Settings, workdir: str) -> train_lib.TrainResult:
  """Trains, then evaluates the final step on `eval.tasks`. The evaluation's limits are
  checked before training starts."""
  run = startup.start(s, workdir)
  renderer = make_renderer(s, run.model_config)
  evaluate_lib.check_limits(s.eval, renderer, run.model_config.max_position_embeddings)
  result = _train(run)
  if not result.preempted:
    model = checkpoint.load_model(workdir, run.mesh, **s.model.overrides())
    source = startup.WeightSource("resume", checkpoint.checkpoint_root(workdir), result.step)
    evaluate_model(s, model, run.mesh, workdir, source, renderer)
  return result


def evaluate(s: Settings, workdir: str) -> dict:
  """Evaluates the run's weights (resumed, init.checkpoint or init.hf_dir) on `eval.tasks`.
  Without data.tokenizer, a training checkpoint's recorded tokenizer and template are used.
  Everything is checked before the weights load."""
  run = startup.start(s, workdir)
  s = startup.with_recorded_tokenizer(s, run.source)
  renderer = make_renderer(s, run.model_config)
  evaluate_lib.check_limits(s.eval, renderer, run.model_config.max_position_embeddings)
  model = startup.load_weights(run.source, run.model_config, run.mesh, s.seed)
  return evaluate_model(s, model, run.mesh, workdir, run.source, renderer)


def distill_traces(s: Settings, workdir: str) -> dict | None:
  """The run's weights (init.hf_dir or init.checkpoint) as a teacher: samples traces.*'s
  problems with the eval.* sampling settings, keeps the verified responses and writes them
  as a trace dataset (jaxdistill/traces.py) into traces.output (default workdir/traces);
  returns its stats (None on processes other than 0). Resumable: a rerun continues the
  sampling where it stopped. The problems and limits are checked before the weights load."""
  run = startup.start(s, workdir)
  s = startup.with_recorded_tokenizer(s, run.source)
  renderer = make_renderer(s, run.model_config)
  cfg, out_dir = s.traces, s.traces.output or f"{workdir}/traces"
  problems = traces.read_problems(cfg.problems_file, cfg.field_map, cfg.answer_kind,
                                  lambda p: evaluate_lib.user_prompt(p, s.eval.instruction))
  index = contamination.ContaminationIndex.from_tasks() if cfg.decontaminate else None
  matches = traces.check_problems(problems, index)
  clean = [{"id": p.id, "problem": p.problem} for p, m in zip(problems, matches) if not m]
  evaluate_lib.check_limits(dataclasses.replace(s.eval, limit=0), renderer,
                            run.model_config.max_position_embeddings,
                            [evaluate_lib.Task("traces", cfg.answer_kind, tuple(clean))])
  model = startup.load_weights(run.source, run.model_config, run.mesh, s.seed)
  provenance = {"weights": run.source.identity(model.config, s.seed),
                "compute_dtype": s.eval.compute_dtype, "tokenizer": renderer.identity()}
  shaping = traces.Shaping.for_renderer(renderer, s.eval.think_end, s.data.format_spec)
  return traces.sample_traces(sampler_for(model, run.mesh, s.eval.compute_dtype), renderer,
                              s.eval, cfg, problems, matches, out_dir, shaping=shaping,
                              teacher=str(run.source), provenance=provenance, log=logging.info)


def make_renderer(s: Settings, cfg: ModelConfig) -> chat.ChatRenderer:
  """The run's tokenizer and chat template, checked against the model's vocabulary."""
  if not s.data.tokenizer:
    raise ValueError("evaluation needs a tokenizer: set data.tokenizer or init.hf_dir (a "
                     "training checkpoint's own is found by itself)")
  renderer = chat.ChatRenderer(chat.load_tokenizer(s.data.tokenizer), s.data.chat_template)
  if renderer.tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer ({s.data.tokenizer}) has {renderer.tokenizer.vocab_size} "
                     f"tokens but the model only {cfg.vocab_size}: they do not belong together")
  return renderer


def evaluate_model(s: Settings, model: model_lib.Transformer, mesh, workdir: str,
                   source: startup.WeightSource, renderer: chat.ChatRenderer) -> dict:
  """Evaluates `model` on `eval.tasks` into workdir/eval/ (resumable). The model is handed
  to the sampler, which takes over its weights: do not use it afterwards."""
  provenance = {"weights": source.identity(model.config, s.seed),
                "compute_dtype": s.eval.compute_dtype, "tokenizer": renderer.identity()}
  description = {"init": str(source), "compute_dtype": s.eval.compute_dtype,
                 "param_dtype": model.config.param_dtype, "cache_dtype": s.eval.cache_dtype}
  sampler = sampler_for(model, mesh, s.eval.compute_dtype)
  return evaluate_lib.evaluate(sampler, renderer, s.eval, f"{workdir}/eval",
                               model_description=description, provenance=provenance,
                               log=logging.info)


def sampler_for(model: model_lib.Transformer, mesh, compute_dtype: str) -> Sampler:
  """A sampler over `model`'s weights (taken over: the model must not be used again),
  computing in `compute_dtype`, with rows split over the mesh's data axes."""
  if compute_dtype != model.config.compute_dtype:
    abstract = model_lib.abstract_model(model.config.replace(compute_dtype=compute_dtype))
    model = nnx.merge(nnx.graphdef(abstract), nnx.state(model))
  if mesh.shape["context"] > 1:  # decoding is one token a step: the context devices take rows
    mesh = sharding.fold_context(mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.param_shardings(state, mesh))
    model = nnx.merge(graphdef, state)
    logging.info("evaluating on mesh %s (context folded into data)", sharding.describe(mesh))
  return Sampler.from_model(model, mesh, consume=True)

