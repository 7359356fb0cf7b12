"""Memory planner: per-device bytes of a training step and of evaluation, from shapes alone.

Pure functions of a `ModelConfig`, the run's batch/sequence settings and the mesh shape. The
parameters are the model's own (`nnx.eval_shape`, once per architecture) laid out by
`sharding.param_shardings` on a device-less mesh; the rest is arithmetic on shapes, so
`tools/plan.py` can try thousands of candidate settings in a second.

A training step holds its parameters, AdamW mu and nu, the batch and the gradients
throughout (`Estimate.held`), plus the largest of these moments (`Estimate.moments`):
  layer backward, MLP:       every layer's saved activations + one layer's recomputed
                             forward and its MLP gradients (+ FSDP-gathered weights);
  layer backward, attention: saved activations + the attention backward's temporaries;
  loss backward:             saved activations + one loss chunk's logits and gradient;
  optimizer update:          one more parameter-sized buffer (the AdamW update).
Evaluation holds the parameters and the KV cache (and the decode step's copies of it).

Where the numbers come from. Parameters, optimizer state and gradients are counted exactly
from the model's abstract parameters and `sharding.param_shardings`; the tests check them
against the compiled step's argument bytes. The rest was measured: `tests/test_plan.py`
compiles the real train step (`train.make_train_step`) and the sampler's decode step on small
configs on 8 simulated CPU devices and requires this estimate to lie within 20% of XLA's
`compiled.memory_analysis()` (arguments + outputs that are not aliases + temporaries). The
counts below (how many [B, T, F] buffers a policy keeps, how many score-sized buffers dense
attention's backward holds, ...) were read off the buffer assignments of those compilations
(`XLA_FLAGS=--xla_dump_to=DIR`, `*memory-usage-report.txt`). Over a sweep of 79 fp32 configs
(remat none / full / save_dots / save_dots_no_batch, dense and blockwise attention, fsdp, tp,
context parallelism, micro-batches, loss-dominated and MLP-dominated shapes) the estimate was
0.86x-1.08x of XLA's figure (bf16 compute, 19 configs: 0.80x-1.09x; XLA:CPU emulates bf16
in fp32 and keeps more fp32 buffers than followed here). They are XLA:CPU's choices: the
GPU and TPU compilers fuse, schedule (FSDP gathers ahead of use) and allocate differently,
and fused attention kernels cannot be compiled on CPU, so their terms and the GPU/TPU FSDP
term are reasoned, not measured. Keep a margin.

Shape letters follow model.py: B batch rows (per device, per micro-batch), T sequence,
D model, N/K query/kv heads, H head dim, F MLP hidden, V vocab, L layers, C loss chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
from flax import nnx

from jaxdistill import attention, distill, hardware, model, settings as settings_lib, sharding
from jaxdistill.hardware import Chip
from jaxdistill.model_config import ModelConfig

GiB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2}


# -- Inputs -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainShape:
  """The train-step settings that decide memory (the run config's train/data fields)."""
  global_batch_size: int
  seq_len: int
  micro_batches: int = 1
  loss_chunk: int = 1024


@dataclasses.dataclass(frozen=True)
class EvalShape:
  """What the sampler holds during evaluation (the run config's eval section)."""
  batch_size: int = 8  # sampler slots decoding at once
  num_samples: int = 64  # samples per prompt
  samples_at_once: int = 0  # rows per slot: samples of one prompt decoding together (0 = all)
  max_new_tokens: int = 32768
  prompt_len: int = 256  # the prompt bucket (a power of two above the longest prompt)
  compute_dtype: str = "float32"
  cache_dtype: str = "float32"


def resolve_mesh(shape: Sequence[int], devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, context, tp) with a -1 entry replaced, as sharding.make_mesh does."""
  shape = list(shape)
  if len(shape) != 4 or shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} must have 4 entries, at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if devices % known:
      raise ValueError(f"mesh shape {shape}: {devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = devices // known
  if math.prod(shape) != devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, not {devices}")
  return tuple(shape)


# -- Parameters -------------------------------------------------------------------------------

def param_bytes(cfg: ModelConfig, mesh: tuple[int, ...], dtype: str | None = None,
                layers_only: bool = False) -> int:
  """Bytes of the parameters on one device (in `dtype`, default the param dtype): the model's
  own abstract parameters laid out by `sharding.param_shardings` on a device-less mesh.
  Raises ValueError (naming the parameter) when the mesh does not divide one."""
  elements = _elements(_shape_config(cfg), tuple(mesh), layers_only)
  return elements * _BYTES[dtype or cfg.param_dtype]


def _shape_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with fields that never change a parameter's shape set to fixed values: suggest()
  varies remat and attention per candidate, and the caches below should hold one entry per
  architecture, not one per candidate (each entry costs an `nnx.eval_shape`)."""
  return cfg.replace(remat="none", attention="auto", attention_block=0,
                     scan_unroll=1, compute_dtype="float32", param_dtype="float32")


@functools.lru_cache(maxsize=64)
def _abstract_params(cfg: ModelConfig) -> dict:
  """The model's parameters as ShapeDtypeStructs (`nnx.eval_shape`: traced, never built)."""
  return nnx.to_pure_dict(nnx.state(model.abstract_model(cfg), nnx.Param))


@functools.lru_cache(maxsize=4096)
def _elements(cfg: ModelConfig, mesh: tuple[int, ...], layers_only: bool) -> int:
  params = _abstract_params(cfg)
  shardings = sharding.param_shardings(params, sharding.abstract_mesh(mesh))
  return sum(math.prod(s.shard_shape(x.shape)) for (kp, x), s in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings))
             if not layers_only or sharding.path_str(kp).startswith("layers/"))


