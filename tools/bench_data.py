r"""Input-pipeline throughput on long synthetic traces: raw JSONL and prepared ArrayRecord.

  python tools/bench_data.py [--records=300] [--min_tokens=2048] [--max_tokens=16000] \
      [--seq_len=16384] [--batch=8] [--threads=1] [--prepare_workers=N] [--profile]

Builds, in a temporary directory:
  - a trace set of --records OpenAI-messages records, each a question and a `<think>` section
    of pseudo-mathematical prose (a Zipfian lexicon of 30k made-up words, numbers, LaTeX
    formulas, worked products, "Wait, ..." reflections) of log-uniform length between
    --min_tokens and --max_tokens tokens;
  - the tokenizer: a byte-level BPE with a ~32k vocabulary, trained here on that text, with
    Qwen2's pre-tokenizer regex (digits split one by one) and the ChatML special tokens,
    saved as a Hugging Face directory. It is rendered with the built-in ChatML template. The
    tokenizer decides most of the cost of (a): a real Qwen2.5 vocabulary (151k) encodes at a
    similar rate per token, and a SentencePiece model is slower. A Jinja template costs little
    next to the encoding.

Then it measures, through `pipeline.DataIterator` (shuffled, best-fit packing, batches of
--batch rows of --seq_len tokens):
  (a) raw JSONL -> batches, rendering with `ChatRenderer` in --threads reader threads;
  (b) the directory written by `prepare.prepare` (pre-tokenised examples in ArrayRecord) ->
      batches, over several epochs so that the measurement lasts a few seconds;
and, for reference, the offline preparation itself with --prepare_workers processes.

Tokens are those packed into rows (padding excluded). "Per core" is tokens per CPU-second
of the process (all its threads; for the preparation, its worker processes). That is the
rate a core sustains, whatever the thread count. The wall-clock rate is printed beside it
with the thread count. Targets: >= 100k tokens/s/core from raw JSONL, >= 1M from ArrayRecord.
"""

import cProfile
import io
import json
import math
import multiprocessing
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxdistill.data import builder, chat, formats, pipeline, prepare  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("records", 300, "Synthetic trace records.")
flags.DEFINE_integer("min_tokens", 2048, "Shortest assistant turn, in tokens.")
flags.DEFINE_integer("max_tokens", 16000, "Longest assistant turn, in tokens.")
flags.DEFINE_integer("seq_len", 16384, "Packed row length.")
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("vocab", 32000, "BPE vocabulary size to train.")
flags.DEFINE_integer("threads", 1, "Pipeline reader threads (DataConfig.num_threads).")
flags.DEFINE_integer("epochs_b", 30, "Epochs over the prepared data in (b).")
flags.DEFINE_integer("prepare_workers", os.cpu_count() or 1, "Processes for the preparation.")
flags.DEFINE_bool("profile", False, "Print the top functions of (b) by cumulative time.")
flags.DEFINE_string("workdir", None, "Keep the data here (default: a temporary directory).")

TARGET_RAW, TARGET_PREPARED = 100_000, 1_000_000
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
COMMON = ("the of and to a in is we that it this for so be with as by on are not let then we "
          "have which number equation value sum case since there if now check answer term "
          "function integer prime root square side triangle area angle circle point line "
          "solution factor divisible remainder modulo terms sequence probability count ways "
          "wait but actually hmm okay right correct again first second next means gives").split()
OPENERS = ("Wait,", "Hmm,", "Let me double-check.", "Alternatively,", "So", "Therefore,",
           "Now", "But", "Okay,", "Let me reconsider:")


