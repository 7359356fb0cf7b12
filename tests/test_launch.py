"""Launch scripts: local multi-process training with save/restore, and the exact pod/cluster commands."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.trees import assert_trees_close, checkpoint_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [row["loss"] for row in map(json.loads, f) if "loss" in row]


def _sh(*args, timeout=300):
  env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
  return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _main(workdir, *args, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxdistill.main", f"--workdir={workdir}",
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_process_with_four_devices_and_resume(tmp_path):
  """Two processes of two devices each, started by launch/local.sh, against one process of
  four devices: the same losses, the same parameters after the last step (written by both
  processes together); then a resume, and a refused change of process count. With the k_proj
  bias gradient dropped in multi-process runs the losses agree and the parameters do not."""
  args = ["--config=configs/tiny.py", "--config.train.num_steps=6",
          "--config.train.log_every=1", "--config.train.checkpoint_every=3",
          "--config.data.packing=pad"]
  single, multi = tmp_path / "single", tmp_path / "multi"
  r = _main(single, *args, devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "2", "--", *args, f"--workdir={multi}")
  assert r.returncode == 0, r.stderr[-3000:]
  one, two = _losses(single), _losses(multi)
  assert len(one) == len(two) == 6
  np.testing.assert_allclose(two, one, rtol=1e-5)
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
  assert_trees_close(checkpoint_params(multi, 6), checkpoint_params(single, 6), atol=1e-6)
  # Run again for longer: both processes resume at step 6.
  more = [a.replace("num_steps=6", "num_steps=8") for a in args]
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "2", "--", *more, f"--workdir={multi}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr and "(step 6 of 8)" in r.stderr
  assert "8" in os.listdir(multi / "checkpoints")
  # One process (this one) cannot take over two processes' places in the data stream.
  from jaxdistill import main as main_lib  # pylint: disable=g-import-not-at-top
  from tests.test_main import _load  # pylint: disable=g-import-not-at-top
  overrides = [a.removeprefix("--config.").replace("num_steps=6", "num_steps=10")
               for a in args[1:]]
  with pytest.raises(ValueError, match="holds the data position of 2 processes"):
    main_lib.run(_load("configs/tiny.py", *overrides), str(multi))


def test_dry_runs_print_the_exact_commands():
  r = _sh("launch/local.sh", "-n", "3", "--port", "1234", "--dry_run", "--", "--config=c.py",
          "--workdir=w")
  lines = r.stdout.strip().splitlines()
  assert r.returncode == 0 and len(lines) == 3
  assert lines[2].endswith("-m jaxdistill.main --config=c.py --workdir=w "
                           "--coordinator_address=127.0.0.1:1234 --num_processes=3 "
                           "--process_id=2")
  r = _sh("launch/tpu_pod.sh", "--tpu=v5p-128", "--zone=us-east5-a", "--project=p",
          "--dry_run", "--", "--config=configs/qwen2_5_32b_s1.py", "--workdir=/mnt/runs/s1")
  assert r.returncode == 0, r.stderr
  out = r.stdout.strip()
  assert out.startswith("gcloud compute tpus tpu-vm ssh v5p-128 --zone=us-east5-a "
                        "--worker=all --command=")
  assert "python3\\ -m\\ jaxdistill.main\\ --config=configs/qwen2_5_32b_s1.py" in out
  assert out.endswith("--project=p")
  r = _sh("launch/slurm.sh", "--nodes=4", "--gpus_per_node=8", "--partition=gpu", "--dry_run",
          "--", "--config=configs/qwen2_5_7b_sft.py", "--workdir=/shared/q7b")
  assert r.returncode == 0, r.stderr
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --signal=TERM@120",
               "srun python3 -m jaxdistill.main --config=configs/qwen2_5_7b_sft.py "
               "--workdir=/shared/q7b"):
    assert line in r.stdout, line


def test_missing_arguments_are_usage_errors():
  assert _sh("launch/tpu_pod.sh", "--", "--config=c.py").returncode == 2
  assert _sh("launch/slurm.sh", "--dry_run", "--", "--config=c.py").returncode == 2
  assert _sh("launch/local.sh", "-n", "2").returncode == 2


def test_two_processes_evaluate_like_one_process_and_resume_after_kill_9(tmp_path):
  """A sampled evaluation (n=4, top-p, more prompts than slots, so slots are refilled) of all
  30 AIME24 problems over a mesh that spans two processes, killed (-9) once it has written
  some lines and run again, ends with byte-identical files to one uninterrupted process of
  four devices. A finished task samples nothing when run again; other weights are refused."""
  args = ["--config=configs/tiny.py", "--config.mode=eval", "--config.mesh.shape=(2, -1, 1, 1)",
          "--config.eval.tasks=aime24", "--config.eval.num_samples=4",
          "--config.eval.max_new_tokens=12", "--config.eval.batch_size=1",
          "--config.eval.temperature=0.6", "--config.eval.top_p=0.9",
          "--config.eval.greedy=false"]
  single, multi = tmp_path / "single", tmp_path / "multi"
  r = _main(single, *args, devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
  command = ["bash", "launch/local.sh", "-n", "2", "--cpu_devices", "2", "--", *args,
             f"--workdir={multi}"]
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  out = multi / "eval" / "aime24" / "generations.jsonl"
  start = time.time()
  while not (out.exists() and out.stat().st_size > 0):
    assert proc.poll() is None and time.time() - start < 240, "no lines before the kill"
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  written = out.read_text().count("\n")
  assert 0 < written < 30, written
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "2", "--", *args, f"--workdir={multi}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{written} of 30 prompts already done; continuing" in r.stderr
  for name in ("generations.jsonl", "summary.json", "graded.jsonl"):
    one = (single / "eval" / "aime24" / name).read_bytes()
    assert one == (multi / "eval" / "aime24" / name).read_bytes(), name
  rows = [json.loads(x) for x in out.open()]
  assert len(rows) == 30 and all(len(r["response"]) == 4 for r in rows)
  assert len({tuple(t) for r in rows for t in r["completion_token_ids"]}) > 30  # sampled
  # Run again (here, in this process, on its 8 devices: the mesh does not change the samples)
  # a finished task samples nothing; other weights are refused, named.
  from jaxdistill import main as main_lib  # pylint: disable=g-import-not-at-top
  from tests.test_main import _load  # pylint: disable=g-import-not-at-top
  overrides = [a.removeprefix("--config.") for a in args[1:]]
  stamp = out.stat().st_mtime_ns
  summary = main_lib.run(_load("configs/tiny.py", *overrides), str(multi))
  assert out.stat().st_mtime_ns == stamp and summary["aime24"]["samples"] == 120
  with pytest.raises(ValueError, match=r"weights\.seed: 0 -> 1"):
    main_lib.run(_load("configs/tiny.py", *overrides, "seed=1"), str(multi))


def test_generate_tool_on_two_processes_equals_one(tiny_qwen2_dir, tmp_path):
  """tools/generate.py over a mesh spanning two processes (launch/local.sh --script) writes
  the bytes one process of four devices writes: n=4 sampled, more prompts than slots."""
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top
  tok = hf_fixtures.save_tiny_chatml_tokenizer(tmp_path / "tok")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"the answer is {i}", "id": i}) + "\n"
                             for i in range(6)))
  args = [f"--init={tiny_qwen2_dir}", f"--tokenizer={tok}", "--chat_template_name=chatml",
          f"--prompts={prompts}", "--num_samples=4", "--max_new_tokens=8", "--batch_size=1",
          "--temperature=0.6", "--top_p=0.9", "--mesh=2,-1,1,1"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  one = tmp_path / "one.jsonl"
  r = subprocess.run([sys.executable, "tools/generate.py", *args, f"--output={one}"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  two = tmp_path / "two.jsonl"
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "2", "--script", "tools/generate.py",
          "--", *args, f"--output={two}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert one.read_bytes() == two.read_bytes()
  rows = [json.loads(x) for x in one.open()]
  assert len(rows) == 6 and len({tuple(t) for r in rows for t in r["completion_token_ids"]}) > 6
