"""ModelConfig: the frozen description of a Llama 3 / Qwen2 model, its presets, and HF config mapping."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload_dots")
# The fields that set how a model computes, never its weights: a run sets them on whatever the
# weights come from (settings.ModelSettings.overrides, startup, the benchmarks).
EXECUTION_FIELDS = ("param_dtype", "compute_dtype", "remat", "attention", "attention_block",
                    "scan_unroll")
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "pallas_gpu", "splash")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face's `rope_scaling` / `rope_parameters` describe it."""

  rope_type: str = "default"  # "default" | "linear" | "llama3"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one decoder-only transformer.

  Names follow Hugging Face's where they exist, so `from_hf_config` is mostly a copy.
  """

  model_type: str = "llama"  # "llama" | "qwen2": decides the HF architecture on export
  vocab_size: int = 256
  d_model: int = 64  # hidden_size
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128  # intermediate_size
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  qkv_bias: bool = False  # Qwen2 has biases on q, k and v (never on o)
  tie_embeddings: bool = False  # lm_head shares the embedding matrix
  initializer_range: float = 0.02
  param_dtype: str = "float32"  # storage dtype of parameters: "float32" | "bfloat16"
  compute_dtype: str = "float32"  # dtype of matmul inputs and activations
  remat: str = "none"  # per-layer rematerialisation: one of REMAT_POLICIES
  attention: str = "auto"  # one of ATTENTION_IMPLS (attention.py)
  # Query/key block of blockwise attention and the fused kernels; 0: the platform's default
  # (attention.block_size: 256 on CPU, 512 on accelerators).
  attention_block: int = 0
  scan_unroll: int = 1  # layers per iteration of the scan over layers (model.Transformer)
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None  # a tuple keeps the config hashable

  def __post_init__(self):
    problems = []
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      problems.append(f"model_type={self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim={self.head_dim} must be even for RoPE")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in _DTYPES:
        problems.append(f"{field}={getattr(self, field)!r} is not one of {tuple(_DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      problems.append(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if self.attention_block < 0 or self.attention_block % 16:
      problems.append(f"attention_block={self.attention_block} must be 0 (the platform's "
                      "default) or a positive multiple of 16")
    if self.scan_unroll < 1:
      problems.append(f"scan_unroll={self.scan_unroll} must be at least 1")
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
      problems.append(f"rope_type={self.rope_scaling.rope_type!r} is not one of "
                      f"{SUPPORTED_ROPE_TYPES}")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> ModelConfig:
    if isinstance(changes.get("rope_scaling"), dict):
      changes["rope_scaling"] = RopeScaling(**changes["rope_scaling"])
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count from the shapes alone (equals the model's, tested)."""
    d, h = self.d_model, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * self.mlp_dim + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + embed + d

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
      d["eos_token_id"] = tuple(d["eos_token_id"])
    return cls(**d)

  # -- Hugging Face config.json ---------------------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
    """Reads a Hugging Face `config.json` (dict, file or directory).

    Accepts both the transformers v4 layout (`rope_theta` + `rope_scaling`) and the v5
    layout (`rope_parameters`). `overrides` replace fields afterwards, e.g.
    `rope_theta=300_000, max_position_embeddings=32768` for long traces on Qwen2.5-Math.
    """
    if not isinstance(hf, dict):
      path = os.fspath(hf)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"No Hugging Face config at {path}")
      with open(path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {model_type!r} (architectures={hf.get('architectures')}); "
          f"jaxdistill supports {SUPPORTED_MODEL_TYPES} (Llama 3.x, Qwen2, Qwen2.5, "
          "Qwen2.5-Math).")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"Unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU).")
    if hf.get("mlp_bias"):
      raise ValueError("Unsupported mlp_bias=true in config.json.")
    if model_type == "llama" and hf.get("attention_bias"):
      raise ValueError("Unsupported attention_bias=true for a llama model (it adds an o_proj "
                       "bias jaxdistill does not have).")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
      raise ValueError("Unsupported use_sliding_window=true in a qwen2 config; set it to "
                       "false (Qwen2.5 checkpoints ship it false).")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"Unsupported RoPE scaling {rope_type!r}; supported: "
                       f"{SUPPORTED_ROPE_TYPES}.")
    scaling = None
    if rope_type != "default":
      scaling = RopeScaling(
          rope_type=rope_type,
          factor=float(rope.get("factor", 1.0)),
          low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
          high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(
              rope.get("original_max_position_embeddings", 8192)))
    num_heads = hf["num_attention_heads"]
    d_model = hf["hidden_size"]
    cfg = cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or d_model // num_heads,
        mlp_dim=hf["intermediate_size"],
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_int_or_tuple(hf.get("eos_token_id")),
    )
    return cfg.replace(**overrides) if overrides else cfg

  def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` transformers (v4 and v5) and vLLM load for this model."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
    out = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.mlp_dim,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": self.tie_embeddings,
        "initializer_range": self.initializer_range,
        "torch_dtype": dtype or self.param_dtype,
        "use_cache": True,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
    }
    if self.rope_scaling is not None:
      rs = self.rope_scaling
      scaling = {"rope_type": rs.rope_type, "factor": rs.factor}
      if rs.rope_type == "llama3":
        scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                       original_max_position_embeddings=rs.original_max_position_embeddings)
      out["rope_scaling"] = scaling
    if self.model_type == "llama":
      out.update(attention_bias=False, mlp_bias=False)
    else:
      out.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=self.num_layers)
    return out


def _int_or_tuple(x):
  return tuple(x) if isinstance(x, list) else x


def _llama3_rope(factor: float) -> RopeScaling:
  return RopeScaling("llama3", factor, 1.0, 4.0, 8192)


def _qwen2_5(vocab, d, layers, heads, kv, mlp, tied, theta=1e6, positions=32768, eos=151643):
  return ModelConfig(
      model_type="qwen2", vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
      num_kv_heads=kv, head_dim=d // heads, mlp_dim=mlp, rms_eps=1e-6, rope_theta=theta,
      max_position_embeddings=positions, qkv_bias=True, tie_embeddings=tied,
      bos_token_id=151643, eos_token_id=eos)


def _llama3(d, layers, heads, mlp, tied, factor):
  return ModelConfig(
      model_type="llama", vocab_size=128256, d_model=d, num_layers=layers, num_heads=heads,
      num_kv_heads=8, head_dim=d // heads, mlp_dim=mlp, rms_eps=1e-5, rope_theta=500000.0,
      rope_scaling=_llama3_rope(factor), max_position_embeddings=131072,
      tie_embeddings=tied, bos_token_id=128000, eos_token_id=128001)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        model_type="qwen2", vocab_size=512, d_model=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, mlp_dim=128, rms_eps=1e-6, max_position_embeddings=2048,
        qkv_bias=True, tie_embeddings=True),
    # The distillation demo's student (configs/demo.py); its vocabulary is the demo tokenizer's.
    "demo_student": ModelConfig(
        model_type="qwen2", vocab_size=512, d_model=128, num_layers=4, num_heads=4,
        num_kv_heads=4, head_dim=32, mlp_dim=384, rms_eps=1e-6, max_position_embeddings=1024,
        qkv_bias=True, tie_embeddings=True),
    # The demo's distill preset's student: 419,424 parameters with the demo's 512-token
    # vocabulary, 0.46 of demo_student's 920,192 (the preset asks for at most half).
    "demo_student_small": ModelConfig(
        model_type="qwen2", vocab_size=512, d_model=96, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=24, mlp_dim=224, rms_eps=1e-6, max_position_embeddings=1024,
        qkv_bias=True, tie_embeddings=True),
    # The model every benchmark in tools/ compares against its peer on CPU.
    "bench": ModelConfig(
        model_type="llama", vocab_size=8192, d_model=256, num_layers=4, num_heads=8,
        num_kv_heads=4, head_dim=32, mlp_dim=768, rms_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2),
    "llama3_2_1b": _llama3(2048, 16, 32, 8192, tied=True, factor=32.0),
    "llama3_1_8b": _llama3(4096, 32, 32, 14336, tied=False, factor=8.0),
    "llama3_1_70b": _llama3(8192, 80, 64, 28672, tied=False, factor=8.0),
    "qwen2_5_0_5b": _qwen2_5(151936, 896, 24, 14, 2, 4864, tied=True),
    "qwen2_5_1_5b": _qwen2_5(151936, 1536, 28, 12, 2, 8960, tied=True),
    "qwen2_5_3b": _qwen2_5(151936, 2048, 36, 16, 2, 11008, tied=True),
    "qwen2_5_7b": _qwen2_5(152064, 3584, 28, 28, 4, 18944, tied=False),
    "qwen2_5_14b": _qwen2_5(152064, 5120, 48, 40, 8, 13824, tied=False),
    "qwen2_5_32b": _qwen2_5(152064, 5120, 64, 40, 8, 27648, tied=False),
    "qwen2_5_72b": _qwen2_5(152064, 8192, 80, 64, 8, 29568, tied=False),
    # Qwen2.5-Math ships rope_theta 1e4 and 4,096 positions; long-trace SFT overrides both.
    "qwen2_5_math_1_5b": _qwen2_5(151936, 1536, 28, 12, 2, 8960, tied=True, theta=1e4,
                                  positions=4096),
    "qwen2_5_math_7b": _qwen2_5(152064, 3584, 28, 28, 4, 18944, tied=False, theta=1e4,
                                positions=4096),
    "qwen2_5_math_72b": _qwen2_5(152064, 8192, 80, 64, 8, 29568, tied=False, theta=1e4,
                                 positions=4096),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  cfg = PRESETS[name]
  return cfg.replace(**overrides) if overrides else cfg
