"""The memory planner against XLA: memory.py's per-device estimate of the real train step and
decode step vs `compiled.memory_analysis()` on CPU, plus the CLI's suggestions."""

import ast
import glob
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdistill import (attention, hardware, memory, metrics, model as model_lib, sampler,
                        settings, sharding, train)
from jaxdistill.model_config import ModelConfig
from jaxdistill.optimizer import make_optimizer, make_schedule
from tests import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="qwen2", vocab_size=512, d_model=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, qkv_bias=True, tie_embeddings=False,
            attention="dense")
WIDE = dict(TINY, d_model=128, mlp_dim=1024, head_dim=32)  # MLP-heavy: [B,T,F] dominates

# name: (model fields, global batch, seq, loss chunk, micro-batches, mesh). Each exercises
# a different dominant term: dense scores, MLP activations, FSDP, tp, accumulation, context
# parallelism, and a 32k-token packed row under blockwise attention.
CASES = {
    "full_dense": (dict(TINY, remat="full"), 2, 256, 128, 1, (1, 1, 1, 1)),
    "none_dense_long": (dict(TINY, remat="none"), 2, 512, 128, 1, (1, 1, 1, 1)),
    "full_fsdp2": (dict(WIDE, remat="full"), 4, 64, 64, 1, (1, 2, 1, 1)),
    "save_dots_no_batch_tp2": (dict(WIDE, remat="save_dots_no_batch"), 2, 64, 64, 1,
                               (1, 1, 1, 2)),
    "full_bf16_micro2": (dict(WIDE, remat="full", compute_dtype="bfloat16"), 4, 256, 64, 2,
                         (1, 1, 1, 1)),
    "blockwise_context2_tp2": (dict(TINY, remat="full", attention="blockwise"), 1, 8192, 1024,
                               1, (1, 1, 2, 2)),
    "blockwise_32k": (dict(TINY, remat="full", attention="blockwise"), 1, 32768, 1024, 1,
                      (1, 1, 1, 1)),
}


def _compiled_train_step(cfg: ModelConfig, shape: memory.TrainShape, mesh_shape):
  """The trainer's jitted step (as train.run builds it), compiled for abstract inputs."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  optim = defaults.optim_config(lr=1e-4, total_steps=100, warmup_ratio=0.01, weight_decay=0.1)
  optimizer = make_optimizer(optim)
  graphdef = nnx.graphdef(model_lib.abstract_model(cfg))
  abs_params = train.abstract_params(cfg)
  p_shard = sharding.param_shardings(abs_params, mesh)
  abs_opt = jax.eval_shape(optimizer.init, abs_params)
  o_shard = sharding.opt_state_shardings(abs_opt, abs_params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shard = train.TrainState(step=replicated, params=p_shard, opt_state=o_shard)
  state = train.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                           train.with_shardings(abs_params, p_shard),
                           train.with_shardings(abs_opt, o_shard))
  rows = sharding.batch_sharding(mesh, 2)
  batch = {k: jax.ShapeDtypeStruct((shape.global_batch_size, shape.seq_len),
                                   jnp.bool_ if k == "loss_mask" else jnp.int32, sharding=rows)
           for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")}
  tcfg = defaults.train_config(global_batch_size=shape.global_batch_size,
                               micro_batches=shape.micro_batches, seq_len=shape.seq_len,
                               loss_chunk=shape.loss_chunk)
  step = jax.jit(train.make_train_step(graphdef, optimizer, make_schedule(optim), tcfg),
                 in_shardings=(state_shard, None), out_shardings=(state_shard, None),
                 donate_argnums=0)
  with jax.set_mesh(mesh):
    return step.lower(state, batch).compile()


def _peak(analysis) -> int:
  """What a device holds at the step's peak: its arguments (the donated state aliases the
  outputs), the outputs that are not aliases, and XLA's temporaries."""
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


@pytest.mark.parametrize("name", list(CASES))
def test_train_estimate_is_within_20_percent_of_xla(name):
  fields, batch, seq, chunk, micro, mesh = CASES[name]
  cfg = ModelConfig(**fields)
  shape = memory.TrainShape(global_batch_size=batch, seq_len=seq, micro_batches=micro,
                            loss_chunk=chunk)
  analysis = _compiled_train_step(cfg, shape, mesh).memory_analysis()
  est = memory.estimate_train(cfg, shape, mesh, platform="cpu")
  assert not est.problems
  # The arguments are counted exactly: parameters, AdamW mu and nu, the batch (and the step
  # counters, a few bytes).
  held = est.held
  arguments = sum(v for k, v in held.items() if not k.startswith("gradients"))
  assert 0 <= analysis.argument_size_in_bytes - arguments < 1024, (held, analysis)
  ratio = est.peak / _peak(analysis)
  print(f"{name}: estimate {est.peak / 2**20:.1f} MiB, XLA {_peak(analysis) / 2**20:.1f} MiB, "
        f"ratio {ratio:.3f} ({est.phase})")
  assert 0.8 <= ratio <= 1.2, (name, ratio, est.to_dict())


