"""Where a profiled computation's time went: its XLA ops by share of wall time.

  python tools/profile_summary.py TRACE [--hlo=FILE] [--top=25]
  python tools/bench_train.py --hf_dir=DIR --batch=2 --seq=1024 --profile_dir=/tmp/prof
                                       # writes a train step's trace and HLO, prints this table

TRACE is a `perfetto_trace.json.gz` written by `jax.profiler` with `create_perfetto_trace=True`,
or a directory holding one (the newest is read): `train.profile_steps` writes one under
`workdir/profile`, `tools/bench_train.py --profile_dir` and `tools/bench_gpu.py` write one of a
train step. The optimized HLO of the traced program (`--hlo`; else NAME.hlo.txt beside a
NAME.perfetto.json.gz, as those tools write it, or an hlo.txt beside the trace or in the
directory; `jitted.lower(...).compile().as_text()` gives it) names each op's result shape and
the JAX operation it came from (`jvp(...)`: forward, `transpose(jvp(...))`: backward);
without it ops are grouped by their names alone.

The table is wall time, not the sum of op durations: XLA:CPU runs independent ops on several
threads at once (a layer's gate and up projections in decode) and hands some matrix products
to a thread pool whose work no op event covers. Each instant is split equally among the ops
running then, and instants with none running are reported as `between ops` (on CPU mostly
those pooled products and loop control). A sum of durations would count overlapped work
twice and pooled work not at all.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("hlo", None, "Optimized HLO text of the traced program (default: an "
                    "hlo.txt beside the trace).")
flags.DEFINE_integer("top", 25, "Rows to print.")

# Events of the runtime around the ops, and control-flow ops whose bodies are traced too.
_RUNTIME = ("$", "end:", "ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "Parse",
            "Handle", "CommonPjRt", "Allocate", "PythonRefManager", "PjitFunction")
_CONTROL = ("while", "conditional", "cond", "call")


@dataclasses.dataclass(frozen=True)
class Op:
  """One HLO instruction as the summary groups it."""
  kind: str  # "dot", "fusion kind" ("ynn_fusion", "loop_fusion", ...), "copy", ...
  shape: str  # result shape, e.g. "f32[2048,576]"
  source: str  # the JAX operation, from the instruction's metadata op_name


@dataclasses.dataclass(frozen=True)
class Row:
  op: Op
  wall_s: float  # wall time attributed to the group
  count: int  # events


def find_trace(path: str) -> str:
  """`path` itself, or the newest perfetto_trace.json.gz under the directory `path`."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*perfetto*.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no perfetto trace (*perfetto*.json.gz) under {path}; trace "
                            "with jax.profiler.trace(dir, create_perfetto_trace=True)")
  return max(found, key=os.path.getmtime)