# -- The estimate -----------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
  """Per-device bytes: what is held throughout, plus the largest of the step's moments."""
  held: dict[str, int]  # live for the whole step
  moments: dict[str, dict[str, int]]  # moment -> its terms; only one moment is live at a time
  notes: list[str] = dataclasses.field(default_factory=list)
  problems: list[str] = dataclasses.field(default_factory=list)  # settings that cannot run

  @property
  def phase(self) -> str:
    """The moment of the peak."""
    return max(self.moments, key=lambda m: sum(self.moments[m].values()), default="")

  @property
  def peak(self) -> int:
    top = max((sum(m.values()) for m in self.moments.values()), default=0)
    return sum(self.held.values()) + top

  def fits(self, hbm_bytes: int, margin: float) -> bool:
    return not self.problems and self.peak <= hbm_bytes * (1 - margin)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), peak=self.peak, phase=self.phase)


# Coefficients measured on XLA:CPU (see the module docstring and tests/test_plan.py).
# Dense attention's backward holds about this many fp32 [B, N, T, T] score-sized buffers
# (scores, probabilities, their gradient) besides the boolean mask.
_DENSE_BWD_SCORES = 3.0
# Without remat, the MLP backward's fresh gradient buffers, in [B, T, F] and [B, T, D] units.
_MLP_BWD_BTF = 6
_MLP_BWD_BTD = 2
# A loss chunk's backward holds its fp32 logits [B, C, V] and their gradient (and both again
# in the compute dtype when that is not fp32: the head's output and the gradient into it).
_LOSS_CHUNK_FP32 = 2.0


