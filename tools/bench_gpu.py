"""One-GPU benchmark: the training-MFU and decode figures in one run, one table.

  tools/bench_gpu.sh --out=DIR              # one H100/H200: every figure, within 8 minutes
  python tools/bench_gpu.py --smoke --out=DIR   # CPU: the same code at tiny shapes, seconds

Figures (one device, mesh 1,1,1,1, random weights):
  train_llama3_2_1b, train_qwen2_5_3b: one AdamW train step (train.make_train_step, fp32
    master weights and optimizer state, bf16 compute, global-norm clipping) on one row of
    8,192 tokens. MFU = model FLOPs per step (metrics.train_flops_per_token: 3x the forward's
    matmuls, so remat's recomputation earns nothing) / median step time / the chip's dense
    bf16 peak (hardware.CHIPS). Remat is the least recomputation the memory planner
    (memory.estimate_train, 10% margin) says fits the chip; a step that runs out of memory
    anyway moves on to the next policy. Targets: 40% and 45%.
  decode_qwen2_5_7b_b1, decode_qwen2_5_0_5b_b32: the sampler's decode phase (greedy, bf16
    weights and KV cache) after a 2,048-token prompt, batch 1 and 32. Share of the bandwidth
    bound = the run's decode steps/s over (read bandwidth / bytes a step must read:
    benchlib.decode_bytes_per_step), the bandwidth read by a large reduction just before each
    timed run (benchlib.BandwidthProbe). Targets: 0.6 and 0.7.

A profile trace (jax.profiler) of one train step of the first train figure is written to
DIR/train_step.xplane.pb (TensorBoard's profile plugin or XProf) and
DIR/train_step.perfetto.json.gz (ui.perfetto.dev), with the step's optimized HLO as
DIR/train_step.hlo.txt (`python tools/profile_summary.py DIR/train_step.perfetto.json.gz`
tabulates where the step's time went); the table to DIR/bench_gpu.txt and every
figure's numbers to DIR/bench_gpu.json. A figure that fails or runs out of time gets a row
saying so and the others still run; the exit status is 1 when any figure failed.

--isolate (the default outside --smoke) runs each figure in its own process under a time
limit (--figure_timeout, and whatever is left of --budget), so one that hangs or exhausts
the GPU's memory cannot take the rest with it, and each starts with the whole device.

--smoke keeps the code path and shrinks the shapes: every figure on the `tiny` preset (2
layers, width 64, 512-token vocabulary), 128-token rows, 2 rows of 32-token prompts, 8 new
tokens, 2 timed steps, one timed decode run, a 64 MiB bandwidth probe, and XLA's
optimisations off. Its figures mean nothing (no target is met or missed); it checks that every
row, the JSON and the trace are produced, in about 15 s on 2 CPU cores
(tests/test_bench_gpu.py). Without a known peak for the device (a CPU) MFU is "n/a", never a
guessed figure.

What a bare GPU image may lack (grain, ml-collections): see tools/bench_gpu.sh.
"""

import atexit
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One process owns the device for the whole run (or one figure, with --isolate): take most of
# its memory up front, as a training job would; the 3B step needs about 65 GB of an 80 GB H100.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import attention, hardware, memory, metrics, model as model_lib, rules  # noqa: E402
from jaxdistill import sharding  # noqa: E402
from jaxdistill.model_config import REMAT_POLICIES, get_preset  # noqa: E402
from jaxdistill.sampler import Sampler, SamplingConfig  # noqa: E402
from configs import base  # noqa: E402
import benchlib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Figure:
  name: str
  kind: str  # "train" (value: MFU) | "decode" (value: share of the bandwidth bound)
  preset: str  # model_config.PRESETS name: the shapes, with random weights
  batch: int  # rows
  tokens: int  # train: tokens per row; decode: prompt tokens
  target: float  # the least value the figure should reach


FIGURES = (
    Figure("train_llama3_2_1b", "train", "llama3_2_1b", 1, 8192, 0.40),
    Figure("train_qwen2_5_3b", "train", "qwen2_5_3b", 1, 8192, 0.45),
    Figure("decode_qwen2_5_7b_b1", "decode", "qwen2_5_7b", 1, 2048, 0.6),
    Figure("decode_qwen2_5_0_5b_b32", "decode", "qwen2_5_0_5b", 32, 2048, 0.7),
)
_BY_NAME = {f.name: f for f in FIGURES}
# Remat policies from least to most recomputation (save_dots keeps every matmul's output,
# save_dots_no_batch not those with batch dimensions, the attention scores'; "offload_dots"
# trades memory for host transfers instead, not what "the remat that fits" asks for).
_REMAT_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")
# --smoke: every figure on the tests' tiny model, at these lengths. One model for all keeps
# the compiles to one train step and one decode pair (later figures find them in the
# compilation cache): compiling, not running, is what a CPU smoke run spends its time on.
_SMOKE_PRESET = "tiny"
_SMOKE_TOKENS = {"train": 128, "decode": 32}
_SMOKE_DECODE_BATCH = 2

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes on any device (CPU): the same code path, "
                  "meaningless figures (module docstring).")
