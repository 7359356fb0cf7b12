"""Sharded equals unsharded on simulated meshes, and parameters are sharded as the table says."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdistill import checkpoint, hf, model as model_lib, sharding
from jaxdistill.model_config import ModelConfig
from tests.trees import assert_trees_close

MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 1, 2)]


def _forward(model, mesh, tokens, positions, segments):
  graphdef, state = nnx.split(model)
  data = sharding.batch_sharding(mesh)
  args = [jax.device_put(jnp.asarray(x), data) for x in (tokens, positions, segments)]

  @jax.jit
  def fwd(state, *args):
    return nnx.merge(graphdef, state)(*args)[0]

  with jax.set_mesh(mesh):
    return np.asarray(fwd(state, *args))


def _packed_batch(batch=8, length=32, vocab=320, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (batch, length))
  split = rng.randint(4, length - 4, batch)
  idx = np.arange(length)[None]
  segments = np.where(idx < split[:, None], 1, 2)
  positions = np.where(idx < split[:, None], idx, idx - split[:, None])
  return tokens, positions, segments


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_forward_equals_unsharded(mesh_shape, tiny_qwen2_dir):
  assert jax.device_count() == 8
  batch = _packed_batch()
  reference, _ = hf.load_hf_model(tiny_qwen2_dir)(*map(jnp.asarray, batch))
  mesh = sharding.make_mesh(mesh_shape)
  model = hf.load_hf_model(tiny_qwen2_dir, mesh)
  got = _forward(model, mesh, *batch)
  np.testing.assert_allclose(got, np.asarray(reference), atol=2e-5, rtol=0)
  _assert_sharded_as_table(model, mesh)


def _assert_sharded_as_table(model, mesh):
  params = model_lib.flat_params(model)
  for path, x in params.items():
    want = sharding.param_spec(path, x.shape, mesh)
    assert x.sharding.spec == want, path
    shard_shape = x.sharding.shard_shape(x.shape)
    for dim, full, entry in zip(shard_shape, x.shape, tuple(want) + (None,) * x.ndim):
      names = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
      assert dim * int(np.prod([mesh.shape[n] for n in names])) == full, (path, entry)
  fsdp, tp = mesh.shape["fsdp"], mesh.shape["tp"]
  q = params["layers/self_attn/q_proj/kernel"]  # [L, D, N, H]
  assert q.sharding.shard_shape(q.shape)[1:3] == (q.shape[1] // fsdp, q.shape[2] // tp)
  if tp > 1:
    up = params["layers/mlp/up_proj/kernel"]
    assert up.addressable_shards[0].data.shape[-1] == up.shape[-1] // tp


def test_sharded_init_and_training_gradients_match(tiny_llama_dir):
  """Random sharded init equals unsharded init with the same seed, gradients too."""
  cfg = ModelConfig.from_hf_config(tiny_llama_dir)
  mesh = sharding.make_mesh((2, 2, 1, 2))
  sharded = model_lib.create_model(cfg, mesh, seed=3)
  plain = model_lib.create_model(cfg, seed=3)
  assert_trees_close(model_lib.flat_params(sharded), model_lib.flat_params(plain))
  tokens, positions, segments = _packed_batch(seed=5)

  def grads(model, mesh=None):
    graphdef, state = nnx.split(model)

    def loss(state):
      logits, _ = nnx.merge(graphdef, state)(tokens, positions, segments)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    fn = jax.jit(jax.grad(loss))
    if mesh is None:
      return fn(state)
    with jax.set_mesh(mesh):
      return fn(state)

  assert_trees_close(grads(sharded, mesh), grads(plain), atol=1e-6)


def test_sharded_init_never_materialises_whole_parameters():
  """The compiled init, per device: its outputs are that device's shards, and its scratch
  memory is smaller than the largest parameter, so no parameter ever exists whole on one
  device. (With `jax_threefry_partitionable` off, each device draws the whole embedding and
  slices it: 5.3 MB of temporaries against 1.6 MB, and this test fails.)"""
  cfg = ModelConfig(vocab_size=16384, d_model=64, num_heads=8, num_kv_heads=8, head_dim=8,
                    mlp_dim=256, num_layers=2, tie_embeddings=True)
  mesh = sharding.make_mesh((1, 4, 1, 2))
  _, init = model_lib.jitted_init(cfg, mesh)
  memory = init.lower().compile().memory_analysis()
  embedding_bytes = cfg.vocab_size * cfg.d_model * 4  # the largest parameter, 4 MiB
  total_bytes = cfg.num_params() * 4
  assert memory.output_size_in_bytes <= total_bytes / 8 * 1.05, memory  # a shard of each
  assert memory.temp_size_in_bytes < embedding_bytes / 2, memory.temp_size_in_bytes
  model = model_lib.create_model(cfg, mesh)
  up = model.layers.mlp.up_proj.kernel[...]
  assert all(s.data.shape == (2, 16, 128) for s in up.addressable_shards)
  assert len({s.device for s in up.addressable_shards}) == 8


def test_restore_onto_a_different_mesh(tiny_llama_dir, tmp_path):
  model = hf.load_hf_model(tiny_llama_dir, sharding.make_mesh((1, 8, 1, 1)))
  checkpoint.save_model(str(tmp_path / "ckpt"), model)
  mesh = sharding.make_mesh((2, 2, 1, 2))
  restored = checkpoint.load_model(str(tmp_path / "ckpt"), mesh)
  _assert_sharded_as_table(restored, mesh)
  assert_trees_close(model_lib.flat_params(restored), model_lib.flat_params(model))


def test_the_array_handler_is_registered_without_a_warning():
  code = ("import jax, orbax.checkpoint as ocp\n"
          "from jaxdistill import checkpoint\n"
          "h = ocp.type_handlers.get_type_handler(jax.Array)\n"
          "print(h._min_slice_bytes_for_replica_parallel)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split()[-1] == str(checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES)
  assert "overriding" not in out.stderr, out.stderr[-2000:]


def test_saving_small_replicated_parameters_compiles_nothing(tiny_llama_dir, tmp_path):
  """Parameters replicated over the data axis are written whole by one replica while their
  slices would be under `checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES`: Orbax's default slices
  each on device first, one compiled program per shape (seconds at a run's first save)."""
  model = hf.load_hf_model(tiny_llama_dir, sharding.make_mesh((8, 1, 1, 1)))
  compiles = []
  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpoint.save_model(str(tmp_path / "ckpt"), model)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, f"{len(compiles)} programs compiled while saving"
  restored = checkpoint.load_model(str(tmp_path / "ckpt"))
  assert_trees_close(model_lib.flat_params(restored), model_lib.flat_params(model))


def test_kv_heads_fewer_than_tp_are_replicated():
  mesh = sharding.make_mesh((1, 1, 1, 8))
  spec = sharding.param_spec("layers/self_attn/k_proj/kernel", (2, 64, 2, 16), mesh)
  assert spec == jax.sharding.PartitionSpec(None, ("fsdp", "context"), None, None)
  with pytest.raises(ValueError, match="q_proj/kernel.*heads=4 is not divisible"):
    sharding.param_spec("layers/self_attn/q_proj/kernel", (2, 64, 4, 16), mesh)


def test_mesh_errors_say_what_to_change():
  assert sharding.make_mesh((2, -1, 1, 2)).shape == {"data": 2, "fsdp": 2, "context": 1, "tp": 2}
  with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
    sharding.make_mesh((3, 2, 1, 2))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((-1, -1, 1, 2))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh((3, -1, 1, 1))


def test_activation_constraint_rejects_indivisible_batch():
  mesh = sharding.make_mesh((8, 1, 1, 1))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="batch=3 is not divisible"):
      jax.jit(lambda x: sharding.shard(x, ("batch", None)))(jnp.zeros((3, 4)))


