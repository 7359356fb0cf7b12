"""Grades, keeps and decontaminates responses made elsewhere (vLLM, an API) into a trace dataset.

  python tools/filter_traces.py --input=dump.jsonl --output_dir=DIR --answer_kind=aime \
      [--keep=all|at_most_k|shortest --k=1] [--fields=problem=question,response=outputs] \
      [--tokenizer=DIR] [--teacher="DeepSeek-R1 via API"] [--nodecontaminate]

The same stage as mode="distill" after its sampling (jaxdistill/traces.py), with the same
outputs: DIR/traces.jsonl (`messages` records with provenance, ready for data.sources) and
DIR/stats.json. Each input line holds a problem, its reference answer and one or more
responses:

  problem        the problem text (checked against the evaluation sets)
  answer         the reference (a string, or a number)
  response       one response, or a list of them
  id             optional (default: the line number)
  prompt         optional: the user turn the teacher answered (default: the problem)
  finish_reason  optional: one per response; "length" marks one cut off (never kept)
  num_tokens     optional: one per response (or completion_token_ids, as tools/generate.py
                 writes); else --tokenizer counts them

--fields renames them, canonical=theirs. A response may end with a stop token (the known turn
ends, and --tokenizer's eos): it is dropped. Defaults are configs/base.py's traces.*, eval.*
and data.* values.
"""

import hashlib
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import base  # noqa: E402
from jaxdistill import storage, traces  # noqa: E402
from jaxdistill.data import chat, contamination  # noqa: E402
from jaxdistill.eval import grade  # noqa: E402

_BASE = base.get_config()
FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL of problems, references and responses.")
flags.DEFINE_string("output_dir", None, "Where traces.jsonl and stats.json are written.")
flags.DEFINE_enum("answer_kind", _BASE.traces.answer_kind, list(grade.KINDS),
                  "How references are graded (traces.answer_kind).")
flags.DEFINE_string("fields", "", "Renamed fields as canonical=theirs,... for "
                    f"{', '.join(traces.RESPONSE_FIELDS)}.")
flags.DEFINE_enum("keep", _BASE.traces.keep, list(traces.POLICIES), "Keep policy (traces.keep).")
flags.DEFINE_integer("k", _BASE.traces.k, "at_most_k: the most traces per problem.")
flags.DEFINE_bool("decontaminate", _BASE.traces.decontaminate,
                  "Drop problems overlapping the bundled evaluation sets.")
flags.DEFINE_string("tokenizer", None, "Tokenizer to count response tokens with (when the "
                    "input has no counts); its eos is also stripped from responses.")
flags.DEFINE_string("teacher", "", "Who wrote the responses, recorded in every trace.")
flags.DEFINE_string("think_end", _BASE.eval.think_end, "End-of-thinking delimiter.")
flags.DEFINE_string("thinking_open", _BASE.data.thinking_open, "Written before the thinking.")
flags.DEFINE_string("thinking_close", _BASE.data.thinking_close,
                    "Written between the thinking and the answer.")
flags.DEFINE_integer("grading_workers", _BASE.eval.grading_workers,
                     "Processes for symbolic (MATH) comparisons.")
flags.mark_flags_as_required(["input", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.keep == "at_most_k" and FLAGS.k < 1:
    raise app.UsageError(f"--k={FLAGS.k} must be >= 1 with --keep=at_most_k")
  try:
    storage.check_reachable(FLAGS.input, what="--input")
    storage.check_reachable(FLAGS.output_dir, writable=True, what="--output_dir")
    field_map = traces.parse_fields(FLAGS.fields, traces.RESPONSE_FIELDS, key="--fields")
  except ValueError as e:
    raise app.UsageError(str(e))
  stops = list(chat.TURN_END_TOKENS)
  count = None
  if FLAGS.tokenizer:
    tok = chat.load_tokenizer(FLAGS.tokenizer)
    stops.append(tok.special_tokens.get("eos_token", ""))
    count = lambda text: len(tok.encode(text))
  try:
    problems, responses = traces.read_responses(FLAGS.input, field_map, FLAGS.answer_kind,
                                                count)
  except ValueError as e:
    raise app.UsageError(str(e))
  index = contamination.ContaminationIndex.from_tasks() if FLAGS.decontaminate else None
  with storage.open(FLAGS.input, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  source = {"teacher": FLAGS.teacher, "input": FLAGS.input, "input_sha256": digest}
  shaping = traces.Shaping(FLAGS.think_end, FLAGS.thinking_open, FLAGS.thinking_close,
                           tuple(dict.fromkeys(s for s in stops if s)))
  with grade.SymbolicChecker(workers=FLAGS.grading_workers) as checker:
    records, stats = traces.select(
        problems, responses, traces.check_problems(problems, index), kind=FLAGS.answer_kind,
        keep=FLAGS.keep, k=FLAGS.k, shaping=shaping, source=source, checker=checker)
  traces.write_outputs(FLAGS.output_dir, records, stats)
  print(f"{FLAGS.output_dir}: {traces.summary_line(stats)}")


if __name__ == "__main__":
  app.run(main)
