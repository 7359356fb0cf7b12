"""Memory planner: will this config fit on that hardware, and if not, what would?

  python tools/plan.py --config=configs/qwen2_5_7b_sft.py --topology=8xH100
  python tools/plan.py --config=configs/qwen2_5_32b_s1.py --topology=v5p-128 \
      --config.train.micro_batches=4 [--json]

Prints per-device bytes of the training step (parameters, AdamW state, gradients, saved
activations under the remat policy, one layer's backward, attention, the loss chunk, FSDP
gathers) and of evaluation (the KV cache of eval.batch_size x eval.samples_at_once rows), the
peak against the devices' memory less a margin, and, when something does not fit, the first
settings that do, as --config overrides. The model is `model.preset` (the architecture of
init.hf_dir) with the config's dtypes, remat and attention; a distillation teacher
(distill.teacher_hf_dir or distill.teacher_checkpoint) is read from its config and counted:
its parameters, hidden states, forward and KL chunk. The estimates come from
jaxdistill/memory.py, checked against XLA's memory_analysis() of the real train step on CPU
(tests/test_plan.py); GPU and TPU compilers allocate differently, hence the margin.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdistill import hardware, memory, settings as settings_lib, startup  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/<name>.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "8xH100, 16xH200, v5p-128, v6e-256, v5e-256")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Share of each device's memory kept free for the "
                             "runtime, fragmentation and the estimate's error.")
_SUGGESTIONS = flags.DEFINE_integer("suggestions", 5, "Fitting settings to print when the "
                                    "config does not fit.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "Evaluation prompt bucket (a power of two "
                                   "above the longest prompt; AIME prompts are ~100-250 tokens).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
flags.mark_flags_as_required(["config", "topology"])


def _gib(n: int) -> str:
  return f"{n / memory.GiB:8.2f} GiB"


def report(p: dict) -> str:
  m, t = p["model"], p["topology"]
  lines = [
      f"model {m['preset']} ({m['params'] / 1e9:.2f}B parameters), params {m['param_dtype']}, "
      f"compute {m['compute_dtype']}, remat {m['remat']}, attention {m['attention']}",
      f"{t['name']}: {t['devices']} x {t['chip']} ({t['hbm_bytes'] / memory.GiB:.0f} GiB, "
      f"{t['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16); mesh "
      + " ".join(f"{k}={v}" for k, v in p["mesh"].items()),
      f"budget per device: {_gib(p['budget_bytes']).strip()} ({p['margin']:.0%} margin)"]
  if p.get("teacher"):
    lines.insert(1, f"teacher for logit distillation ({p['teacher']['params'] / 1e9:.2f}B "
                    f"parameters, {p['teacher']['param_dtype']}, frozen)")
  if t["chip"].startswith(("H", "A")):
    lines.append("(JAX takes 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised; "
                 "set it to ~0.95 for this budget to hold)")
  for title, e in (("Training step", p["train"]), ("Evaluation (sampling)", p["eval"])):
    lines += ["", f"{title}, per device: " + "; ".join(e["notes"])]
    for name, value in e["held"].items():
      lines.append(f"  {name:58s}{_gib(value)}")
    if len(e["moments"]) > 1:
      lines.append("  plus the largest of:")
    for moment, terms in e["moments"].items():
      parts = " + ".join(f"{name} {v / memory.GiB:.2f}" for name, v in terms.items())
      lines.append(f"    {moment:56s}{_gib(sum(terms.values()))}   ({parts})")
    verdict = ("fits" if e["fits"] else "DOES NOT FIT" if e["peak"] > p["budget_bytes"]
               else "fits in memory, but refused:")
    lines.append(f"  {'peak (' + e['phase'] + ')':58s}{_gib(e['peak'])}   {verdict}")
    for problem in e["problems"]:
      lines.append(f"  refused: {problem}")
    if e["suggestions"]:
      lines.append("  fits with (least recomputation and communication first"
                   + ("; fix what is refused above too" if e.get("unaddressed") else "")
                   + "):")
      for s in e["suggestions"]:
        lines.append(f"    {s['flags']:70s} peak {_gib(s['peak']).strip()}")
    elif not e["fits"]:
      lines.append("  no setting searched fits: more devices, or a smaller batch / sequence")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  s = settings_lib.parse(_CONFIG.value)
  teacher = startup.teacher_source(s)[1] if s.distill.enabled else None
  p = memory.plan(s, hardware.topology(_TOPOLOGY.value), _MARGIN.value, _SUGGESTIONS.value,
                  _PROMPT_LEN.value, teacher=teacher)
  print(json.dumps(p, indent=1) if _JSON.value else report(p))


if __name__ == "__main__":
  app.run(main)
