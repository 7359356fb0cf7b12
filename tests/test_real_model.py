"""A published model with its own tokenizer and chat template: SmolLM2-135M-Instruct.

What tiny random models cannot show: parity on real text through 30 trained layers (where
a few features grow to ~2e4), greedy decoding of a model whose outputs vary, the assistant
mask on the template users load, and SFT from a Hugging Face directory back to one.
The fixture is described in tests/real_model.py.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdistill import checkpoint, hf
from jaxdistill.data import chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy. "
    "Each was written while he worked six days a week at the patent office in Bern.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
    "print([fib(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\n"
    "# Exponential time: memoise with functools.lru_cache for linear time.",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is "
                                 "prime."}],
    [{"role": "user", "content": "Solve for x: 3x + 7 = 22. Show your steps."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
]
# XLA:CPU's fp32 matrix products round about twice as far from exact as PyTorch's (a
# [80, 1536] x [1536, 576] product: 3.7e-4 against 1.9e-4 from float64), and the error
# grows through the layers where activations reach ~2e4. On TEXTS transformers' own fp32
# logits are 6e-5 from its float64 run and ours 1.5e-4. A broken model (RoPE off, wrong norm
# epsilon, an untied head) is off by more than 1e-1.
LOGITS_ATOL = 2.5e-4


def _text_tokens(tokenizer):
  ids = [tokenizer(t)["input_ids"] for t in TEXTS]
  n = min(map(len, ids))
  return np.array([x[:n] for x in ids])


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.double().numpy()


def test_logits_match_transformers_on_real_text(smollm2_dir):
  """Fails with the checkpoint's RoPE theta (1e5) replaced by 1e4: 8.8 off."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  tokens = _text_tokens(tokenizer)
  assert tokens.shape[1] >= 50, tokens.shape
  ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
  model = hf.load_hf_model(smollm2_dir)
  cfg = model.config
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (30, 9, 3,
                                                                                    True)
  got = np.asarray(model(jnp.asarray(tokens))[0], np.float64)
  want = _hf_logits(ref, tokens)
  exact = _hf_logits(ref.double(), tokens)
  assert np.abs(got - want).max() <= LOGITS_ATOL, np.abs(got - want).max()
  # No further from the float64 result than a small multiple of transformers' own rounding.
  assert np.abs(got - exact).max() <= 4 * np.abs(want - exact).max()
  # The model is trained: it predicts real text far better than chance (ln 49152 = 10.8).
  logp = torch.log_softmax(torch.tensor(got), -1).numpy()
  nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
  assert nll < 4.0, nll


