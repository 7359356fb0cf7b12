"""Qwen2.5-7B SFT on distilled long-CoT traces (open-r1 / Sky-T1 style), 16k-token rows.

  python -m jaxdistill.main --config=configs/qwen2_5_7b_sft.py --workdir=gs://BUCKET/runs/q7b \
      --config.init.hf_dir=/ckpt/Qwen2.5-7B-Instruct --config.data.sources=/data/traces.jsonl

Hardware: 8x H100 80GB or a TPU v5p-16 (FSDP over all chips, 4 micro-batches: 3 rows of
16k tokens per device at a time; `python tools/plan.py --config=configs/qwen2_5_7b_sft.py
--topology=8xH100` puts the peak at ~46 GiB). 3 epochs of 17k traces is ~1.2k steps at batch
96 rows; expect the training loss to settle near 0.3-0.4.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.preset = "qwen2_5_7b"  # the architecture of init.hf_dir (for planning and tests)
  c.init.hf_dir = "/ckpt/Qwen2.5-7B-Instruct"
  c.model.param_dtype = "float32"  # fp32 master weights
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.shape = (1, -1, 1, 1)
  c.data.sources = "/data/traces.jsonl"
  c.data.seq_len = 16384
  c.train.global_batch_size = 96
  c.train.micro_batches = 4  # the loss chunk's fp32 logits scale with rows per device
  c.train.num_epochs = 3.0
  c.train.lr = 1e-5
  c.train.warmup_ratio = 0.1
  c.train.weight_decay = 0.0
  c.train.loss_chunk = 2048
  c.train.checkpoint_every = 200
  return c
