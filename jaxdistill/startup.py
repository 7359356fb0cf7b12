"""What every application does first: find where the weights come from (a value), build the
mesh, check the settings against model and mesh, load the starting model, write the manifest.

The weight source, first that applies: resume from the workdir's own checkpoints >
init.checkpoint > init.hf_dir > random init of model.preset. A distillation teacher
(distill.teacher_hf_dir or distill.teacher_checkpoint) is a second, frozen source, loaded
afresh by every start (resume included): it is never checkpointed.

Any of the run's paths may be a gs:// URL (`jaxdistill.storage`); `check_storage` stops a run
whose URLs cannot be used before anything is created or compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess

import jax

from jaxdistill import checkpoint, distill, hf, model as model_lib, settings as settings_lib
from jaxdistill import sharding, storage
from jaxdistill.data import builder, chat, sources
from jaxdistill.model import Transformer
from jaxdistill.model_config import EXECUTION_FIELDS, ModelConfig

SOURCE_KINDS = ("resume", "checkpoint", "hf", "random")


def _cluster_detected() -> bool:
  """True under a multi-task SLURM job or on a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout: int = 60) -> None:
  """Starts multi-process JAX: by itself on TPU pods and SLURM, else from the explicit
  coordinator address, process count and index; does nothing for one process. Call it before
  anything touches a device."""
  explicit = coordinator_address is not None
  if not (explicit or _cluster_detected()):
    return
  # Only the CPU backend reads this: multi-process CPU runs (tests, laptops) need gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout)
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """Where a run's weights come from."""
  kind: str  # one of SOURCE_KINDS
  path: str  # the workdir, checkpoint or Hugging Face directory ("" for random)
  step: int | None  # the checkpoint step (resume, checkpoint); None otherwise
  preset: str = ""  # the preset of a random init

  def __str__(self) -> str:
    if self.kind == "resume":
      return f"resume from {self.path} (latest step {self.step})"
    if self.kind == "checkpoint":
      return f"init.checkpoint={self.path} (step {self.step})"
    if self.kind == "hf":
      return f"init.hf_dir={self.path}"
    return f"random init of preset {self.preset!r}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def identity(self, cfg: ModelConfig, seed: int) -> dict:
    """What decides the weights, for the provenance record beside evaluation outputs: a
    checkpoint by its root and step, a Hugging Face directory by its config and each weight
    file's size and header hash (the tensor names, shapes, dtypes and offsets), a random
    init by its config and seed."""
    out = {"kind": self.kind, "model_config": cfg.to_dict()}
    if self.kind in ("resume", "checkpoint"):
      out.update(checkpoint=checkpoint.checkpoint_root(self.path), step=self.step)
    elif self.kind == "hf":
      files = {}
      for name in sorted(storage.listdir(self.path)):
        if name.endswith(".safetensors"):
          path = storage.join(self.path, name)
          with storage.open(path, "rb") as f:
            header = f.read(int.from_bytes(f.read(8), "little"))
          files[name] = {"bytes": storage.size(path),
                         "header_sha256": hashlib.sha256(header).hexdigest()}
      out.update(hf_dir=storage.absolute(self.path), weight_files=files)
    else:
      out.update(seed=seed)
    return out


def find_weight_source(s: settings_lib.Settings, workdir: str) -> tuple[WeightSource,
                                                                         ModelConfig]:
  """The weight source of a run in `workdir` and its model config, with the run's model
  overrides applied."""
  overrides = s.model.overrides()
  ckpt = checkpoint.TrainCheckpointer(workdir, async_save=False)
  try:
    steps = ckpt.steps()
    if steps:
      return (WeightSource("resume", ckpt.root, steps[-1]),
              ckpt.model_config(steps[-1]).replace(**overrides))
  finally:
    ckpt.close()
  if s.init.checkpoint:
    cfg, step = checkpoint.load_model_config(s.init.checkpoint)
    return WeightSource("checkpoint", s.init.checkpoint, step), cfg.replace(**overrides)
  if s.init.hf_dir:
    return (WeightSource("hf", s.init.hf_dir, None),
            ModelConfig.from_hf_config(hf.read_config(s.init.hf_dir), **overrides))
  return WeightSource("random", "", None, s.model.preset), s.model.preset_config()