@pytest.mark.parametrize("prompt,new", [(32, 2048), (512, 256)])
def test_eval_estimate_is_within_20_percent_of_the_decode_step(prompt, new):
  """The sampler's decode step (state donated, laid out as prefill leaves it) on a (1, 2, 1, 2)
  mesh: 4 prompts x 8 samples, `new` answer slots a row and `prompt` slots a prompt, which
  its 8 rows share (with long prompts and short answers, a copy per row would hold 3x the
  cache). Its KV cache dominates (kv heads over tp), updated in place."""
  cfg = ModelConfig(**dict(TINY, attention="auto"))
  mesh_shape, slots, n = (1, 2, 1, 2), 4, 8
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:4])
  # The sampler's own module: its layers one by one, each weight sharded as in the stack.
  model = model_lib.create_model(cfg, mesh)
  own = sampler.Sampler.from_model(model)
  graphdef, params = own.graphdef, own.params
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        params)
  static = dict(graphdef=graphdef, n=n, cache_len=new, cache_dtype=jnp.float32,
                cfg=sampler.SamplingConfig(max_new_tokens=new),
                cache_shape=(cfg.num_layers, own.stacks, cfg.num_kv_heads, cfg.head_dim))
  tokens = jax.ShapeDtypeStruct((slots, prompt), jnp.int32,
                                sharding=sharding.batch_sharding(mesh, 2))
  lengths = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  prefill, decode = sampler._prefill, sampler._decode  # pylint: disable=protected-access
  with jax.set_mesh(mesh):
    # Packed prompts (tokens, positions, segments), each prompt's row and offset, lengths,
    # prompt ids, first samples, seed.
    args = (params, tokens, tokens, tokens) + (lengths,) * 5 + (jnp.asarray(0, jnp.uint32),)
    state = jax.eval_shape(lambda *a: prefill(*a, **static), *args)
    layout = prefill.lower(*args, **static).compile().output_shardings
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                         layout)
    compiled = decode.lower(params, state, steps=16, **static).compile()
  est = memory.estimate_eval(cfg, memory.EvalShape(batch_size=slots, num_samples=n,
                                                   max_new_tokens=new, prompt_len=prompt),
                             mesh_shape)
  ratio = est.peak / _peak(compiled.memory_analysis())
  print(f"decode: estimate {est.peak / 2**20:.1f} MiB, ratio {ratio:.3f}")
  assert 0.8 <= ratio <= 1.2, (ratio, est.to_dict())


def test_topologies():
  v5p = hardware.topology("v5p-128")
  assert (v5p.devices, v5p.chip.hbm_bytes, v5p.chip.platform) == (64, 95 * 10**9, "tpu")
  assert hardware.topology("v6e-256").devices == 256
  h100 = hardware.topology("8xH100")
  assert (h100.devices, h100.chip.platform) == (8, "gpu")
  assert memory.resolve_mesh((1, -1, 1, 8), 64) == (1, 8, 1, 8)
  assert hardware.topology("4xL40S").chip.peak_flops == 362e12
  assert hardware.topology("8xA100-40GB").chip.hbm_bytes == 40960 * 2**20
  with pytest.raises(ValueError, match="unknown topology '8xV100': use one of NxH100, "):
    hardware.topology("8xV100")
  with pytest.raises(ValueError, match="two per device"):
    hardware.topology("v5p-3")


# jax.Device.device_kind as the runtimes report it -> the CHIPS key it must resolve to.
DEVICE_KINDS = {
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H100 PCIe": "H100-PCIe",
    "NVIDIA H100 NVL": "H100-NVL",
    "NVIDIA H200": "H200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A100-SXM4-40GB": "A100-40GB",
    "NVIDIA L40S": "L40S",
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v4 lite": None,  # the v4i inference chip, not a v4
    "NVIDIA L40": None,
    "cpu": None,
}


@pytest.mark.parametrize("kind", list(DEVICE_KINDS))
def test_device_kinds_resolve_to_their_chip(kind):
  """One chip table for the planner and MFU: each device kind finds its own chip (not the
  first whose name it contains) or none, and MFU's peak is that chip's."""
  device = types.SimpleNamespace(device_kind=kind)
  want = DEVICE_KINDS[kind] and hardware.CHIPS[DEVICE_KINDS[kind]]
  assert hardware.chip_for_device(device) == want
  assert metrics.device_peak_flops(device) == (want.peak_flops if want else None)


def _plan(*args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--json", *args],
                       capture_output=True, text=True, check=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout)


def test_cli_suggestions_fit_when_applied():
  """7B SFT at 12 rows a device (one micro-batch) does not fit an H100; the first suggestion,
  applied as the flags it prints, does."""
  one = "--config.train.micro_batches=1"
  plan = _plan("--config=configs/qwen2_5_7b_sft.py", "--topology=8xH100", one)
  assert not plan["train"]["fits"] and plan["train"]["suggestions"]
  assert plan["train"]["peak"] > plan["budget_bytes"]
  first = plan["train"]["suggestions"][0]
  again = _plan("--config=configs/qwen2_5_7b_sft.py", "--topology=8xH100", one,
                *first["flags"].split())
  assert again["train"]["fits"] and again["train"]["peak"] == first["peak"]


