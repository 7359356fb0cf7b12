"""The SFT train step and loop: state on the mesh, jitted step, logging, checkpoints, preemption.

A batch is a dict of [B, T] arrays (see data/packing.py): `inputs`, `targets`, `loss_mask`,
`positions`, `segment_ids`. The loss is the mean NLL over scored targets of the whole global
batch, so packing and gradient accumulation give the same gradient as one big batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdistill import losses, metrics, sharding
from jaxdistill.checkpoint import TrainCheckpointer
from jaxdistill.data import pipeline
from jaxdistill.model import Transformer, abstract_model
from jaxdistill.model_config import ModelConfig
from jaxdistill.optimizer import OptimConfig, make_optimizer, make_schedule



@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The trainer's own settings (the `train` section of a run config, typed; defaults live in
  configs/base.py)."""

  global_batch_size: int  # packed rows per optimizer step, all processes together
  micro_batches: int  # gradient accumulation: the global batch in this many scans
  num_steps: int  # optimizer steps (0 in a run's settings until the data has been counted)
  seq_len: int  # tokens per row (the data's), for throughput and MFU
  loss_chunk: int  # sequence tokens per output-head chunk in the loss
  z_loss: float  # coefficient of the summed logsumexp^2 added to the loss
  log_every: int
  eval_every: int  # steps between validation-loss passes (0 = never)
  eval_batches: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  profile_steps: tuple[int, int]  # [start, stop) traced by jax.profiler; equal = off


class BatchIterator(Protocol):
  """What the trainer needs from the data pipeline (per-process numpy batches)."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # nnx pure dict of the model's parameters
  opt_state: Any


class TrainingStopped(RuntimeError):
  """Training stopped on a non-finite loss or gradient (the last checkpoint is kept)."""


# -- The step ---------------------------------------------------------------------------------

class Objective(Protocol):
  """What a train step minimises, summed over one (micro-)batch's scored tokens.

  `frozen` is whatever the run holds fixed beside the trained model (a teacher's parameters
  for logit distillation, `distill.DistillObjective`; None for SFT), passed to every step on
  the same mesh.
  Returns (the sum to differentiate, the sums to report): the NLL sum, reported as `loss`,
  or a dict of sums holding it under "loss" beside others (distillation's "kl"). The step
  reports each divided by the global batch's scored tokens.
  """

  def __call__(self, model: Transformer, batch: dict, step: jax.Array,
               frozen: Any) -> tuple[jax.Array, jax.Array | dict[str, jax.Array]]: ...


@dataclasses.dataclass(frozen=True)
class SFTObjective:
  """Next-token NLL on the scored targets, plus `z_loss` x the summed logsumexp^2."""
  loss_chunk: int
  z_loss: float

  def __call__(self, model, batch, step, frozen=None):
    del step, frozen
    nll, z = nll_sums(model, batch, self.loss_chunk)
    return nll + self.z_loss * z, nll


def nll_sums(model: Transformer, batch: dict, loss_chunk: int):
  """(NLL sum, logsumexp^2 sum) of the batch's scored targets, the head applied in chunks."""
  hidden, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                    return_hidden=True)
  return losses.cross_entropy_sums(model.unembed, hidden, batch["targets"], batch["loss_mask"],
                                   chunk=loss_chunk)


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: TrainConfig,
                    objective: Objective | None = None) -> Callable:
  """train_step(state, batch, frozen=None) -> (state, metrics), a pure function to jit.

  The objective (default: SFT with cfg's loss chunk and z-loss) is divided by the scored
  tokens of the whole global batch, so micro-batches sum to the one-batch gradient.
  """
  objective = objective or SFTObjective(cfg.loss_chunk, cfg.z_loss)

  def loss_fn(params, mb, n_scored, step, frozen):
    total, sums = objective(nnx.merge(graphdef, params), mb, step, frozen)
    return total / n_scored, sums if isinstance(sums, dict) else {"loss": sums}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch, frozen=None):
    n_scored = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    k = cfg.micro_batches
    if k == 1:
      (_, sums), grads = grad_fn(state.params, batch, n_scored, state.step, frozen)
    else:
      # Micro-batch j takes rows j, j+k, ...: every device keeps rows of every micro-batch,
      # so splitting needs no communication.
      def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return sharding.shard(x, (None, "batch") + (None,) * (x.ndim - 2))
      micro = jax.tree.map(split, batch)

      def accumulate(carry, mb):
        (_, sums), g = grad_fn(state.params, mb, n_scored, state.step, frozen)
        return jax.tree.map(jnp.add, carry, (sums, g)), None

      reported = jax.eval_shape(  # the objective's sums: a scalar, or a dict of them
          lambda mb: loss_fn(state.params, mb, n_scored, state.step, frozen)[1],
          jax.tree.map(lambda x: x[0], micro))
      zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), reported),
               jax.tree.map(jnp.zeros_like, state.params))
      (sums, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    real = jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))  # all but padding
    return new_state, {**{k: v / n_scored for k, v in sums.items()}, "grad_norm": grad_norm,
                       "scored_tokens": n_scored, "real_tokens": real,
                       "lr": schedule(state.step)}

  return train_step