def load_weights(source: WeightSource, cfg: ModelConfig, mesh, seed: int) -> Transformer:
  """The model `source` names, with config `cfg` (its overrides applied), on `mesh`."""
  overrides = {k: getattr(cfg, k) for k in EXECUTION_FIELDS + (
      "rope_theta", "max_position_embeddings")}
  if source.kind in ("resume", "checkpoint"):
    return checkpoint.load_model(source.path, mesh, step=source.step, **overrides)
  if source.kind == "hf":
    return hf.load_hf_model(source.path, mesh, **overrides)
  return model_lib.create_model(cfg, mesh, seed=seed)


def _recorded_data(source: WeightSource) -> tuple[str, dict]:
  """(tokenizer, data section) that the training run behind a checkpoint recorded."""
  recorded = checkpoint.load_run_config(source.path, source.step)
  data = recorded.get("data", {})
  return data.get("tokenizer") or recorded.get("init", {}).get("hf_dir", ""), data


def with_recorded_tokenizer(s: settings_lib.Settings, source: WeightSource
                            ) -> settings_lib.Settings:
  """`s` with the tokenizer and chat template the training run behind `source` recorded, when
  `s` names no tokenizer and the weights come from a training checkpoint. An explicit
  data.chat_template (not "auto") is kept."""
  if s.data.tokenizer or source.kind not in ("resume", "checkpoint"):
    return s
  tokenizer, data = _recorded_data(source)
  if not tokenizer:
    return s
  template = (s.data.chat_template if s.data.chat_template != "auto"
              else data.get("chat_template", "auto"))
  logging.info("tokenizer %s and chat template %r as recorded by %s", tokenizer, template,
               source)
  return dataclasses.replace(s, data=dataclasses.replace(s.data, tokenizer=tokenizer,
                                                         chat_template=template))


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A distillation run's teacher: its weight source, its config (its own architecture and
  positions, distill.teacher_param_dtype, the student's compute dtype and attention), and
  the tokenizer's ids, over which the KL runs."""
  source: WeightSource
  config: ModelConfig
  vocab_size: int


def teacher_source(s: settings_lib.Settings) -> tuple[WeightSource, ModelConfig]:
  """Where the teacher of `s.distill` comes from, and its config (see `Teacher`)."""
  d, m = s.distill, s.model
  overrides = {**{f: getattr(m, f) for f in EXECUTION_FIELDS},
               "param_dtype": d.teacher_param_dtype,
               "remat": "none"}  # never differentiated: nothing to rematerialise
  if d.teacher_checkpoint:
    cfg, step = checkpoint.load_model_config(d.teacher_checkpoint)
    return WeightSource("checkpoint", d.teacher_checkpoint, step), cfg.replace(**overrides)
  return (WeightSource("hf", d.teacher_hf_dir, None),
          ModelConfig.from_hf_config(hf.read_config(d.teacher_hf_dir), **overrides))


def find_teacher(s: settings_lib.Settings, cfg: ModelConfig, mesh_shape: tuple[int, ...]
                 ) -> Teacher | None:
  """The run's teacher, checked against the student `cfg`, the tokenizer and the mesh before
  any weights load; None without distillation. Raises ConfigError with every problem.

  One tokenizer: when the teacher brings its own (tokenizer files in its Hugging Face
  directory, or the tokenizer its training run recorded), it must be data.tokenizer's
  (`chat.tokenizer_sha256`); either way both output heads must cover data.tokenizer's ids.
  """
  if not s.distill.enabled:
    return None
  source, teacher_cfg = teacher_source(s)
  name = (f"distill.teacher_hf_dir={source.path}" if source.kind == "hf"
          else f"distill.teacher_checkpoint={source.path} (step {source.step})")
  if not s.data.tokenizer:
    raise settings_lib.ConfigError([
        "logit distillation compares the two models id by id over the tokenizer's ids: set "
        "data.tokenizer (or init.hf_dir)"])
  tokenizer = chat.load_tokenizer(s.data.tokenizer)
  problems = []
  theirs = _teacher_tokenizer(source)
  if theirs and chat.tokenizer_sha256(theirs) != chat.tokenizer_sha256(tokenizer):
    problems.append(
        f"the teacher's tokenizer ({theirs.path}, {theirs.vocab_size} ids) is not data."
        f"tokenizer ({s.data.tokenizer}, {tokenizer.vocab_size} ids): logit distillation needs "
        f"one tokenizer; choose a teacher of the student's tokenizer ({name})")
  problems += distill.check_models(cfg, teacher_cfg, tokenizer.vocab_size, s.data.tokenizer,
                                   name, s.data.seq_len, mesh_shape)
  if problems:
    raise settings_lib.ConfigError(problems)
  logging.info("distilling from %s (%s parameters): alpha %g, temperature %g, KL over %d ids",
               name, f"{teacher_cfg.num_params():,}", s.distill.alpha, s.distill.temperature,
               tokenizer.vocab_size)
  return Teacher(source, teacher_cfg, tokenizer.vocab_size)


