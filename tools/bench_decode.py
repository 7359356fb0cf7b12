"""Decode throughput against transformers' generate (KV cache) on the same weights.

  python tools/bench_decode.py                         # bench model: 64-token prompts, 128 new
  python tools/bench_decode.py --preset=qwen2_5_0_5b --prompt_len=2048 --new_tokens=64

Decode speed is separated from the prompt's prefill: the sampler reports the seconds of its
prefill and decode phases (`generate(timings=...)`), and transformers generates from a KV
cache of the prompt made beforehand (a fresh copy each call), so both time N one-token steps
per row and nothing else. decode tokens/s = batch x N / median seconds. Prints both
frameworks' decode tokens/s, their ratio, and the share of the memory-bandwidth bound:
batch x read bandwidth / (bytes of weights + KV cache read per step), with the read
bandwidth measured in the same run (a large array reduction). Prefill time is printed too.
"""

import copy
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill.model_config import get_preset  # noqa: E402
import benchlib  # noqa: E402
from jaxdistill.sampler import Sampler, SamplingConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "bench", "'bench' or a model_config.PRESETS name.")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row (no early stop).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights, compute and cache.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting (median).")
flags.DEFINE_bool("vs_hf", True, "Also time transformers generate.")




def _read_bandwidth() -> float:
  """Bytes/s of a large reduction: what streaming weights from memory can reach here. The
  array, 4 GiB, is larger than any CPU's last-level cache (a 256 MiB one partly fits in a
  large server L3 and read 39-66 GB/s from run to run here) and makes one call's launch cost
  noise on an accelerator."""
  n = 2**30
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(jnp.sum)
  seconds = benchlib.median_time(lambda: f(x).block_until_ready(), 5)
  return x.nbytes / seconds


def _decode_rate(generate, batch: int) -> tuple[float, float]:
  """(decode tokens/s, prefill seconds): `generate(n)` makes n new tokens per row and returns
  (decode seconds, prefill seconds)."""
  n = FLAGS.new_tokens
  generate(n)  # compiles
  runs = [generate(n) for _ in range(FLAGS.repeats)]
  return (batch * n / max(float(np.median([d for d, _ in runs])), 1e-9),
          float(np.median([p for _, p in runs])))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  cfg = get_preset(FLAGS.preset)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  ref, model = benchlib.twin_models(cfg, FLAGS.dtype, device)
  sampler = Sampler.from_model(model)
  bandwidth = _read_bandwidth()
  itemsize = 2 if FLAGS.dtype == "bfloat16" else 4
  weight_bytes = cfg.num_params() * itemsize
  print(f"model: {FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M params, {FLAGS.dtype}), prompt "
        f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens; {jax.devices()[0].device_kind}; "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
  for b in [int(x) for x in FLAGS.batch]:
    prompts = np.random.RandomState(b).randint(3, cfg.vocab_size, (b, FLAGS.prompt_len)).tolist()

    def ours(n):
      timings = {}
      sampler.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=n,
                                               cache_dtype=FLAGS.dtype), timings=timings,
                       decode_chunk=n)
      return timings["decode"], timings["prefill"]

    ours_tps, prefill = _decode_rate(ours, b)
    cache_len = FLAGS.prompt_len + FLAGS.new_tokens / 2  # on average over the decode
    kv_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize) * cache_len
    bound_tps = b * bandwidth / (weight_bytes + b * kv_bytes)
    line = (f"batch {b}: jaxdistill {ours_tps:9.1f} tok/s ({ours_tps / bound_tps:.2f} of the "
            f"bound {bound_tps:,.0f}; prefill {prefill:.2f}s)")
    if FLAGS.vs_hf:
      ids = torch.tensor(prompts, device=device)
      sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
      with torch.inference_mode():
        start = time.perf_counter()
        # The prompt less its last token: generate feeds that one, then N - 1 more.
        prefilled = ref(ids[:, :-1], use_cache=True)
        cache_arg = "cache" if "cache" in prefilled else "past_key_values"  # transformers 5
        prompt_cache = prefilled[cache_arg]
        sync()
        t_prefill = time.perf_counter() - start

      def theirs(n):
        cache = copy.deepcopy(prompt_cache)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
          ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       **{cache_arg: cache})
        sync()
        return time.perf_counter() - start, t_prefill

      theirs_tps, t_prefill = _decode_rate(theirs, b)
      line += (f" | transformers {theirs_tps:9.1f} tok/s ({theirs_tps / bound_tps:.2f}; "
               f"prefill {t_prefill:.2f}s) | ratio {ours_tps / theirs_tps:.2f}x")
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