flags.DEFINE_string("out", "runs/bench_gpu", "Directory for bench_gpu.json, bench_gpu.txt "
                    "and the train step's profile trace.")
flags.DEFINE_list("figures", [f.name for f in FIGURES], "Figures to run, in this order.")
flags.DEFINE_bool("isolate", None, "Each figure in its own process under a time limit "
                  "(default: on, off with --smoke).")
flags.DEFINE_integer("figure_timeout", 300, "Seconds one isolated figure may take, compile "
                     "included.")
flags.DEFINE_integer("budget", 480, "Seconds for the whole isolated run: a figure gets at most "
                     "what is left, and none starts with under 30 s left.")
flags.DEFINE_enum("remat", "auto", ["auto", *REMAT_POLICIES], "'auto': the least "
                  "recomputation the memory planner says fits; else this policy for every "
                  "train figure.")
flags.DEFINE_integer("steps", None, "Timed train steps (default 10; --smoke 2).")
flags.DEFINE_integer("new_tokens", None, "Decoded tokens per row (default 128; --smoke 8).")
flags.DEFINE_integer("repeats", None, "Timed decode runs, median (default 3; --smoke 1).")
flags.DEFINE_bool("trace", True, "Write a profile trace of one step of the first train "
                  "figure run.")
flags.DEFINE_string("row_file", None, "Internal (--isolate): write this one figure's row here.")


def _settings() -> dict:
  """The run's lengths and counts, --smoke's where a flag leaves them unset."""
  smoke = FLAGS.smoke
  pick = lambda value, full, tiny: value if value is not None else (tiny if smoke else full)
  return dict(steps=pick(FLAGS.steps, 10, 2), warmup=1 if smoke else 2,
              new_tokens=pick(FLAGS.new_tokens, 128, 8), repeats=pick(FLAGS.repeats, 3, 1),
              probe_bytes=2**26 if smoke else 2**32)


def _model_config(fig: Figure, **dtypes):
  return get_preset(_SMOKE_PRESET if FLAGS.smoke else fig.preset, **dtypes)


def _smoke_compiles() -> None:
  """Cheap compiles for --smoke, whose figures mean nothing: XLA's optimisations off (a CPU
  then compiles the train step about twice as fast), and a persistent compilation cache for
  this run and its children unless one is set (the smoke figures share one model, so each
  compile after the first is a cache hit)."""
  jax.config.update("jax_disable_most_optimizations", True)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  cache = tempfile.mkdtemp(prefix="bench-gpu-xla-")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _tokens(fig: Figure) -> int:
  return _SMOKE_TOKENS[fig.kind] if FLAGS.smoke else fig.tokens


def _device_row() -> dict:
  device = jax.devices()[0]
  chip = hardware.chip_for_device(device)
  return dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
              peak_tflops=chip.peak_flops / 1e12 if chip else None)


def _remat_candidates(cfg, b: int, t: int, chunk: int, chip) -> list[str]:
  """Policies to try in order: --remat alone, else from the first the planner says fits the
  chip (all of `_REMAT_ORDER` from "none" when the device has no known memory, e.g. a CPU)."""
  if FLAGS.remat != "auto":
    return [FLAGS.remat]
  if chip is None:
    return list(_REMAT_ORDER)
  shape = memory.TrainShape(global_batch_size=b, seq_len=t, loss_chunk=chunk)
  for i, remat in enumerate(_REMAT_ORDER):
    estimate = memory.estimate_train(cfg.replace(remat=remat), shape, (1, 1, 1, 1),
                                     chip.platform)
    if estimate.fits(chip.hbm_bytes, margin=0.1):
      return list(_REMAT_ORDER[i:])
  return [_REMAT_ORDER[-1]]


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _timed_steps(cfg, b: int, t: int, chunk: int, mesh, s: dict):
  """(median step seconds, state, last metrics, jitted step, batch) of `cfg` from scratch;
  everything it allocated is released when it raises."""
  model = model_lib.create_model(cfg, mesh, seed=0)
  state, step_fn, batch, _ = benchlib.train_setup(model, b, t, chunk, mesh)
  del model  # the step donates the state, which holds these parameters
  step_s, state, m = benchlib.time_train_steps(step_fn, state, batch, mesh, s["steps"],
                                               warmup=s["warmup"])
  return step_s, state, m, step_fn, batch


