"""The config boundary: a run's `ConfigDict` (configs/base.py and its overrides) in, typed
frozen settings out, every problem reported at once.

This module and `jaxdistill/main.py` are the only library code that sees a `ConfigDict`;
everything below them takes the dataclasses here (or the ones they hold: `train.TrainConfig`,
`optimizer.OptimConfig`, `evaluate.EvalConfig`, `builder.DataSettings`,
`distill.DistillConfig`, `traces.TraceConfig`). None of them declares a default:
configs/base.py is the one home of every default (tests/test_layout.py checks).

Two stages of checks, each collecting every problem before raising: `parse` checks what the
config alone decides (names, ranges, divisibility within the config); `check_run` checks it
against the model and the mesh once both are known (heads over tp, batch over data x fsdp,
sequence over the model's positions).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from jaxdistill import evaluate, traces as traces_lib
from jaxdistill.distill import DistillConfig
from jaxdistill.data import builder, formats
from jaxdistill import model_config as model_config_lib
from jaxdistill.model_config import ModelConfig
from jaxdistill.optimizer import OptimConfig
from jaxdistill.train import TrainConfig

MODES = ("train", "eval", "train_and_eval", "distill", "demo")
# Modes that only sample: train.* and data.seq_len are not checked against model and mesh.
SAMPLING_MODES = ("eval", "distill")
# Architecture fields a run may set on a preset (random init only); 0 keeps the preset's.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class InitSettings:
  checkpoint: str  # Orbax checkpoint root, step directory or another run's workdir ("" = none)
  hf_dir: str  # Hugging Face directory ("" = none)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """What a run sets on top of the checkpoint's or the preset's ModelConfig."""
  preset: str
  param_dtype: str
  compute_dtype: str
  remat: str
  attention: str
  attention_block: int
  scan_unroll: int
  rope_theta: float  # 0 = the checkpoint's
  max_position_embeddings: int  # 0 = the checkpoint's
  architecture: tuple[tuple[str, int], ...]  # (ARCHITECTURE_FIELDS name, value) set non-zero

  def overrides(self) -> dict:
    """ModelConfig fields to replace on any weight source (numerics, attention, positions)."""
    out = {f: getattr(self, f) for f in model_config_lib.EXECUTION_FIELDS}
    if self.rope_theta > 0:
      out["rope_theta"] = float(self.rope_theta)
    if self.max_position_embeddings > 0:
      out["max_position_embeddings"] = int(self.max_position_embeddings)
    return out

  def preset_config(self) -> ModelConfig:
    """The preset with the architecture fields and overrides applied (random init)."""
    cfg = model_config_lib.get_preset(self.preset)
    arch = dict(self.architecture)
    if ("d_model" in arch or "num_heads" in arch) and "head_dim" not in arch:
      arch["head_dim"] = arch.get("d_model", cfg.d_model) // arch.get("num_heads", cfg.num_heads)
    return cfg.replace(**arch, **self.overrides())


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """The distillation demo (`mode="demo"`, jaxdistill/demo/run.py; the distill preset's
  fields: jaxdistill/demo/distill.py)."""
  preset: str  # "default" | "long": its training length; "distill": model to model
  num_steps: int  # optimizer steps (train.num_steps or the preset's); distill: the students'
  num_traces: int  # training traces (demo.num_traces or the preset's); distill: problems
  families: tuple[str, ...]
  eval_per_family: int
  data_seed: int
  vocab_size: int
  max_new_tokens: int
  eval_batch_size: int
  maj_k: int
  maj_per_family: int
  maj_temperature: float
  maj_top_p: float
  untrained: bool
  teacher_workdir: str  # distill: the teacher's default-preset run ("" = <workdir>/teacher)
  teacher_num_steps: int  # distill: the default preset's lengths, for a teacher made here
  teacher_num_traces: int
  student: ModelSettings  # distill: the students (preset and architecture; numerics: model.*)


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run, typed. `train.num_steps` and `optim.total_steps` are 0 when the data decides
  the length; the training application fills them in once it has counted the data."""
  mode: str
  seed: int
  init: InitSettings
  model: ModelSettings
  mesh_shape: tuple[int, ...]  # (data, fsdp, context, tp); one entry may be -1
  data: builder.DataSettings
  train: TrainConfig
  optim: OptimConfig
  distill: DistillConfig
  eval: evaluate.EvalConfig
  traces: traces_lib.TraceConfig
  demo: DemoSettings
  compilation_cache_dir: str  # "" = none
  config_json: str  # the whole config, recorded in checkpoints and the manifest

  def with_num_steps(self, num_steps: int) -> Settings:
    return dataclasses.replace(
        self, train=dataclasses.replace(self.train, num_steps=num_steps),
        optim=dataclasses.replace(self.optim, total_steps=num_steps))


