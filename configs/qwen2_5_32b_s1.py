"""s1: Qwen2.5-32B-Instruct on s1K-1.1 with s1's published hyperparameters.

  python -m jaxdistill.main --config=configs/qwen2_5_32b_s1.py --workdir=gs://BUCKET/runs/s1 \
      --config.init.hf_dir=/ckpt/Qwen2.5-32B-Instruct --config.data.sources=/data/s1K-1.1.parquet

Hardware: a TPU v5p-64 or 16x H100 80GB (FSDP over half the chips, each 32k row split over two
by context parallelism: 16 rows a step on 32 devices; bf16 compute, full remat; `tools/plan.py`
puts the peak at ~38 GiB on v5p-64, ~71 GiB on 16x H100). 1k traces in 32,768-token rows, 5
epochs at batch 16: ~315 steps; loss on the completion only.
Hyperparameters (s1 paper): lr 1e-5 cosine, warmup 5%, weight decay 1e-4, Adam (0.9, 0.95).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.preset = "qwen2_5_32b"  # the architecture of init.hf_dir (for planning and tests)
  c.init.hf_dir = "/ckpt/Qwen2.5-32B-Instruct"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.shape = (1, -1, 2, 1)  # (data, fsdp, context, tp)
  c.data.sources = "/data/s1K-1.1.parquet"
  c.data.format = "s1k"
  c.data.seq_len = 32768
  c.data.packing = "pad"  # s1 trains one example per 32k block
  c.train.global_batch_size = 16
  c.train.num_epochs = 5.0
  c.train.lr = 1e-5
  c.train.schedule = "cosine"
  c.train.warmup_ratio = 0.05
  c.train.weight_decay = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.loss_chunk = 2048
  c.train.checkpoint_every = 50
  return c