def test_fold_context_keeps_devices_and_merges_context_into_data():
  mesh = sharding.make_mesh((2, 1, 2, 2))
  folded = sharding.fold_context(mesh)
  assert folded.shape == {"data": 4, "fsdp": 1, "context": 1, "tp": 2}
  assert sorted(d.id for d in folded.devices.flat) == sorted(d.id for d in mesh.devices.flat)
  # tp groups (the innermost axis, the fastest links) are unchanged
  assert {tuple(d.id for d in row) for row in folded.devices.reshape(-1, 2)} == {
      tuple(d.id for d in row) for row in mesh.devices.reshape(-1, 2)}


# The planner has no devices: it lays parameters out on an AbstractMesh. Its per-device bytes
# must be what the trainer's walk gives on real devices. kv heads (2) are fewer than tp (4) in
# the first case, so k and v are replicated over tp; the second is tied and bias-free.
ONE_WALK_CASES = [
    ((1, 2, 1, 4), dict(qkv_bias=True, tie_embeddings=False)),
    ((2, 4, 1, 1), dict(qkv_bias=False, tie_embeddings=True)),
]


@pytest.mark.parametrize("mesh_shape,fields", ONE_WALK_CASES)
def test_state_pure_dict_and_planner_share_one_layout(mesh_shape, fields):
  import optax  # pylint: disable=g-import-not-at-top
  from jaxdistill import memory  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=2,
                    head_dim=16, mlp_dim=128, **fields)
  mesh = sharding.make_mesh(mesh_shape)

  def by_path(tree):
    return {sharding.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(tree)}

  _, state = nnx.split(model_lib.abstract_model(cfg))
  pure = nnx.to_pure_dict(state)
  from_state = by_path(sharding.param_shardings(state, mesh))
  from_dict = by_path(sharding.param_shardings(pure, mesh))
  assert from_state == from_dict
  assert set(from_state) == set(model_lib.flat_params(model_lib.abstract_model(cfg)))
  k_spec = from_state["layers/self_attn/k_proj/kernel"].spec
  q_spec = from_state["layers/self_attn/q_proj/kernel"].spec
  assert (q_spec[2], k_spec[2]) == ("tp", None if cfg.num_kv_heads % mesh_shape[3] else "tp")

  # AdamW's moments take their parameter's layout; its step count is replicated.
  opt = jax.eval_shape(optax.adamw(1e-3).init, pure)
  opt_shardings = sharding.opt_state_shardings(opt, pure, mesh)
  moments = [by_path(opt_shardings[0].mu), by_path(opt_shardings[0].nu)]
  assert moments == [from_dict, from_dict]
  assert opt_shardings[0].count.spec == jax.sharding.PartitionSpec()

  # The planner's bytes on one device are what the trainer's layout puts on device 0 (placed
  # for real: device_put slices host zeros, nothing compiles).
  device0 = mesh.devices.flat[0]
  held = sum(shard.data.nbytes for path, x in by_path(pure).items()
             for shard in jax.device_put(np.zeros(x.shape, x.dtype), from_dict[path])
             .addressable_shards if shard.device == device0)
  assert memory.param_bytes(cfg, mesh_shape) == held
