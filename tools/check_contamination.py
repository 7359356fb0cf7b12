r"""Checks training traces for overlap with the bundled evaluation sets, and can write a clean copy.

  python tools/check_contamination.py --train='data/*.jsonl,extra.parquet' \
      [--eval=aime24,aime25,amc23,math500] [--ngram=13] [--threshold=0.5] [--format=auto] \
      [--fields=question=query,...] [--report=overlap.json] [--write_filtered=clean.jsonl]

Records are read as training reads them: --format, --fields, --thinking_open,
--thinking_close, --system_prompt and --s1k_variant are the run's data.* keys of those names.

It prints, per evaluation set, the contaminated evaluation items and the flagged training
records, then the first matches as file:line. The exit status is 0 whatever it finds, so that
a pipeline can read the report, and non-zero only for bad arguments. The matching rules are
in jaxdistill/data/contamination.py.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import format_flags  # noqa: E402
from jaxdistill import storage  # noqa: E402
from jaxdistill.data import contamination, formats  # noqa: E402
from jaxdistill.eval import tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("train", None, "Training data: files, globs or directories (JSONL, Parquet, "
                  "ArrayRecord) or tfds:NAME[@SPLIT], comma-separated.")
flags.DEFINE_list("eval", list(tasks.TASKS),
                  f"Evaluation sets to check against, from {','.join(tasks.TASKS)}.")
flags.DEFINE_integer("ngram", contamination.DEFAULT_NGRAM, "n-gram length in normalised tokens.")
flags.DEFINE_float("threshold", contamination.DEFAULT_THRESHOLD,
                   "Smallest share of an eval problem's n-grams that counts as a match.")
flags.DEFINE_enum("format", "auto", ["auto", *formats.FORMATS], "Trace format of the records.")
format_flags.define()
flags.DEFINE_string("report", None, "Write the full report (every match and skip) as JSON here.")
flags.DEFINE_string("write_filtered", None,
                    "Write the records that were checked and found clean here, as JSONL.")
flags.DEFINE_integer("show", 10, "How many matches and skipped records to print.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.train:
    raise app.UsageError("--train is required")
  unknown = [name for name in FLAGS.eval if name not in tasks.TASKS]
  if unknown or not FLAGS.eval:
    raise app.UsageError(f"--eval: unknown evaluation sets {unknown}; choose from "
                         f"{','.join(tasks.TASKS)}")
  try:
    for spec in FLAGS.train:  # gs:// ones: reachable, or a message saying what to change
      if not spec.startswith("tfds:"):
        storage.check_reachable(spec, what="--train")
    for flag in ("report", "write_filtered"):
      if getattr(FLAGS, flag):
        storage.check_reachable(storage.dirname(getattr(FLAGS, flag)), writable=True,
                                what=f"--{flag}")
  except ValueError as e:
    raise app.UsageError(str(e))
  inputs = {_real(p) for spec in FLAGS.train for p in storage.glob(spec)}
  if FLAGS.write_filtered and _real(FLAGS.write_filtered) in inputs:
    raise app.UsageError(f"--write_filtered={FLAGS.write_filtered} is one of the --train files")
  try:
    index = contamination.ContaminationIndex.from_tasks(
        FLAGS.eval, ngram=FLAGS.ngram, threshold=FLAGS.threshold)
    report = contamination.check_sources(FLAGS.train, index, FLAGS.format, format_flags.spec())
  except (FileNotFoundError, ValueError) as e:  # missing paths, unsupported files, bad numbers
    raise app.UsageError(str(e))

  print(report.summary(FLAGS.show))
  if FLAGS.report:
    with storage.atomic_write(FLAGS.report, "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=1, ensure_ascii=False)
    print(f"wrote report {FLAGS.report}")
  if FLAGS.write_filtered:
    counts = contamination.write_filtered(FLAGS.train, report, FLAGS.write_filtered)
    print(f"wrote {counts['written']} records to {FLAGS.write_filtered} (dropped "
          f"{counts['dropped_flagged']} flagged, {counts['dropped_skipped']} skipped)")


def _real(path: str) -> str:
  return path if storage.is_url(path) else os.path.realpath(path)


if __name__ == "__main__":
  app.run(main)
