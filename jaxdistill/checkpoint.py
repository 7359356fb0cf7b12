"""Orbax checkpoints: model-only checkpoints, full train-state checkpoints, and restoring onto a mesh.

Layout (shared with the trainer, which adds its own items beside these):
  <root>/<step>/params        the parameter tree (nnx pure dict), restorable on any mesh
  <root>/<step>/model_config  ModelConfig as JSON
A training workdir keeps its root at `<workdir>/checkpoints`. Any of these may be a gs://
URL (Orbax writes through epath and tensorstore; `storage` for the rest).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxdistill import storage
from jaxdistill.model import Transformer, abstract_model
from jaxdistill.model_config import ModelConfig
from jaxdistill.sharding import param_shardings

PARAMS = "params"
MODEL_CONFIG = "model_config"
OPT_STATE = "opt_state"
DATA_STATE = "data_state"
RUN_CONFIG = "run_config"

# Orbax writes an array held whole by R replicas (data-parallel parameters, the optimizer
# state) replica-parallel: each replica writes 1/R of it, sliced on device first, by one small
# compiled program per shape. For small arrays that is all cost: the first save of 40
# replicated [64..103, 96] arrays on 4 CPU devices took 4.6 s against 0.07 s unsliced. Slices
# under this size are written whole by one replica; large arrays keep the parallel write.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


class _WithoutOverrideNotice(logging.Filter):
  """Drops Orbax's warning that a handler overrides jax.Array's: here that is the intent, and
  every process that imports this module would print it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "overriding" not in record.getMessage()


def _register_array_handler() -> None:
  default = ocp.type_handlers.get_type_handler(jax.Array)
  quiet = _WithoutOverrideNotice()
  absl_logger = logging.getLogger("absl")  # Orbax logs through absl's logger
  absl_logger.addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(default, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)
  finally:
    absl_logger.removeFilter(quiet)


_register_array_handler()


def checkpoint_root(path: str) -> str:
  """The CheckpointManager root for a workdir, a root, or a step directory."""
  path = storage.absolute(path)
  if storage.isdir(storage.join(path, "checkpoints")):
    return storage.join(path, "checkpoints")
  if storage.isdir(storage.join(path, PARAMS)):  # a step directory
    return storage.dirname(path)
  return path


def _step_of(path: str) -> int | None:
  path = storage.absolute(path)
  if storage.isdir(storage.join(path, PARAMS)):
    try:
      return int(storage.basename(path))
    except ValueError:
      return None
  return None


def save_model(directory: str, model: Transformer, step: int = 0) -> str:
  """Saves parameters and config as checkpoint `step` under `directory` (a root)."""
  with ocp.CheckpointManager(storage.absolute(directory)) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        MODEL_CONFIG: ocp.args.JsonSave(model.config.to_dict()),
    }))
    mngr.wait_until_finished()
  return storage.join(storage.absolute(directory), str(step))


def _pick_step(mngr, root: str, step: int | None) -> int:
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoints under {root}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no step {step} under {root}; available: {steps}")
  return step


def load_model_config(path: str, step: int | None = None) -> tuple[ModelConfig, int]:
  """(ModelConfig, step) stored with a checkpoint; `path` as in `load_model`."""
  root = checkpoint_root(path)
  step = step if step is not None else _step_of(path)
  if not storage.isdir(root):
    raise FileNotFoundError(f"no checkpoint directory at {root}")
  with ocp.CheckpointManager(root) as mngr:
    step = _pick_step(mngr, root, step)
    got = mngr.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
  return ModelConfig.from_dict(got[MODEL_CONFIG]), step


def load_run_config(path: str, step: int) -> dict:
  """The run config a training checkpoint recorded (`{}` for a model-only checkpoint)."""
  root = checkpoint_root(path)
  if not storage.exists(storage.join(root, str(step), RUN_CONFIG)):
    return {}
  with ocp.CheckpointManager(root) as mngr:
    got = mngr.restore(step, args=ocp.args.Composite(**{RUN_CONFIG: ocp.args.JsonRestore()}))
  return got[RUN_CONFIG] or {}