def _teacher_tokenizer(source: WeightSource) -> chat.Tokenizer | None:
  """The teacher's own tokenizer, when it has one that loads."""
  if source.kind == "hf":
    files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    path = source.path if any(storage.exists(storage.join(source.path, f))
                              for f in files) else ""
  else:
    path, _ = _recorded_data(source)
  if not path:
    return None
  try:
    return chat.load_tokenizer(path)
  except (OSError, ValueError) as e:
    logging.warning("the teacher's tokenizer %s does not load (%s): only the vocabulary "
                    "sizes are checked", path, e)
    return None


@dataclasses.dataclass(frozen=True)
class Run:
  """A started run: its settings, weight source, model config and mesh, and the teacher
  when it distils."""
  settings: settings_lib.Settings
  workdir: str
  source: WeightSource
  model_config: ModelConfig
  mesh: jax.sharding.Mesh
  teacher: Teacher | None = None


def start(s: settings_lib.Settings, workdir: str, model_config: ModelConfig | None = None
          ) -> Run:
  """Compilation cache, weight source, mesh and the checks against model and mesh.

  `model_config` replaces the one the weight source gives (the demo sizes its student's
  vocabulary from the tokenizer it trained).
  """
  check_storage(s, workdir)
  if s.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", s.compilation_cache_dir)
  source, cfg = find_weight_source(s, workdir)
  cfg = model_config or cfg
  mesh = sharding.make_mesh(list(s.mesh_shape))
  settings_lib.check_run(s, cfg, tuple(mesh.shape.values()))
  teacher = find_teacher(s, cfg, tuple(mesh.shape.values()))
  logging.info("mesh %s; model %s, %s parameters; init: %s", sharding.describe(mesh),
               cfg.model_type, f"{cfg.num_params():,}", source)
  return Run(s, workdir, source, cfg, mesh, teacher)


def check_storage(s: settings_lib.Settings, workdir: str) -> None:
  """Stops the run, before anything is created, when one of its gs:// paths cannot be used:
  --workdir must take writes; init.checkpoint, init.hf_dir, data.tokenizer, the distillation
  teacher, data.sources and data.validation_sources must be there, and sources must be of a
  kind read from gs:// (ArrayRecord is not). Local paths are left to fail where they always
  did."""
  storage.check_reachable(workdir, writable=True, what="--workdir")
  for key, path in (("init.checkpoint", s.init.checkpoint), ("init.hf_dir", s.init.hf_dir),
                    ("data.tokenizer", s.data.tokenizer),
                    ("distill.teacher_checkpoint", s.distill.teacher_checkpoint),
                    ("distill.teacher_hf_dir", s.distill.teacher_hf_dir)):
    if path:
      storage.check_reachable(path, what=key)
  for key, spec in (("data.sources", s.data.sources),
                    ("data.validation_sources", s.data.validation_sources)):
    for source in builder.parse_sources(spec) if spec else ():
      if storage.is_url(source.path):
        storage.check_reachable(source.path, what=key)
        try:
          sources.source_files(source.path)
        except (ValueError, FileNotFoundError) as e:
          raise ValueError(f"{key}: {e}") from e


def write_manifest(run: Run, data_fingerprint: str) -> None:
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
      "config": json.loads(run.settings.config_json),
      "model_config": run.model_config.to_dict(),
      "init": str(run.source),
      "weight_source": run.source.to_dict(),
      "git_revision": revision,
      "versions": versions,
      "mesh": dict(run.mesh.shape),
      "process_count": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "data_fingerprint": data_fingerprint,
  }
  if run.teacher is not None:  # reloaded from its source by every start: record what it was
    manifest["distill_teacher"] = dict(
        run.teacher.source.identity(run.teacher.config, run.settings.seed),
        init=str(run.teacher.source), vocab_size=run.teacher.vocab_size)
  storage.makedirs(run.workdir)
  with storage.atomic_write(storage.join(run.workdir, "manifest.json")) as f:
    json.dump(manifest, f, indent=2, default=str)
