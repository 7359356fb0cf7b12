"""Hugging Face conversion: export loads in transformers, round trips are exact, bad input fails clearly."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdistill import checkpoint, hf
from jaxdistill.model_config import ModelConfig
from tests import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same_tensors(dir_a, dir_b):
  a, b = hf.SafetensorsReader(dir_a), hf.SafetensorsReader(dir_b)
  assert sorted(a.tensors) == sorted(b.tensors)
  for name in a.tensors:
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{name} differs"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_same_logits(kind, request, tmp_path):
  model = hf.load_hf_model(request.getfixturevalue(f"tiny_{kind}_dir"))
  out = str(tmp_path / "export")
  hf.save_hf_model(model, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded).__name__ == ("LlamaForCausalLM" if kind == "llama" else
                                     "Qwen2ForCausalLM")
  tokens = np.random.RandomState(0).randint(0, 320, (2, 80))
  with torch.no_grad():
    want = reloaded(torch.tensor(tokens)).logits.numpy()
  got, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_export_round_trip_is_bit_identical(kind, dtype, tmp_path):
  src = hf_fixtures.save_tiny_model(tmp_path / "src", kind, dtype=dtype)
  param_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
  model = hf.load_hf_model(src, param_dtype=param_dtype)
  hf.save_hf_model(model, str(tmp_path / "out"))
  _same_tensors(src, str(tmp_path / "out"))


def test_sharded_export_with_index_and_tokenizer(tiny_llama_dir, tmp_path):
  tok_dir = hf_fixtures.save_tiny_chatml_tokenizer(tmp_path / "tok")
  model = hf.load_hf_model(tiny_llama_dir)
  out = str(tmp_path / "out")
  hf.save_hf_model(model, out, tokenizer_dir=tok_dir, max_shard_bytes=100_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert set(index["weight_map"].values()) == set(shards)
  assert "tokenizer.json" in files and "tokenizer_config.json" in files
  _same_tensors(tiny_llama_dir, out)
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  tok = transformers.AutoTokenizer.from_pretrained(out)
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert im_end in gen["eos_token_id"] and tok.eos_token_id in gen["eos_token_id"]
  assert tok.apply_chat_template([{"role": "user", "content": "2 + 2"}], tokenize=False)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert im_end in reloaded.generation_config.eos_token_id


def test_export_refuses_to_overwrite(tiny_qwen2_dir, tmp_path):
  model = hf.load_hf_model(tiny_qwen2_dir)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    hf.save_hf_model(model, str(out))
  assert os.listdir(out) == ["keep.txt"]


def test_rope_override_at_import(tiny_qwen2_dir, tmp_path):
  model = hf.load_hf_model(tiny_qwen2_dir, rope_theta=3e5, max_position_embeddings=4096)
  assert model.config.rope_theta == 3e5 and model.config.max_position_embeddings == 4096
  hf.save_hf_model(model, str(tmp_path / "out"))
  cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
  assert cfg.max_position_embeddings == 4096
  theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
  assert theta == 3e5


def test_reads_both_config_layouts():
  v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}}
  v5 = dict(v4)
  del v5["rope_theta"], v5["rope_scaling"]
  v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=5e5)
  assert ModelConfig.from_hf_config(v4) == ModelConfig.from_hf_config(v5)
  assert ModelConfig.from_hf_config(v4).rope_scaling.factor == 8.0
  back = ModelConfig.from_hf_config(ModelConfig.from_hf_config(v4).to_hf_config())
  assert back == ModelConfig.from_hf_config(v4)


# -- Bad input ----------------------------------------------------------------------------------

def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_truncated_safetensors_is_a_clear_error(tiny_llama_dir, tmp_path):
  d = _copy(tiny_llama_dir, tmp_path / "ckpt")
  path = os.path.join(d, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(hf.CheckpointError, match="truncated.*download the file again"):
    hf.load_hf_model(d)
  with open(path, "r+b") as f:
    f.truncate(4)
  with pytest.raises(hf.CheckpointError, match="truncated or not a safetensors file"):
    hf.load_hf_model(d)


def _rewrite(src_dir, dst_dir, edit):
  """Copies a checkpoint, letting `edit(dict of arrays)` change its tensors."""
  os.makedirs(dst_dir)
  shutil.copy(os.path.join(src_dir, "config.json"), dst_dir)
  reader = hf.SafetensorsReader(src_dir)
  tensors = {n: np.array(reader.get(n)) for n in reader.tensors}
  edit(tensors)
  hf.write_safetensors(os.path.join(dst_dir, "model.safetensors"),
                       [(n, a.shape, a.dtype) for n, a in tensors.items()], tensors.__getitem__)
  return str(dst_dir)


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
  d = _rewrite(tiny_llama_dir, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.load_hf_model(d)


def test_extra_tensor_is_named(tiny_llama_dir, tmp_path):
  def add(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  d = _rewrite(tiny_llama_dir, tmp_path / "c", add)
  with pytest.raises(hf.CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
    hf.load_hf_model(d)


def test_wrong_shape_is_named(tiny_llama_dir, tmp_path):
  def shrink(t):
    t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:8]
  d = _rewrite(tiny_llama_dir, tmp_path / "c", shrink)
  with pytest.raises(hf.CheckpointError,
                     match=r"'model.layers.2.self_attn.k_proj.weight' has shape \(8, 64\) but "
                     r"config.json implies \(16, 64\)"):
    hf.load_hf_model(d)


def test_unknown_model_type_is_a_clear_error(tiny_llama_dir, tmp_path):
  d = _copy(tiny_llama_dir, tmp_path / "c")
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'.*supports"):
    hf.load_hf_model(d)


def test_pickled_weights_are_refused(tiny_llama_dir, tmp_path):
  d = tmp_path / "c"
  d.mkdir()
  shutil.copy(os.path.join(tiny_llama_dir, "config.json"), d)
  (d / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(hf.CheckpointError, match="never unpickles"):
    hf.load_hf_model(str(d))


def test_tied_checkpoint_with_redundant_lm_head_imports(tiny_qwen2_dir, tmp_path):
  def add_head(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  d = _rewrite(tiny_qwen2_dir, tmp_path / "c", add_head)
  model = hf.load_hf_model(d)
  assert model.config.tie_embeddings


# -- Orbax and the CLI --------------------------------------------------------------------------

def test_cli_round_trip_through_orbax(tiny_qwen2_dir, tmp_path):
  tok_dir = hf_fixtures.save_tiny_chatml_tokenizer(tmp_path / "tok")
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
  tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  run = lambda *args: subprocess.run([sys.executable, tool, *args], env=env, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300)
  r = run(f"--from_hf={tiny_qwen2_dir}", f"--to_orbax={ckpt}", "--mesh=1,2,1,2")
  assert r.returncode == 0, r.stderr[-3000:]
  r = run(f"--from_orbax={ckpt}", f"--to_hf={out}", f"--tokenizer={tok_dir}", "--mesh=1,-1,1,1")
  assert r.returncode == 0, r.stderr[-3000:]
  _same_tensors(tiny_qwen2_dir, out)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  # A bad source writes nothing.
  bad = str(tmp_path / "bad")
  r = run(f"--from_hf={bad}", f"--to_orbax={tmp_path / 'ckpt2'}")
  assert r.returncode != 0 and not os.path.exists(tmp_path / "ckpt2")


def test_orbax_checkpoint_from_workdir_and_step_dir(tiny_llama_dir, tmp_path):
  model = hf.load_hf_model(tiny_llama_dir)
  workdir = tmp_path / "workdir"
  checkpoint.save_model(str(workdir / "checkpoints"), model, step=3)
  checkpoint.save_model(str(workdir / "checkpoints"), model, step=7)
  for path, step in [(workdir, 7), (workdir / "checkpoints" / "3", 3)]:
    restored = checkpoint.load_model(str(path))
    assert restored.config == model.config
    a, b = restored.layers.mlp.up_proj.kernel[...], model.layers.mlp.up_proj.kernel[...]
    assert np.array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match="no step 5"):
    checkpoint.load_model(str(workdir), step=5)
