"""Test setup: 8 simulated CPU devices (so meshes are real), fp32 matmuls, tiny HF models.

Most tests compile programs that then run for a few steps on tiny models, so compiling is
most of their time. Two things keep it down:
- One persistent XLA compilation cache serves the whole session, subprocesses included (they
  inherit the environment): many tests compile the same tiny train step. It starts empty
  each session and is removed at the end.
- XLA compiles with most of its optimisations off (`jax_disable_most_optimizations`, also
  inherited by subprocesses): a third to a half of the compile time for code that runs a
  little slower. Tests whose programs run long (a 32k-token row, the real model, the demo's
  training) are marked `@pytest.mark.optimized` (fixtures: `tests.xla.optimized()`) and
  compile as a user's run does.
The suite passes with optimisations on everywhere; every test but the demo's also passed off.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jaxdistill-tests-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# PyTorch (the reference side of the parity tests) on one thread: two workers share 2 cores,
# and its OpenMP threads spin while the other worker holds a core. transformers' `generate`
# on the real model took 22.9 s on two threads with the other core busy, 6.7 s on one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# Test files that take longest (seconds on 2 cores, measured by `--durations=0`). The two
# workers take files in collection order as they free up (`--no-loadscope-reorder`), so the
# longest go first and the short ones fill in at the end rather than one long file running
# alone at the end.
_LONGEST_FIRST = ("test_demo.py", "test_main.py", "test_launch.py", "test_attention.py",
                  "test_sampler.py", "test_real_model.py", "test_train.py", "test_evaluate.py",
                  "test_plan.py", "test_distill.py", "test_prepare.py", "test_remote_paths.py",
                  "test_bench_gpu.py", "test_model.py", "test_hf.py", "test_sharding.py",
                  "test_contamination.py", "test_grading.py", "test_pipeline.py",
                  "test_packing.py", "test_trace_distill.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
  """XLA's optimisations back on for tests marked `optimized` (and their subprocesses);
  a fixture that runs long programs uses `tests.xla.optimized()` itself."""
  if request.node.get_closest_marker("optimized") is None:
    yield
    return
  from tests import xla  # pylint: disable=g-import-not-at-top
  with xla.optimized():
    yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  from tests import hf_fixtures
  return hf_fixtures.save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
  from tests import hf_fixtures
  return hf_fixtures.save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def smollm2_dir():
  """SmolLM2-135M-Instruct, fp32 Hugging Face directory (see tests/real_model.py)."""
  from tests import real_model
  return real_model.smollm2_dir()