class ConfigError(ValueError):
  """A config with problems; the message lists each with what to change."""

  def __init__(self, problems: list[str]):
    super().__init__("Invalid config:\n  - " + "\n  - ".join(problems))
    self.problems = problems


def _unset(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Keys a config file leaves to the command line (`config_dict.placeholder`, still None)."""
  out = []
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _unset(value, f"{prefix}{key}.")
    elif value is None:
      out.append(f"{prefix}{key}")
  return out


def parse(c: ml_collections.ConfigDict) -> Settings:
  """Typed settings of the config `c`; raises ConfigError listing every problem found."""
  missing = _unset(c)
  if missing:  # nothing else can be read from a config with holes
    raise ConfigError([f"{k} has no value: this config takes it on the command line, "
                       f"--config.{k}=..." for k in missing])
  problems: list[str] = []

  def build(fn, *args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ValueError as e:
      problems.append(str(e))
      return None

  if c.mode not in MODES:
    problems.append(f"mode={c.mode!r} is not one of {MODES}")
  m = c.model
  architecture = tuple((f, int(m[f])) for f in ARCHITECTURE_FIELDS if m[f])
  model = ModelSettings(
      preset=m.preset, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
      remat=m.remat, attention=m.attention, attention_block=m.attention_block,
      scan_unroll=int(m.scan_unroll), rope_theta=float(m.rope_theta),
      max_position_embeddings=int(m.max_position_embeddings),
      architecture=architecture)
  problems += _model_problems(model)
  if architecture and (c.init.checkpoint or c.init.hf_dir):
    problems.append(
        f"model.{', model.'.join(f for f, _ in architecture)} change the architecture of a "
        "random init; with init.checkpoint or init.hf_dir the weights decide it: set them "
        "back to 0")
  d = c.data
  if d.format != "auto" and d.format not in formats.FORMATS:
    problems.append(f"data.format={d.format!r} is not 'auto' or one of {formats.FORMATS}")
  format_spec = build(formats.parse_spec, d.fields, d.thinking_open, d.thinking_close,
                      d.system_prompt, d.s1k_variant, prefix="data.")
  data = builder.DataSettings(
      sources=c.data.sources, format=c.data.format, format_spec=format_spec,
      tokenizer=c.data.tokenizer or c.init.hf_dir, chat_template=c.data.chat_template,
      seq_len=c.data.seq_len, packing=c.data.packing, overlong=c.data.overlong,
      shuffle=c.data.shuffle, validation_sources=c.data.validation_sources,
      workers=c.data.workers, prefetch=c.data.prefetch, strict=c.data.strict,
      num_epochs=c.train.num_epochs)
  t = c.train
  demo = _demo(c, model, problems)
  num_steps = demo.num_steps if c.mode == "demo" and demo else t.num_steps
  if num_steps <= 0 and (int(t.num_epochs) != t.num_epochs or t.num_epochs < 1):
    problems.append(f"train.num_epochs={t.num_epochs} must be a whole number >= 1 when "
                    "train.num_steps is 0 (or set train.num_steps)")
  if t.loss_chunk <= 0:
    problems.append(f"train.loss_chunk={t.loss_chunk} must be positive")
  if len(tuple(t.profile_steps)) != 2:
    problems.append(f"train.profile_steps={t.profile_steps} must be (start, stop)")
  train = TrainConfig(
      global_batch_size=t.global_batch_size, micro_batches=t.micro_batches,
      num_steps=max(num_steps, 0), seq_len=c.data.seq_len, loss_chunk=t.loss_chunk,
      z_loss=t.z_loss, log_every=t.log_every, eval_every=t.eval_every,
      eval_batches=t.eval_batches, checkpoint_every=t.checkpoint_every,
      keep_checkpoints=t.keep_checkpoints, async_checkpoints=t.async_checkpoints,
      profile_steps=tuple(t.profile_steps))
  optim = build(OptimConfig, lr=t.lr, warmup_ratio=t.warmup_ratio, schedule=t.schedule,
                end_lr_ratio=t.end_lr_ratio, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
                eps=t.eps, grad_clip=t.grad_clip, total_steps=max(num_steps, 0))
  di = c.distill
  distill = DistillConfig(
      teacher_hf_dir=di.teacher_hf_dir, teacher_checkpoint=di.teacher_checkpoint,
      teacher_param_dtype=di.teacher_param_dtype, alpha=float(di.alpha),
      temperature=float(di.temperature))
  problems += distill.problems(c.mode)
  e = c.eval
  if e.compute_dtype not in ("float32", "bfloat16") or e.cache_dtype not in ("float32",
                                                                            "bfloat16"):
    problems.append(f"eval.compute_dtype={e.compute_dtype!r} and eval.cache_dtype="
                    f"{e.cache_dtype!r} must each be float32 or bfloat16")
  budgets = ()
  try:
    budgets = tuple(int(x) for x in str(e.thinking_budgets).split(",") if x.strip())
  except ValueError:
    problems.append(f"eval.thinking_budgets={e.thinking_budgets!r} is not a comma-separated "
                    "list of token counts (e.g. \"512,1024,2048\"; \"\" = none)")
  ev = build(evaluate.EvalConfig,
             tasks=tuple(x.strip() for x in e.tasks.split(",") if x.strip()),
             num_samples=e.num_samples, temperature=e.temperature, top_p=e.top_p,
             top_k=e.top_k, max_new_tokens=e.max_new_tokens, greedy=e.greedy,
             batch_size=e.batch_size, samples_at_once=e.samples_at_once, limit=e.limit,
             instruction=e.instruction, seed=e.seed, compute_dtype=e.compute_dtype,
             cache_dtype=e.cache_dtype, grading_workers=e.grading_workers, restart=e.restart,
             think_end=e.think_end, answer_cue=e.answer_cue,
             max_thinking_tokens=e.max_thinking_tokens,
             min_thinking_tokens=e.min_thinking_tokens, wait_text=e.wait_text,
             max_waits=e.max_waits, thinking_budgets=budgets)
  tr = c.traces
  trace_cfg = traces_lib.TraceConfig(
      problems_file=tr.problems_file, field_map=build(traces_lib.parse_fields, tr.fields) or {},
      answer_kind=tr.answer_kind, num_samples=tr.num_samples, keep=tr.keep, k=tr.k,
      decontaminate=tr.decontaminate, output=tr.output)
  problems += trace_cfg.problems(c.mode, e.samples_at_once)
  if c.mode == "distill" and not (c.init.hf_dir or c.init.checkpoint):
    problems.append("mode='distill' samples a teacher: set init.hf_dir or init.checkpoint "
                    "(a random init writes no trace worth keeping)")
  if problems:
    raise ConfigError(problems)
  return Settings(
      mode=c.mode, seed=c.seed, init=InitSettings(c.init.checkpoint, c.init.hf_dir),
      model=model, mesh_shape=tuple(c.mesh.shape), data=data, train=train, optim=optim,
      distill=distill, eval=ev, traces=trace_cfg, demo=demo,
      compilation_cache_dir=os.path.expanduser(t.compilation_cache_dir)
      if t.compilation_cache_dir else "", config_json=c.to_json_best_effort(sort_keys=True))


def _model_problems(m: ModelSettings) -> list[str]:
  problems = []
  dtypes = ("float32", "bfloat16")
  for name in ("param_dtype", "compute_dtype"):
    if getattr(m, name) not in dtypes:
      problems.append(f"model.{name}={getattr(m, name)!r} is not one of {dtypes}")
  if m.remat not in model_config_lib.REMAT_POLICIES:
    problems.append(f"model.remat={m.remat!r} is not one of {model_config_lib.REMAT_POLICIES}")
  if m.attention not in model_config_lib.ATTENTION_IMPLS:
    problems.append(f"model.attention={m.attention!r} is not one of "
                    f"{model_config_lib.ATTENTION_IMPLS}")
  if m.attention_block < 0 or m.attention_block % 16:
    problems.append(f"model.attention_block={m.attention_block} must be 0 (the platform's "
                    "default: 256 on CPU, 512 on accelerators) or a positive multiple of 16")
  if m.scan_unroll < 1:
    problems.append(f"model.scan_unroll={m.scan_unroll} must be at least 1 (1: one layer per "
                    "iteration of the scan over layers)")
  if m.preset not in model_config_lib.PRESETS:
    problems.append(f"model.preset={m.preset!r} is not one of {sorted(model_config_lib.PRESETS)}")
  elif m.architecture:
    try:
      m.preset_config()
    except ValueError as e:
      problems.append(f"model.* on preset {m.preset!r}: {e}")
  return problems


def _demo(c: ml_collections.ConfigDict, model: ModelSettings, problems: list[str]
          ) -> DemoSettings | None:
  d = c.demo
  if d.preset not in d.presets:
    problems.append(f"demo.preset={d.preset!r} is not one of {sorted(d.presets)}")
    return None
  preset = d.presets[d.preset]
  st = d.student
  student = dataclasses.replace(model, preset=st.preset, architecture=tuple(
      (f, int(st[f])) for f in ARCHITECTURE_FIELDS if st[f]))
  if d.preset == "distill":
    if st.preset not in model_config_lib.PRESETS:
      problems.append(f"demo.student.preset={st.preset!r} is not one of "
                      f"{sorted(model_config_lib.PRESETS)}")
    elif student.architecture:
      try:
        student.preset_config()
      except ValueError as e:
        problems.append(f"demo.student.* on preset {st.preset!r}: {e}")
  return DemoSettings(
      preset=d.preset, num_steps=c.train.num_steps or preset.num_steps,
      num_traces=d.num_traces or preset.num_traces,
      families=tuple(f.strip() for f in d.families.split(",") if f.strip()),
      eval_per_family=d.eval_per_family, data_seed=d.data_seed, vocab_size=d.vocab_size,
      max_new_tokens=d.max_new_tokens, eval_batch_size=d.eval_batch_size, maj_k=d.maj_k,
      maj_per_family=d.maj_per_family, maj_temperature=d.maj_temperature,
      maj_top_p=d.maj_top_p, untrained=d.untrained, teacher_workdir=d.teacher_workdir,
      teacher_num_steps=d.presets.default.num_steps,
      teacher_num_traces=d.presets.default.num_traces, student=student)


def check_run(s: Settings, cfg: ModelConfig, mesh_shape: tuple[int, ...]) -> None:
  """Checks the settings against the model and the mesh, every problem at once, before
  anything compiles. `mesh_shape` is the resolved (data, fsdp, context, tp)."""
  problems = []
  data, fsdp, context, tp = mesh_shape
  dp = data * fsdp
  micro = s.train.micro_batches
  if s.mode not in SAMPLING_MODES:
    if s.train.global_batch_size % (dp * micro):
      problems.append(
          f"train.global_batch_size={s.train.global_batch_size} is not divisible by data x "
          f"fsdp ({dp}) x train.micro_batches ({micro}) = {dp * micro}; make it a multiple of "
          f"{dp * micro}")
    if s.data.seq_len % (2 * context):
      problems.append(f"data.seq_len={s.data.seq_len} is not divisible by 2 x mesh context "
                      f"({2 * context}): context parallelism splits each row into that many "
                      "chunks; choose a seq_len that is a multiple of it")
    if s.data.seq_len > cfg.max_position_embeddings:
      problems.append(
          f"data.seq_len={s.data.seq_len} exceeds the model's max_position_embeddings="
          f"{cfg.max_position_embeddings}; lower data.seq_len or raise "
          "model.max_position_embeddings (and model.rope_theta, for long-trace SFT)")
  if cfg.num_heads % tp:
    problems.append(f"the model's {cfg.num_heads} attention heads are not divisible by "
                    f"mesh tp={tp}; choose tp dividing {cfg.num_heads}")
  if problems:
    raise ConfigError(problems)
