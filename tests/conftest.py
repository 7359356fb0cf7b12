"""Test setup: 8 simulated CPU devices (so meshes are real), fp32 matmuls, tiny HF models."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  from tests import hf_fixtures
  return hf_fixtures.save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
  from tests import hf_fixtures
  return hf_fixtures.save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")
