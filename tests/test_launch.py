"""Launch scripts: local multi-process training with save/restore, and the exact pod/cluster commands."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(*args, timeout=300):
  env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
  return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_local_two_processes_train_checkpoint_and_resume(tmp_path):
  common = ["--config=configs/tiny.py", f"--workdir={tmp_path}",
            "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "1", "--",
          *common, "--config.train.num_steps=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  r = _sh("launch/local.sh", "-n", "2", "--cpu_devices", "1", "--",
          *common, "--config.train.num_steps=6")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr and "(step 4 of 6)" in r.stderr
  assert "6" in os.listdir(tmp_path / "checkpoints")
  # One process cannot take over two processes' places in the data stream: a clear error.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "jaxdistill.main", *common,
                      "--config.train.num_steps=8"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
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