class TraceText:
  """Seeded pseudo-mathematical prose with roughly the token statistics of real reasoning."""

  def __init__(self, seed: int = 0):
    self.rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ou")]
    made_up = {"".join(self.rng.choice(syllables, int(self.rng.integers(1, 5))))
               for _ in range(40_000)}
    self.words = np.array(COMMON + sorted(made_up)[:30_000])
    ranks = np.arange(len(self.words))
    self.p = 1.0 / (ranks + 2.7) ** 1.07
    self.p /= self.p.sum()
    self._drawn, self._at = np.zeros(0, self.words.dtype), 0

  def _draw(self, n: int) -> list[str]:
    # Weighted choice costs O(lexicon) per call: words are drawn a million at a time.
    if self._at + n > len(self._drawn):
      self._drawn, self._at = self.rng.choice(self.words, 1 << 20, p=self.p), 0
    self._at += n
    return list(self._drawn[self._at - n:self._at])

  def _formula(self) -> str:
    r = self.rng.integers
    a, b, c = (int(x) for x in r(2, 999, 3))
    kind = int(r(0, 6))
    if kind == 0:
      return f"${a}x^{{2}} + {b}x - {c} = 0$"
    if kind == 1:
      return f"$\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{a + b}}}$"
    if kind == 2:
      return f"{a} \\times {b} = {a * b}"
    if kind == 3:
      return f"$\\sqrt{{{a}}} \\approx {math.sqrt(a):.4f}$"
    if kind == 4:
      return f"$\\sum_{{k=1}}^{{{a}}} k^{{2}} = {a * (a + 1) * (2 * a + 1) // 6}$"
    return f"$a_{{{a % 20}}} \\equiv {b} \\pmod{{{c}}}$"

  def sentence(self) -> str:
    words = self._draw(int(self.rng.integers(6, 22)))
    for _ in range(int(self.rng.integers(0, 3))):
      words.insert(int(self.rng.integers(0, len(words) + 1)), self._formula())
    if self.rng.random() < 0.3:
      words.insert(0, OPENERS[int(self.rng.integers(len(OPENERS)))])
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."

  def paragraph(self) -> str:
    return " ".join(self.sentence() for _ in range(int(self.rng.integers(2, 7))))


def train_tokenizer(texts, vocab_size: int, directory: str):
  """A byte-level BPE trained on `texts`, saved as a Hugging Face tokenizer directory;
  returns the `tokenizers.Tokenizer` too."""
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.save_pretrained(directory)
  return tok


def write_traces(path: str, text: TraceText, tokenizer, n: int, lo: int, hi: int):
  """n messages records whose assistant turns hold log-uniform lo..hi tokens."""
  rng = np.random.default_rng(1)
  targets = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
  with open(path, "w", encoding="utf-8") as f:
    for target in targets:
      parts, count = [], 0
      while count < target - 16:  # the wrapper and the answer line take the rest
        paragraphs = [text.paragraph() for _ in range(8)]
        for p, ids in zip(paragraphs, tokenizer.encode_batch(paragraphs)):
          if count < target - 16:
            parts.append(p)
            count += len(ids) + 1  # + the "\n\n" between paragraphs
      answer = int(rng.integers(0, 1000))
      thinking = "\n\n".join(parts)
      f.write(json.dumps({"messages": [
          {"role": "user", "content": f"{text.paragraph()} {PROMPT}"},
          {"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n"
                                           f"The answer is $\\boxed{{{answer}}}$."}]}) + "\n")


def _setup(tok_dir: str, traces: str, vocab: int, records: int, lo: int, hi: int) -> float:
  """Trains the tokenizer and writes the traces; returns the training text's size in MB."""
  text = TraceText(seed=0)
  corpus = [text.paragraph() for _ in range(20_000)]
  bpe = train_tokenizer(corpus, vocab, tok_dir)
  write_traces(traces, text, bpe, records, lo, hi)
  return sum(map(len, corpus)) / 1e6


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) and of its reaped children."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run_pipeline(source: str, example_fn, epochs: int, profile: bool = False):
  """(tokens packed, wall s, CPU s, batches) of a whole pass of DataIterator over `source`."""
  cfg = pipeline.DataConfig(sources=(source,), seq_len=FLAGS.seq_len,
                            global_batch_size=FLAGS.batch, num_epochs=epochs,
                            num_threads=FLAGS.threads, prefetch_batches=0)
  profiler = cProfile.Profile() if profile else None
  wall, cpu = time.perf_counter(), _cpu_seconds()
  if profiler:
    profiler.enable()
  it = pipeline.DataIterator(cfg, example_fn, process_index=0, process_count=1)
  batches = sum(1 for _ in it)
  if profiler:
    profiler.disable()
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  tokens = it.stats["tokens"]
  it.close()
  if profiler:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    print(out.getvalue())
  return tokens, wall, cpu, batches


