"""tools/profile_summary.py: wall time split among concurrent ops, HLO naming, a real trace."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import profile_summary  # noqa: E402  pylint: disable=wrong-import-position

HLO = "\n".join([
    "HloModule jit_step",
    "",
    "%fused_computation.7 (param_0: f32[64,32], param_1: f32[32,16]) -> f32[64,16] {",
    "  ROOT %dot.1 = f32[64,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, "
    "rhs_contracting_dims={0}",
    "}",
    "",
    "ENTRY %main (p0: f32[64,32], p1: f32[32,16]) -> f32[64,16] {",
    "  %ynn_fusion.7 = f32[64,16]{1,0} fusion(%p0, %p1), kind=kCustom, "
    "calls=%fused_computation.7, metadata={op_name=\"jit(step)/jvp()/dot_general\"}, "
    "backend_config={\"fusion_config\":{\"kind\":\"__ynn_fusion\"}}",
    "  %add_fusion = f32[64,16]{1,0} fusion(%ynn_fusion.7), kind=kLoop, calls=%x, "
    "metadata={op_name=\"jit(step)/add\"}",
    "  %while.3 = (s32[], f32[64,16]{1,0}) while(%t), condition=%c, body=%b",
    "  ROOT %copy.2 = f32[64,16]{1,0} copy(%add_fusion)",
    "}",
])


def _event(name, ts, dur, tid=1):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_hlo_names_kind_shape_and_source():
  ops = profile_summary.parse_hlo(HLO)
  assert ops["ynn_fusion.7"] == profile_summary.Op("ynn_fusion", "f32[64,16]",
                                                   "jit(step)/jvp()/dot_general")
  assert ops["add_fusion"].kind == "loop_fusion"
  assert ops["copy.2"] == profile_summary.Op("copy", "f32[64,16]", "")
  assert ops["while.3"].kind == "while"


def test_concurrent_ops_share_their_overlap_and_gaps_count_between_ops():
  hlo = profile_summary.parse_hlo(HLO)
  events = [
      _event("ynn_fusion.7", 0, 100, tid=1),   # alone 0-40, with add_fusion 40-100
      _event("add_fusion", 40, 80, tid=2),     # with the dot 40-100, alone 100-120
      _event("copy.2", 150, 50, tid=1),        # after a 30 us gap
      _event("while.3", 0, 200, tid=3),        # control flow: its body's ops are counted
      _event("ThunkExecutor::Execute", 0, 200, tid=4),  # runtime, not an op
      _event("unknown.1", 0, 10, tid=5),       # not in the HLO (another program)
  ]
  rows, between, window = profile_summary.summarize(events, hlo)
  wall = {r.op.kind: r.wall_s * 1e6 for r in rows}
  assert wall == pytest.approx({"ynn_fusion": 40 + 30, "loop_fusion": 30 + 20, "copy": 50})
  assert between * 1e6 == pytest.approx(30)
  assert window * 1e6 == pytest.approx(200)
  # Wall time is conserved: the groups and the gaps add up to the window exactly.
  assert sum(r.wall_s for r in rows) + between == pytest.approx(window)
  assert [r.op.kind for r in rows] == ["ynn_fusion", "loop_fusion", "copy"]


def test_without_hlo_ops_group_by_name_and_control_flow_is_left_out():
  events = [_event("ynn_fusion.7", 0, 10), _event("ynn_fusion.7", 20, 10),
            _event("cond.29", 0, 30), _event("fusion.3.1", 30, 5)]
  rows, between, _ = profile_summary.summarize(events)
  assert {r.op.kind: (r.count, round(r.wall_s * 1e6)) for r in rows} == {
      "ynn_fusion": (2, 20), "fusion": (1, 5)}
  assert between * 1e6 == pytest.approx(10)


def test_a_real_trace_puts_the_matrix_product_first(tmp_path):
  """A jitted program that is one large product and a cheap elementwise op, traced by
  jax.profiler on CPU: the product must lead the table with most of the wall time."""
  a = jnp.asarray(np.random.RandomState(0).randn(768, 768).astype(np.float32))

  @jax.jit
  def step(x):
    y = x
    for _ in range(3):
      y = jnp.tanh(y @ x) * 0.5
    return y

  jax.block_until_ready(step(a))
  with open(tmp_path / "step.hlo.txt", "w", encoding="utf-8") as f:
    f.write(step.lower(a).compile().as_text())
  trace_dir = tmp_path / "raw"
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(3):
      jax.block_until_ready(step(a))
  found = list(trace_dir.rglob("perfetto_trace.json.gz"))
  assert found
  os.replace(found[0], tmp_path / "step.perfetto.json.gz")

  rows, between, window = profile_summary.summarize(
      profile_summary.load_events(str(tmp_path / "step.perfetto.json.gz")),
      profile_summary.parse_hlo((tmp_path / "step.hlo.txt").read_text()))
  assert rows and window > 0
  top = rows[0]
  assert "dot" in top.op.kind or top.op.kind.endswith("_fusion") and "dot" in top.op.source
  assert top.op.shape == "f32[768,768]"
  assert top.count == 9  # three products a call, three calls
  assert top.wall_s > 0.5 * sum(r.wall_s for r in rows)
  assert sum(r.wall_s for r in rows) + between == pytest.approx(window, rel=1e-6)
  # The table finds the HLO beside the trace by its name.
  table = profile_summary.summary_of(str(tmp_path), top=5)
  assert "f32[768,768]" in table.splitlines()[2] and "between ops" in table.splitlines()[0]
