"""Device mesh, the parameter PartitionSpec table and its one walk, the activation helper.

Mesh axes are ("data", "fsdp", "context", "tp"). Parameters and activations are described
with logical axis names; `LOGICAL_RULES` maps each to mesh axes in one place:

  batch    -> ("data", "fsdp")   the batch is split over every data-parallel axis
  seq      -> "context"          context parallelism splits the sequence (attention.py)
  embed    -> ("fsdp", "context") FSDP shards the model dimension of every weight (over the
                                 context devices too: they hold the same rows, so their
                                 weights and optimizer state would otherwise be copies)
  heads    -> "tp"               tensor parallelism splits attention heads,
  kv_heads -> "tp"               kv heads (replicated when fewer than tp, as in GQA models),
  mlp      -> "tp"               the MLP hidden dimension,
  vocab    -> "tp"               and the vocabulary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tp")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp", "context"),
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "vocab": "tp",
    "layers": None,
    "seq": "context",
}

# Parameter path (slash-joined, as in model.py) -> logical axis of each dimension.
# Stacked layer parameters carry a leading "layers" dimension.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"layers/self_attn/q_proj/kernel", ("layers", "embed", "heads", None)),
    (r"layers/self_attn/[kv]_proj/kernel", ("layers", "embed", "kv_heads", None)),
    (r"layers/self_attn/q_proj/bias", ("layers", "heads", None)),
    (r"layers/self_attn/[kv]_proj/bias", ("layers", "kv_heads", None)),
    (r"layers/self_attn/o_proj/kernel", ("layers", "heads", None, "embed")),
    (r"layers/mlp/(gate|up)_proj/kernel", ("layers", "embed", "mlp")),
    (r"layers/mlp/down_proj/kernel", ("layers", "mlp", "embed")),
    (r"layers/(input|post_attention)_layernorm/scale", ("layers", None)),
    (r"norm/scale", (None,)),
    (r"lm_head/kernel", ("embed", "vocab")),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "context", "tp") mesh; one entry may be -1, meaning "all remaining devices"."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
        f"{len(devices)} are available; change the mesh so its product is {len(devices)} "
        "(or set one axis to -1).")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
  """A device-less ("data", "fsdp", "context", "tp") mesh of resolved sizes (no -1): what
  `param_shardings` needs to lay out parameters for hardware that is not attached."""
  return AbstractMesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None]) -> P:
  return P(*(LOGICAL_RULES[a] if a is not None else None for a in axes))


def _axis_size(mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def param_logical_axes(path: str) -> tuple[str | None, ...]:
  for pattern, axes in PARAM_AXES:
    if re.fullmatch(pattern, path):
      return axes
  raise KeyError(f"parameter {path!r} has no entry in sharding.PARAM_AXES")


def param_spec(path: str, shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
  """The PartitionSpec of one parameter on `mesh`, checked for divisibility.

  kv heads fewer than (or not divisible by) the tp size are replicated across tp, the usual
  treatment of GQA models whose kv heads are fewer than the tensor-parallel degree. Any other
  dimension that does not divide is an error naming the parameter.
  """
  axes = param_logical_axes(path)
  if len(axes) != len(shape):
    raise ValueError(f"parameter {path!r} has shape {tuple(shape)}, table expects rank "
                     f"{len(axes)}")
  entries = []
  for axis, dim in zip(axes, shape):
    entry = LOGICAL_RULES[axis] if axis is not None else None
    size = _axis_size(mesh, entry)
    if dim % size:
      if axis == "kv_heads":
        entry = None
      else:
        raise ValueError(
            f"parameter {path!r} dimension {axis}={dim} is not divisible by mesh axes "
            f"{entry} of size {size}; choose a mesh whose {entry} size divides {dim}.")
    entries.append(entry)
  return P(*entries)


def path_str(keypath) -> str:
  """The slash-joined parameter path ("layers/self_attn/q_proj/kernel") of a pytree key path.

  Only dict keys count, so an nnx.State (whose leaves sit under each Variable's `.value`), its
  pure dict, and an optimizer state (whose moments sit under optax's tuples and named fields)
  all give a parameter the same path, the one `PARAM_AXES` is written in.
  """
  return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def param_shardings(params, mesh: Mesh | AbstractMesh):
  """NamedShardings, in the structure of `params`, from `PARAM_AXES`.

  The one walk from parameters to shardings: model initialisation, checkpoint and Hugging
  Face loading, the trainer and the memory planner all call it.

  Args:
    params: an nnx.State, its pure dict, or any tree of arrays or ShapeDtypeStructs whose
      dict keys spell parameter paths.
    mesh: a device Mesh, or an AbstractMesh (`abstract_mesh`) where there are no devices, as
      in the planner, which reads `shard_shape` off the result.
  Returns:
    The same tree with a NamedSharding at each leaf; raises (naming the parameter) when a
    parameter has no table entry or the mesh does not divide it.
  """
  return jax.tree.map_with_path(
      lambda kp, x: NamedSharding(mesh, param_spec(path_str(kp), x.shape, mesh)), params)


def opt_state_shardings(opt_state, params, mesh: Mesh | AbstractMesh):
  """NamedShardings for an optimizer state: a leaf under a parameter's path with that
  parameter's shape (AdamW's mu and nu) takes its sharding; the rest (step counts) is
  replicated. `opt_state` and `params` are abstract or concrete trees (see param_shardings)."""
  by_path = {path_str(kp): (x.shape, s) for (kp, x), s in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings(params, mesh)))}
  replicated = NamedSharding(mesh, P())

  def pick(kp, x):
    shape, s = by_path.get(path_str(kp), (None, None))
    return s if shape == x.shape else replicated

  return jax.tree.map_with_path(pick, opt_state)


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding on the ambient mesh (`jax.set_mesh`).

  Without an ambient mesh the computation is unsharded and there is nothing to constrain, so
  `x` is returned as is. With one, a dimension that the mesh does not divide is an error
  rather than a silently dropped constraint.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"shard(): {len(logical_axes)} axes given for an array of rank {x.ndim}")
  spec = logical_to_spec(logical_axes)
  for dim, entry, axis in zip(x.shape, spec, logical_axes):
    size = _axis_size(mesh, entry)
    if dim % size:
      raise ValueError(f"activation dimension {axis}={dim} is not divisible by mesh axes "
                       f"{entry} of size {size} (shape {x.shape}); change the batch size or mesh.")
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] input batch: B over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def fold_context(mesh: Mesh) -> Mesh:
  """The same devices with the context axis merged into data (context 1): for decoding,
  where each step has one token per row and rows, not the sequence, are what to split."""
  d, f, c, t = (mesh.shape[a] for a in MESH_AXES)
  devices = mesh.devices.transpose(0, 2, 1, 3).reshape(d * c, f, 1, t)
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
