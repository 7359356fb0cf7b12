"""Hugging Face checkpoint conversion, both ways, through one key table.

Import reads `config.json` and `*.safetensors` (one file, or shards with an index) through
memory maps and ml_dtypes (so bf16 needs no torch) and builds each parameter straight onto
the mesh with `jax.make_array_from_callback`: every device reads only its own slice, so a 72B
checkpoint is never held whole in host memory. Export writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` and vLLM load.

Either directory may be a gs:// URL: an import copies the directory into the local cache
first (`storage.local_dir`, once per host; memory maps need local files), an export is
written locally and then uploaded.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxdistill import storage
from jaxdistill.data.chat import TURN_END_TOKENS
from jaxdistill.model import Transformer, abstract_model, flat_params
from jaxdistill.model_config import ModelConfig
from jaxdistill.sharding import param_shardings, path_str

_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
# Buffers some exporters write that are recomputed from the config, not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be imported as it stands."""


# -- safetensors, read through memory maps ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorRef:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offsets in `file`
  end: int


class SafetensorsReader:
  """All tensors of a safetensors checkpoint directory, read lazily."""

  def __init__(self, directory: str):
    self.directory = directory
    files = self._files(directory)
    self.tensors: dict[str, _TensorRef] = {}
    self._maps: dict[str, np.memmap] = {}
    for path in files:
      for name, ref in _read_header(path).items():
        if name in self.tensors:
          raise CheckpointError(f"tensor {name!r} appears in both {self.tensors[name].file} "
                                f"and {path}")
        self.tensors[name] = ref

  @staticmethod
  def _files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted({os.path.join(directory, v) for v in weight_map.values()})
      missing = [p for p in files if not os.path.exists(p)]
      if missing:
        raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
      return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
      return files
    pickles = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(
        os.path.join(directory, "*.pt"))
    if pickles:
      raise CheckpointError(
          f"{directory} holds only pickled PyTorch weights ({os.path.basename(pickles[0])}, "
          "...). jaxdistill never unpickles checkpoints (they can run arbitrary code); convert "
          "them to safetensors first, e.g. with transformers: "
          "model.save_pretrained(dir, safe_serialization=True).")
    raise CheckpointError(f"no *.safetensors files in {directory}")

  def get(self, name: str) -> np.ndarray:
    """A read-only view of tensor `name`; nothing is read until it is indexed."""
    ref = self.tensors[name]
    if ref.file not in self._maps:
      self._maps[ref.file] = np.memmap(ref.file, dtype=np.uint8, mode="r")
    raw = self._maps[ref.file][ref.start:ref.end]
    return raw.view(ref.dtype).reshape(ref.shape)


