"""Launch scripts: local multi-process training with save/restore, and the exact pod/cluster commands."""

import json
import os
import subprocess
import sys

import numpy as np

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
  # One process cannot take over two processes' places in the data stream: a clear error.
  r = _main(multi, *[a.replace("num_steps=6", "num_steps=10") for a in args], devices=4)
  assert r.returncode != 0 and "holds the data position of 2 processes" in r.stderr


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


def test_two_processes_evaluate_like_one_process_with_four_devices(tmp_path):
  """A sampled evaluation (n=4, top-p, more prompts than slots, so slots are refilled) over a
  mesh that spans two processes writes byte-identical generations and the same summary as
  one process of four devices; only process 0 writes."""
  args = ["--config=configs/tiny.py", "--config.mode=eval", "--config.mesh.shape=(2, -1, 1, 1)",
          "--config.eval.tasks=aime24", "--config.eval.limit=5", "--config.eval.num_samples=4",
          "--config.eval.max_new_tokens=16", "--config.eval.batch_size=2",
          "--config.eval.temperature=0.6", "--config.eval.top_p=0.9"]
  single, multi = tmp_path / "single", tmp_path / "multi"
  r = _main(single, *args, devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "2", "--", *args, f"--workdir={multi}")
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("generations.jsonl", "greedy.jsonl", "summary.json", "graded.jsonl"):
    one = (single / "eval" / "aime24" / name).read_bytes()
    assert one == (multi / "eval" / "aime24" / name).read_bytes(), name
  rows = [json.loads(x) for x in (single / "eval" / "aime24" / "generations.jsonl").open()]
  assert len(rows) == 5 and all(len(r["response"]) == 4 for r in rows)
  assert len({tuple(t) for r in rows for t in r["completion_token_ids"]}) > 5  # sampled
