"""Model FLOPs and device peaks: the arithmetic behind tokens/s and MFU figures."""

from __future__ import annotations

import json
import os

import jax

from jaxdistill.model_config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, without sparsity). Matched against
# `device_kind` by substring, first match wins.
DEVICE_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of `device` (default: the first), or None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in DEVICE_PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Matmul FLOPs of one token's forward pass in a causal sequence of `seq_len` tokens.

  Counts every weight matmul (the output head included, the embedding gather excluded) and
  the two attention matmuls over the causal half of the sequence on average.
  """
  d, h = cfg.d_model, cfg.head_dim
  weights = cfg.num_layers * (d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                              + 3 * d * cfg.mlp_dim) + d * cfg.vocab_size
  attention = cfg.num_layers * 2 * cfg.num_heads * h * seq_len  # QK^T and PV, causal half
  return 2.0 * weights + attention


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward plus backward (twice the forward): the usual 6N-style training count."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard event files; silent off process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