def make_eval_step(graphdef, cfg: TrainConfig) -> Callable:
  """eval_step(params, batch) -> (nll_sum, n_scored)."""

  def eval_step(params, batch):
    nll, _ = nll_sums(nnx.merge(graphdef, params), batch, cfg.loss_chunk)
    return nll, jnp.sum(batch["loss_mask"].astype(jnp.float32))

  return eval_step


# -- State on the mesh ------------------------------------------------------------------------

def abstract_params(cfg: ModelConfig):
  _, state = nnx.split(abstract_model(cfg))
  return nnx.to_pure_dict(state)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Where a train state lives on the mesh: parameters by the sharding table, optimizer state
  beside its parameters, the step replicated; with the abstract trees a restore needs."""
  abs_params: dict
  abs_opt: Any
  shardings: TrainState  # a NamedSharding for each leaf

  @classmethod
  def of(cls, model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
         mesh) -> StateLayout:
    abs_params = abstract_params(model_cfg)
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return cls(abs_params, abs_opt, TrainState(
        step=replicated, params=sharding.param_shardings(abs_params, mesh),
        opt_state=sharding.opt_state_shardings(abs_opt, abs_params, mesh)))

  def placed(self, step: int, params, opt_state) -> TrainState:
    return TrainState(jax.device_put(jnp.asarray(step, jnp.int32), self.shardings.step),
                      params, opt_state)

  def fresh(self, params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: `params` placed on the mesh and the optimizer state initialised there."""
    params = jax.tree.map(jax.device_put, params, self.shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=self.shardings.opt_state)(params)
    return self.placed(0, params, opt_state)

  def jit(self, train_step: Callable) -> Callable:
    """`make_train_step`'s step compiled for this layout (state donated); called as
    step(state, batch, frozen)."""
    return jax.jit(train_step, in_shardings=(self.shardings, None, None),
                   out_shardings=(self.shardings, None), donate_argnums=0)


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# -- The loop ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Preemption:
  """Set by SIGTERM/SIGINT; the loop checkpoints and returns at the next step boundary."""
  requested: bool = False
  signum: int = 0

  def install(self):
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, self._handle)
    return previous

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signum = True, signum


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


@dataclasses.dataclass
class TrainResult:
  step: int
  params: dict
  last_metrics: dict[str, float]
  preempted: bool = False


def check_finite(step: int, scalars: dict[str, float], ckpt: TrainCheckpointer) -> None:
  """Raises TrainingStopped when a step's loss or gradient norm is NaN or infinite."""
  if math.isfinite(scalars["loss"]) and math.isfinite(scalars["grad_norm"]):
    return
  raise TrainingStopped(
      f"non-finite loss {scalars['loss']} or grad norm {scalars['grad_norm']} at step {step}; "
      f"stopping. The newest checkpoint in {ckpt.root} (steps {ckpt.steps()}) predates it: "
      "lower train.lr, raise train.warmup_ratio, set train.grad_clip, or train in float32 to "
      "find the cause.")


