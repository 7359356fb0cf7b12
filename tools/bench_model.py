"""Forward throughput of jaxdistill's model against transformers (PyTorch) on the same weights.

  python tools/bench_model.py                      # the bench model on this machine
  python tools/bench_model.py --preset=llama3_2_1b --seq=2048 --dtype=bfloat16   # on a GPU

Both run in this process on the same random weights (checked to agree), and the ratio
jaxdistill/transformers of tokens/s is printed. On a GPU or TPU the figure is also given as
model FLOP utilisation against the device's bf16 peak.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Both frameworks share the accelerator in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdistill import metrics  # noqa: E402
from jaxdistill.model_config import get_preset  # noqa: E402
import benchlib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "bench", "A model_config.PRESETS name; 'bench' is d=256, "
                    "4 layers, 8/4 heads, MLP 768, vocab 8192.")
flags.DEFINE_integer("batch", 8, "Sequences per forward.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_integer("iters", 20, "Timed forwards per framework (after warm-up).")
flags.DEFINE_bool("vs_hf", True, "Also time transformers PyTorch on the same weights.")




def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  cfg = get_preset(FLAGS.preset)
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  ref, model = benchlib.twin_models(cfg, FLAGS.dtype, torch_device)
  graphdef, state = nnx.split(model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq))

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]

  jtokens = jnp.asarray(tokens)
  jax_s = benchlib.median_time(lambda: forward(state, jtokens).block_until_ready(),
                               FLAGS.iters, warmup=2)
  n_tokens = FLAGS.batch * FLAGS.seq
  flops = metrics.forward_flops_per_token(cfg, FLAGS.seq) * n_tokens
  device = jax.devices()[0]
  print(f"model: {FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M params), batch {FLAGS.batch} x "
        f"seq {FLAGS.seq}, {FLAGS.dtype}")
  print(f"jax device: {device.device_kind} x{jax.device_count()}; torch device: {torch_device} "
        f"({torch.get_num_threads()} threads)")
  line = (f"jaxdistill   {jax_s * 1e3:9.2f} ms/forward  {n_tokens / jax_s:12,.0f} tokens/s  "
          f"{flops / jax_s / 1e9:9.1f} GFLOP/s")
  peak = metrics.device_peak_flops(device)
  if peak:
    line += f"  MFU {flops / jax_s / peak:.1%}"
  print(line)
  if not FLAGS.vs_hf:
    return
  ttokens = torch.tensor(tokens, device=torch_device)

  def torch_forward():
    with torch.inference_mode():
      out = ref(ttokens).logits
    if torch_device == "cuda":
      torch.cuda.synchronize()
    return out

  want = torch_forward().float().cpu().numpy()
  got = np.asarray(forward(state, jtokens), np.float32)
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
  torch_s = benchlib.median_time(torch_forward, FLAGS.iters, warmup=2)
  print(f"transformers {torch_s * 1e3:9.2f} ms/forward  {n_tokens / torch_s:12,.0f} tokens/s  "
        f"{flops / torch_s / 1e9:9.1f} GFLOP/s")
  print(f"logits agree: max |diff| / max |logit| = {err:.2e}")
  print(f"ratio (jaxdistill tokens/s / transformers tokens/s): {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
