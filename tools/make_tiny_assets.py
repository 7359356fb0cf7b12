"""Writes the small trace file and tokenizer that `configs/tiny.py` trains on (committed).

  python tools/make_tiny_assets.py [--out=jaxdistill/assets]

Traces are column additions worked digit by digit inside <think>...</think>, with a
verification, in the OpenAI `messages` format; the tokenizer is a SentencePiece BPE model
trained on them with the ChatML tokens as symbols and digits split. Deterministic.
"""

import io
import json
import os
import random
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "jaxdistill", "assets"), "Output directory.")
flags.DEFINE_integer("num_traces", 400, "Traces to write.")

SYMBOLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def addition_trace(a: int, b: int) -> list[dict]:
  steps, carry = [], 0
  da, db = str(a)[::-1], str(b)[::-1]
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    s = x + y + carry
    steps.append(f"Digit {i + 1}: {x} + {y} + carry {carry} = {s}, write {s % 10}, "
                 f"carry {s // 10}.")
    carry = s // 10
  if carry:
    steps.append(f"Final carry {carry} becomes the leading digit.")
  total = a + b
  thinking = "\n".join([f"I add {a} and {b} column by column.", *steps,
                        f"So the sum is {total}.",
                        f"Wait, let me verify: {total} - {b} = {total - b}, which is {a}. "
                        "Correct."])
  return [{"role": "user", "content": f"What is {a} + {b}? {PROMPT}"},
          {"role": "assistant",
           "content": f"<think>\n{thinking}\n</think>\n\nThe answer is \\boxed{{{total}}}."}]


def main(argv):
  del argv
  import sentencepiece  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  os.makedirs(FLAGS.out, exist_ok=True)
  traces = [addition_trace(rng.randint(10, 9999), rng.randint(10, 9999))
            for _ in range(FLAGS.num_traces)]
  with open(os.path.join(FLAGS.out, "tiny_traces.jsonl"), "w") as f:
    for messages in traces:
      f.write(json.dumps({"messages": messages}) + "\n")
  corpus = [m["content"] for t in traces for m in t]
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=384, model_type="bpe",
      user_defined_symbols=SYMBOLS, byte_fallback=True, split_digits=True,
      character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
  with open(os.path.join(FLAGS.out, "tiny_tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  print(f"wrote {len(traces)} traces and a tokenizer to {FLAGS.out}")


if __name__ == "__main__":
  sys.exit(app.run(main))
