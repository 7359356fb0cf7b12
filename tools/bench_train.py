"""Train-step throughput: step time, tokens/s and MFU, optionally against transformers + torch AdamW.

  python tools/bench_train.py --vs_hf                 # the bench model on this machine
  python tools/bench_train.py --config=configs/tiny.py
  python tools/bench_train.py --hf_dir=DIR --batch=2 --seq=1024 --steps=3 --vs_hf
                                                      # a Hugging Face model's own weights
  python tools/bench_train.py --preset=llama3_2_1b --seq=4096 --batch=8 --dtype=bfloat16 \
      --remat=full                                      # on a GPU: MFU against the bf16 peak
  python tools/bench_train.py --hf_dir=DIR --batch=2 --seq=1024 --steps=2 --profile_dir=/tmp/p
                                                      # + where one step's time went, by op

Both frameworks run on the same weights and token batch (full rows, every target scored), with
AdamW and global-norm clipping, PyTorch in a process of its own; rounds of timed steps
alternate between them (`_TorchPeer`), and each side's figure is the median of its rounds'
medians. The ratio printed is
jaxdistill step time / PyTorch step time (below 1 means jaxdistill is faster). With --hf_dir
both load that directory (its config and weights; e.g. SmolLM2-135M from
tests/real_model.py) instead of random weights of --preset; PyTorch runs eager with sdpa
attention and as many threads as cores.
"""

import multiprocessing
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Both frameworks share the accelerator in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import hf, metrics, model as model_lib, sharding  # noqa: E402
from jaxdistill.model_config import (  # noqa: E402
    ATTENTION_IMPLS, EXECUTION_FIELDS, REMAT_POLICIES, ModelConfig, get_preset)
from jaxdistill import settings  # noqa: E402
import benchlib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "A run config (configs/*.py): use its model, batch, seq.")
flags.DEFINE_string("preset", "bench", "'bench' or a model_config.PRESETS name.")
flags.DEFINE_string("hf_dir", None, "A Hugging Face directory: its config and weights instead "
                    "of --preset's random ones.")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq", 256, "Tokens per row.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params fp32).")
flags.DEFINE_enum("remat", "none", list(REMAT_POLICIES), "Remat policy.")
flags.DEFINE_enum("attention", "auto", list(ATTENTION_IMPLS), "Attention implementation.")
flags.DEFINE_integer("attention_block", 0, "Attention's query/key block; 0: the platform's "
                     "default (attention.block_size).")
flags.DEFINE_integer("scan_unroll", 1, "Layers per iteration of the scan over layers.")
flags.DEFINE_integer("loss_chunk", 1024, "Sequence tokens per loss chunk.")
flags.DEFINE_integer("steps", 10, "Timed steps (after two warm-up steps); with --vs_hf, per round.")
flags.DEFINE_integer("rounds", 2, "With --vs_hf: rounds of --steps steps, ours then PyTorch's.")
flags.DEFINE_list("mesh", ["1", "-1", "1", "1"], "data,fsdp,context,tp.")
flags.DEFINE_bool("vs_hf", False, "Also time transformers PyTorch eager + torch AdamW.")
flags.DEFINE_string("profile_dir", None, "Trace one more step into this directory (trace and "
                    "HLO, benchlib.write_step_trace) and print where its time went "
                    "(tools/profile_summary.py).")



def _settings():
  if FLAGS.config:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    from jaxdistill import startup  # pylint: disable=g-import-not-at-top
    c = config_flags.config_flags._ConfigFileParser(name="config").parse(FLAGS.config)  # pylint: disable=protected-access
    s = settings.parse(c)
    _, cfg = startup.find_weight_source(s, tempfile.mkdtemp())
    return cfg, s.train.global_batch_size, s.data.seq_len, s.train.loss_chunk
  overrides = dict(param_dtype="float32", compute_dtype=FLAGS.dtype, remat=FLAGS.remat,
                   attention=FLAGS.attention, attention_block=FLAGS.attention_block,
                   scan_unroll=FLAGS.scan_unroll)
  if FLAGS.hf_dir:
    cfg = ModelConfig.from_hf_config(FLAGS.hf_dir, **overrides)
  else:
    cfg = get_preset(FLAGS.preset).replace(**overrides)
  return cfg, FLAGS.batch, FLAGS.seq, FLAGS.loss_chunk


