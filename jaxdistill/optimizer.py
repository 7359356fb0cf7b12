"""AdamW with warm-up and decay, global-norm clipping, and no weight decay on norms and biases."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxdistill.sharding import path_str

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer settings of a run (the `train` section's lr ... grad_clip, typed; defaults
  live in configs/base.py)."""
  lr: float  # peak learning rate
  warmup_ratio: float  # share of total_steps spent in linear warm-up from 0
  schedule: str  # shape after warm-up: one of SCHEDULES
  end_lr_ratio: float  # final lr / peak lr
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float  # global-norm clip; 0 disables clipping
  total_steps: int  # optimizer steps of the run (0 until the data has been counted)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"train.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if not 0 <= self.warmup_ratio <= 1:
      raise ValueError(f"train.warmup_ratio={self.warmup_ratio} must lie in [0, 1]")

  @property
  def warmup_steps(self) -> int:
    return int(round(self.warmup_ratio * self.total_steps))


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine, linear or constant to `lr * end_lr_ratio`."""
  end = cfg.lr * cfg.end_lr_ratio
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(cfg.lr)
  if cfg.warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params):
  """True for parameters that get weight decay: matrices, not norm scales or biases."""
  return jax.tree.map_with_path(
      lambda kp, _: not (path_str(kp).endswith("/bias") or "norm/" in path_str(kp)
                         or path_str(kp).startswith("norm")),
      params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
