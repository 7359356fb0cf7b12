"""AdamW with warm-up and decay, global-norm clipping, and no weight decay on norms and biases."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxdistill.model import keypath_str

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-5  # peak learning rate
  total_steps: int = 1000
  warmup_steps: int = 0
  schedule: str = "cosine"  # shape after warm-up: one of SCHEDULES
  end_lr_ratio: float = 0.0  # final lr / peak lr
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0  # 0 disables clipping

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"train.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup steps {self.warmup_steps} must lie in [0, total steps "
                       f"{self.total_steps}]; lower train.warmup_ratio")


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
      lambda kp, _: not (keypath_str(kp).endswith("/bias") or "norm/" in keypath_str(kp)
                         or keypath_str(kp).startswith("norm")),
      params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
