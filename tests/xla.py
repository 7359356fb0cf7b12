"""XLA's optimisations back on for a block of a test (tests/conftest.py turns most off)."""

import contextlib
import os

import jax


@contextlib.contextmanager
def optimized():
  """Compiles in this process and in subprocesses started inside the block with XLA's
  optimisations on, as a user's run does: for programs that run long enough to repay them."""
  env, before = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"), \
      jax.config.read("jax_disable_most_optimizations")
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    if env is None:
      del os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
    else:
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = env
