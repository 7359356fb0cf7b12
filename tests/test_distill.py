"""Logit distillation: the chunked KL against materialised logits (value, gradient, memory,
context parallelism), alpha = 0 as SFT to the bit through `main.run`, sharded as unsharded
through `train.run`, the refusals at parse and start-up, and the planner's teacher."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from jaxdistill import distill, losses, main as main_lib, memory, model as model_lib, settings
from jaxdistill import sharding, train
from jaxdistill.data import pipeline
from jaxdistill.model_config import ModelConfig
from jaxdistill.optimizer import make_optimizer, make_schedule
from tests import data_fixtures, defaults
from tests.test_train import SyntheticBatches
from tests.trees import assert_trees_close

# -- The chunked KL -----------------------------------------------------------------------

# Student head 50 rows, teacher head 56 (different padding), tokenizer 45 ids; widths 16, 24.
B, T, D, E, VS, VT, VOCAB, TEMP = 2, 40, 16, 24, 50, 56, 45, 2.0


def _naive_sums(hs, ht, ws, wt, y, m):
  """The reference: both models' [B, T, V] logits, sliced to the tokenizer, plain autodiff."""
  student, teacher = hs @ ws, jax.lax.stop_gradient(ht @ wt)
  nll, z = losses.naive_cross_entropy_sums(student, y, m)
  log_s = jax.nn.log_softmax(student[..., :VOCAB] / TEMP, -1)
  log_t = jax.nn.log_softmax(teacher[..., :VOCAB] / TEMP, -1)
  kl = jnp.sum(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1) * m)
  return nll, z, kl


def _chunked_sums(hs, ht, ws, wt, y, m, chunk):
  return distill.distill_sums(lambda x: x @ ws, lambda x: x @ wt, hs, ht, y, m,
                              vocab_size=VOCAB, temperature=TEMP, chunk=chunk)


def _inputs(t=T):
  rng = np.random.RandomState(0)
  hs = jnp.asarray(rng.randn(B, t, D), jnp.float32)
  ht = jnp.asarray(rng.randn(B, t, E), jnp.float32)
  ws = jnp.asarray(rng.randn(D, VS), jnp.float32)
  wt = jnp.asarray(rng.randn(E, VT), jnp.float32)
  y = jnp.asarray(rng.randint(0, VOCAB, (B, t)), jnp.int32)
  m = jnp.asarray(rng.rand(B, t) > 0.3, jnp.float32)
  return hs, ht, ws, wt, y, m


def _value_and_grad(sums):
  """jit(value_and_grad) of NLL + 0.3 z + 0.7 KL in the student's hidden states and head,
  and of the teacher's (which must get none)."""
  def total(hs, ht, ws, wt, y, m):
    nll, z, kl = sums(hs, ht, ws, wt, y, m)
    return nll + 0.3 * z + 0.7 * kl, (nll, z, kl)
  return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True))


def test_chunked_kl_value_and_gradient_equal_the_naive_reference():
  """Three chunks of a padded sequence (T=40, chunk 16), and the sequence split over a
  context axis of 2: the NLL, z and KL sums and their gradients in the student's hidden
  states and head equal materialised logits' (one chunk is checked against SFT, to the bit,
  below); the teacher gets no gradient; the KL covers the tokenizer's ids only, while the
  NLL keeps the student's whole head, as SFT does."""
  args = _inputs()
  (_, want), want_g = _value_and_grad(_naive_sums)(*args)
  assert float(want[2]) > 1.0  # a KL worth comparing
  chunked = _value_and_grad(lambda *a: _chunked_sums(*a, 16))
  mesh = sharding.make_mesh((1, 1, 2, 1), jax.devices()[:2])
  seq = NamedSharding(mesh, P(None, "context"))
  with jax.set_mesh(mesh):
    on_context = _value_and_grad(lambda *a: _chunked_sums(*a, 8))(
        *(jax.device_put(x, seq) if x.shape[:2] == (B, T) else x for x in args))
  for where, ((_, got), got_g) in (("chunk 16", chunked(*args)), ("context 2", on_context)):
    for name, a, b in zip(("nll", "z", "kl"), got, want):
      np.testing.assert_allclose(a, b, rtol=2e-6, err_msg=f"{name}, {where}")
    for name, a, b in zip(("student hidden", "teacher hidden", "student head", "teacher head"),
                          got_g, want_g):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f"{name}, {where}")
    assert not np.any(got_g[1]) and not np.any(got_g[3])  # the teacher is frozen
  # Both heads' rows from VOCAB on: outside the KL, inside the NLL's partition.
  hs, ht, ws, wt, y, m = args
  (_, moved), _ = chunked(hs, ht, ws.at[:, VOCAB:].add(3.0), wt.at[:, VOCAB:].add(100.0), y, m)
  assert float(moved[2]) == pytest.approx(float(want[2]), rel=1e-6)
  assert float(moved[0]) > float(want[0]) + 1.0