def test_planner_resolves_attention_by_the_models_rule():
  """attention.resolve is the one rule ("auto" by platform and length; a context axis > 1
  overrides any choice); the planner plans for what it returns."""
  t = attention.DENSE_MAX_T
  assert [attention.resolve("auto", t, p) for p in ("tpu", "gpu", "cpu")] == [
      "splash", "pallas_gpu", "dense"]
  assert attention.resolve("auto", 2 * t, "cpu") == "blockwise"
  assert attention.resolve("dense", 2 * t, "tpu") == "dense"
  assert attention.resolve("splash", t, "tpu", context=2) == "context"
  cfg = ModelConfig(**dict(TINY, attention="auto"))
  for platform, mesh, want in (("tpu", (1, 1, 1, 1), "splash"), ("cpu", (1, 1, 1, 1), "dense"),
                               ("gpu", (1, 1, 2, 1), "context")):
    est = memory.estimate_train(cfg, memory.TrainShape(2, 256), mesh, platform)
    assert f"attention {want}" in est.notes[0], (platform, est.notes)


def _recipe_runs():
  """(config path, phase argument, documented overrides, topology) for every recipe config and
  every piece of hardware its docstring names, with each variant the docstring gives as a
  backquoted run of `--config.` flags."""
  import re  # pylint: disable=g-import-not-at-top
  runs = []
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.basename(path)
    if name in ("__init__.py", "base.py", "tiny.py", "demo.py"):
      continue
    doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
    hardware_line = doc.split("Hardware:", 1)[1].split("(", 1)[0]
    topologies = [f"{n}x{chip}" for n, chip in re.findall(r"(\d+)x (H100|H200|A100)",
                                                          hardware_line)]
    topologies += re.findall(r"\b(v\d[a-z]?-\d+)\b", hardware_line)
    assert topologies, f"{name}: the docstring's Hardware: line names no topology"
    variants = [()] + [tuple(v.split()) for v in re.findall(r"`(--config\.[^`]+)`", doc)]
    phases = re.findall(rf"--config=configs/{name}:(\w+)", doc) or [None]
    for phase in dict.fromkeys(phases):
      for variant in variants:
        for topo in topologies:
          runs.append((name, phase, variant, topo))
  return runs


@pytest.mark.parametrize("name, phase, variant, topo", _recipe_runs(),
                         ids=lambda x: " ".join(x) if isinstance(x, tuple) else str(x))
def test_recipes_fit_the_hardware_their_docstrings_name(name, phase, variant, topo):
  """Every recipe, as published (batch, learning rate, sequence length, epochs untouched), is
  accepted by the config checks and fits in memory on each topology its docstring names: the
  training step for a training recipe, sampling for an evaluation one."""
  from tests.test_main import _load  # pylint: disable=g-import-not-at-top
  config = f"configs/{name}" + (f":{phase}" if phase else "")
  overrides = [o.removeprefix("--config.") for o in variant]
  if phase == "2":
    overrides.append("init.checkpoint=RUNS/phase1")
  s = settings.parse(_load(config, *overrides))
  plan = memory.plan(s, hardware.topology(topo))
  phase_name = "eval" if s.mode == "eval" else "train"
  got = plan[phase_name]
  assert got["fits"] and not got["problems"], (config, variant, topo, got["problems"],
                                               got["peak"] / 2**30)
  if s.mode == "train_and_eval":
    assert plan["eval"]["fits"], (config, topo)


def test_progress_reports_padded_real_and_scored_token_rates():
  """tok/s counts padded positions (what FLOPs and MFU count); beside it the rates of tokens
  that hold text and of tokens the loss scores, summed over the steps since the last report."""
  rows, lines = [], []
  writer = types.SimpleNamespace(write=lambda step, row: rows.append((step, row)))
  now = iter([0.0, 10.0, 12.0])  # start; step 1 (compilation); steps 2-3
  reporter = metrics.ProgressReporter(
      writer, lines.append, first_step=1, num_steps=3, log_every=3, tokens_per_step=1000,
      flops_per_step=2e12, peak_flops=1e12, clock=lambda: next(now))
  base = {"loss": 1.0, "grad_norm": 1.0, "lr": 1e-3}
  reporter.step_done(1, dict(base, real_tokens=900.0, scored_tokens=400.0))
  reporter.step_done(2, dict(base, real_tokens=800.0, scored_tokens=300.0))
  reporter.step_done(3, dict(base, real_tokens=600.0, scored_tokens=100.0))
  step, row = rows[-1]
  assert step == 3 and row["step_time"] == 1.0 and row["tokens_per_s"] == 1000.0
  assert row["real_tokens_per_s"] == 700.0 and row["scored_tokens_per_s"] == 200.0
  assert row["mfu"] == pytest.approx(2e12 / 1.0 / (1e12 * jax.device_count()))
  assert "1,000 tok/s (700 not padding, 200 scored)" in lines[-1]
