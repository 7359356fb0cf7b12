"""Entry point: `python -m jaxdistill.main --config=configs/<name>.py --workdir=DIR`.

Flags, multi-process initialisation and logging; the config becomes typed settings
(`jaxdistill.settings`) and the mode picks the application (`APPS`).
Run the same command on every host. Multi-process JAX starts by itself on TPU pods and
SLURM clusters; elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdistill import apps, settings
from jaxdistill.demo import run as demo_run

APPS = {"train": apps.train, "eval": apps.evaluate, "train_and_eval": apps.train_and_eval,
        "demo": demo_run.main}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/<name>.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds without a peer's heartbeat before the survivors exit "
    "with an error instead of waiting forever in a collective.")
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_detected() -> bool:
  """True under a multi-task SLURM job or on a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def init_distributed() -> None:
  explicit = _COORDINATOR.value is not None
  if not (explicit or _cluster_detected()):
    return
  # Only the CPU backend reads this: multi-process CPU runs (tests, laptops) need gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(heartbeat_timeout_seconds=_HEARTBEAT.value)
  if explicit:
    kwargs.update(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
  jax.distributed.initialize(**kwargs)


class _QuietLibraries(logging.logging.Filter):
  """Keeps Orbax's and Grain's per-save INFO chatter out of the run log (warnings pass)."""

  def filter(self, record):
    if record.levelno >= logging.logging.WARNING:
      return True
    return not any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the application `config.mode` names in `workdir`; returns what it returns."""
  s = settings.parse(config)
  return APPS[s.mode](s, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  init_distributed()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