def load_model(path: str, mesh=None, step: int | None = None, **config_overrides) -> Transformer:
  """Restores a model from a workdir, checkpoint root or step directory.

  Args:
    path: workdir (uses `checkpoints/`), checkpoint root, or one step's directory.
    mesh: restore sharded onto this mesh (any shape: Orbax reshards); None = first device.
    step: which step (default: the one `path` names, else the latest).
    **config_overrides: ModelConfig fields to change, e.g. `param_dtype="bfloat16"`.
  """
  cfg, step = load_model_config(path, step)
  cfg = cfg.replace(**config_overrides)
  root = checkpoint_root(path)
  logging.info("restoring step %d from %s", step, root)
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state)
  else:
    shardings = param_shardings(abstract_state, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  with ocp.CheckpointManager(root) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(nnx.to_pure_dict(target))}))[PARAMS]
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)




def _all_process_states(state: dict) -> dict:
  """Every process's data-iterator state, gathered so process 0 writes them all."""
  if jax.process_count() == 1:
    return {"process_count": 1, "states": [state]}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return {"process_count": jax.process_count(),
          "states": [json.loads(bytes(blobs[i, :int(lengths[i, 0])])) for i in range(len(blobs))]}


def _own_state(saved: dict, root: str, step: int) -> dict:
  if saved.get("process_count") != jax.process_count():
    raise ValueError(
        f"checkpoint {root}/{step} holds the data position of {saved.get('process_count')} "
        f"processes, but this run has {jax.process_count()}: each process's place in the data "
        "stream depends on the process count. Resume with the same number of processes (the "
        "mesh may differ), or start a new workdir with init.checkpoint pointing at this one.")
  return saved["states"][jax.process_index()]


class TrainCheckpointer:
  """One CheckpointManager under `<workdir>/checkpoints` holding the whole train state.

  Each step holds `params` and `model_config` (so `load_model` and the converter read a
  training workdir directly), plus `opt_state`, the data-iterator state and the run config.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.root = storage.join(storage.absolute(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.root, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt_state, model_config: ModelConfig, data_state: dict,
           run_config: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        MODEL_CONFIG: ocp.args.JsonSave(model_config.to_dict()),
        DATA_STATE: ocp.args.JsonSave(_all_process_states(data_state)),
        RUN_CONFIG: ocp.args.JsonSave(run_config),
    }), force=True)

  def model_config(self, step: int) -> ModelConfig:
    got = self.manager.restore(step, args=ocp.args.Composite(
        **{MODEL_CONFIG: ocp.args.JsonRestore()}))
    return ModelConfig.from_dict(got[MODEL_CONFIG])

  def restore_latest(self, abstract_params, abstract_opt_state):
    """(step, params, opt_state, data_state) of the newest readable checkpoint, or None.

    An unreadable newest checkpoint (a crash mid-write on a filesystem without atomic
    renames, a lost file) falls back to the one before it, with a warning.
    """
    unreadable = []
    for step in reversed(self.steps()):
      try:
        got = self.manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract_params),
            OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
            DATA_STATE: ocp.args.JsonRestore(),
        }))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d under %s is unreadable (%s: %s); trying the one "
                        "before it", step, self.root, type(e).__name__, str(e)[:300])
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      return step, got[PARAMS], got[OPT_STATE], _own_state(got[DATA_STATE], self.root, step)
    if unreadable:
      raise RuntimeError(f"no readable checkpoint under {self.root} (tried steps "
                         f"{unreadable}); move the directory away to start afresh")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps to `<workdir>/checkpoints.unreadable/`, so training can write
    those steps again and the files stay for inspection."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.root + ".unreadable"
      storage.makedirs(aside)
      for step in steps:
        storage.move(storage.join(self.root, str(step)),
                     storage.join(aside, f"{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("jaxdistill_set_aside_checkpoints")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