def _line(name, tokens, wall, cpu, units, target=None):
  per_core = tokens / cpu
  line = (f"{name:<38} {tokens:>11,} tokens  {wall:6.2f} s  {tokens / wall:>11,.0f} tokens/s "
          f"wall ({units})  {per_core:>11,.0f} tokens/s/core")
  if target:
    line += f"  target >= {target:,}: {'MET' if per_core >= target else 'MISSED'}"
  return line


def main(argv):
  del argv
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_data_")
  os.makedirs(workdir, exist_ok=True)
  try:
    t0 = time.perf_counter()
    tok_dir, traces = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "traces.jsonl")
    # In a child process: once `tokenizers` has run its thread pool (training, encode_batch),
    # later single `encode` calls in that process leave the core idle a third of the time, and
    # a training process never trains a tokenizer.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
      corpus_mb = pool.apply(_setup, (tok_dir, traces, FLAGS.vocab, FLAGS.records,
                                      FLAGS.min_tokens, FLAGS.max_tokens))
    tokenizer = chat.load_tokenizer(tok_dir)
    renderer = chat.ChatRenderer(tokenizer, "chatml")
    print(f"setup {time.perf_counter() - t0:.1f} s: tokenizer {tokenizer.vocab_size:,} ids "
          f"(byte-level BPE trained on {corpus_mb:.1f} MB of the synthetic text, Qwen2 "
          f"pre-tokenizer, ChatML); {FLAGS.records} records, "
          f"{os.path.getsize(traces) / 1e6:.1f} MB JSONL")
    fn = builder.example_fn(renderer, "auto", formats.DEFAULT_SPEC)

    raw = _run_pipeline(traces, fn, epochs=1)
    prepared_dir = os.path.join(workdir, "prepared")
    wall, cpu = time.perf_counter(), _cpu_seconds()
    stats = prepare.prepare(prepare.PrepareConfig(
        inputs=(traces,), output=prepared_dir, seq_len=FLAGS.seq_len,
        workers=FLAGS.prepare_workers), renderer, progress=None)
    prep = (stats["tokens"], time.perf_counter() - wall, _cpu_seconds() - cpu)
    hist = stats["length_histogram"]["kept"]
    print(f"examples: {stats['kept']} kept of {stats['records']} ({stats['dropped']['too_long']}"
          f" too long), {stats['tokens']:,} tokens, lengths {hist}")
    prepared = _run_pipeline(prepared_dir, fn, epochs=FLAGS.epochs_b)

    print(f"pipeline: seq_len {FLAGS.seq_len}, batch {FLAGS.batch}, best-fit packing, "
          f"shuffled; {FLAGS.threads} reader thread(s) + the main thread; per core = tokens "
          "per CPU-second of the process")
    print(_line("(a) raw JSONL -> packed batches", raw[0], raw[1], raw[2],
                f"{FLAGS.threads} thread(s)", TARGET_RAW))
    print(_line(f"(b) ArrayRecord -> packed batches x{FLAGS.epochs_b}", prepared[0],
                prepared[1], prepared[2], f"{FLAGS.threads} thread(s)", TARGET_PREPARED))
    print(_line("prepare_traces (JSONL -> ArrayRecord)", prep[0], prep[1], prep[2],
                f"{FLAGS.prepare_workers} worker processes"))
    if FLAGS.profile:
      _run_pipeline(prepared_dir, fn, epochs=FLAGS.epochs_b, profile=True)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
