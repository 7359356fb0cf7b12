"""tools/bench_gpu.py's CPU smoke mode: every figure's row, the JSON and the profile trace."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("train_llama3_2_1b", "train_qwen2_5_3b", "decode_qwen2_5_7b_b1",
           "decode_qwen2_5_0_5b_b32")
NUMBERS = {"train": ("step_ms", "tokens_per_s", "model_tflops", "loss"),
           "decode": ("tokens_per_s", "step_ms", "bandwidth_gbs", "bound_tokens_per_s",
                      "share", "prefill_s")}


def test_smoke_run_gives_every_figure_a_row_the_json_and_a_trace(tmp_path):
  # The environment (8 CPU devices, the session's compilation cache) comes from conftest.py.
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_gpu.py"), "--smoke",
                        f"--out={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

  table = (tmp_path / "bench_gpu.txt").read_text()
  assert table.strip() in out.stdout
  header, columns, *lines = table.strip().splitlines()
  assert "--smoke" in header and "cpu" in header
  assert columns.split()[:3] == ["figure", "shape", "measured"]
  assert [line.split()[0] for line in lines] == list(FIGURES)
  for line in lines:
    assert "error" not in line
    if line.startswith("train"):
      assert "n/a MFU" in line  # no peak FLOP/s is known for a CPU: none is made up

  report = json.loads((tmp_path / "bench_gpu.json").read_text())
  assert report["smoke"] is True and report["header"] == header
  rows = report["figures"]
  assert [r["name"] for r in rows] == list(FIGURES)
  for r in rows:
    assert "error" not in r, r
    for key in NUMBERS[r["kind"]]:
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["name"], key)
      if key != "loss":
        assert r[key] > 0, (r["name"], key)
    assert isinstance(r["target"], float) and r["device"] and r["met"] is None
  train = [r for r in rows if r["kind"] == "train"]
  assert all(r["mfu"] is None and r["value"] is None for r in train)
  assert all(math.isclose(r["value"], r["share"]) for r in rows if r["kind"] == "decode")

  assert train[0]["trace"] and all(r.get("trace") is None for r in train[1:])
  for name in train[0]["trace"]:
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / "train_step.xplane.pb").exists()
  # The step's HLO beside its trace names the ops of the summary table: its matrix products,
  # forward and backward, by shape and source.
  assert "train_step.hlo.txt" in train[0]["trace"]
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import profile_summary  # pylint: disable=g-import-not-at-top
  rows, _, window = profile_summary.summarize(
      profile_summary.load_events(str(tmp_path / "train_step.perfetto.json.gz")),
      profile_summary.parse_hlo((tmp_path / "train_step.hlo.txt").read_text()))
  dots = [r for r in rows if r.op.source.endswith("dot_general") and r.op.shape]
  assert window > 0 and dots, rows[:5]
  assert any(r.op.source.startswith("jit(train_step)/transpose(jvp(") for r in dots)
  assert any(r.op.source.startswith("jit(train_step)/jvp(") for r in dots)
