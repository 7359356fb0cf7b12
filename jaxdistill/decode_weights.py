"""The sampler's copy of a model's weights: its layers one Block per layer, unrolled in the decode
step (`sampler._run_layers`), or the model's own [L, ...] stacks looped over for deep models,
and a tied embedding laid out [D, V] for the output head."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdistill.model import Embed, Transformer

# Most layers a decode step runs as unrolled code; a deeper model loops over its layers one
# at a time (sampler.py's module docstring). Every preset up to 7B, and SmolLM2 (the
# real-model tests), has 36 layers or fewer and keeps the faster unrolled step on CPU.
# Measured at the bench width (AMD EPYC, 2 cores, batch 1; tools/bench_decode.py
# --compile_depths=8,80): the 80-layer loop compiles in 0.4-0.65x the time of the 8-layer
# unrolled step (unrolled, the 80-layer one takes 8-13x), and its step is no slower than the
# unrolled one there (16.7 vs 26.2 ms: a layer fits in L2); with Qwen2.5-0.5B-wide layers the
# loop's step is about twice the unrolled one's.
# Groups of 2 to 20 layers per loop iteration stepped no faster and compiled longer.
UNROLL = 36


def stacks_for(num_layers: int, unroll: int) -> int:
  """Blocks a decode step unrolls (`sampler._run_layers`): every layer up to `unroll` layers,
  else one, looped over the layers."""
  if unroll < 1:
    raise ValueError(f"unroll={unroll} must be at least 1")
  return num_layers if num_layers <= unroll else 1


def decode_model(model: Transformer, stacks: int, consume: bool = False) -> Transformer:
  """A second module over `model`'s weights for `sampler._run_layers`: its layers `stacks`
  Blocks (an nnx.List), block g holding layers g, g + stacks, ... stacked [L / stacks, ...].

  With one layer per block (stacks = L) a decode step reads each weight where it lies; run
  as a loop over the [L, ...] stack, XLA:CPU first copies each layer's slice out of it,
  tripling the step's weight traffic. The split copies the layer weights once (the final
  norm and an untied head stay shared); a tied embedding is copied as [D, V], the faster
  layout for the output head (`Embed`). With `consume` the model's stacks and tied embedding
  are donated to the copies and freed. With one block (a loop over the layers) the block is
  the model's own [L, ...] stacks, shared, not copied. The module's `layers` are for
  `sampler._run_layers`, not for `Transformer.__call__`.
  """
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state)
  layer_def, stacked = nnx.split(model.layers)
  if stacks == 1:
    per_block = [stacked]
  elif all(_on_this_host_cpu(a) for a in jax.tree.leaves(stacked)):
    per_block = _split_stack_on_host(stacked, stacks, consume)
  else:
    split = _split_stack_donated if consume else _split_stack
    with warnings.catch_warnings():  # slices cannot reuse the stack's buffers; it is freed
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      per_block = split(stacked, stacks)
  model.layers = nnx.List([nnx.merge(layer_def, st) for st in per_block])
  if model.config.tie_embeddings:
    transpose = _transpose_donated if consume else _transpose
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      model.embed_tokens = Embed(transpose(model.embed_tokens.embedding[...]), vocab_last=True)
  return model


def _split_stack_impl(stacked: nnx.State, stacks: int) -> list[nnx.State]:
  """[L, ...] leaves -> `stacks` states of [L / stacks, ...] leaves, layer j * stacks + g at
  index j of state g."""
  def part(a, g):
    return a.reshape((-1, stacks) + a.shape[1:])[:, g]
  return [jax.tree.map(lambda a: part(a, g), stacked) for g in range(stacks)]


def _on_this_host_cpu(a: jax.Array) -> bool:
  return a.is_fully_addressable and all(d.platform == "cpu" for d in a.devices())


def _split_stack_on_host(stacked: nnx.State, stacks: int, consume: bool) -> list[nnx.State]:
  """`_split_stack` for arrays in this host's memory (CPU devices): slices of a NumPy view,
  each placed as its stack was. Compiling the split of a 30-layer stack takes XLA:CPU ~2 s,
  copying it ~0.1 s. With `consume` each stack is freed once copied."""
  leaves, treedef = jax.tree.flatten(stacked)
  parts = []
  for a in leaves:
    host = np.asarray(a)
    host = host.reshape((-1, stacks) + host.shape[1:])
    # Copies: a device array may alias the NumPy memory it is made from, here the stack's.
    parts.append([jax.device_put(host[:, g].copy(), a.sharding) for g in range(stacks)])
    if consume:
      jax.block_until_ready(parts[-1])
      del host
      a.delete()
  return [jax.tree.unflatten(treedef, [p[g] for p in parts]) for g in range(stacks)]


_split_stack = jax.jit(_split_stack_impl, static_argnums=1)
_split_stack_donated = jax.jit(_split_stack_impl, static_argnums=1, donate_argnums=0)
_transpose = jax.jit(jnp.transpose)
_transpose_donated = jax.jit(jnp.transpose, donate_argnums=0)