def _read_header(path: str) -> dict[str, _TensorRef]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims "
                            f"{header_len} bytes but the file has {size}")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
  base = 8 + header_len
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in _ST_TO_NP:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
    dtype = _ST_TO_NP[meta["dtype"]]
    begin, end = meta["data_offsets"]
    shape = tuple(meta["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape "
                            f"{shape} and dtype {meta['dtype']}")
    if base + end > size:
      raise CheckpointError(
          f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file has "
          f"{size} bytes; download the file again")
    out[name] = _TensorRef(path, dtype, shape, base + begin, base + end)
  return out


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray]) -> None:
  """Writes tensors one at a time: the header is planned from shapes, then `fetch(name)`."""
  header, offset = {}, 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NP_TO_ST[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in tensors:
      arr = np.ascontiguousarray(fetch(name), dtype=dtype)
      if arr.shape != tuple(shape):
        raise AssertionError(f"{name}: planned shape {shape}, got {arr.shape}")
      f.write(arr.tobytes())


# -- The key table ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyRule:
  """One Hugging Face tensor name pattern and our parameter it becomes.

  `to_ours` maps the HF array to our layout using only transposes and axis splits, so on a
  memory map it stays a view and slicing it afterwards reads only the slice.
  """

  hf: str  # "{i}" stands for the layer index
  ours: str  # slash path in model.py; paths under "layers/" carry a leading L axis
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def _identity(x):
  return x


def key_table(cfg: ModelConfig) -> list[KeyRule]:
  """The whole HF <-> jaxdistill mapping for a Llama / Qwen2 config."""
  d, f, v, h = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.head_dim
  n, k = cfg.num_heads, cfg.num_kv_heads

  def out_split(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
    return (lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

  def bias_split(heads):  # HF [heads*H] <-> ours [heads, H]
    return (lambda b: b.reshape(heads, h), lambda b: b.reshape(heads * h))

  transpose = (lambda w: w.T, lambda w: w.T)
  ident = (_identity, _identity)
  a, m = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
  rules = [
      ("model.embed_tokens.weight", "embed_tokens/embedding", (v, d), ident),
      (f"{a}.q_proj.weight", "layers/self_attn/q_proj/kernel", (n * h, d), out_split(n)),
      (f"{a}.k_proj.weight", "layers/self_attn/k_proj/kernel", (k * h, d), out_split(k)),
      (f"{a}.v_proj.weight", "layers/self_attn/v_proj/kernel", (k * h, d), out_split(k)),
      (f"{a}.o_proj.weight", "layers/self_attn/o_proj/kernel", (d, n * h),
       (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)),
      (f"{m}.gate_proj.weight", "layers/mlp/gate_proj/kernel", (f, d), transpose),
      (f"{m}.up_proj.weight", "layers/mlp/up_proj/kernel", (f, d), transpose),
      (f"{m}.down_proj.weight", "layers/mlp/down_proj/kernel", (d, f), transpose),
      ("model.layers.{i}.input_layernorm.weight", "layers/input_layernorm/scale", (d,), ident),
      ("model.layers.{i}.post_attention_layernorm.weight",
       "layers/post_attention_layernorm/scale", (d,), ident),
      ("model.norm.weight", "norm/scale", (d,), ident),
  ]
  if cfg.qkv_bias:
    rules += [
        (f"{a}.q_proj.bias", "layers/self_attn/q_proj/bias", (n * h,), bias_split(n)),
        (f"{a}.k_proj.bias", "layers/self_attn/k_proj/bias", (k * h,), bias_split(k)),
        (f"{a}.v_proj.bias", "layers/self_attn/v_proj/bias", (k * h,), bias_split(k)),
    ]
  if not cfg.tie_embeddings:
    rules.append(("lm_head.weight", "lm_head/kernel", (v, d), transpose))
  return [KeyRule(hf, ours, shape, *fns) for hf, ours, shape, fns in rules]


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[KeyRule, int | None]]:
  out = {}
  for rule in key_table(cfg):
    if rule.per_layer:
      for i in range(cfg.num_layers):
        out[rule.hf.format(i=i)] = (rule, i)
    else:
      out[rule.hf] = (rule, None)
  return out


def check_checkpoint(cfg: ModelConfig, reader: SafetensorsReader) -> None:
  """Every expected tensor present with its config.json shape, and nothing unexplained."""
  expected = _expected_tensors(cfg)
  problems = []
  for name, (rule, _) in expected.items():
    if name not in reader.tensors:
      problems.append(f"missing tensor {name!r}")
    elif reader.tensors[name].shape != rule.hf_shape:
      problems.append(f"tensor {name!r} has shape {reader.tensors[name].shape} but config.json "
                      f"implies {rule.hf_shape}")
  for name in reader.tensors:
    if name in expected or name.endswith(_IGNORED_SUFFIXES):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      continue  # some exporters write the tied head too; the embedding is authoritative
    problems.append(f"unexpected tensor {name!r}")
  if problems:
    shown = "; ".join(problems[:10])
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    raise CheckpointError(f"{reader.directory} does not match its config.json: {shown}{more}")


# -- Import -----------------------------------------------------------------------------------

def read_config(hf_dir: str) -> dict | str:
  """What `ModelConfig.from_hf_config` reads for `hf_dir`: a local path as it is, the
  `config.json` of a gs:// directory as a dict (without copying its weights)."""
  if not storage.is_url(hf_dir):
    return hf_dir
  path = storage.join(hf_dir, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"No Hugging Face config at {path}")
  with storage.open(path) as f:
    return json.load(f)


def load_hf_model(hf_dir: str, mesh=None, **config_overrides) -> Transformer:
  """Imports a Hugging Face directory as a Transformer, each parameter built on `mesh`.

  Args:
    hf_dir: directory with `config.json` and `*.safetensors` (gs://: copied locally first).
    mesh: a ("data", "fsdp", "context", "tp") mesh; None puts everything on the first device.
    **config_overrides: ModelConfig fields to replace after reading config.json, e.g.
      `param_dtype="bfloat16"`, `rope_theta=3e5`, `max_position_embeddings=32768`.
  Returns:
    The model, parameters cast to `param_dtype`.
  """
  hf_dir = storage.local_dir(hf_dir)
  cfg = ModelConfig.from_hf_config(hf_dir, **config_overrides)
  reader = SafetensorsReader(hf_dir)
  check_checkpoint(cfg, reader)
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state)
  else:
    shardings = param_shardings(abstract_state, mesh)
  rules = {r.ours: r for r in key_table(cfg)}

  def build(keypath, abstract, sharding):
    rule = rules[path_str(keypath)]
    dtype = np.dtype(abstract.dtype)

    def read(index):
      if not rule.per_layer:
        return np.array(rule.to_ours(reader.get(rule.hf))[index], dtype=dtype)
      layers = range(cfg.num_layers)[index[0]]
      return np.stack([np.array(rule.to_ours(reader.get(rule.hf.format(i=i)))[index[1:]],
                                dtype=dtype) for i in layers])

    return jax.make_array_from_callback(abstract.shape, sharding, read)

  state = jax.tree.map_with_path(build, abstract_state, shardings)
  return nnx.merge(graphdef, state)


# -- Export -----------------------------------------------------------------------------------

def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf_model(model: Transformer, out_dir: str, *, dtype: str | None = None,
                  tokenizer_dir: str | None = None, max_shard_bytes: int = 5 * 2**30,
                  overwrite: bool = False) -> None:
  """Writes `model` as a Hugging Face directory, one tensor at a time.

  Args:
    model: the model to export (parameters may be sharded, across processes too).
    out_dir: destination (local or gs://); must not exist unless `overwrite`.
    dtype: "float32" or "bfloat16" for the stored tensors (default: the parameter dtype).
    tokenizer_dir: a Hugging Face tokenizer directory whose files (and chat template) are
      copied; its turn-end token joins the eos ids in `generation_config.json`.
    max_shard_bytes: above this the weights are split into
      `model-0000x-of-0000y.safetensors` with an index, as transformers writes them.
    overwrite: replace an existing `out_dir`.
  """
  cfg = model.config
  dtype = dtype or cfg.param_dtype
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  if storage.exists(out_dir) and storage.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory")
  if tokenizer_dir is not None:
    tokenizer_dir = storage.local_dir(tokenizer_dir, skip=storage.WEIGHT_SUFFIXES)
  params = flat_params(model)
  plan = []  # (hf name, nbytes, fetch)
  for rule in key_table(cfg):
    for i in range(cfg.num_layers) if rule.per_layer else [None]:
      name = rule.hf.format(i=i) if i is not None else rule.hf
      plan.append((name, rule, i))
  shards, current, size = [], [], 0
  for entry in plan:
    nbytes = int(np.prod(entry[1].hf_shape)) * np_dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  shards.append(current)

  def fetch(rule, i):
    x = params[rule.ours]
    return rule.to_hf(_to_host(x if i is None else x[i]))

  writer = jax.process_index() == 0
  remote = storage.is_url(out_dir)
  # Written beside the destination and renamed into place; a gs:// export is uploaded whole.
  tmp = tempfile.mkdtemp(prefix=".export-", dir=None if remote else
                         os.path.dirname(os.path.abspath(out_dir)))
  try:
    weight_map, total = {}, 0
    for s, entries in enumerate(shards):
      fname = ("model.safetensors" if len(shards) == 1
               else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
      lookup = {name: (rule, i) for name, rule, i in entries}
      tensors = [(name, rule.hf_shape, np_dtype) for name, rule, i in entries]
      if writer:
        write_safetensors(os.path.join(tmp, fname), tensors, lambda n: fetch(*lookup[n]))
      else:  # every process takes part in the gathers
        for name, _, _ in tensors:
          fetch(*lookup[name])
      for name, shape, _ in tensors:
        weight_map[name] = fname
        total += int(np.prod(shape)) * np_dtype.itemsize
    if writer:
      if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
          json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
      _write_configs(cfg, tmp, dtype, tokenizer_dir)
      if storage.exists(out_dir):
        storage.rmtree(out_dir)
      if remote:
        storage.upload_dir(tmp, out_dir)
      else:
        os.replace(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def _write_configs(cfg: ModelConfig, out_dir: str, dtype: str, tokenizer_dir: str | None):
  hf_config = cfg.to_hf_config(dtype=dtype)
  eos = hf_config["eos_token_id"]
  eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  if tokenizer_dir is not None:
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
    if not copied:
      raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) "
                              f"in {tokenizer_dir}")
    for n in copied:
      shutil.copy2(os.path.join(tokenizer_dir, n), os.path.join(out_dir, n))
    eos_ids += _turn_end_ids(tokenizer_dir)
  eos_ids = list(dict.fromkeys(eos_ids))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  generation = {"bos_token_id": cfg.bos_token_id,
                "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)


def _turn_end_ids(tokenizer_dir: str) -> list[int]:
  """The tokenizer's eos id and any chat turn-end token it knows, in that order."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
  vocab = tok.get_vocab()
  template = tok.chat_template if isinstance(tok.chat_template, str) else ""
  for token in TURN_END_TOKENS:
    if token in vocab and (token in template or token == tok.eos_token):
      ids.append(vocab[token])
  if not ids:
    logging.warning("tokenizer in %s has no eos token; generation_config.json has none",
                    tokenizer_dir)
  return ids
