"""Attention implementations side by side: forward + backward time and memory per length.

  python tools/bench_attention.py                        # CPU: dense vs blockwise, 2k/8k/32k
  python tools/bench_attention.py --impls=dense,blockwise,pallas_gpu --dtype=bfloat16 \
      --heads=32 --kv_heads=8 --head_dim=64              # a GPU: adds the fused kernel

Each row times one jitted forward + backward (gradients of q, k, v) of causal self-attention
over rows packed with four examples each, and reports XLA's temporary memory for it
(`memory_analysis()`, compile only) and the attention FLOP/s counting only unmasked work
(causal within each example). Dense runs only where its scores fit `--dense_max_gib`. The
ratio column is the time against dense at the same length (below 1: faster).

The model-level figure the issue tracks, MFU of llama3_2_1b at seq 8192 on one GPU, comes
from the train-step benchmark with the fused kernel:

  python tools/bench_train.py --preset=llama3_2_1b --seq=8192 --batch=1 --dtype=bfloat16 \
      --remat=save_dots_no_batch --attention=pallas_gpu
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import attention  # noqa: E402
from tools.benchlib import median_time  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["2048", "8192", "32768"], "Row lengths T.")
flags.DEFINE_list("impls", ["dense", "blockwise"], "Implementations (model_config.ATTENTION_IMPLS).")
flags.DEFINE_integer("batch", 1, "Rows.")
flags.DEFINE_integer("heads", 8, "Query heads N.")
flags.DEFINE_integer("kv_heads", 4, "Key/value heads K.")
flags.DEFINE_integer("head_dim", 64, "Head dimension H.")
flags.DEFINE_integer("block", 0, "Block size of blockwise / fused attention; 0: the platform's "
                     "default (attention.block_size).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q/k/v dtype.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).")
flags.DEFINE_float("dense_max_gib", 8.0, "Skip dense where its fp32 scores exceed this.")


def packed_row(t: int):
  """Positions and segment ids of a row holding four examples (40/30/20/10% of T)."""
  lengths = [int(t * f) for f in (0.4, 0.3, 0.2)]
  lengths.append(t - sum(lengths))
  pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
  seg = np.repeat(np.arange(1, 5), lengths).astype(np.int32)
  return pos, seg, lengths


def make_fn(impl, pos, seg):
  block = attention.block_size(FLAGS.block)

  def fwd(q, k, v):
    if impl == "dense":
      return attention.dense_attention(q, k, v, attention.attention_mask(pos, seg, pos, seg))
    if impl == "blockwise":
      return attention.blockwise_attention(q, k, v, pos, seg, pos, seg, block=block)
    fused = {"pallas_gpu": attention.pallas_gpu_attention,
             "splash": attention.splash_attention}[impl]
    return fused(q, k, v, seg, block=block)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv):
  del argv
  b, n, kv, h = FLAGS.batch, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
  dtype = jnp.dtype(FLAGS.dtype)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}): batch {b}, heads {n}/{kv}, "
        f"head_dim {h}, {FLAGS.dtype}, block {attention.block_size(FLAGS.block)}; "
        "forward + backward")
  print(f"{'T':>6} {'impl':>11} {'ms':>10} {'temp MiB':>10} {'GFLOP/s':>9} {'vs dense':>9}")
  for t in (int(x) for x in FLAGS.seq_lens):
    pos_T, seg_T, lengths = packed_row(t)
    pos, seg = (jnp.asarray(np.broadcast_to(x, (b, t))) for x in (pos_T, seg_T))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kv, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kv, h)), dtype)
    # Unmasked (query, key) pairs x 4 matmuls (fwd QK, PV; bwd 2.5 of them, counted as 3.5x).
    pairs = sum(m * (m + 1) // 2 for m in lengths)
    flops = 2 * 2 * pairs * n * h * b * 3.5
    dense_s = None
    for impl in FLAGS.impls:
      if impl == "dense" and b * n * t * t * 4 > FLAGS.dense_max_gib * 2**30:
        print(f"{t:>6} {impl:>11} {'(scores do not fit)':>33}")
        continue
      fn = make_fn(impl, pos, seg)
      try:
        compiled = fn.lower(q, k, v).compile()
      except Exception as e:  # pylint: disable=broad-except
        print(f"{t:>6} {impl:>11} unavailable here: {type(e).__name__}: {str(e)[:80]}")
        continue
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
      seconds = median_time(lambda: jax.block_until_ready(compiled(q, k, v)), FLAGS.repeats)
      if impl == "dense":
        dense_s = seconds
      ratio = f"{seconds / dense_s:8.2f}x" if dense_s else f"{'-':>9}"
      print(f"{t:>6} {impl:>11} {seconds * 1e3:10.1f} {temp:10.1f} "
            f"{flops / seconds / 1e9:9.1f} {ratio}")


if __name__ == "__main__":
  app.run(main)
