"""Shared by the benchmarks: the same random weights in transformers and jaxdistill, timing,
the timed train step (tools/bench_train.py, tools/bench_gpu.py) and the decode rate against
the memory-bandwidth bound (tools/bench_decode.py, tools/bench_gpu.py)."""

import dataclasses
import glob
import os
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
  """`lscpu`'s model name (the processor the figures were measured on), with its CPU family
  and model numbers: a virtual machine's name may be as generic as "AMD EPYC" for
  generations whose figures differ (family 25 is Zen 3 and 4, 26 Zen 5)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown CPU"
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  name = fields.get("Model name") or platform.processor() or "unknown CPU"
  if "CPU family" in fields and "Model" in fields:
    name += f" (family {fields['CPU family']} model {fields['Model']})"
  return name


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


# -- Train step -------------------------------------------------------------------------------

def train_batch(cfg: ModelConfig, b: int, t: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(one process's batch of `b` full rows of `t` random tokens, every target scored; the
  tokens [b, t + 1] it was cut from, for a PyTorch twin)."""
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = np.ones((b, t), bool)
  return {"inputs": tokens[:, :t], "targets": tokens[:, 1:], "loss_mask": mask,
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32)}, tokens


def train_setup(model, b: int, t: int, loss_chunk: int, mesh: jax.sharding.Mesh):
  """What timing `train.make_train_step` on `model` takes: AdamW (lr 1e-4, weight decay 0.01,
  global-norm clipping at 1.0), every other setting at configs/base.py's value. State and
  step are laid out by `train.StateLayout`, as `train.run` lays them out, so the step
  compiles once, as the trainer's does.

  Returns:
    (TrainState, the jitted step (state donated; its `lower(state, batch)` lowers it, for the
    HLO a profile summary reads), the global batch on `mesh`, the batch's tokens [b, t + 1]
    as numpy).
  """
  # Imported here: the decode benchmarks use this module too and need neither the data
  # pipeline nor the config stack that these bring in.
  from configs import base  # pylint: disable=g-import-not-at-top
  from jaxdistill import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from jaxdistill import settings, train  # pylint: disable=g-import-not-at-top
  from jaxdistill.data import pipeline  # pylint: disable=g-import-not-at-top
  defaults = settings.parse(base.get_config())
  optim = dataclasses.replace(defaults.optim, lr=1e-4, total_steps=1000, warmup_ratio=0.0,
                              weight_decay=0.01, grad_clip=1.0)
  optimizer = optimizer_lib.make_optimizer(optim)
  tcfg = dataclasses.replace(defaults.train, global_batch_size=b, seq_len=t,
                             loss_chunk=loss_chunk)
  layout = train.StateLayout.of(model.config, optimizer, mesh)
  state = layout.fresh(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer)
  jitted = layout.jit(train.make_train_step(nnx.graphdef(model), optimizer,
                                            optimizer_lib.make_schedule(optim), tcfg))

  def step_fn(state, batch):
    return jitted(state, batch, None)  # nothing frozen

  step_fn.lower = lambda state, batch: jitted.lower(state, batch, None)
  local, tokens = train_batch(model.config, b, t)
  with jax.set_mesh(mesh):
    batch = pipeline.make_global_batch(local, mesh)
  return state, step_fn, batch, tokens


def time_train_steps(step_fn, state, batch, mesh: jax.sharding.Mesh, steps: int,
                     warmup: int = 2):
  """(median seconds of `steps` steps after `warmup` untimed ones, the state after them, the
  last step's metrics). Each step is waited for, so a step's time is its own."""
  with jax.set_mesh(mesh):
    for _ in range(warmup):
      state, m = step_fn(state, batch)
      jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = step_fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  return float(np.median(times)), state, m


def write_step_trace(step_fn, state, batch, mesh: jax.sharding.Mesh, out: str,
                     prefix: str = "train_step") -> tuple[list[str], object]:
  """One more step of `train_setup`'s `step_fn` under jax.profiler, written to the top of
  `out` as PREFIX.xplane.pb (TensorBoard's profile plugin, XProf), PREFIX.perfetto.json.gz
  (ui.perfetto.dev, tools/profile_summary.py) and the step's optimized HLO as PREFIX.hlo.txt
  (what profile_summary names ops by). Returns (the names written, the state after the
  step)."""
  tmp = tempfile.mkdtemp(prefix="jaxdistill-trace-")
  try:
    with jax.set_mesh(mesh):
      hlo = step_fn.lower(state, batch).compile().as_text()
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        state, m = step_fn(state, batch)
        jax.block_until_ready(m)
    os.makedirs(out, exist_ok=True)
    names = []
    for pattern, name in (("*.xplane.pb", f"{prefix}.xplane.pb"),
                          ("perfetto_trace.json.gz", f"{prefix}.perfetto.json.gz")):
      found = glob.glob(os.path.join(tmp, "**", pattern), recursive=True)
      if found:
        shutil.copyfile(found[0], os.path.join(out, name))
        names.append(name)
    with open(os.path.join(out, f"{prefix}.hlo.txt"), "w", encoding="utf-8") as f:
      f.write(hlo)
    names.append(f"{prefix}.hlo.txt")
    return names, state
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# -- Decode -----------------------------------------------------------------------------------

class BandwidthProbe:
  """Read bandwidth: bytes/s of a reduction over a large array (4 GiB by default: larger than
  any CPU's last-level cache, since a 256 MiB one partly fits in a large server L3, and long
  enough that a call's launch cost is noise on an accelerator). The array is kept, so the
  probe can run next to each timed decode: on a shared machine bandwidth drifts by 10% or
  more within minutes, and a share of the bound is only as good as a reading taken under the
  same conditions."""

  def __init__(self, nbytes: int = 2**32):
    self.x = jnp.ones((nbytes // 4,), jnp.float32)
    self.sum = jax.jit(jnp.sum)
    self.sum(self.x).block_until_ready()
    self.readings: list[float] = []

  def __call__(self) -> float:
    gbs = self.x.nbytes / median_time(lambda: self.sum(self.x).block_until_ready(), 3,
                                      warmup=0)
    self.readings.append(gbs)
    return gbs


def decode_bytes_per_step(cfg: ModelConfig, batch: int, cache_len: float, itemsize: int
                          ) -> float:
  """Bytes one decode step must read at least: every weight once (an untied input embedding
  is only gathered, `batch` rows of it, so it is left out; a tied one is read whole as the
  output head) plus each row's keys and values over `cache_len` positions."""
  weights = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_len
  return (weights + batch * kv) * itemsize


def decode_rate(generate, batch: int, probe: BandwidthProbe, bytes_per_step: float,
                new_tokens: int, repeats: int) -> tuple[float, float, float]:
  """(decode tokens/s, share of the bandwidth bound, prefill seconds).

  `generate(n)` makes n new tokens per row and returns (decode seconds, prefill seconds); one
  untimed call compiles. Each of `repeats` timed runs reads the bandwidth just before it;
  the share is the median over runs of the run's step rate over the step rate its reading
  allows (bandwidth / bytes read per step).
  """
  n = new_tokens
  generate(n)  # compiles
  runs, shares = [], []
  for _ in range(repeats):
    bandwidth = probe()
    decode, prefill = generate(n)
    runs.append((decode, prefill))
    shares.append((n / max(decode, 1e-9)) / (bandwidth / bytes_per_step))
  return (batch * n / max(float(np.median([d for d, _ in runs])), 1e-9),
          float(np.median(shares)), float(np.median([p for _, p in runs])))
