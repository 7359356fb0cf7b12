"""Comparing parameter trees leaf by leaf, by key path: never a silent `zip` of leaves."""

import os

import jax
import numpy as np


def flat(tree) -> dict[str, np.ndarray]:
  """{"a/b/c": array} for a pytree (dicts, nnx state, lists), in key-path order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x)
          for path, x in leaves}


def checkpoint_params(workdir, step: int) -> dict:
  """The parameters a run saved at `step`, as a nested dict (restored on one device)."""
  from jaxdistill import checkpoint  # pylint: disable=g-import-not-at-top
  model = checkpoint.load_model(os.path.join(workdir, "checkpoints", str(step)))
  return checkpoint.nnx.to_pure_dict(checkpoint.nnx.state(model))


def assert_trees_close(got, want, *, atol=0.0, rtol=0.0):
  """Same key paths, same leaf count and shapes, every leaf within tolerance (exact
  equality by default)."""
  a, b = flat(got), flat(want)
  assert list(a) == list(b), (f"key paths differ: only in got {sorted(set(a) - set(b))}, only "
                              f"in want {sorted(set(b) - set(a))}")
  assert len(a) > 0
  for path in a:
    assert a[path].shape == b[path].shape, (path, a[path].shape, b[path].shape)
    if atol == 0 and rtol == 0:
      np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    else:
      np.testing.assert_allclose(a[path], b[path], atol=atol, rtol=rtol, err_msg=path)
