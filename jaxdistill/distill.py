"""Logit distillation: a frozen teacher's next-token distributions as a second training signal.

The objective (`DistillObjective`, a `train.Objective`) is SFT's plus a KL term,

  NLL + z_loss * sum lse^2 + alpha * T^2 * sum_scored KL(teacher_T || student_T),

where `_T` is the softmax of logits / T over the tokenizer's ids. The teacher shares the
student's mesh and batch: its parameters ride along as the train step's `frozen` argument
(no gradients, no optimizer state, never checkpointed). Both output heads are applied chunk by
chunk of the sequence inside one scan under `jax.checkpoint`, in the layout of the chunked
cross-entropy (`losses.sequence_chunks`, context parallelism included), so neither model's
[B, T, V] logits ever exist; only [B, C, V] of one chunk, per model.

Heads are often padded beyond the tokenizer (Qwen2.5: 151,665 ids in 151,936 or 152,064
rows); the KL runs over the tokenizer's `vocab_size` ids only. The NLL keeps the student's
whole head, as SFT does, so that with alpha = 0 the step is SFT's to the bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdistill import losses
from jaxdistill.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The `distill` section of a run config, typed (defaults live in configs/base.py)."""
  teacher_hf_dir: str  # Hugging Face directory of the teacher ("" = none)
  teacher_checkpoint: str  # Orbax checkpoint or run workdir of the teacher ("" = none)
  teacher_param_dtype: str  # the teacher's weights on the devices
  alpha: float  # weight of T^2 x KL beside the NLL
  temperature: float  # T, applied to both models' logits

  @property
  def enabled(self) -> bool:
    return bool(self.teacher_hf_dir or self.teacher_checkpoint)

  def problems(self, mode: str) -> list[str]:
    """What the config alone gets wrong, each with what to change."""
    out = []
    if self.teacher_hf_dir and self.teacher_checkpoint:
      out.append("distill.teacher_hf_dir and distill.teacher_checkpoint are both set: the "
                 "teacher comes from exactly one of them; set the other to \"\"")
    if not self.alpha >= 0:
      out.append(f"distill.alpha={self.alpha} must be >= 0 (0 trains as plain SFT)")
    if not self.temperature > 0:
      out.append(f"distill.temperature={self.temperature} must be > 0 (1.0 = the models' "
                 "own distributions)")
    if self.teacher_param_dtype not in ("float32", "bfloat16"):
      out.append(f"distill.teacher_param_dtype={self.teacher_param_dtype!r} is not float32 "
                 "or bfloat16")
    if self.enabled and mode not in ("train", "train_and_eval"):
      out.append(f"distill.teacher_* is set but mode={mode!r} does not train through "
                 "jaxdistill.train: use mode train or train_and_eval, or unset the teacher")
    return out


def check_models(student: ModelConfig, teacher: ModelConfig, vocab_size: int,
                 tokenizer: str, teacher_name: str, seq_len: int,
                 mesh_shape: tuple[int, ...]) -> list[str]:
  """Problems of distilling `teacher` into `student` over a tokenizer of `vocab_size` ids,
  each with what to change. `mesh_shape` is the resolved (data, fsdp, context, tp)."""
  out = []
  for who, cfg in (("the student's", student), (f"the teacher's ({teacher_name})", teacher)):
    if cfg.vocab_size < vocab_size:
      out.append(f"{who} output head has {cfg.vocab_size} rows but the tokenizer "
                 f"({tokenizer}) has {vocab_size} ids: the model was not trained with this "
                 "tokenizer; distil between models of one tokenizer (or set data.tokenizer)")
  if seq_len > teacher.max_position_embeddings:
    out.append(f"data.seq_len={seq_len} exceeds the teacher's max_position_embeddings="
               f"{teacher.max_position_embeddings} ({teacher_name}); lower data.seq_len or "
               "choose a teacher with longer positions")
  tp = mesh_shape[3]
  if teacher.num_heads % tp:
    out.append(f"the teacher's {teacher.num_heads} attention heads are not divisible by mesh "
               f"tp={tp} ({teacher_name}); choose tp dividing both models' heads")
  return out


