"""Model FLOPs and device peaks (the arithmetic behind tokens/s and MFU), the metric writer,
and the train loop's progress reporter."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import jax

from jaxdistill import hardware, storage
from jaxdistill.model_config import ModelConfig


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of `device` (default: the first) from hardware.CHIPS, or None
  when it is not listed there (e.g. CPU)."""
  chip = hardware.chip_for_device(device or jax.devices()[0])
  return chip.peak_flops if chip else None


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


def _tensorboard_writer_class():
  """tensorboardX's SummaryWriter (None when it is not installed), imported without PyTorch.

  tensorboardX imports torch when it can, only to accept torch tensors, which this writer
  never passes: with torch installed that adds 2-3 s to every run's start-up. Unless torch
  is already loaded, `import torch` is made to fail for the duration of the import.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # an ImportError for `import torch`, until removed below
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard event files; silent off process 0.

  Locally each row is flushed as it comes. A gs:// object cannot be appended to, so there
  metrics.jsonl is uploaded whole at most every `remote_flush_seconds` and at `close`, and
  TensorBoard writes into a local temporary directory whose files are uploaded to
  `workdir/tensorboard/` at the same moments (one storage layer, one set of credentials).
  """

  def __init__(self, workdir: str, enabled: bool = True, remote_flush_seconds: float = 30.0):
    self.enabled = enabled
    self._file = None
    self._tb = None
    self._tb_dir = storage.join(workdir, "tensorboard")
    self._tb_local = None  # where TensorBoard writes when the workdir is remote
    if enabled:
      storage.makedirs(workdir)
      self._file = storage.Appender(storage.join(workdir, "metrics.jsonl"),
                                    min_interval=remote_flush_seconds)
      summary_writer = _tensorboard_writer_class()
      if summary_writer is None:
        return
      if storage.is_url(workdir):
        self._tb_local = tempfile.mkdtemp(prefix="jaxdistill-tensorboard-")
      self._tb = summary_writer(self._tb_local or self._tb_dir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
    if self._file.flush() and self._tb_local:
      self._tb.flush()
      storage.upload_dir(self._tb_local, self._tb_dir)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()
    if self._tb_local:
      storage.upload_dir(self._tb_local, self._tb_dir)
      shutil.rmtree(self._tb_local, ignore_errors=True)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressReporter:
  """Step timing, throughput, MFU and ETA for the train loop, written to a MetricWriter and a
  log on the logging cadence (every `log_every` steps, the first and the last).

  Timing covers the steps since the previous report, measured when a report is due; the
  first step's time is mostly compilation, so it gets no rate or ETA. Three token rates:
  `tokens_per_s` counts every position of the padded rows (what the FLOPs and MFU count),
  `real_tokens_per_s` those that hold text (not padding), `scored_tokens_per_s` those the loss
  scores (assistant turns), from the step's `real_tokens` and `scored_tokens` when given.
  """

  def __init__(self, writer: MetricWriter, log, *, first_step: int, num_steps: int,
               log_every: int, tokens_per_step: int, flops_per_step: float,
               peak_flops: float | None, clock=time.perf_counter):
    self.writer, self.log, self.clock = writer, log, clock
    self.first_step, self.num_steps, self.log_every = first_step, num_steps, log_every
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.peak = peak_flops * jax.device_count() if peak_flops else None
    self._since, self._steps = clock(), 0
    self._counted = {"real_tokens": 0.0, "scored_tokens": 0.0}

  def step_done(self, step: int, scalars: dict[str, float]) -> None:
    """Records one finished step; reports when the cadence says so."""
    self._steps += 1
    for k in self._counted:
      self._counted[k] += float(scalars.get(k, 0.0))
    if step % self.log_every and step not in (self.first_step, self.num_steps):
      return
    now = self.clock()
    elapsed, steps = now - self._since, self._steps
    step_time = elapsed / steps
    counted = self._counted
    self._since, self._steps = now, 0
    self._counted = dict.fromkeys(counted, 0.0)
    head = (f"step {step}/{self.num_steps} | loss {scalars['loss']:.4f} | grad "
            f"{scalars['grad_norm']:.3f} | lr {scalars['lr']:.2e}")
    if "kl" in scalars:  # logit distillation's KL(teacher || student) per scored token
      head += f" | kl {scalars['kl']:.4f}"
    if step == self.first_step:
      self.writer.write(step, scalars)
      self.log(f"{head} | first step with compilation {step_time:.1f}s")
      return
    row = dict(scalars, step_time=step_time, tokens_per_s=self.tokens_per_step / step_time)
    line = f"{head} | {row['tokens_per_s']:,.0f} tok/s"
    if "real_tokens" in scalars:
      row["real_tokens_per_s"] = counted["real_tokens"] / elapsed
      row["scored_tokens_per_s"] = counted["scored_tokens"] / elapsed
      line += (f" ({row['real_tokens_per_s']:,.0f} not padding, "
               f"{row['scored_tokens_per_s']:,.0f} scored)")
    line += f" | {step_time * 1e3:.0f} ms/step"
    if self.peak:
      row["mfu"] = self.flops_per_step / step_time / self.peak
      line += f" | MFU {row['mfu']:.1%}"
    line += f" | ETA {format_duration(step_time * (self.num_steps - step))}"
    self.writer.write(step, row)
    self.log(line)