def run_train(fig: Figure, s: dict, trace: bool) -> dict:
  """One training figure: median step time, tokens/s, model TFLOP/s and MFU."""
  device = jax.devices()[0]
  chip = hardware.chip_for_device(device)
  cfg = _model_config(fig, param_dtype="float32", compute_dtype="bfloat16")
  b, t = fig.batch, _tokens(fig)
  chunk = base.get_config().train.loss_chunk
  mesh = sharding.make_mesh([1, 1, 1, 1], devices=[device])
  candidates = _remat_candidates(cfg, b, t, chunk, chip)
  for i, remat in enumerate(candidates):
    cfg = cfg.replace(remat=remat)
    try:
      step_s, state, m, step_fn, batch = _timed_steps(cfg, b, t, chunk, mesh, s)
      break
    except Exception as e:  # pylint: disable=broad-except
      if not _out_of_memory(e) or i + 1 == len(candidates):
        raise
      print(f"{fig.name}: remat {remat} ran out of memory; trying {candidates[i + 1]}",
            flush=True)
    gc.collect()  # the failed attempt's buffers, before the next one allocates
  flops = metrics.train_flops_per_token(cfg, t) * b * t
  peak = chip.peak_flops if chip else None
  mfu = flops / step_s / peak if peak else None
  row = dict(step_ms=step_s * 1e3, tokens_per_s=b * t / step_s,
             model_tflops=flops / step_s / 1e12, mfu=mfu, value=mfu, loss=float(m["loss"]),
             remat=cfg.remat,
             attention=attention.resolve(cfg.attention, t, device.platform),
             shape=f"{b} x {t} tokens", params=cfg.num_params(),
             setting="bf16 compute, fp32 weights and AdamW state, mesh 1,1,1,1")
  if trace:  # a profiler that cannot start (no CUPTI, say) costs the trace, not the figure
    try:
      row["trace"], state = benchlib.write_step_trace(step_fn, state, batch, mesh, FLAGS.out)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row["trace"], row["trace_error"] = [], f"{type(e).__name__}: {e}"[:300]
  return row


def run_decode(fig: Figure, s: dict) -> dict:
  """One decode figure: decode tokens/s, ms per step, read bandwidth, share of the bound."""
  cfg = _model_config(fig, param_dtype="bfloat16", compute_dtype="bfloat16")
  b, p, n = _SMOKE_DECODE_BATCH if FLAGS.smoke else fig.batch, _tokens(fig), s["new_tokens"]
  sampler = Sampler.from_model(model_lib.create_model(cfg, seed=0), consume=True)
  prompts = np.random.RandomState(b).randint(3, cfg.vocab_size, (b, p)).tolist()

  def generate(steps):
    timings = {}
    sampler.generate(prompts, SamplingConfig(rules.Greedy(), max_new_tokens=steps,
                                             cache_dtype="bfloat16"),
                     timings=timings, decode_chunk=steps)
    return timings["decode"], timings["prefill"]

  probe = benchlib.BandwidthProbe(s["probe_bytes"])
  step_bytes = benchlib.decode_bytes_per_step(cfg, b, p + n / 2, itemsize=2)  # mean cache
  tokens_per_s, share, prefill_s = benchlib.decode_rate(generate, b, probe, step_bytes, n,
                                                        s["repeats"])
  bandwidth = float(np.median(probe.readings))  # each read just before a timed run
  return dict(tokens_per_s=tokens_per_s, step_ms=b / tokens_per_s * 1e3,
              bandwidth_gbs=bandwidth / 1e9, bound_tokens_per_s=b * bandwidth / step_bytes,
              share=share, value=share, prefill_s=prefill_s, step_bytes=step_bytes,
              shape=f"batch {b}, prompt {p}, {n} new", params=cfg.num_params(),
              setting="greedy, bf16 weights and KV cache")


def run_figure(fig: Figure, trace: bool) -> dict:
  """`fig`'s row: its measurements, or the error that stopped it."""
  row = dict(name=fig.name, kind=fig.kind, model=fig.preset, target=fig.target,
             **_device_row())
  start = time.perf_counter()
  try:
    row.update(run_train(fig, _settings(), trace) if fig.kind == "train"
               else run_decode(fig, _settings()))
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()  # the row keeps the first line; the log keeps the rest
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
  row["seconds"] = time.perf_counter() - start
  return row


