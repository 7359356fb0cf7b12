"""Shared by the benchmarks: the same random weights in transformers and jaxdistill, and timing."""

import platform
import subprocess
import tempfile
import time

import numpy as np

from jaxdistill import hf
from jaxdistill.model_config import ModelConfig


def twin_models(cfg: ModelConfig, dtype: str, device: str):
  """(transformers model on `device`, jaxdistill model) holding the same random weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
  with tempfile.TemporaryDirectory() as tmp:
    ref = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
    ref.save_pretrained(tmp)
    model = hf.load_hf_model(tmp, param_dtype=dtype, compute_dtype=dtype)
  return ref.to(device).eval(), model


def hf_dir_models(hf_dir: str, dtype: str, device: str, **overrides):
  """(transformers model on `device`, jaxdistill model) loaded from the Hugging Face directory
  `hf_dir` (e.g. tests/real_model.py's SmolLM2), both holding its weights in `dtype`.
  `overrides` are ModelConfig fields for ours (remat, attention, ...)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype,
                                                          attn_implementation="sdpa")
  model = hf.load_hf_model(hf_dir, param_dtype=dtype, compute_dtype=dtype, **overrides)
  return ref.to(device).eval(), model


def cpu_name() -> str:
  """`lscpu`'s model name (the processor the figures were measured on)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown CPU"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  """Median seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