def run(model: Transformer | None, model_cfg: ModelConfig, optim_cfg: OptimConfig,
        cfg: TrainConfig, mesh, data: BatchIterator, workdir: str, *,
        run_config: dict | None = None, eval_data: Callable[[], Iterator] | None = None,
        objective: Objective | None = None, frozen: Any = None,
        log: Callable[[str], None] = logging.info) -> TrainResult:
  """Trains to `cfg.num_steps`, resuming from `workdir` when it holds checkpoints.

  Args:
    model: initial model (already on the mesh) used when there is nothing to resume; None
      when resuming is certain.
    model_cfg, optim_cfg, cfg: typed settings.
    mesh: the device mesh.
    data: per-process batch iterator with get_state/set_state.
    workdir: checkpoints, metrics.jsonl and TensorBoard files go here.
    run_config: the run's full config (JSON-able), stored with each checkpoint.
    eval_data: returns a fresh iterator of validation batches, for the validation loss.
    objective: what the step minimises (default: SFT, `SFTObjective`).
    frozen: arrays held fixed beside the trained model and passed to the objective (e.g. a
      teacher's parameters, placed on `mesh` with `sharding.param_shardings`).
    log: where progress lines go.
  """
  optimizer = make_optimizer(optim_cfg)
  graphdef = nnx.graphdef(abstract_model(model_cfg))
  layout = StateLayout.of(model_cfg, optimizer, mesh)
  p_shard = layout.shardings.params

  ckpt = TrainCheckpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  restored = ckpt.restore_latest(with_shardings(layout.abs_params, p_shard),
                                 with_shardings(layout.abs_opt, layout.shardings.opt_state))
  if restored is not None:
    step, params, opt_state, data_state = restored
    data.set_state(data_state)
    state = layout.placed(step, params, opt_state)
    log(f"resumed from {ckpt.root}/{step} (step {step} of {cfg.num_steps})")
  else:
    if model is None:
      raise ValueError(f"nothing to resume in {workdir} and no initial model given")
    state = layout.fresh(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer)
    step = 0

  train_step = layout.jit(
      make_train_step(graphdef, optimizer, make_schedule(optim_cfg), cfg, objective))
  eval_step = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(p_shard, None))
  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
  tokens_per_step = cfg.global_batch_size * cfg.seq_len
  reporter = metrics.ProgressReporter(
      writer, log, first_step=step + 1, num_steps=cfg.num_steps, log_every=cfg.log_every,
      tokens_per_step=tokens_per_step,
      flops_per_step=metrics.train_flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step,
      peak_flops=metrics.device_peak_flops())
  preemption = _Preemption()
  previous_handlers = preemption.install()
  last: dict[str, float] = {}

  def finish(at_step, step_metrics):
    """Reads a dispatched step's metrics: stop if not finite, else report."""
    nonlocal last
    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    check_finite(at_step, last, ckpt)
    reporter.step_done(at_step, last)

  saved_step = step
  pending = None  # (step, metrics) of the step in flight, read after the next is dispatched
  profile = range(*cfg.profile_steps)
  try:
    with jax.set_mesh(mesh):
      while step < cfg.num_steps and not _any_process(preemption.requested):
        if profile and step == profile.start:
          # The Perfetto JSON beside the XProf trace: tools/profile_summary.py reads it.
          jax.profiler.start_trace(f"{workdir}/profile", create_perfetto_trace=True)
        state, step_metrics = train_step(state, pipeline.make_global_batch(next(data), mesh),
                                         frozen)
        step += 1
        if profile and step == profile.stop:
          jax.profiler.stop_trace()
        if pending is not None:
          finish(*pending)
        pending = (step, step_metrics)
        validate = bool(cfg.eval_every and eval_data and step % cfg.eval_every == 0)
        save = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
        if save or validate:
          finish(*pending)  # a state is saved only after its own step proved finite
          pending = None
        if validate:
          val = _validation_loss(eval_step, state.params, eval_data, mesh, cfg.eval_batches)
          writer.write(step, {"val_loss": val})
          log(f"step {step}: validation loss {val:.4f}")
        if save:
          ckpt.save(step, state.params, state.opt_state, model_cfg, data.get_state(),
                    run_config or {})
          saved_step = step
      if pending is not None:
        finish(*pending)
      if step > saved_step:  # stopped by a signal between checkpoints
        ckpt.save(step, state.params, state.opt_state, model_cfg, data.get_state(),
                  run_config or {})
        log(f"signal {preemption.signum}: checkpointed step {step} to {ckpt.root}; exiting")
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    writer.close()
    ckpt.close()
  return TrainResult(step=step, params=state.params, last_metrics=last,
                     preempted=preemption.requested and step < cfg.num_steps)


def _validation_loss(eval_step, params, eval_data, mesh, max_batches: int) -> float:
  nll, n = 0.0, 0.0
  batches = eval_data()
  try:
    for i, local in enumerate(batches):
      if i >= max_batches:
        break
      b_nll, b_n = eval_step(params, pipeline.make_global_batch(local, mesh))
      nll, n = nll + float(b_nll), n + float(b_n)
  finally:
    if hasattr(batches, "close"):
      batches.close()
  return nll / max(n, 1.0)
