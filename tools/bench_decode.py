"""Decode throughput against transformers' generate (KV cache) on the same weights.

  python tools/bench_decode.py                         # bench model: 64-token prompts, 128 new
  python tools/bench_decode.py --preset=qwen2_5_0_5b --prompt_len=2048 --new_tokens=64
  python tools/bench_decode.py --compile_depths=8,80   # decode compile time against depth
  python tools/bench_decode.py --hf_dir=DIR            # a Hugging Face model's own weights

Decode speed is separated from the prompt's prefill: the sampler reports the seconds of its
prefill and decode phases (`generate(timings=...)`), and transformers generates from a KV
cache of the prompt made beforehand (a fresh copy each call), so both time N one-token steps
per row and nothing else. decode tokens/s = batch x N / median seconds. Prints both
frameworks' decode tokens/s, their ratio, and the share of the memory-bandwidth bound:
batch x read bandwidth / bytes a step must read (the weights, less an untied input
embedding, which is only gathered, plus the KV cache at its mean length:
benchlib.decode_bytes_per_step), with the read bandwidth (a large array reduction) measured
just before each timed run, so that each run is held to the bandwidth of its own moment.
Prefill time is printed too. With --hf_dir both frameworks load that directory (e.g.
SmolLM2-135M from tests/real_model.py) instead of random weights of --preset; transformers
runs with sdpa attention and as many torch threads as cores.

With --growth, it measures instead what the growing KV cache saves a long generation
(sampler.GROW_FROM): greedy decoding of --new_tokens tokens per row at each --batch, in chunks
of 16 steps as evaluation decodes, with the cache holding every answer slot from the start
(grow_from=0) and growing from GROW_FROM slots; the seconds from an empty compilation cache
(each size's compile counted), alternating, medians of --repeats, and their ratio.

With --compile_depths, it measures instead what depth costs the decode step: for each depth,
a model of the preset's width with that many layers (random weights, no transformers twin),
the seconds the first decode call of a 4-step chunk takes beyond a steady one (tracing,
lowering and compiling it; median of --repeats, caches cleared before each) and the steady
per-step time of --new_tokens steps, at batch 1;
then the ratio of the last depth's compile to the first's. --unroll sets the sampler's
(decode_weights.UNROLL by default).
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
import numpy as np  # noqa: E402

from jaxdistill import decode_weights, model as model_lib, rules  # noqa: E402
from jaxdistill import sampler as sampler_lib  # noqa: E402
from jaxdistill.model_config import ModelConfig, get_preset  # noqa: E402
import benchlib  # noqa: E402
from jaxdistill.sampler import Sampler, SamplingConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "bench", "'bench' or a model_config.PRESETS name.")
flags.DEFINE_string("hf_dir", None, "A Hugging Face directory: its config and weights instead "
                    "of --preset's random ones.")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row (no early stop).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights, compute and cache.")
flags.DEFINE_integer("repeats", 3, "Timed runs per setting (median).")
flags.DEFINE_bool("vs_hf", True, "Also time transformers generate.")
flags.DEFINE_list("compile_depths", [], "Layer counts (e.g. 8,80): time the decode compile "
                  "and step of the preset's width at each depth instead (module docstring).")
flags.DEFINE_integer("unroll", decode_weights.UNROLL, "Sampler.from_model's unroll.")
flags.DEFINE_bool("growth", False, "Time a long generation with the cache growing against a "
                  "cache of every answer slot from the start.")




def _compile_and_step(cfg, layers: int) -> tuple[float, float, int]:
  """(seconds of the first decode call beyond a steady one, steady seconds per step, blocks
  unrolled) at batch 1 for `cfg` with `layers` layers."""
  deep = cfg.replace(num_layers=layers)
  sampler = Sampler.from_model(model_lib.create_model(deep, seed=0), consume=True,
                               unroll=FLAGS.unroll)
  prompt = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, FLAGS.prompt_len)).tolist()

  def decode_seconds(n):
    timings = {}
    sampler.generate(prompt, SamplingConfig(rules.Greedy(), max_new_tokens=n,
                                            cache_dtype=FLAGS.dtype),
                     timings=timings, decode_chunk=n)
    return timings["decode"]

  # A short chunk, so that the steady run subtracted is short next to the compile; each
  # compile from cleared caches, the median of several (the machine may be shared).
  firsts = []
  for _ in range(FLAGS.repeats):
    jax.clear_caches()
    firsts.append(decode_seconds(4))
  compile_s = float(np.median(firsts)) - float(np.median([decode_seconds(4)
                                                          for _ in range(FLAGS.repeats)]))
  decode_seconds(FLAGS.new_tokens)  # compiles for the longer cache
  steady = float(np.median([decode_seconds(FLAGS.new_tokens) for _ in range(FLAGS.repeats)]))
  return compile_s, steady / FLAGS.new_tokens, sampler.stacks


def _growth(cfg) -> None:
  """--growth: a long greedy generation with and without the growing cache."""
  sampler = Sampler.from_model(model_lib.create_model(cfg, seed=0), unroll=FLAGS.unroll)
  print(f"model: {FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M params, {FLAGS.dtype}), prompt "
        f"{FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, decode chunks of 16; "
        f"{jax.devices()[0].device_kind} ({benchlib.cpu_name()})")
  sampling = SamplingConfig(rules.Greedy(), max_new_tokens=FLAGS.new_tokens,
                            cache_dtype=FLAGS.dtype)
  for b in [int(x) for x in FLAGS.batch]:
    prompts = np.random.RandomState(b).randint(3, cfg.vocab_size, (b, FLAGS.prompt_len)).tolist()
    seconds = {0: [], sampler_lib.GROW_FROM: []}
    outputs = {}
    for _ in range(FLAGS.repeats):
      for grow_from in seconds:
        jax.clear_caches()
        start = time.perf_counter()
        out = sampler.generate(prompts, sampling, grow_from=grow_from)
        seconds[grow_from].append(time.perf_counter() - start)
        outputs[grow_from] = [s[0].tokens.tolist() for s in out]
    if outputs[0] != outputs[sampler_lib.GROW_FROM]:
      raise RuntimeError("the growing cache generated other tokens")
    full, grown = (float(np.median(v)) for v in seconds.values())
    print(f"batch {b}: every slot from the start {full:.1f}s, growing from "
          f"{sampler_lib.GROW_FROM} slots {grown:.1f}s (compiles included) | "
          f"ratio {full / grown:.2f}x", flush=True)


def main(argv):
  del argv
  cfg = get_preset(FLAGS.preset)
  if FLAGS.growth:
    _growth(cfg)
    return
  if FLAGS.compile_depths:
    depths = [int(x) for x in FLAGS.compile_depths]
    compiles = []
    for layers in depths:
      compile_s, step_s, stacks = _compile_and_step(cfg, layers)
      compiles.append(compile_s)
      shape = "unrolled" if stacks == layers else "a loop over the layers"
      print(f"{FLAGS.preset} width, {layers} layers ({shape}): decode compile {compile_s:.2f}s, "
            f"step {step_s * 1e3:.3f} ms (batch 1); {jax.devices()[0].device_kind}", flush=True)
    print(f"compile {depths[-1]} / {depths[0]} layers: {compiles[-1] / compiles[0]:.2f}x")
    return
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  if FLAGS.hf_dir:
    cfg = ModelConfig.from_hf_config(FLAGS.hf_dir)
    ref, model = benchlib.hf_dir_models(FLAGS.hf_dir, FLAGS.dtype, device)
  else:
    ref, model = benchlib.twin_models(cfg, FLAGS.dtype, device)
  sampler = Sampler.from_model(model, unroll=FLAGS.unroll)
  probe = benchlib.BandwidthProbe()
  itemsize = 2 if FLAGS.dtype == "bfloat16" else 4
  print(f"model: {FLAGS.hf_dir or FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M params, "
        f"{FLAGS.dtype}), prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens; "
        f"{jax.devices()[0].device_kind} ({benchlib.cpu_name()}); "
        f"read bandwidth {probe() / 1e9:.1f} GB/s")
  for b in [int(x) for x in FLAGS.batch]:
    prompts = np.random.RandomState(b).randint(3, cfg.vocab_size, (b, FLAGS.prompt_len)).tolist()

    def ours(n):
      timings = {}
      sampler.generate(prompts, SamplingConfig(rules.Greedy(), max_new_tokens=n,
                                               cache_dtype=FLAGS.dtype), timings=timings,
                       decode_chunk=n)
      return timings["decode"], timings["prefill"]

    cache_len = FLAGS.prompt_len + FLAGS.new_tokens / 2  # on average over the decode
    step_bytes = benchlib.decode_bytes_per_step(cfg, b, cache_len, itemsize)
    first = len(probe.readings)
    ours_tps, ours_share, prefill = benchlib.decode_rate(ours, b, probe, step_bytes,
                                                         FLAGS.new_tokens, FLAGS.repeats)
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

      theirs_tps, theirs_share, t_prefill = benchlib.decode_rate(
          theirs, b, probe, step_bytes, FLAGS.new_tokens, FLAGS.repeats)
      line += (f" | transformers {theirs_tps:9.1f} tok/s ({theirs_share:.2f}; "
               f"prefill {t_prefill:.2f}s) | ratio {ours_tps / theirs_tps:.2f}x")
    seen = probe.readings[first:]
    line += (f" | bandwidth {min(seen) / 1e9:.1f}-{max(seen) / 1e9:.1f} GB/s, bound at the "
             f"median {b * float(np.median(seen)) / step_bytes:,.0f} tok/s")
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