def estimate_train(cfg: ModelConfig, shape: TrainShape, mesh: tuple[int, int, int, int],
                   platform: str = "gpu", teacher: ModelConfig | None = None) -> Estimate:
  """Per-device memory of one training step (train.make_train_step, AdamW, donated state).

  Args:
    cfg: the model (its remat, attention, dtypes).
    shape: batch, sequence, micro-batches and loss chunk.
    mesh: (data, fsdp, context, tp) sizes, resolved (no -1).
    platform: "gpu" | "tpu" | "cpu", for what attention="auto" resolves to.
    teacher: a logit-distillation teacher's config (its param dtype), when there is one
      (`distill.memory_terms`).
  Returns:
    An Estimate; `problems` lists settings the trainer would refuse.
  """
  data, fsdp, context, tp = mesh
  problems = []
  dp = data * fsdp
  micro = shape.micro_batches
  if shape.global_batch_size % (dp * micro):  # worded as settings.check_run words it
    problems.append(
        f"train.global_batch_size={shape.global_batch_size} is not divisible by data x fsdp "
        f"({dp}) x train.micro_batches ({micro}) = {dp * micro}; make it a multiple of "
        f"{dp * micro}")
  if cfg.num_heads % tp:
    problems.append(f"the model's {cfg.num_heads} attention heads are not divisible by "
                    f"mesh tp={tp}; choose tp dividing {cfg.num_heads}")
  if shape.seq_len % (2 * context):
    problems.append(f"data.seq_len={shape.seq_len} is not divisible by 2 x context "
                    f"({2 * context}): context parallelism splits rows into 2 x context chunks")
  try:
    params = param_bytes(cfg, mesh)
    layer_params_full = param_bytes(cfg, (1, 1, 1, tp), layers_only=True) // cfg.num_layers
  except ValueError as e:
    problems.append(str(e))
    return Estimate({}, {}, problems=problems)
  rows = max(1, shape.global_batch_size // dp)  # rows per device per step
  b = max(1, rows // shape.micro_batches)  # rows per device per micro-batch
  t_full = shape.seq_len
  t = t_full // context
  c = _BYTES[cfg.compute_dtype]
  p = _BYTES[cfg.param_dtype]
  d, h = cfg.d_model, cfg.head_dim
  n = cfg.num_heads // tp if cfg.num_heads % tp == 0 else cfg.num_heads
  kvh = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
  f = cfg.mlp_dim // tp
  v = cfg.vocab_size // tp
  impl = attention.resolve(cfg.attention, t_full, platform, context)

  btd, btd32 = b * t * d * c, b * t * d * 4
  btf = b * t * f * c
  btq = b * t * n * h * c
  btk = b * t * kvh * h * c
  scores = b * n * t * t_full  # elements of one layer's [B, N, T, S] scores

  # What one layer keeps for the backward pass, by policy (jax.checkpoint_policies): the
  # layer input is always kept (the scan carry); dots_with_no_batch_dims are the weight
  # matmuls q, k, v, o, gate, up, down; dots_saveable adds the attention matmuls when they
  # are visible to the policy (dense only: fused and blockwise attention are custom calls).
  # XLA:CPU has no bf16 arithmetic: it computes in fp32 and keeps many bf16 results (the
  # saved matmul outputs, silu parts, norms, residual sums) in fp32 (measured: bf16 buffer
  # dumps); GPUs and TPUs keep them in bf16. `e` is the bytes of those.
  e = 4 if platform == "cpu" else c
  btf_e, btd_e = b * t * f * e, b * t * d * e
  projections = (btq + 2 * btk) // c * e + 2 * btd_e + 2 * btf_e
  if impl == "dense":
    attn_keep_none = scores * (4 + c) + 2 * btq + 2 * btk  # masked scores f32, probs, q, k, v
    attn_dots = scores * 4 + btq
  elif impl in ("blockwise", "context"):
    # q, k, v and the output in the blocked layout, lse, and the output unblocked again
    attn_keep_none = 3 * btq + 2 * btk + b * n * t * 4
    attn_dots = 0
  else:  # fused kernels keep K and V repeated to every query head
    attn_keep_none = 5 * btq + b * n * t * 4
    attn_dots = 0
  # Without remat every intermediate stays: 6 [B,T,F] (gate, up, silu parts, product),
  # 7 [B,T,D] in the compute dtype and the two RMSNorm inputs in fp32, the attention
  # residuals, and each layer's weights cast to the compute dtype when that is a copy (the
  # cast of the local shard; XLA gathers FSDP weights again in the backward, measured).
  cast_weights = layer_params_full // p * c // fsdp if c != p else 0
  keep_none = (2 * btf + 4 * btf_e + 2 * btd + 5 * btd_e + 2 * btd32 + attn_keep_none
               + cast_weights)
  remat = cfg.remat
  if remat == "offload_dots" and platform == "cpu":
    remat = "save_dots_no_batch"  # host memory is device memory: nothing moves
  keep = {
      "none": keep_none,
      "full": btd,
      "save_dots_no_batch": btd + projections,
      "save_dots": btd + projections + attn_dots,
      "offload_dots": btd,
  }[remat]
  saved = cfg.num_layers * keep

  # One layer's backward has two high points. Right after its forward is recomputed, every
  # residual the policy did not keep is live; the MLP's gradients then reuse those buffers as
  # they are consumed. Without remat the residuals sit in [L, ...] stacks that stay whole
  # until the loop ends, so the backward needs fresh buffers: about as many [B,T,F] as the
  # forward made (measured). Later, the attention backward: dense attention holds about
  # three fp32 score-sized buffers (scores, probabilities, their gradient) and the boolean
  # masks; the other implementations hold fp32 dq, dk, dv and a few block tiles.
  recompute = 0 if remat == "none" else keep_none - keep
  mlp_temps = _MLP_BWD_BTF * btf_e if remat == "none" else 0
  mlp_moment = recompute + mlp_temps + _MLP_BWD_BTD * btd
  if impl == "dense":
    attn_temps = int(_DENSE_BWD_SCORES * scores * 4) + scores + b * t * t_full
  elif impl == "blockwise":
    block = min(attention.block_size(cfg.attention_block, platform), t_full)
    attn_temps = 4 * b * n * block * block * 4 + btq // c * 4 + 2 * btk // c * 4 + b * n * t * 4
  elif impl == "context":
    block = min(attention.block_size(cfg.attention_block, platform), t_full)
    kv_heads = kvh if cfg.num_kv_heads % tp == 0 else n  # replicated kv heads are repeated
    gathered_kv = 2 * b * t_full * kv_heads * h * c
    attn_temps = (gathered_kv + gathered_kv // c * 4  # K, V of the whole sequence, dK, dV
                  + 4 * b * n * block * block * 4 + btq // c * 4 + b * n * t * 4)
  else:  # fused kernels repeat K and V to every query head (attention._repeat_kv); their
    # backward writes dq, dk, dv over all heads; the score tiles live on chip (not measured)
    attn_temps = 2 * btq + 3 * btq // c * 4 + b * n * t * 4
  attention_moment = attn_temps + 2 * btq + 2 * btk + 4 * btd
  # FSDP gathers each layer's weights whole (XLA gathers the param dtype, then casts) and
  # makes its gradient whole before reducing it. On XLA:CPU that costs about one layer's
  # weights beyond the unsharded run (measured). GPU and TPU compilers gather the next
  # layer while this one computes: counted as two gathered layers and one whole gradient.
  fsdp_layer = 0
  if fsdp > 1:
    fsdp_layer = layer_params_full * (1 if platform == "cpu" else 3)

  # The loss: per chunk of C tokens [B, C, V] logits in fp32 and their gradient; with FSDP
  # the output head is gathered whole for the chunk loop and its gradient accumulated whole.
  chunk = min(shape.loss_chunk, t_full)
  if context > 1:  # each chunk takes chunk / context tokens from every device (losses.py)
    chunk = math.gcd(t, max(1, chunk // context))
  loss = int(_LOSS_CHUNK_FP32 * b * chunk * v * 4) + (2 * b * chunk * v * c if c != 4 else 0)
  head = d * v  # the output head's elements on one device once gathered
  head_gather = head * c + head * p if fsdp > 1 else 0

  saved_name = f"saved activations, {cfg.num_layers} layers (remat={cfg.remat})"
  gathers = {"FSDP-gathered layer weights and gradient": fsdp_layer} if fsdp_layer else {}
  if remat == "offload_dots":
    gathers["host transfer buffers"] = 2 * projections
  moments = {
      "layer backward, MLP": {saved_name: saved,
                              ("MLP gradients" if remat == "none" else
                               "one layer recomputed + gradients"): mlp_moment,
                              **gathers},
      "layer backward, attention": {saved_name: saved,
                                    f"attention backward ({impl})": attention_moment,
                                    **gathers},
      "loss backward": {saved_name: saved, f"loss chunk of {chunk} tokens": loss,
                        "final hidden states": btd32,
                        **({"FSDP-gathered output head and gradient": head_gather}
                           if head_gather else {})},
      "optimizer update": {"AdamW update": params},
  }
  held = {
      f"parameters ({cfg.param_dtype})": params,
      f"AdamW mu, nu ({cfg.param_dtype})": 2 * params,
      "gradients" + (" + accumulator" if shape.micro_batches > 1 else ""):
          params * (2 if shape.micro_batches > 1 else 1),
      "batch": rows * t_full * (4 * 4 + 1),  # inputs, targets, positions, segments, mask
  }
  if teacher is not None:
    if teacher.num_heads % tp:
      problems.append(f"the teacher's {teacher.num_heads} attention heads are not divisible "
                      f"by mesh tp={tp}; choose tp dividing both models' heads")
    try:
      gathered = param_bytes(teacher, (1, 1, 1, tp), layers_only=True) // teacher.num_layers
      held_t, loss_t, forward_t = distill.memory_terms(
          teacher, rows=b, seq=t, seq_full=t_full, chunk=chunk, tp=tp, fsdp=fsdp, act_bytes=e,
          dense=impl == "dense", params=param_bytes(teacher, mesh),
          gathered_layer=gathered if fsdp > 1 else 0)
      held.update(held_t)
      moments["loss backward"].update(loss_t)
      moments["teacher forward"] = {saved_name: saved, **forward_t}
    except ValueError as err:
      problems.append(f"the teacher: {err}")
  notes = [f"{b} row(s) x {t} tokens per micro-batch, attention {impl}"]
  if cfg.remat == "offload_dots" and platform != "cpu":
    notes.append(f"offload_dots keeps {_fmt(cfg.num_layers * projections)} per device in "
                 "host memory")
  return Estimate(held, moments, notes, problems)


def estimate_eval(cfg: ModelConfig, shape: EvalShape, mesh: tuple[int, int, int, int]
                  ) -> Estimate:
  """Per-device memory of sampling (sampler.py): parameters, the KV cache, decode state.

  Rows are slots x samples of a prompt, with slots padded to a multiple of data x fsdp (x
  context, which evaluation folds into data) and rows split over them; the cache holds
  L x [rows, K, max_new_tokens, H] keys and values of the answers and L x [slots, K, P, H] of
  the prompts, which a slot's rows share (kv heads over tp when they divide,
  as XLA lays out prefill's output; measured on a (1, 2, 1, 2) mesh). The decode state is
  donated and the cache, one array per layer, is updated in place; XLA's temporaries are
  then about one layer's keys or values (measured on CPU), which dominates a refill's
  prefill of fresh rows. A prompt's samples decode `samples_at_once` at a time.
  """
  data, fsdp, context, tp = mesh
  mesh = (data * context, fsdp, 1, tp)  # apps.sampler_for folds context into data for decoding
  dp = data * context * fsdp
  problems = []
  if cfg.num_heads % tp:
    problems.append(f"the model's {cfg.num_heads} attention heads are not divisible by "
                    f"mesh tp={tp}; choose tp dividing {cfg.num_heads}")
  try:
    params = param_bytes(cfg, mesh)
  except ValueError as e:
    return Estimate({}, {}, problems=[str(e)])
  slots = shape.batch_size + (-shape.batch_size % dp)
  group = shape.samples_at_once or shape.num_samples
  rows = slots * group // dp
  length = shape.prompt_len + shape.max_new_tokens
  kvh = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
  cache = (2 * cfg.num_layers * (rows * shape.max_new_tokens + slots // dp * shape.prompt_len)
           * kvh * cfg.head_dim * _BYTES[shape.cache_dtype])
  n = max(1, cfg.num_heads // tp)
  # One query per row attends over the whole cache: fp32 scores [rows, N, S] of a layer;
  # logits [rows, V] in fp32 for sampling; a copy of one layer's keys or values, which XLA
  # keeps around the in-place update of the loop-carried cache; one layer's cache cast to
  # the compute dtype.
  decode = (rows * n * length * 4 + rows * cfg.vocab_size * 4 * 2
            + cache // (2 * cfg.num_layers))
  if shape.cache_dtype != shape.compute_dtype:
    decode += cache // cfg.num_layers // _BYTES[shape.cache_dtype] * _BYTES[shape.compute_dtype]
  held = {f"parameters ({cfg.param_dtype})": params, f"KV cache ({shape.cache_dtype})": cache}
  notes = [f"{rows} row(s) ({slots} slots x {group} samples of a prompt over {dp} "
           f"data-parallel devices) x {shape.max_new_tokens} answer slots, and each slot's "
           f"{shape.prompt_len} prompt slots, which its rows share"]
  return Estimate(held, {"decode step": {"scores, logits, cast cache": decode}}, notes,
                  problems)


def _fmt(n: int) -> str:
  return f"{n / GiB:.2f} GiB"


# -- Suggestions ------------------------------------------------------------------------------

# Remat policies from most to least memory kept; and the rough cost of each in recomputation
# (full remat runs the forward twice: ~4/3 of the step's FLOPs).
REMAT_ORDER = ("none", "save_dots", "save_dots_no_batch", "offload_dots", "full")
_RECOMPUTE = {"none": 1.0, "save_dots": 1.02, "save_dots_no_batch": 1.1, "offload_dots": 1.05,
              "full": 1.33}


@dataclasses.dataclass
class Suggestion:
  overrides: dict[str, object]  # run-config key -> value, e.g. {"train.micro_batches": 4}
  estimate: Estimate
  cost: float  # rough step-time factor against the settings as given (1.0)

  def flags(self) -> str:
    def value(v):
      return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return " ".join(f"--config.{k}={value(v)}" for k, v in self.overrides.items())


def _first_distinct(found: list[Suggestion], limit: int) -> list[Suggestion]:
  """Cheapest first (then fewest changes), leaving out any that only adds changes to one
  already listed."""
  found.sort(key=lambda x: (round(x.cost, 3), len(x.overrides), x.estimate.peak))
  kept = []
  for s in found:
    items = set((k, str(v)) for k, v in s.overrides.items())
    if not any(set((k, str(v)) for k, v in k_.overrides.items()) <= items for k_ in kept):
      kept.append(s)
    if len(kept) == limit:
      break
  return kept


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def _cost(cfg, shape, mesh, base_cfg, base_shape, base_mesh) -> float:
  """A rough ordering of settings by step time, not a prediction: recomputation first, then
  communication (tensor and context parallelism, FSDP gathers repeated per micro-batch)."""
  def comm(m):
    return 1 + 0.08 * math.log2(m[3]) + 0.05 * math.log2(m[2])
  cost = _RECOMPUTE[cfg.remat] / _RECOMPUTE[base_cfg.remat] * comm(mesh) / comm(base_mesh)
  cost *= 1 + 0.02 * math.log2(shape.micro_batches / base_shape.micro_batches)
  cost *= 1 + 0.01 * math.log2(base_shape.loss_chunk / shape.loss_chunk)
  return cost


def suggest(cfg: ModelConfig, shape: TrainShape, mesh: tuple[int, int, int, int], chip: Chip,
            margin: float = 0.1, limit: int = 5,
            teacher: ModelConfig | None = None) -> list[Suggestion]:
  """The first `limit` settings (by `_cost`, then fewest changes) whose training step fits.

  Searches the mesh (data x fsdp x context x tp over the same devices, tp dividing the heads
  and at most 8), micro-batches, remat policies that keep less, smaller loss chunks, and
  blockwise attention where dense was asked for.
  """
  devices = math.prod(mesh)
  budget = chip.hbm_bytes * (1 - margin)
  meshes = {mesh}
  for tp in _divisors(cfg.num_heads):
    for context in (1, 2, 4, 8, 16, 32):
      if tp > 8 or devices % (tp * context) or shape.seq_len % (2 * context):
        continue
      meshes.add((1, devices // (tp * context), context, tp))
  remats = REMAT_ORDER[REMAT_ORDER.index(cfg.remat):]
  if chip.platform == "cpu":
    remats = tuple(r for r in remats if r != "offload_dots")
  chunks = [shape.loss_chunk] + [x for x in (1024, 512, 256) if x < shape.loss_chunk]
  attentions = [cfg.attention] + (["auto"] if cfg.attention == "dense" else [])
  found = []
  for m in meshes:
    dp = m[0] * m[1]
    if shape.global_batch_size % dp:
      continue
    for micro in _divisors(shape.global_batch_size // dp):
      for remat in remats:
        for chunk in chunks:
          for attn in attentions:
            c = cfg.replace(remat=remat, attention=attn)
            s = dataclasses.replace(shape, micro_batches=micro, loss_chunk=chunk)
            est = estimate_train(c, s, m, chip.platform, teacher)
            if est.problems or est.peak > budget:
              continue
            overrides = {}
            if m != mesh:
              overrides["mesh.shape"] = m
            if micro != shape.micro_batches:
              overrides["train.micro_batches"] = micro
            if remat != cfg.remat:
              overrides["model.remat"] = remat
            if chunk != shape.loss_chunk:
              overrides["train.loss_chunk"] = chunk
            if attn != cfg.attention:
              overrides["model.attention"] = attn
            found.append(Suggestion(overrides, est, _cost(c, s, m, cfg, shape, mesh)))
  return _first_distinct(found, limit)


def suggest_eval(cfg: ModelConfig, shape: EvalShape, mesh: tuple[int, int, int, int],
                 chip: Chip, margin: float = 0.1, limit: int = 3) -> list[Suggestion]:
  """Evaluation settings that fit: a bf16 cache, fewer slots at once, fewer samples of a
  prompt at once (`samples_at_once`: the prompt is prefilled once per group; avg@n still
  averages over all `num_samples`), and tensor parallelism over the kv heads (rows cannot go
  below one per data x fsdp device)."""
  devices = math.prod(mesh)
  budget = chip.hbm_bytes * (1 - margin)
  meshes = {mesh} | {(1, devices // tp, 1, tp) for tp in _divisors(cfg.num_heads)
                     if tp <= 8 and devices % tp == 0}
  group = shape.samples_at_once or shape.num_samples
  found = []
  for m in meshes:
    for cache_dtype in dict.fromkeys((shape.cache_dtype, "bfloat16")):
      dp = m[0] * m[1]
      # Slots are padded to a multiple of data x fsdp: of the batch sizes that give the same
      # rows, only the largest.
      batches = {k + (-k % dp): k for k in _divisors(shape.batch_size)}.values()
      for batch in batches:
        for at_once in [g for g in _divisors(shape.num_samples) if g <= group]:
          s = dataclasses.replace(shape, cache_dtype=cache_dtype, batch_size=batch,
                                  samples_at_once=at_once)
          est = estimate_eval(cfg, s, m)
          if est.problems or est.peak > budget:
            continue
          overrides = {}
          if m != mesh:
            overrides["mesh.shape"] = m
          if cache_dtype != shape.cache_dtype:
            overrides["eval.cache_dtype"] = cache_dtype
          if batch != shape.batch_size:
            overrides["eval.batch_size"] = batch
          if at_once != group:
            overrides["eval.samples_at_once"] = at_once
          # Time grows as fewer rows decode at once (and with more prefills of a prompt).
          cost = (shape.batch_size * group / (batch * at_once)) ** 0.5 * (
              1 + 0.08 * math.log2(m[3])) + 0.02 * math.log2(group / at_once)
          if cache_dtype != shape.cache_dtype:  # rounding the cache can move scores: last
            cost += 2
          found.append(Suggestion(overrides, est, cost))
  return _first_distinct(found, limit)


def plan(s: settings_lib.Settings, topo: hardware.Topology, margin: float = 0.1,
         suggestions: int = 5, prompt_len: int = 256,
         teacher: ModelConfig | None = None) -> dict:
  """Estimates, verdicts and suggestions for run settings `s` on `topo`, as a JSON-able dict
  (what tools/plan.py prints): the training step whatever the mode, and evaluation.
  `teacher`: the distillation teacher's config (`startup.teacher_source`) when `s` has one."""
  if s.distill.enabled != (teacher is not None):
    raise ValueError("plan: pass the teacher's config exactly when distill.teacher_* is set")
  cfg = s.model.preset_config()
  mesh = resolve_mesh(s.mesh_shape, topo.devices)
  problems = []
  try:  # the training checks, whatever the config's mode
    settings_lib.check_run(dataclasses.replace(s, mode="train"), cfg, mesh)
  except settings_lib.ConfigError as e:
    problems = e.problems
  shape = TrainShape(global_batch_size=s.train.global_batch_size, seq_len=s.data.seq_len,
                     micro_batches=s.train.micro_batches, loss_chunk=s.train.loss_chunk)
  train = estimate_train(cfg, shape, mesh, topo.chip.platform, teacher)
  # What the trainer refuses beyond what the estimator checks (and its suggestions avoid).
  other_problems = [p for p in problems if p not in train.problems]
  train.problems = list(dict.fromkeys(problems + train.problems))
  e = s.eval
  eval_shape = EvalShape(batch_size=e.batch_size, num_samples=e.num_samples,
                         samples_at_once=e.samples_at_once, max_new_tokens=e.max_new_tokens,
                         prompt_len=prompt_len, compute_dtype=e.compute_dtype,
                         cache_dtype=e.cache_dtype)
  evaluation = estimate_eval(cfg.replace(compute_dtype=e.compute_dtype), eval_shape, mesh)
  budget = int(topo.chip.hbm_bytes * (1 - margin))
  out = {
      "model": {"preset": s.model.preset, "params": cfg.num_params(),
                "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
                "remat": cfg.remat, "attention": cfg.attention},
      "teacher": teacher and {"params": teacher.num_params(), "param_dtype": teacher.param_dtype},
      "topology": {"name": topo.name, "devices": topo.devices, "chip": topo.chip.name,
                   "hbm_bytes": topo.chip.hbm_bytes, "peak_bf16_flops": topo.chip.peak_flops},
      "mesh": dict(zip(("data", "fsdp", "context", "tp"), mesh)),
      "budget_bytes": budget, "margin": margin,
      "train": dict(train.to_dict(), fits=train.fits(topo.chip.hbm_bytes, margin),
                    suggestions=[], unaddressed=other_problems),
      "eval": dict(evaluation.to_dict(), fits=evaluation.fits(topo.chip.hbm_bytes, margin),
                   suggestions=[]),
  }
  if not out["train"]["fits"]:
    out["train"]["suggestions"] = [
        {"flags": g.flags(), "peak": g.estimate.peak, "cost": round(g.cost, 3)}
        for g in suggest(cfg, shape, mesh, topo.chip, margin, suggestions, teacher)]
  if not out["eval"]["fits"]:
    out["eval"]["suggestions"] = [
        {"flags": g.flags(), "peak": g.estimate.peak, "cost": round(g.cost, 3)}
        for g in suggest_eval(cfg.replace(compute_dtype=e.compute_dtype), eval_shape, mesh,
                              topo.chip, margin, 3)]
  return out
