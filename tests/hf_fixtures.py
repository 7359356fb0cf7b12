"""Tiny random Hugging Face models built offline with a fixed seed."""

import torch
import transformers


def tiny_hf_config(kind: str, **overrides):
  common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2)
  if kind == "llama":
    # llama3 rope scaling with a short original context, so the scaled bands are exercised.
    cfg = transformers.LlamaConfig(
        **common, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   rope_theta=1e6, use_sliding_window=False)
  else:
    raise ValueError(kind)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def tiny_hf_model(kind: str, seed: int = 0, dtype=torch.float32, **overrides):
  """A random model whose greedy continuations vary from token to token.

  At Hugging Face's init (std 0.02 everywhere) the layers barely move the residual stream,
  so the last token's embedding dominates the output: the tied Qwen2 model then repeats its
  input token (53% of its vocabulary predicts itself), and any decode path that ignored
  the KV cache after the first step would still pass. The layers' matrices are drawn 10x
  larger (std 0.2), which makes them dominate: greedy outputs of 12 tokens hold 10-12
  distinct ids.
  """
  torch.manual_seed(seed)
  cfg = tiny_hf_config(kind, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:  # HF zero-initialises biases
        p.add_(0.1 * torch.randn_like(p))
      elif name.startswith("model.layers."):
        p.mul_(10.0)
  return model.to(dtype).eval()


def save_tiny_model(directory, kind: str, dtype=torch.float32, **overrides) -> str:
  model = tiny_hf_model(kind, dtype=dtype, **overrides)
  model.save_pretrained(directory)
  return str(directory)


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_tiny_chatml_tokenizer(directory) -> str:
  """A word-level tokenizer with Qwen's special tokens and a ChatML template."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  words = ["system", "user", "assistant", "the", "answer", "is", "2", "+", "=", "4", "<unk>"]
  vocab = {t: i for i, t in enumerate(specials + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      additional_special_tokens=specials[1:])
  fast.chat_template = CHATML_TEMPLATE
  fast.save_pretrained(directory)
  return str(directory)
