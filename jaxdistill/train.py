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
import time
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
  """The trainer's own settings (the `train` section of a run config, typed)."""

  global_batch_size: int = 8
  micro_batches: int = 1
  num_steps: int = 100
  seq_len: int = 2048
  loss_chunk: int = 1024
  z_loss: float = 0.0
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 8
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  profile_steps: tuple[int, int] = (0, 0)
  inject_nan_at_step: int = -1


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

def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: TrainConfig) -> Callable:
  """train_step(state, batch) -> (state, metrics), a pure function to jit."""

  def loss_fn(params, mb, n_scored):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(mb["inputs"], mb["positions"], mb["segment_ids"], return_hidden=True)
    nll, z = losses.cross_entropy_sums(model.unembed, hidden, mb["targets"], mb["loss_mask"],
                                       chunk=cfg.loss_chunk)
    return (nll + cfg.z_loss * z) / n_scored, nll

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    n_scored = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    k = cfg.micro_batches
    if k == 1:
      (_, nll), grads = grad_fn(state.params, batch, n_scored)
    else:
      # Micro-batch j takes rows j, j+k, ...: every device keeps rows of every micro-batch,
      # so splitting needs no communication.
      def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
        return sharding.shard(x, (None, "batch") + (None,) * (x.ndim - 2))
      micro = jax.tree.map(split, batch)

      def accumulate(carry, mb):
        (_, nll), g = grad_fn(state.params, mb, n_scored)
        return (carry[0] + nll, jax.tree.map(jnp.add, carry[1], g)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (nll, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
    loss = nll / n_scored
    if cfg.inject_nan_at_step >= 0:
      poison = jnp.where(state.step == cfg.inject_nan_at_step, jnp.nan, 1.0)
      loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "scored_tokens": n_scored,
                       "lr": schedule(state.step)}

  return train_step


def make_eval_step(graphdef, cfg: TrainConfig) -> Callable:
  """eval_step(params, batch) -> (nll_sum, n_scored)."""

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                      return_hidden=True)
    nll, _ = losses.cross_entropy_sums(model.unembed, hidden, batch["targets"],
                                       batch["loss_mask"], chunk=cfg.loss_chunk)
    return nll, jnp.sum(batch["loss_mask"].astype(jnp.float32))

  return eval_step


# -- State on the mesh ------------------------------------------------------------------------

def _dict_path(keypath) -> str:
  return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def param_shardings(abstract_params, mesh):
  return jax.tree.map_with_path(
      lambda kp, x: jax.sharding.NamedSharding(
          mesh, sharding.param_spec(_dict_path(kp), x.shape, mesh)), abstract_params)


def opt_state_shardings(abstract_opt_state, abstract_params, mesh):
  """Optimizer moments take their parameter's sharding; counters are replicated."""
  by_path = {_dict_path(kp): (x.shape, s) for (kp, x), s in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params),
      jax.tree.leaves(param_shardings(abstract_params, mesh)))}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(kp, x):
    shape, s = by_path.get(_dict_path(kp), (None, None))
    return s if shape == x.shape else replicated

  return jax.tree.map_with_path(pick, abstract_opt_state)


def abstract_params(cfg: ModelConfig):
  _, state = nnx.split(abstract_model(cfg))
  return nnx.to_pure_dict(state)


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


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclasses.dataclass
class TrainResult:
  step: int
  params: dict
  last_metrics: dict[str, float]
  preempted: bool = False