def main(argv):
  del argv
  cfg, b, t, chunk = _settings()
  mesh = sharding.make_mesh([int(x) for x in FLAGS.mesh])
  if FLAGS.hf_dir:
    model = hf.load_hf_model(FLAGS.hf_dir, mesh,
                             **{f: getattr(cfg, f) for f in EXECUTION_FIELDS})
    hf_path = FLAGS.hf_dir
  else:
    model = model_lib.create_model(cfg, mesh, seed=0)
    hf_path = None
    if FLAGS.vs_hf:  # exported now: the jitted step donates (deletes) these parameters
      hf_path = os.path.join(tempfile.mkdtemp(), "m")
      hf.save_hf_model(model, hf_path, dtype="float32")
  state, step_fn, batch, tokens = benchlib.train_setup(model, b, t, chunk, mesh)
  peer = _TorchPeer(hf_path, cfg.compute_dtype == "bfloat16", tokens, b, t) if FLAGS.vs_hf else None
  jax_times, torch_times = [], []
  try:
    for r in range(FLAGS.rounds if peer else 1):
      seconds, state, m = benchlib.time_train_steps(step_fn, state, batch, mesh, FLAGS.steps,
                                                    warmup=2 if r == 0 else 1)
      jax_times.append(seconds)
      if peer:
        torch_times.append(peer.time_steps(FLAGS.steps))
  finally:
    if peer:
      peer.close()
  jax_s = float(np.median(jax_times))
  flops = metrics.train_flops_per_token(cfg, t) * b * t
  peak = metrics.device_peak_flops()
  print(f"model: {FLAGS.hf_dir or FLAGS.config or FLAGS.preset} ({cfg.num_params() / 1e6:.1f}M "
        f"params), batch {b} x seq {t}, compute {cfg.compute_dtype}, remat {cfg.remat}, "
        f"attention {cfg.attention}, loss chunk {chunk}; {jax.device_count()} x "
        f"{jax.devices()[0].device_kind} ({benchlib.cpu_name()}), mesh {dict(mesh.shape)}")
  line = (f"jaxdistill  {jax_s * 1e3:9.1f} ms/step  {b * t / jax_s:10,.0f} tokens/s  "
          f"{flops / jax_s / 1e9:8.1f} GFLOP/s  loss {float(m['loss']):.4f}")
  if peak:
    line += f"  MFU {flops / jax_s / (peak * jax.device_count()):.1%}"
  print(line)
  if FLAGS.vs_hf:
    torch_s = float(np.median(torch_times))
    print(f"medians of {FLAGS.rounds} rounds, each {FLAGS.steps} steps of ours then PyTorch's: "
          f"jaxdistill {', '.join(f'{x:.2f}' for x in jax_times)} s; "
          f"pytorch {', '.join(f'{x:.2f}' for x in torch_times)} s")
    print(f"pytorch     {torch_s * 1e3:9.1f} ms/step  {b * t / torch_s:10,.0f} tokens/s  "
          f"{flops / torch_s / 1e9:8.1f} GFLOP/s")
    print(f"step-time ratio jaxdistill / pytorch: {jax_s / torch_s:.2f}x")
  if FLAGS.profile_dir:
    import profile_summary  # pylint: disable=g-import-not-at-top
    names, state = benchlib.write_step_trace(step_fn, state, batch, mesh, FLAGS.profile_dir)
    print(f"one step traced: {', '.join(names)} in {FLAGS.profile_dir}")
    print(profile_summary.summary_of(FLAGS.profile_dir, top=20))


class _TorchPeer:
  """transformers + torch AdamW's train step, in a process of its own.

  Rounds of its steps alternate with rounds of ours, since a shared machine's speed drifts by
  10-20% within minutes. Each framework has a process to itself: in one process, either ran
  10-20% slower once the other had run. Each round starts with an untimed step: on a 2-core
  AMD EPYC VM the first step after the other framework's ran up to 30% slower even across
  processes (18.6 s, then 14.4-14.7 s), and steady state is what training sees.
  """

  def __init__(self, hf_path, autocast, tokens, b, t):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_torch_worker,
                                args=(child, hf_path, autocast, tokens, b, t), daemon=True)
    self._process.start()
    self._conn.recv()  # loaded and warmed up

  def time_steps(self, steps: int) -> float:
    """Median seconds of `steps` steps after one untimed step."""
    self._conn.send(steps)
    return self._conn.recv()

  def close(self):
    if self._process.is_alive():  # else its failure is already the error being raised
      self._conn.send("stop")
    self._process.join()


def _torch_worker(conn, hf_path, autocast, tokens, b, t):
  step = _torch_step(hf_path, autocast, tokens, b, t)
  conn.send("ready")
  while (steps := conn.recv()) != "stop":
    conn.send(benchlib.median_time(step, steps))


def _torch_step(hf_path, autocast, tokens, b, t):
  """transformers + torch AdamW's train step on the same weights and tokens, warmed up."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      hf_path, dtype=torch.float32, attn_implementation="sdpa").to(device)
  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
  inputs = torch.tensor(tokens[:, :t], device=device, dtype=torch.long)
  labels = torch.tensor(tokens[:, 1:], device=device, dtype=torch.long)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      logits = ref(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):
    step()
  return step


if __name__ == "__main__":
  app.run(main)