def run_isolated(fig: Figure, trace: bool, deadline: float) -> dict:
  """`fig` in a fresh process of this script, killed when its time is up."""
  left = deadline - time.monotonic()
  if left < 30:
    return dict(name=fig.name, kind=fig.kind, model=fig.preset, target=fig.target,
                error=f"skipped: {left:.0f}s of --budget left")
  timeout = min(FLAGS.figure_timeout, left)
  row_file = os.path.join(tempfile.mkdtemp(prefix="bench-gpu-row-"), "row.json")
  forwarded = [FLAGS[name].serialize() for name in ("smoke", "out", "remat", "steps",
                                                    "new_tokens", "repeats")
               if FLAGS[name].value is not None]
  cmd = [sys.executable, os.path.abspath(__file__), *forwarded, f"--figures={fig.name}",
         "--noisolate", "--trace" if trace else "--notrace", f"--row_file={row_file}"]
  try:
    subprocess.run(cmd, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(name=fig.name, kind=fig.kind, model=fig.preset, target=fig.target,
                error=f"timed out after {timeout:.0f}s")
  if not os.path.exists(row_file):
    return dict(name=fig.name, kind=fig.kind, model=fig.preset, target=fig.target,
                error="the figure's process ended without a row (see its output above)")
  with open(row_file) as f:
    return json.load(f)


def _measured(row: dict) -> str:
  if row["kind"] == "train":
    return (f"{row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['model_tflops']:.1f} TFLOP/s, remat {row['remat']}, {row['attention']}")
  return (f"{row['tokens_per_s']:,.1f} tok/s, {row['step_ms']:.2f} ms/step, "
          f"{row['bandwidth_gbs']:,.1f} GB/s read, bound {row['bound_tokens_per_s']:,.0f} tok/s")


def _value(row: dict, v) -> str:
  if v is None:
    return "n/a"
  return f"{v:.1%}" if row["kind"] == "train" else f"{v:.2f}"


def table(rows: list[dict], header: str) -> str:
  """The run as aligned text: one line per figure."""
  lines = [["figure", "shape", "measured", "value", "target", "met"]]
  for r in rows:
    if "error" in r:
      lines.append([r["name"], "-", r["error"], "n/a", f">= {_value(r, r['target'])}",
                    "error"])
      continue
    met = {None: "n/a", True: "yes", False: "no"}[r["met"]]
    what = "MFU" if r["kind"] == "train" else "of bound"
    lines.append([r["name"], r["shape"], _measured(r), f"{_value(r, r['value'])} {what}",
                  f">= {_value(r, r['target'])}", met])
  widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
  text = [header] + ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines]
  return "\n".join(text)


def main(argv):
  del argv
  unknown = [n for n in FLAGS.figures if n not in _BY_NAME]
  if unknown:
    raise app.UsageError(f"unknown figures {unknown}; choose from {sorted(_BY_NAME)}")
  figures = [_BY_NAME[n] for n in FLAGS.figures]
  isolate = (not FLAGS.smoke) if FLAGS.isolate is None else FLAGS.isolate
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.smoke:
    _smoke_compiles()
  if FLAGS.row_file:  # a child of --isolate: one figure, its row to the parent
    row = run_figure(figures[0], FLAGS.trace)
    with open(FLAGS.row_file, "w") as f:
      json.dump(row, f)
    return
  start = time.monotonic()
  deadline = start + FLAGS.budget
  first_train = next((f.name for f in figures if f.kind == "train"), None)
  rows = []
  for fig in figures:
    trace = FLAGS.trace and fig.name == first_train
    print(f"-- {fig.name}", flush=True)
    rows.append(run_isolated(fig, trace, deadline) if isolate else run_figure(fig, trace))
  for r in rows:  # --smoke's figures are not measurements: no target is met or missed there
    usable = r.get("value") is not None and not FLAGS.smoke
    r["met"] = r["value"] >= r["target"] if usable else None
  # The parent of --isolate never touches the device (it would hold memory the figures need):
  # the device comes from the figures' rows.
  named = next((r for r in rows if "device" in r), None) or _device_row()
  peak = f"{named['peak_tflops']:.0f} TFLOP/s bf16 peak" if named["peak_tflops"] else (
      "no known peak FLOP/s (MFU n/a)")
  header = (f"bench_gpu{' --smoke' if FLAGS.smoke else ''}: {named['device']} "
            f"({named['platform']}, jax {named['jax']}, {peak}); "
            f"{time.monotonic() - start:.0f}s in all")
  text = table(rows, header)
  print(text, flush=True)
  with open(os.path.join(FLAGS.out, "bench_gpu.txt"), "w") as f:
    f.write(text + "\n")
  for r in rows:
    if "trace" in r:
      print(f"profile trace of a {r['name']} step: " + (
          ", ".join(os.path.join(FLAGS.out, n) for n in r["trace"]) or r.get("trace_error")))
  with open(os.path.join(FLAGS.out, "bench_gpu.json"), "w") as f:
    json.dump(dict(header=header, smoke=FLAGS.smoke, isolated=isolate, figures=rows), f,
              indent=1)
  if any("error" in r for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
