r"""Renders trace records once, on every core, into pre-tokenised ArrayRecord shards, or
writes their conversations as a TensorFlow Datasets dataset (--tfds_name).

  python tools/prepare_traces.py --input='data/*.jsonl,extra.parquet' \
      --tokenizer=/ckpt/Qwen2.5-7B --seq_len=16384 --output=/data/prepared \
      [--format=auto] [--fields=question=query,...] [--chat_template=auto] \
      [--overlong=drop|truncate] [--pack] [--strict] [--workers=K]

  python tools/prepare_traces.py --input='data/*.jsonl' --tfds_name=my_traces \
      --tfds_dir=/data/tfds [--tfds_split=train] [--format=auto] [--fields=...] [--strict]

Records are read as training reads them: --format, --fields, --thinking_open,
--thinking_close, --system_prompt and --s1k_variant are the run's data.* keys of those names.

Without --pack, DIR gets examples-0000i-of-0000n.array_record: one pre-tokenised example
(tokens and loss mask) per entry, in input order. The training pipeline reads them directly
in place of the raw traces (--config.data.sources=DIR), with no tokenizer work. Shuffling,
packing and the over-length policy still happen there, so seq_len may stay the same or shrink.
With --pack, DIR gets rows-0000i-of-0000n.array_record instead: rows already packed to
seq_len (the encoding is described in jaxdistill/data/prepare.py). Training reads them as they
are, shuffled per epoch, sharded and batched with no rendering or packing
(--config.data.sources=DIR --config.data.seq_len=<this --seq_len>); a packed directory cannot
share a mixture with sources the pipeline packs. `jaxdistill.data.packed_rows.PackedRows(DIR)`
is a Grain source of its row dicts.

Either way DIR/stats.json records what was kept, truncated and dropped (by reason), the
first bad records as file:line, length histograms, the tokenizer and template, and input
fingerprints. Training with a tokenizer or chat template other than the one recorded there is
refused. Bad records are skipped and counted; with --strict the run stops at the first
one, prints where it is, and leaves no shards behind. Progress goes to stderr every few
seconds. The output does not depend on --workers.

With --tfds_name, no tokenizer is involved: the conversations are written as the TensorFlow
Datasets dataset TFDS_DIR/NAME/1.0.0 in ArrayRecord format, in the canonical `messages`
layout (jaxdistill/data/tfds_traces.py), and training reads them with
TFDS_DATA_DIR=TFDS_DIR --config.data.sources=tfds:NAME@SPLIT. It needs the tfds extra.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import format_flags  # noqa: E402
from jaxdistill.data import chat, formats, packing, pipeline, prepare, tfds_traces  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("input", None, "Trace files, globs or directories (JSONL, Parquet, "
                  "ArrayRecord) or tfds:NAME[@SPLIT], comma-separated; read in this order.")
flags.DEFINE_string("tokenizer", None, "Hugging Face tokenizer directory or SentencePiece "
                    ".model file: the one training will use.")
flags.DEFINE_integer("seq_len", None, "Row length the examples are fitted to (data.seq_len).")
flags.DEFINE_string("output", None, "Directory for the shards and stats.json (new, or without "
                    "prepared data in it).")
flags.DEFINE_enum("format", "auto", ["auto", *formats.FORMATS], "Trace format of the records.")
format_flags.define()
flags.DEFINE_string("chat_template", "auto", "'auto', 'tokenizer', 'chatml', 'llama3' or a "
                    "Jinja template (data.chat_template).")
flags.DEFINE_enum("overlong", "drop", list(packing.OVERLONG_POLICIES),
                  "Examples longer than seq_len: drop them, or keep their first seq_len tokens.")
flags.DEFINE_bool("pack", False, "Write rows packed to seq_len instead of examples; training "
                  "then needs data.seq_len equal to --seq_len.")
flags.DEFINE_integer("pack_bins", 16, "Rows open at once while packing.")
flags.DEFINE_bool("strict", False, "Stop at the first bad record instead of skipping it.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Rendering processes.")
flags.DEFINE_integer("shard_mb", 256, "Records per shard, in MiB before compression.")
flags.DEFINE_string("tfds_name", None, "Write the conversations as this TFDS dataset (in "
                    "--tfds_dir, ArrayRecord format) instead of tokenising them.")
flags.DEFINE_string("tfds_dir", None, "TFDS data directory for --tfds_name (TFDS_DATA_DIR "
                    "when training).")
flags.DEFINE_string("tfds_split", "train", "Split that --tfds_name writes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    spec = format_flags.spec()
  except ValueError as e:
    raise app.UsageError(str(e))
  if FLAGS.tfds_name or FLAGS.tfds_dir:
    return _write_tfds(spec)
  for name in ("input", "tokenizer", "seq_len", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  try:
    cfg = prepare.PrepareConfig(
        inputs=FLAGS.input, output=FLAGS.output, seq_len=FLAGS.seq_len, format=FLAGS.format,
        overlong=FLAGS.overlong, pack=FLAGS.pack, pack_bins=FLAGS.pack_bins,
        strict=FLAGS.strict, workers=FLAGS.workers, shard_bytes=FLAGS.shard_mb << 20)
    renderer = chat.ChatRenderer(chat.load_tokenizer(FLAGS.tokenizer), FLAGS.chat_template)
    stats = prepare.prepare(cfg, renderer, spec)
  except pipeline.BadRecordError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (FileNotFoundError, ValueError) as e:  # missing paths, bad settings, a used output
    raise app.UsageError(str(e))
  print(prepare.summary(stats))
  print(f"wrote {os.path.join(FLAGS.output, prepare.STATS_FILE)}")
  if not stats["kept"]:
    print("error: no example was kept; see the dropped counts", file=sys.stderr)
    return 1
  return 0


def _write_tfds(spec):
  for name in ("input", "tfds_name", "tfds_dir"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required to write a TFDS dataset")
  if FLAGS.output or FLAGS.pack:
    raise app.UsageError("--tfds_name writes conversations, not tokenised --output shards; "
                         "give one or the other")
  try:
    out = tfds_traces.write_dataset(FLAGS.input, FLAGS.tfds_dir, FLAGS.tfds_name,
                                    split=FLAGS.tfds_split, fmt=FLAGS.format, spec=spec,
                                    strict=FLAGS.strict)
  except pipeline.BadRecordError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e))
  bad = out["bad_records"]
  print(f"records {out['records']:,}: {out['conversations']:,} conversations, "
        f"{out['no_conversations']:,} records with none, {bad['count']:,} bad"
        + "".join(f"\n  {b['location']}: {b['reason']}" for b in bad["first"]))
  print(f"wrote {out['path']}; train with TFDS_DATA_DIR={FLAGS.tfds_dir} "
        f"--config.data.sources={out['source']}")
  if not out["conversations"]:
    print("error: no conversation was written", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