def run(model: Transformer | None, model_cfg: ModelConfig, optim_cfg: OptimConfig,
        cfg: TrainConfig, mesh, data: BatchIterator, workdir: str, *,
        run_config: dict | None = None, eval_data: Callable[[], Iterator] | None = None,
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
    log: where progress lines go.
  """
  optimizer = make_optimizer(optim_cfg)
  schedule = make_schedule(optim_cfg)
  graphdef = nnx.graphdef(abstract_model(model_cfg))
  abs_params = abstract_params(model_cfg)
  p_shard = param_shardings(abs_params, mesh)
  abs_opt = jax.eval_shape(optimizer.init, abs_params)
  o_shard = opt_state_shardings(abs_opt, abs_params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shard = TrainState(step=replicated, params=p_shard, opt_state=o_shard)

  ckpt = TrainCheckpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  restored = ckpt.restore_latest(with_shardings(abs_params, p_shard),
                                 with_shardings(abs_opt, o_shard))
  if restored is not None:
    step, params, opt_state, data_state = restored
    data.set_state(data_state)
    state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), replicated), params,
                       opt_state)
    log(f"resumed from {ckpt.root}/{step} (step {step} of {cfg.num_steps})")
  else:
    if model is None:
      raise ValueError(f"nothing to resume in {workdir} and no initial model given")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, p_shard)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
    step = 0

  train_step = jax.jit(make_train_step(graphdef, optimizer, schedule, cfg),
                       in_shardings=(state_shard, None), out_shardings=(state_shard, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(p_shard, None))
  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
  flops_per_step = metrics.train_flops_per_token(model_cfg, cfg.seq_len) * (
      cfg.global_batch_size * cfg.seq_len)
  peak = metrics.device_peak_flops()
  preemption = _Preemption()
  previous_handlers = preemption.install()
  run_config = run_config or {}

  def save(at_step, state):
    ckpt.save(at_step, state.params, state.opt_state, model_cfg, data.get_state(), run_config)

  last: dict[str, float] = {}
  window = [time.perf_counter(), 0]  # start time, steps since

  def finish(p_step, p_metrics):
    """Checks one step's metrics for NaN/Inf, and logs them on the logging cadence."""
    nonlocal last
    last = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
    if not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])):
      raise TrainingStopped(
          f"non-finite loss {last['loss']} or grad norm {last['grad_norm']} at step {p_step}; "
          f"stopping. The newest checkpoint in {ckpt.root} (steps {ckpt.steps()}) predates "
          "it: lower train.lr, raise train.warmup_ratio, set train.grad_clip, or train in "
          "float32 to find the cause.")
    window[1] += 1
    if p_step % cfg.log_every and p_step not in (first_step, cfg.num_steps):
      return
    now = time.perf_counter()
    step_time = (now - window[0]) / window[1]
    if p_step == first_step:  # its time is mostly compilation: no rate or ETA from it
      writer.write(p_step, last)
      log(f"step {p_step}/{cfg.num_steps} | loss {last['loss']:.4f} | grad "
          f"{last['grad_norm']:.3f} | lr {last['lr']:.2e} | first step with compilation "
          f"{step_time:.1f}s")
      window[0], window[1] = now, 0
      return
    tokens_per_s = cfg.global_batch_size * cfg.seq_len / step_time
    row = dict(last, step_time=step_time, tokens_per_s=tokens_per_s)
    line = (f"step {p_step}/{cfg.num_steps} | loss {last['loss']:.4f} | "
            f"grad {last['grad_norm']:.3f} | lr {last['lr']:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | {step_time * 1e3:.0f} ms/step")
    if peak:
      row["mfu"] = flops_per_step / step_time / (peak * jax.device_count())
      line += f" | MFU {row['mfu']:.1%}"
    line += f" | ETA {_fmt_time(step_time * (cfg.num_steps - p_step))}"
    writer.write(p_step, row)
    log(line)
    window[0], window[1] = now, 0

  saved_step = step
  first_step = step + 1
  pending = None  # (step, metrics) of the step in flight, read after the next is dispatched
  profiling = cfg.profile_steps[1] > cfg.profile_steps[0]
  try:
    with jax.set_mesh(mesh):
      while step < cfg.num_steps and not _any_process(preemption.requested):
        if profiling and step == cfg.profile_steps[0]:
          jax.profiler.start_trace(f"{workdir}/profile")
        state, step_metrics = train_step(state, pipeline.make_global_batch(next(data), mesh))
        step += 1
        if profiling and step == cfg.profile_steps[1]:
          jax.profiler.stop_trace()
        if pending is not None:
          finish(*pending)
        pending = (step, step_metrics)
        evaluate = bool(cfg.eval_every and eval_data and step % cfg.eval_every == 0)
        if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or evaluate:
          finish(*pending)  # a state is saved only after its own step proved finite
          pending = None
          if evaluate:
            val = _validation_loss(eval_step, state.params, eval_data, mesh, cfg.eval_batches)
            writer.write(step, {"val_loss": val})
            log(f"step {step}: validation loss {val:.4f}")
          if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
            save(step, state)
            saved_step = step
      if pending is not None:
        finish(*pending)
      if step > saved_step:  # stopped by a signal between checkpoints
        save(step, state)
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
