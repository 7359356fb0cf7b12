"""The main job end to end: tiny run, kill -9 and SIGTERM resume, two processes, bad configs."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import pytest
from ml_collections import config_flags

from jaxdistill import main as main_lib, optimizer as optimizer_lib, settings, sharding, startup
from jaxdistill import train
from tests import xla
from tests.trees import assert_trees_close, checkpoint_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.train.num_steps=40", "--config.train.checkpoint_every=10",
         "--config.train.log_every=5"]


def _env(devices=1):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _cmd(workdir, *overrides, config="configs/tiny.py"):
  return [sys.executable, "-m", "jaxdistill.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def _run(workdir, *overrides, devices=1, timeout=300):
  r = subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=_env(devices), timeout=timeout,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if "loss" in json.loads(line)]


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "checkpoints", str(step))
  start = time.time()
  while not os.path.isdir(path):
    assert proc.poll() is None, "run ended before its first checkpoint"
    assert time.time() - start < timeout
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  traces = os.path.join(ROOT, "jaxdistill", "assets", "tiny_traces.jsonl")
  with xla.optimized():  # 40 steps repay a full compile
    r = _run(workdir, *SHORT, f"--config.data.validation_sources={traces}",
             "--config.train.eval_every=20", "--config.train.eval_batches=2")
  return workdir, r


def test_tiny_config_trains_and_loss_falls(uninterrupted):
  workdir, r = uninterrupted
  rows = _losses(workdir)
  assert rows[0]["step"] == 1 and rows[-1]["step"] == 40
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(line) for line in f if "val_loss" in line]
  assert [v["step"] for v in val] == [20, 40] and val[-1]["val_loss"] < val[0]["val_loss"]
  assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
  timed = [r for r in rows if "tokens_per_s" in r]
  assert timed and all(0 < r["scored_tokens_per_s"] < r["real_tokens_per_s"]
                       <= r["tokens_per_s"] for r in timed)
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [20, 30, 40]
  manifest = json.load(open(os.path.join(workdir, "manifest.json")))
  assert manifest["mesh"] == {"data": 1, "fsdp": 1, "context": 1, "tp": 1}
  assert manifest["versions"]["jax"] == jax.__version__ and manifest["data_fingerprint"]
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
  assert "random init of preset 'tiny'" in r.stderr
  # Running the finished command again restores the last step and does nothing more.
  again = _run(workdir, *SHORT)
  assert "resumed from" in again.stderr and "(step 40 of 40)" in again.stderr


def test_metric_writer_writes_tensorboard_events_without_importing_torch(tmp_path):
  """tensorboardX would import PyTorch (2-3 s of every run's start-up) where it is installed,
  as it is here; the writer keeps it out, and `import torch` works again afterwards."""
  code = ("import sys\n"
          "from jaxdistill import metrics\n"
          "w = metrics.MetricWriter(sys.argv[1])\n"
          "w.write(3, {'val_loss': 2.5})\n"
          "w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "import torch\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  events = glob.glob(str(tmp_path / "tensorboard" / "events.*"))
  assert len(events) == 1 and b"val_loss" in open(events[0], "rb").read()


@pytest.mark.optimized
def test_kill_9_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  workdir = str(tmp_path)
  proc = subprocess.Popen(_cmd(workdir, *SHORT), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(workdir, 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "40"))
  r = _run(workdir, *SHORT)
  assert "resumed from" in r.stderr
  assert_trees_close(checkpoint_params(workdir, 40), checkpoint_params(full_dir, 40))


@pytest.mark.optimized
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(_cmd(workdir, *SHORT), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(workdir, 10, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps[-1] > 10 and steps[-1] < 40, steps
  assert f"checkpointed step {steps[-1]}" in err


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_survivor_exits_when_a_peer_dies(tmp_path):
  port = _free_port()
  args = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
          "--heartbeat_timeout=10", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"]
  procs = [subprocess.Popen(_cmd(str(tmp_path), *args, f"--process_id={i}"), cwd=ROOT,
                            env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  start = time.time()
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert time.time() - start < 240 and procs[0].poll() is None
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  try:
    _, err = procs[0].communicate(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung after its peer died")
  assert procs[0].returncode != 0, err[-2000:]


# -- Configs ------------------------------------------------------------------------------------

def _load(path, *overrides):
  c = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      os.path.join(ROOT, path))
  for o in overrides:
    key, value = o.split("=", 1)
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if node[leaf] is None:  # a placeholder the command line fills
      node[leaf] = value
    elif isinstance(node[leaf], bool):
      node[leaf] = value.lower() in ("true", "1")
    elif isinstance(node[leaf], tuple):
      node[leaf] = eval(value)  # pylint: disable=eval-used
    else:
      node[leaf] = type(node[leaf])(value)
  return c


@pytest.mark.parametrize("path", sorted(os.path.relpath(p, ROOT) for p in glob.glob(
    os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")))
def test_every_config_loads_and_builds_its_state_abstractly(path, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  c = _load(path)
  if path == "configs/demo.py":  # its 4 rows a step fit up to 4 data devices; these are 8
    c.train.global_batch_size = 8
  s = settings.parse(c)
  if s.init.hf_dir and not os.path.exists(s.init.hf_dir):
    cfg = s.model.preset_config()
  else:
    _, cfg = startup.find_weight_source(s, str(tmp_path))
  mesh = sharding.make_mesh(s.mesh_shape)
  settings.check_run(s, cfg, tuple(mesh.shape.values()))
  abstract = train.abstract_params(cfg)
  opt = optimizer_lib.make_optimizer(s.with_num_steps(1000).optim)
  abstract_opt = jax.eval_shape(opt.init, abstract)
  shardings = sharding.opt_state_shardings(abstract_opt, abstract, mesh)
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(abstract_opt))
  assert sum(x.size for x in jax.tree.leaves(abstract)) == cfg.num_params()


@pytest.mark.parametrize("overrides, message", [
    (["mesh.shape=(3, 1, 1, 1)"], "needs 3 devices but 8 are available"),
    (["train.global_batch_size=12"], "global_batch_size=12 is not divisible by data x fsdp"),
    (["mesh.shape=(1, 1, 1, 8)"], "4 attention heads are not divisible by mesh tp=8"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's max_position_embeddings"),
    (["train.micro_batches=3"], "x train.micro_batches (3)"),
    (["mode=serve"], "mode='serve' is not one of"),
    (["mesh.shape=(1, 1, 8, 1)", "data.seq_len=504"], "not divisible by 2 x mesh context (16)"),
    (["model.attention=flash3"], "attention='flash3' is not one of"),
    (["model.scan_unroll=0"], "model.scan_unroll=0 must be at least 1"),
])
def test_bad_configs_fail_before_compiling_with_what_to_change(overrides, message, tmp_path,
                                                               monkeypatch):
  monkeypatch.chdir(ROOT)
  c = _load("configs/tiny.py", *overrides)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    main_lib.run(c, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "0"))


def test_unknown_override_key_is_an_error(tmp_path):
  r = subprocess.run(_cmd(str(tmp_path), "--config.train.learning_rate=1e-3"), cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "learning_rate" in r.stderr


def _readme_command(marker):
  """The README's bash command containing `marker`, as an argument list."""
  import shlex  # pylint: disable=g-import-not-at-top
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
  block = next(b for b in blocks if marker in b)
  return shlex.split(block.replace("\\\n", " "))


def test_readme_eval_command_after_the_tiny_run(uninterrupted, tmp_path):
  """The README's evaluation of a tiny SFT run, as printed: the checkpoint brings its own
  tokenizer and template; without the README's max_new_tokens the run is refused before the
  weights load, with what fits."""
  train_dir, _ = uninterrupted
  args = _readme_command("runs/tiny_eval")
  assert args[:3] == ["python", "-m", "jaxdistill.main"]
  args = [sys.executable] + [a.replace("runs/tiny_eval", str(tmp_path / "eval")).replace(
      "runs/tiny", train_dir) for a in args[1:]]
  too_long = [a.removeprefix("--config.") for a in args if a.startswith("--config.")
              and not a.startswith("--config.eval.max_new_tokens")]
  with pytest.raises(ValueError, match="set eval.max_new_tokens to at most"):
    with mock.patch.object(startup, "load_weights") as load:
      main_lib.run(_load("configs/eval_aime.py", *too_long), str(tmp_path / "refused"))
  load.assert_not_called()  # refused before any weights were read
  r = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "as recorded by resume" not in r.stderr and "as recorded by init.checkpoint" in r.stderr
  summary = json.loads((tmp_path / "eval" / "eval" / "aime24" / "summary.json").read_text())
  assert summary["problems"] == 3 and summary["samples"] == 12
  assert summary["model"]["init"].startswith(f"init.checkpoint={train_dir}")


def test_o1_journey_recipe_runs_both_phases_as_written_at_tiny_scale(tmp_path, monkeypatch):
  """configs/qwen2_5_math_72b_sft.py end to end on a tiny Qwen2 checkpoint: phase 1 from the
  Hugging Face directory with the recipe's raised RoPE; phase 2 refused without phase 1's
  workdir, then run from it as given on the command line, with its own fresh optimizer and
  schedule (steps restart at 1, warmup from phase 2's learning rate)."""
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  hf_dir = hf_fixtures.save_tiny_model(tmp_path / "hf", "qwen2", vocab_size=384,
                                       rope_theta=10000.0, max_position_embeddings=64)
  assets = os.path.join(ROOT, "jaxdistill", "assets")
  config = "configs/qwen2_5_math_72b_sft.py"
  tiny = [f"--config.data.sources={os.path.join(assets, 'tiny_traces.jsonl')}",
          f"--config.data.tokenizer={os.path.join(assets, 'tiny_tokenizer.model')}",
          "--config.data.chat_template=chatml", "--config.data.seq_len=512",
          "--config.train.global_batch_size=2", "--config.train.num_steps=3",
          "--config.train.loss_chunk=512", "--config.train.log_every=1"]
  phase1, phase2 = str(tmp_path / "phase1"), str(tmp_path / "phase2")

  r = subprocess.run(_cmd(phase1, f"--config.init.hf_dir={hf_dir}", *tiny,
                          config=f"{config}:1"), cwd=ROOT, env=_env(2), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  m1 = json.load(open(os.path.join(phase1, "manifest.json")))
  assert m1["weight_source"]["kind"] == "hf" and m1["mesh"]["context"] == 2
  assert (m1["model_config"]["rope_theta"], m1["model_config"]["max_position_embeddings"]) == (
      300000.0, 16384)  # raised from the checkpoint's 1e4 and 64

  monkeypatch.chdir(ROOT)
  with pytest.raises(ValueError, match=r"init.checkpoint has no value: .*--config.init.checkpoint"):
    main_lib.run(_load(f"{config}:2"), str(tmp_path / "refused"))
  assert not os.path.exists(tmp_path / "refused")

  r = subprocess.run(_cmd(phase2, f"--config.init.checkpoint={phase1}", *tiny,
                          config=f"{config}:2"), cwd=ROOT, env=_env(2), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  m2 = json.load(open(os.path.join(phase2, "manifest.json")))
  assert m2["weight_source"] == {"kind": "checkpoint", "path": phase1, "step": 3, "preset": ""}
  assert m2["model_config"]["rope_theta"] == 300000.0
  rows = _losses(phase2)
  assert [row["step"] for row in rows] == [1, 2, 3]  # a fresh optimizer step count
  s2 = settings.parse(_load(f"{config}:2", f"init.checkpoint={phase1}", "train.num_steps=3"))
  schedule = optimizer_lib.make_schedule(s2.optim)
  assert [row["lr"] for row in rows] == pytest.approx([float(schedule(i)) for i in range(3)])
  assert sorted(int(d) for d in os.listdir(os.path.join(phase2, "checkpoints"))) == [3]