def load_events(trace_path: str) -> list[dict]:
  with gzip.open(trace_path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def parse_hlo(text: str) -> dict[str, Op]:
  """{instruction name: Op} for every instruction of an HLO module's text."""
  ops = {}
  line_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|[^\s(]+) ([\w\-]+)\(")
  for line in text.splitlines():
    m = line_re.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    kind = opcode
    if opcode == "fusion":
      fusion_kind = re.search(r'"kind":"__(\w+?)_fusion"', line) or re.search(
          r"kind=k(\w+)", line)
      kind = f"{fusion_kind.group(1).lower()}_fusion" if fusion_kind else "fusion"
    source = re.search(r'op_name="([^"]*)"', line)
    ops[name] = Op(kind, re.sub(r"\{[^}]*\}", "", shape), source.group(1) if source else "")
  return ops


def _is_op(name: str, hlo: dict[str, Op] | None) -> bool:
  if name.startswith(_RUNTIME):
    return False
  if hlo is not None:
    return name in hlo and hlo[name].kind not in _CONTROL
  return name.split(".")[0] not in _CONTROL


def summarize(events: list[dict], hlo: dict[str, Op] | None = None
              ) -> tuple[list[Row], float, float]:
  """(rows by wall time, descending; seconds between ops; the window in seconds).

  The window runs from the first op's start to the last op's end. An instant with k ops
  running gives each 1/k of it; an instant with none counts as between ops.
  """
  spans = []
  for e in events:
    if e.get("ph") != "X" or not _is_op(e.get("name", ""), hlo):
      continue
    name = e["name"]
    op = hlo[name] if hlo is not None else Op(re.sub(r"(\.\d+)+$", "", name), "", "")
    spans.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), op))
  if not spans:
    return [], 0.0, 0.0
  points = sorted([(s, 1, op) for s, _, op in spans] + [(t, -1, op) for _, t, op in spans],
                  key=lambda p: (p[0], p[1]))
  running: collections.Counter = collections.Counter()
  wall: collections.Counter = collections.Counter()
  idle, last, active = 0.0, points[0][0], 0
  for t, delta, op in points:
    dt = t - last
    if dt > 0:
      if active:
        for o, k in running.items():
          if k:
            wall[o] += dt * k / active
      else:
        idle += dt
    running[op] += delta
    active += delta
    last = t
  counts = collections.Counter(op for _, _, op in spans)
  rows = [Row(op, us / 1e6, counts[op]) for op, us in wall.items()]
  rows.sort(key=lambda r: -r.wall_s)
  window = (max(t for _, t, _ in spans) - min(s for s, _, _ in spans)) / 1e6
  return rows, idle / 1e6, window


def _short_source(source: str) -> str:
  """The op_name without its jit(...) prefix and the nested loop bodies' noise."""
  source = re.sub(r"^jit\([^)]*\)/", "", source)
  return source.replace("/while/body", "").replace("/closed_call", "")


def format_table(rows: list[Row], between_s: float, window_s: float, top: int) -> str:
  lines = [f"{window_s:.3f} s from the first op to the last; {between_s:.3f} s "
           f"({between_s / window_s:.0%}) between ops" if window_s else "no ops in the trace",
           f"{'wall s':>9} {'share':>6} {'events':>7}  {'op':<22} {'shape':<28} source"]
  for r in rows[:top]:
    lines.append(f"{r.wall_s:9.3f} {r.wall_s / window_s:6.1%} {r.count:7d}  {r.op.kind:<22} "
                 f"{r.op.shape[:28]:<28} {_short_source(r.op.source)[:90]}")
  rest = sum(r.wall_s for r in rows[top:])
  if rest:
    lines.append(f"{rest:9.3f} {rest / window_s:6.1%} {'':7}  the other {len(rows) - top} "
                 "groups")
  return "\n".join(lines)


def summary_of(trace: str, hlo_path: str | None = None, top: int = 25) -> str:
  """The table for a trace file or directory, with its HLO if one is given or found."""
  trace_path = find_trace(trace)
  if hlo_path is None:
    beside = os.path.dirname(trace_path)
    stem = os.path.basename(trace_path).split(".perfetto")[0].split("perfetto_trace")[0]
    for candidate in (os.path.join(beside, f"{stem}.hlo.txt") if stem else "",
                      os.path.join(beside, "hlo.txt"),
                      os.path.join(trace, "hlo.txt") if os.path.isdir(trace) else ""):
      if candidate and os.path.exists(candidate):
        hlo_path = candidate
        break
  hlo = None
  if hlo_path:
    with open(hlo_path, encoding="utf-8") as f:
      hlo = parse_hlo(f.read())
  rows, between, window = summarize(load_events(trace_path), hlo)
  return format_table(rows, between, window, top)


def main(argv):
  if len(argv) != 2:
    sys.exit("usage: profile_summary.py TRACE [--hlo=FILE] [--top=N]")
  try:
    print(summary_of(argv[1], FLAGS.hlo, FLAGS.top))
  except FileNotFoundError as e:
    sys.exit(str(e))


if __name__ == "__main__":
  app.run(main)