def test_assistant_mask_covers_exactly_the_assistant_turns(smollm2_dir):
  """On the tokenizer's own template (which adds a default system turn when there is none),
  the scored tokens are each assistant content and its <|im_end|>, and the ids are those
  transformers' `apply_chat_template` gives. Fails if the mask leaves out the turn end."""
  hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  renderer = chat.ChatRenderer(chat.load_tokenizer(smollm2_dir), "tokenizer")
  assert renderer.template_name == "tokenizer" and renderer.turn_end == "<|im_end|>"
  think = "<think>\nFirst, 7 x 8: 7 x 8 = 56.\nWait, let me check: 56 / 8 = 7.\n</think>\n\n"
  conversations = [
      [{"role": "system", "content": "Reason first."},
       {"role": "user", "content": "What is 7 x 8?"},
       {"role": "assistant", "content": think + "The answer is \\boxed{56}."}],
      [{"role": "user", "content": "Hi"},
       {"role": "assistant", "content": "Hello! How can I help?"},
       {"role": "user", "content": "Add 2 and 3."},
       {"role": "assistant", "content": "2 + 3 = 5."}],
  ]
  for messages in conversations:
    ex = renderer.render(messages)
    want_ids = hf_tok.apply_chat_template(messages, tokenize=False)
    assert ex.tokens.tolist() == hf_tok(want_ids, add_special_tokens=False)["input_ids"]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ex.loss_mask.astype(int), [0]])))
    runs = [ex.tokens[a:b] for a, b in zip(edges[::2], edges[1::2])]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [hf_tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    unscored = hf_tok.decode(ex.tokens[~ex.loss_mask])
    for m in messages:
      if m["role"] != "assistant":
        assert m["content"] in unscored
    assert hf_tok.decode(ex.tokens[:ex.prompt_len]).endswith("<|im_start|>assistant\n")


def test_generate_tool_greedy_equals_transformers_generate(smollm2_dir, tmp_path):
  """tools/generate.py, greedy, 64 tokens on four chat prompts: the tokens transformers'
  `generate` gives, or a first difference where its top-2 logit margin is below 1e-4. Fails
  when decode steps ignore the KV cache."""
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"messages": m, "id": i}) + "\n"
                             for i, m in enumerate(CHATS)))
  out = tmp_path / "out.jsonl"
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "generate.py"), f"--init={smollm2_dir}",
       f"--prompts={prompts}", f"--output={out}", "--temperature=0", "--max_new_tokens=64",
       "--batch_size=4", "--chat_template_name=tokenizer"],
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
      capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row["id"] for row in rows] == list(range(len(CHATS)))
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
  renderer = chat.ChatRenderer(chat.load_tokenizer(smollm2_dir), "tokenizer")
  prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True,
                                           return_dict=True)["input_ids"] for m in CHATS]
  for messages, prompt in zip(CHATS, prompts):
    assert renderer.encode_prompt(messages).tolist() == list(prompt)
  # One batched `generate`, prompts padded on the left (a third faster than one at a time;
  # the same tokens here).
  tokenizer.padding_side = "left"
  with torch.no_grad():
    gen = ref.generate(**tokenizer.pad({"input_ids": prompts}, return_tensors="pt"),
                       max_new_tokens=64, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
  width = max(map(len, prompts))
  stopped = 0
  for k, row in enumerate(rows):
    want = gen.sequences[k, width:].tolist()
    got = row["completion_token_ids"][0]
    # A row that stopped early is padded after its stop: compare up to and including it.
    if renderer.turn_end_id in want:
      want = want[:want.index(renderer.turn_end_id) + 1]
    assert len(set(got)) > 5, got  # real, varied output: a cache bug would change it
    if got != want:
      i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
      assert i is not None, (got, want)  # one is a prefix of the other: a stop went wrong
      top2 = torch.topk(gen.logits[i][k].double(), 2).values
      assert float(top2[0] - top2[1]) < 1e-4, (i, got[:i + 1], want[:i + 1])
    stopped += row["finish_reason"][0] == "stop"
    if row["finish_reason"][0] == "stop":
      assert got[-1] == renderer.turn_end_id and row["response"][0].endswith("<|im_end|>")
    else:
      assert len(got) == 64
  assert 0 < stopped < len(CHATS)  # both ways of ending are exercised


@pytest.mark.optimized
def test_sft_from_hf_dir_then_export_loads_in_transformers(smollm2_dir, tmp_path):
  """A short SFT through the main job from `init.hf_dir`, on the model's own template, then
  export: transformers loads the export and computes the trained parameters' logits."""
  workdir, export = tmp_path / "run", tmp_path / "export"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  traces = os.path.join(ROOT, "jaxdistill", "assets", "tiny_traces.jsonl")
  r = subprocess.run(
      [sys.executable, "-m", "jaxdistill.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.init.hf_dir={smollm2_dir}",
       f"--config.data.tokenizer={smollm2_dir}", "--config.data.chat_template=tokenizer",
       f"--config.data.sources={traces}", "--config.mesh.shape=(1,2,1,1)",
       "--config.data.seq_len=288", "--config.train.loss_chunk=288",
       "--config.train.global_batch_size=2", "--config.train.num_steps=1",
       "--config.train.lr=1e-4", "--config.train.warmup_ratio=0.0",
       "--config.train.log_every=1", "--config.train.checkpoint_every=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"init.hf_dir={smollm2_dir}" in r.stderr
  losses = [json.loads(x)["loss"] for x in open(workdir / "metrics.jsonl") if '"loss"' in x]
  assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] < 3.0, losses
  # The export as tools/convert_checkpoint.py --from_orbax --to_hf does it (its command line
  # is tested in test_hf.py), here in this process rather than a third one.
  trained = checkpoint.load_model(str(workdir))
  hf.save_hf_model(trained, str(export), tokenizer_dir=smollm2_dir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
  assert reloaded.config.tie_word_embeddings
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
  tokens = _text_tokens(tokenizer)
  got = np.asarray(trained(jnp.asarray(tokens))[0], np.float64)
  want = _hf_logits(reloaded, tokens)
  assert np.abs(got - want).max() <= LOGITS_ATOL, np.abs(got - want).max()
  # Training moved the weights: the export is not the starting checkpoint.
  before = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir), tokens)
  assert np.abs(want - before).max() > 100 * LOGITS_ATOL
  assert tokenizer.convert_tokens_to_ids("<|im_end|>") in np.atleast_1d(
      reloaded.generation_config.eos_token_id)