# -- The loss ---------------------------------------------------------------------------------

def token_kl(student_logits_BCV: jax.Array, teacher_logits_BCV: jax.Array, vocab_size: int,
             temperature: float) -> jax.Array:
  """KL(teacher_T || student_T) per token [B, C] (float32) over ids below `vocab_size`.

  The heads may differ in padded rows (151,936 against 152,064): both are cut to the
  shorter, and rows from `vocab_size` on are masked rather than sliced away, so the vocabulary
  axis keeps a length that its tensor-parallel sharding divides (151,665 rows would not).
  """
  v = min(student_logits_BCV.shape[-1], teacher_logits_BCV.shape[-1])
  valid_V = jnp.arange(v) < vocab_size

  def log_probs(logits):
    x = logits[..., :v].astype(jnp.float32) / temperature
    return jax.nn.log_softmax(jnp.where(valid_V, x, -jnp.inf), axis=-1)

  log_s, log_t = log_probs(student_logits_BCV), log_probs(teacher_logits_BCV)
  # exp(-inf) = 0 on the masked rows, where the difference is undefined: the where drops it
  # (and its cotangent is zero there, so the student's gradient stays finite).
  return jnp.sum(jnp.where(valid_V, jnp.exp(log_t) * (log_t - log_s), 0.0), axis=-1)


def distill_sums(student_unembed: Callable[[jax.Array], jax.Array],
                 teacher_unembed: Callable[[jax.Array], jax.Array], student_BTD: jax.Array,
                 teacher_BTE: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, *,
                 vocab_size: int, temperature: float, chunk: int = 1024):
  """(NLL sum, logsumexp^2 sum, KL sum) over the scored tokens, heads applied in chunks.

  Args:
    student_unembed, teacher_unembed: hidden [B, C, D] (or [B, C, E]) -> logits [B, C, V].
    student_BTD, teacher_BTE: the two models' final hidden states (E: the teacher's width);
      the teacher's is treated as a constant (`stop_gradient`).
    targets_BT: next-token ids.
    weights_BT: 1.0 where the target is scored, else 0.0.
    vocab_size: the tokenizer's ids; the KL ignores head rows from here on.
    temperature: T of the KL's two softmaxes.
    chunk: sequence tokens per chunk (`losses.sequence_chunks`).
  Returns:
    float32 scalars; the first two from the same chunks and ops as
    `losses.cross_entropy_sums` (so that alpha = 0 trains as SFT does, to the bit).
  """
  teacher_BTE = jax.lax.stop_gradient(teacher_BTE)
  chunks = losses.sequence_chunks(chunk, student_BTD, teacher_BTE, targets_BT,
                                  weights_BT.astype(jnp.float32))

  def one_chunk(h_BCD, g_BCE, y_BC, w_BC):
    logits_BCV = student_unembed(h_BCD)
    nll_BC, lse_BC = losses.token_nll(logits_BCV, y_BC)  # as losses._scan_chunks does
    teacher_BCV = jax.lax.stop_gradient(teacher_unembed(g_BCE))
    kl_BC = token_kl(logits_BCV, teacher_BCV, vocab_size, temperature)
    return (jnp.sum(nll_BC * w_BC), jnp.sum(jnp.square(lse_BC) * w_BC),
            jnp.sum(kl_BC * w_BC))

  if chunks[0].shape[0] == 1:  # as in losses: one chunk is what the naive loss would hold
    return one_chunk(*(x[0] for x in chunks))
  one_chunk = jax.checkpoint(one_chunk)

  def body(carry, xs):
    return tuple(c + s for c, s in zip(carry, one_chunk(*xs))), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero, zero), chunks)
  return sums


