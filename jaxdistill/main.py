"""Entry point: `python -m jaxdistill.main --config=configs/<name>.py --workdir=DIR`.

Flags, multi-process initialisation and logging; the config becomes typed settings
(`jaxdistill.settings`) and the mode picks the application (`APPS`).
Run the same command on every host. Multi-process JAX starts by itself on TPU pods and
SLURM clusters; elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdistill import apps, settings, startup
from jaxdistill.demo import run as demo_run

APPS = {"train": apps.train, "eval": apps.evaluate, "train_and_eval": apps.train_and_eval,
        "distill": apps.distill_traces, "demo": demo_run.main}

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
  startup.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _HEARTBEAT.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