def test_chunked_kl_temporary_memory_stays_chunked():
  """The compiled gradient of the chunked sums holds about five [B, C, V] fp32 chunks
  (both models' logits, softmaxes, the gradient), whatever T: doubling the sequence adds
  only its hidden states' gradient. One model's [B, T, V] fp32 logits would be 16 chunks."""
  b, d, v, chunk = 1, 64, 32768, 512
  chunk_bytes = b * chunk * v * 4

  def temp(t):
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    args = (spec(b, t, d), spec(b, t, d), spec(d, v), spec(d, v), spec(b, t, dtype=jnp.int32),
            spec(b, t))

    def total(hs, ht, ws, wt, y, m):
      nll, _, kl = distill.distill_sums(lambda x: x @ ws, lambda x: x @ wt, hs, ht, y, m,
                                        vocab_size=v - 100, temperature=2.0, chunk=chunk)
      return nll + kl

    compiled = jax.jit(jax.grad(total, argnums=(0, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  short, long = temp(16 * chunk), temp(32 * chunk)
  assert short < 6 * chunk_bytes, short / chunk_bytes
  assert long - short < 0.25 * chunk_bytes, (long - short) / chunk_bytes


# -- Training ---------------------------------------------------------------------------

def _config(**values):
  """configs/tiny.py made cheap to compile as tests/test_remote_paths.py makes it (one
  layer, FSDP over 8 devices, one ~260-token trace a row, 4 steps: the same SFT step, which
  the session's compilation cache may already hold); `values` by dotted key."""
  c = tiny.get_config()
  c.model.num_layers, c.mesh.shape, c.data.seq_len, c.train.loss_chunk = 1, (1, 8, 1, 1), 288, 288
  c.train.num_steps, c.train.log_every, c.train.async_checkpoints = 4, 1, False
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """Plain SFT through main.run: the baseline, and a teacher whose run recorded the
  tokenizer."""
  workdir = str(tmp_path_factory.mktemp("sft"))
  return workdir, main_lib.run(_config(), workdir)


def test_alpha_zero_trains_bit_for_bit_as_sft_through_main(sft_run, tmp_path):
  """main.run with a teacher (the SFT run's checkpoint, loaded on the mesh in fp32) and
  alpha = 0: the parameters and the NLL of every step are SFT's to the bit, the KL is
  reported, and the manifest records the teacher."""
  sft_dir, sft = sft_run
  got = main_lib.run(_config(**{
      "distill.teacher_checkpoint": sft_dir, "distill.alpha": 0.0, "distill.temperature": 2.0,
      "distill.teacher_param_dtype": "float32"}), str(tmp_path))
  assert_trees_close(got.params, sft.params)
  rows, base = _metrics(tmp_path), _metrics(sft_dir)
  assert [r["loss"] for r in rows] == [r["loss"] for r in base]
  assert all(r["kl"] > 0 for r in rows) and "kl" not in base[0]
  teacher = json.load(open(tmp_path / "manifest.json"))["distill_teacher"]
  assert (teacher["kind"], teacher["step"], teacher["vocab_size"]) == ("checkpoint", 4, 384)
  assert teacher["model_config"]["param_dtype"] == "float32"


# A student (head 128 rows) and a wider teacher with a larger head (136), tokenizer 120 ids.
STUDENT = ModelConfig(model_type="qwen2", vocab_size=128, d_model=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=True,
                      tie_embeddings=True)
TEACHER = STUDENT.replace(vocab_size=136, d_model=48, head_dim=12, mlp_dim=96,
                          tie_embeddings=False, initializer_range=0.1)
TOKENIZER_IDS = 120


def _random_params(cfg, seed):
  """Parameters drawn in numpy (norm scales 1, weights N(0, 0.1^2)): no init to compile."""
  rng = np.random.RandomState(seed)

  def draw(path, a):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return np.ones(a.shape, a.dtype)
    return (0.1 * rng.randn(*a.shape)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, train.abstract_params(cfg))


def _distil(mesh_shape):
  """Three train steps of 2 micro-batches, alpha 0.5 at T = 2, student and teacher on a mesh
  of `mesh_shape`, jitted with train.run's shardings: (parameters, each step's metrics)."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  student, teacher = (jax.device_put(p, sharding.param_shardings(p, mesh))
                      for p in (_random_params(STUDENT, 0), _random_params(TEACHER, 7)))
  objective = distill.DistillObjective(
      nnx.graphdef(model_lib.abstract_model(TEACHER)), loss_chunk=8, z_loss=1e-3, alpha=0.5,
      temperature=2.0, vocab_size=TOKENIZER_IDS)
  cfg = defaults.train_config(global_batch_size=8, micro_batches=2, loss_chunk=8)
  optim = defaults.optim_config(lr=1e-2, total_steps=3, warmup_ratio=0.0)
  optimizer = make_optimizer(optim)
  abstract = train.abstract_params(STUDENT)
  opt_shardings = sharding.opt_state_shardings(jax.eval_shape(optimizer.init, abstract),
                                               abstract, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(student)
  replicated = NamedSharding(mesh, P())
  shardings = train.TrainState(replicated, sharding.param_shardings(abstract, mesh),
                               opt_shardings)
  step = jax.jit(train.make_train_step(nnx.graphdef(model_lib.abstract_model(STUDENT)),
                                       optimizer, make_schedule(optim), cfg, objective),
                 in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  state = train.TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), student,
                           opt_state)
  data, rows = SyntheticBatches(8, 32, TOKENIZER_IDS), []
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, metrics = step(state, pipeline.make_global_batch(next(data), mesh), teacher)
      rows.append(jax.device_get(metrics))
  return state.params, rows


def test_sharded_distillation_equals_unsharded():
  """Student and teacher on mesh (2, 1, 2, 2) (rows over data, each sequence over context,
  weights over context and tp) against one device: NLL, KL, gradient norm and parameters
  after three steps."""
  one, one_rows = _distil((1, 1, 1, 1))
  many, many_rows = _distil((2, 1, 2, 2))
  for key in ("loss", "kl", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in many_rows], [r[key] for r in one_rows],
                               rtol=2e-5, err_msg=key)
  assert all(r["kl"] > 0.01 for r in one_rows)
  # Adam turns the rounding of a near-zero gradient into up to a whole step (lr 1e-2) of
  # its parameter: 1e-4 is 1% of a step, far below what a wrong gradient would move.
  assert_trees_close(many, one, atol=1e-4)


# -- Refusals and the planner -------------------------------------------------------------

def test_bad_distillation_settings_are_refused_with_what_to_change(sft_run, tmp_path):
  with pytest.raises(settings.ConfigError) as e:
    settings.parse(_config(**{"distill.teacher_checkpoint": "a", "distill.teacher_hf_dir": "b",
                              "distill.alpha": -1.0, "distill.temperature": 0.0}))
  text = str(e.value)
  assert "exactly one of them" in text and "distill.alpha=-1.0 must be >= 0" in text
  assert "distill.temperature=0.0 must be > 0" in text
  with pytest.raises(settings.ConfigError, match="does not train through"):
    settings.parse(_config(**{"distill.teacher_checkpoint": "a", "mode": "eval"}))
  # Another tokenizer than the teacher's, and a student head too small for it: both named
  # at start-up, before any weights load or anything compiles.
  sft_dir, _ = sft_run
  other = data_fixtures.save_sentencepiece_model(tmp_path / "other.model")
  with pytest.raises(settings.ConfigError) as e:
    main_lib.run(_config(**{"distill.teacher_checkpoint": sft_dir, "data.tokenizer": other,
                            "model.vocab_size": 256}), str(tmp_path / "refused"))
  text = str(e.value)
  assert "the teacher's tokenizer" in text and "logit distillation needs one tokenizer" in text
  assert "the student's output head has 256 rows but the tokenizer" in text
  assert not os.listdir(tmp_path / "refused" / "checkpoints")  # nothing trained or saved


def test_the_planner_counts_the_teacher():
  student = ModelConfig(**dict(model_type="qwen2", vocab_size=512, d_model=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128))
  teacher = student.replace(d_model=128, num_layers=4, mlp_dim=512, head_dim=32,
                            vocab_size=640, param_dtype="bfloat16")
  shape = memory.TrainShape(global_batch_size=8, seq_len=1024, loss_chunk=256)
  mesh = (1, 2, 1, 2)
  alone = memory.estimate_train(student, shape, mesh, "gpu")
  both = memory.estimate_train(student, shape, mesh, "gpu", teacher=teacher)
  teacher_bytes = memory.param_bytes(teacher, mesh)
  # bf16, over fsdp x tp (norm scales replicated)
  assert teacher.num_params() * 2 / 4 < teacher_bytes < teacher.num_params() * 2 / 3.9
  assert both.held["teacher parameters (bfloat16, frozen)"] == teacher_bytes
  assert both.peak >= alone.peak + teacher_bytes
  # No optimizer state or gradients for it: the rest of what is held is the student's.
  assert sum(both.held.values()) - teacher_bytes == sum(alone.held.values())
