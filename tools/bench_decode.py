"""Decode throughput against transformers' generate (KV cache) on the same weights.

  python tools/bench_decode.py                         # bench model: 64-token prompts, 128 new
  python tools/bench_decode.py --preset=qwen2_5_0_5b --prompt_len=2048 --new_tokens=64

Decode speed is separated from the prompt's prefill: the sampler reports the seconds of its
prefill and decode phases (`generate(timings=...)`), and transformers generates from a KV
cache of the prompt made beforehand (a fresh copy each call), so both time N one-token steps
per row and nothing else. decode tokens/s = batch x N / median seconds. Prints both
frameworks' decode tokens/s, their ratio, and the share of the memory-bandwidth bound:
batch x read bandwidth / (bytes of weights + KV cache read per step), with the read
bandwidth (a large array reduction) measured just before each timed run, so that each run
is held to the bandwidth of its own moment. Prefill time is printed too.
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




class _BandwidthProbe:
  """Read bandwidth: bytes/s of a reduction over a 4 GiB array, larger than any CPU's
  last-level cache (a 256 MiB one partly fits in a large server L3) and long enough that a
  call's launch cost is noise on an accelerator. The array is kept, so the probe can run
  next to each timed decode: on a shared machine bandwidth drifts by 10% or more within
  minutes, and a share of the bound is only as good as a reading taken under the same
  conditions."""

  def __init__(self):
    self.x = jnp.ones((2**30,), jnp.float32)
    self.sum = jax.jit(jnp.sum)
    self.sum(self.x).block_until_ready()
    self.readings: list[float] = []

  def __call__(self) -> float:
    gbs = self.x.nbytes / benchlib.median_time(lambda: self.sum(self.x).block_until_ready(),
                                              3, warmup=0)
    self.readings.append(gbs)
    return gbs


def _decode_rate(generate, batch: int, probe: _BandwidthProbe, bytes_per_step: float
                 ) -> tuple[float, float, float]:
  """(decode tokens/s, share of the bandwidth bound, prefill seconds). `generate(n)` makes n
  new tokens per row and returns (decode seconds, prefill seconds). Each timed run reads the
  bandwidth just before it; the share is the median over runs of the run's step rate over
  the step rate its reading allows (bandwidth / bytes read per step)."""
  n = FLAGS.new_tokens
  generate(n)  # compiles
  runs, shares = [], []
  for _ in range(FLAGS.repeats):
    bandwidth = probe()
    decode, prefill = generate(n)
    runs.append((decode, prefill))
    shares.append((n / max(decode, 1e-9)) / (bandwidth / bytes_per_step))
  return (batch * n / max(float(np.median([d for d, _ in runs])), 1e-9),
          float(np.median(shares)), float(np.median([p for _, p in runs])))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  cfg = get_preset(FLAGS.preset)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  ref, model = benchlib.twin_models(cfg, FLAGS.dtype, device)
  sampler = Sampler.from_model(model)
  probe = _BandwidthProbe()
  itemsize = 2 if FLAGS.dtype == "bfloat16" else 4
  weight_bytes = cfg.num_params() * itemsize
  print(f"model: {FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M params, {FLAGS.dtype}), prompt "
        f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens; {jax.devices()[0].device_kind}; "
        f"read bandwidth {probe() / 1e9:.1f} GB/s")
  for b in [int(x) for x in FLAGS.batch]:
    prompts = np.random.RandomState(b).randint(3, cfg.vocab_size, (b, FLAGS.prompt_len)).tolist()

    def ours(n):
      timings = {}
      sampler.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=n,
                                               cache_dtype=FLAGS.dtype), timings=timings,
                       decode_chunk=n)
      return timings["decode"], timings["prefill"]

    cache_len = FLAGS.prompt_len + FLAGS.new_tokens / 2  # on average over the decode
    kv_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize) * cache_len
    step_bytes = weight_bytes + b * kv_bytes
    first = len(probe.readings)
    ours_tps, ours_share, prefill = _decode_rate(ours, b, probe, step_bytes)
    line = (f"batch {b}: jaxdistill {ours_tps:9.1f} tok/s ({ours_share:.2f} of the bound; "
            f"prefill {prefill:.2f}s)")
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

      theirs_tps, theirs_share, t_prefill = _decode_rate(theirs, b, probe, step_bytes)
      line += (f" | transformers {theirs_tps:9.1f} tok/s ({theirs_share:.2f}; "
               f"prefill {t_prefill:.2f}s) | ratio {ours_tps / theirs_tps:.2f}x")
    seen = probe.readings[first:]
    line += (f" | bandwidth {min(seen) / 1e9:.1f}-{max(seen) / 1e9:.1f} GB/s, bound at the "
             f"median {b * float(np.median(seen)) / step_bytes:,.0f} tok/s")
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