@dataclasses.dataclass(frozen=True)
class DistillObjective:
  """SFT's objective plus alpha * T^2 * KL(teacher_T || student_T) on the scored tokens.

  The train step passes the teacher's parameters (an nnx pure dict on the mesh) as `frozen`;
  `teacher_graphdef` rebuilds the teacher around them. Reports the NLL as `loss` and the KL
  sum as `kl` (both divided by the scored tokens by the step).
  """
  teacher_graphdef: Any
  loss_chunk: int
  z_loss: float
  alpha: float
  temperature: float
  vocab_size: int  # the tokenizer's ids: the KL's support

  def __call__(self, model, batch, step, frozen):
    del step
    teacher = nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(frozen))
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    student_BTD, _ = model(*args, return_hidden=True)
    teacher_BTE, _ = teacher(*args, return_hidden=True)
    nll, z, kl = distill_sums(model.unembed, teacher.unembed, student_BTD, teacher_BTE,
                              batch["targets"], batch["loss_mask"], vocab_size=self.vocab_size,
                              temperature=self.temperature, chunk=self.loss_chunk)
    total = nll + self.z_loss * z + self.alpha * self.temperature ** 2 * kl
    return total, {"loss": nll, "kl": kl}


# -- Memory: the teacher's terms in memory.estimate_train -------------------------------------

# The KL chunk's backward holds about this many fp32 [B, C, V] buffers beyond the
# cross-entropy's two (the teacher's logits and softmax, the student's tempered log-softmax):
# five in all, as tests/test_distill.py measures. With these terms the estimate of the whole
# distillation step was 0.85x-1.04x of XLA:CPU's memory_analysis() on five configs (remat
# full / none / save_dots_no_batch, dense and blockwise attention, fsdp 2 x tp 2, context 2 x
# tp 2, teachers wider, deeper and of another vocabulary than the student); measured once
# with tests/test_plan.py's compiled step and a teacher added, not in the suite (compiling
# costs too much there).
_KL_CHUNK_FP32 = 3.0


def memory_terms(teacher: ModelConfig, *, rows: int, seq: int, seq_full: int, chunk: int,
                 tp: int, fsdp: int, act_bytes: int, dense: bool, params: int,
                 gathered_layer: int) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
  """Per-device bytes the teacher adds to a train step: (held throughout, added to the loss
  backward, the teacher-forward moment's own terms).

  The teacher is never differentiated: it holds its parameters (`params`, sharded as the
  student's; no optimizer state, no gradients), and of its forward pass only the final
  hidden states [B, T, E] outlive a layer. Its forward is a moment of its own, one layer's
  activations at a time (nothing is kept for a backward), plus the layer's weights when
  FSDP gathers them (`gathered_layer`). The loss chunk adds the teacher's logits and the
  KL's softmaxes (and, under FSDP, its output head gathered whole for the chunk loop, cast
  to the compute dtype). `rows` per device and micro-batch, `seq` of `seq_full` tokens per device,
  `chunk` the loss chunk's tokens, `act_bytes` per activation element, `dense` when
  attention materialises its scores.
  """
  e, f = teacher.d_model, teacher.mlp_dim // tp
  n = max(1, teacher.num_heads // tp)
  hidden = rows * seq * e * 4
  # One layer: the residual stream, its norm, q/k/v and the attention output; then either
  # dense attention's fp32 scores and probabilities or the MLP's gate, up and product.
  scores = 2 * rows * n * seq * seq_full * 4 if dense else 0
  layer = 4 * rows * seq * e * act_bytes + max(scores, 3 * rows * seq * f * act_bytes)
  v = teacher.vocab_size // tp
  kl = int(_KL_CHUNK_FP32 * rows * chunk * v * 4)
  head = e * v * (jnp.dtype(teacher.param_dtype).itemsize
                  + jnp.dtype(teacher.compute_dtype).itemsize) if fsdp > 1 else 0
  return ({f"teacher parameters ({teacher.param_dtype}, frozen)": params},
          {"teacher hidden states": hidden, "KL chunk (teacher logits, softmaxes)": kl,
           **({"FSDP-gathered teacher head": head} if head else {})},
          {"teacher hidden states": hidden, "one teacher layer forward": layer,
           **({"FSDP-gathered teacher layer": gathered_layer} if gathered_layer else {})})
