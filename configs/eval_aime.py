"""AIME 2024 + 2025 evaluation the way the field reports it: 64 samples per problem.

  python -m jaxdistill.main --config=configs/eval_aime.py --workdir=RUNS/eval \
      --config.init.checkpoint=RUNS/sft            # or --config.init.hf_dir=/ckpt/model

Temperature 0.6, top-p 0.95, up to 32,768 new tokens, plus one greedy sample; fp32 compute
and KV cache. Writes RUNS/eval/eval/<task>/{generations.jsonl, summary.json, budget.png} and
RUNS/eval/eval/report.md. Rerunning continues an interrupted evaluation. A distilled
Qwen2.5-32B (s1-style) should reach roughly 40-55% avg@64 on AIME24.
Hardware: 8x H100 80GB for a Qwen2.5-32B (8 slots of 2 samples: 16 rows of 33k fp32 cache a
device; on more devices raise eval.samples_at_once, as `tools/plan.py` suggests).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = "eval"
  c.model.preset = "qwen2_5_32b"  # the architecture of init.* (for planning and tests)
  c.model.compute_dtype = "float32"
  c.mesh.shape = (1, -1, 1, 1)
  c.eval.tasks = "aime24,aime25"
  c.eval.num_samples = 64
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = 32768
  # 8 slots of 2 samples: 16 rows of 33k fp32 cache, which fits a Qwen2.5-32B on 8xH100
  # (tools/plan.py); on more devices raise samples_at_once (the planner says how far).
  c.eval.batch_size = 8
  c.eval.samples_at_once = 2
  return c
