"""O1-Journey setting: Qwen2.5-Math-72B, long context via a RoPE override, in two phases.

  # Phase 1, format familiarisation:
  python -m jaxdistill.main --config=configs/qwen2_5_math_72b_sft.py:1 --workdir=RUNS/phase1
  # Phase 2, distilled traces, from phase 1's weights with a fresh optimizer and schedule:
  python -m jaxdistill.main --config=configs/qwen2_5_math_72b_sft.py:2 --workdir=RUNS/phase2 \
      --config.init.checkpoint=RUNS/phase1

Phase 2 takes `init.checkpoint` (phase 1's workdir, or one of its checkpoints/<step>) from the
command line and is refused without it.

Hardware: TPU v5p-256 or 64x H100 80GB (FSDP over half the chips, each 16k row split over two
by context parallelism: 64 rows a step on 128 devices; bf16 compute, full remat; `tools/plan.py`
puts the peak at ~56 GiB on 64x H100, ~33 GiB on v5p-256).
32k-token traces: `--config.data.seq_len=32768 --config.model.max_position_embeddings=32768
--config.mesh.shape=1,-1,4,1 --config.train.micro_batches=2` (context parallelism over four
chips; ~60 GiB on 64x H100).
Qwen2.5-Math ships 4,096 positions and rope_theta 1e4; both are raised at import so
16k-token traces fit.
"""

from ml_collections import config_dict

from configs import base


def get_config(phase: str = "1"):
  c = base.get_config()
  c.model.preset = "qwen2_5_math_72b"  # the architecture of init.hf_dir (for planning and tests)
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.model.rope_theta = 300_000.0
  c.model.max_position_embeddings = 16384
  c.mesh.shape = (1, -1, 2, 1)  # (data, fsdp, context, tp)
  c.data.seq_len = 16384
  c.train.loss_chunk = 2048
  c.train.schedule = "cosine"
  c.train.warmup_ratio = 0.03
  c.train.checkpoint_every = 100
  if phase == "1":
    c.init.hf_dir = "/ckpt/Qwen2.5-Math-72B"
    c.data.sources = "/data/format_familiarisation.jsonl"
    c.train.global_batch_size = 64
    c.train.num_epochs = 1.0
    c.train.lr = 1e-5
  elif phase == "2":
    c.init.checkpoint = config_dict.placeholder(str)  # phase 1's workdir, on the command line
    c.data.sources = "/data/distilled_traces.jsonl"
    c.train.global_batch_size = 64
    c.train.num_epochs = 3.0
    c.train.lr = 5e-6
  else:
    raise ValueError(f"phase must be '1' or '2', got {phase!r}")
  return c
