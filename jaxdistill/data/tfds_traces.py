"""Trace records written as a TensorFlow Datasets dataset in ArrayRecord format, for `tfds:`.

`write_dataset` reads traces as training does (`sources.open_source`, `formats.to_conversations`
with a format and `FormatSpec`) and stores each conversation as one example in the canonical
`messages` layout:

  {"messages": Sequence({"role": Text, "content": Text})}

under DATA_DIR/NAME/1.0.0/ (dataset_info.json, features.json and
NAME-SPLIT.array_record-0000i-of-0000n), in input order. `tfds.data_source` reads that back
without TensorFlow, and so does the pipeline: `data.sources=tfds:NAME@SPLIT` with
TFDS_DATA_DIR=DATA_DIR (sources.TfdsSource). Renamed fields, thinking delimiters and a system
prompt are applied once here; the dataset then reads with the default settings. Writing needs
only `tensorflow-datasets` (the `tfds` extra), not TensorFlow.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from jaxdistill.data import formats, pipeline, sources

VERSION = "1.0.0"
# A TFDS dataset name that needs no class: lower-case snake case, as TFDS derives them.
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def write_dataset(inputs: Sequence[str], data_dir: str, name: str, *, split: str = "train",
                  fmt: str = "auto", spec: formats.FormatSpec = formats.DEFAULT_SPEC,
                  strict: bool = False, keep_bad: int = 5) -> dict[str, Any]:
  """Writes the conversations of `inputs` as the TFDS dataset `name` in `data_dir`.

  Args:
    inputs: files, globs, directories or `tfds:` specs, read in this order.
    data_dir: the TFDS data directory (what TFDS_DATA_DIR names when reading).
    name: dataset name, lower-case snake case (`my_traces`).
    split: the split written.
    fmt, spec: how to read the records, as in `formats.to_conversations`.
    strict: raise `pipeline.BadRecordError` at the first bad record (nothing is left
      behind) instead of skipping it.
    keep_bad: how many bad records to list with their locations.

  Returns:
    {"path": the dataset's version directory, "source": the `tfds:` spec to train from,
     "records", "conversations", "no_conversations" (records with none, e.g. OpenR1
     records with no verified generation), "bad_records": {"count", "first":
     [{location, reason}]}}.

  Raises:
    ValueError: a bad name, or a dataset already at that place.
    pipeline.BadRecordError: in strict mode.
  """
  tfds = _import_tfds()
  if not _NAME.match(name):
    raise ValueError(f"TFDS dataset name {name!r} must be lower-case snake case, e.g. "
                     "my_traces")
  path = os.path.join(data_dir, name, VERSION)
  if os.path.exists(path):
    raise ValueError(f"{path} already holds a dataset; choose another name or data_dir, or "
                     "remove it")
  srcs = [sources.open_source(s) for s in inputs]  # every path checked before writing
  counts = {"records": 0, "conversations": 0, "no_conversations": 0,
            "bad_records": {"count": 0, "first": []}}

  def bad(location: str, reason: str):
    if strict:
      raise pipeline.BadRecordError(location, reason)
    counts["bad_records"]["count"] += 1
    if len(counts["bad_records"]["first"]) < keep_bad:
      counts["bad_records"]["first"].append({"location": location, "reason": reason})

  def examples() -> Iterator[tuple[int, dict]]:
    for src in srcs:
      for i in range(len(src)):
        item = src[i]
        counts["records"] += 1
        if item.record is None:
          bad(item.location, item.error or "unreadable record")
          continue
        if not isinstance(item.record, dict):
          bad(item.location, "pre-tokenised record: no text to write")
          continue
        try:
          conversations = formats.to_conversations(item.record, fmt, spec)
        except formats.FormatError as e:
          bad(item.location, f"format error: {e}")
          continue
        counts["no_conversations"] += not conversations
        for conversation in conversations:
          yield counts["conversations"], {"messages": conversation}
          counts["conversations"] += 1

  builder = _builder_class(tfds, name, split, examples)(data_dir=data_dir,
                                                        file_format="array_record")
  with tempfile.TemporaryDirectory() as downloads:  # TFDS wants one; nothing is downloaded
    builder.download_and_prepare(download_dir=downloads)
  return {"path": path, "source": f"tfds:{name}@{split}", **counts}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("writing a TFDS dataset needs TensorFlow Datasets: "
                      "pip install 'jaxdistill[tfds]'") from e
  return tfds


def _builder_class(tfds, name: str, split: str, examples):
  """A one-off builder of `name` (not registered, so that a process can write several)."""

  class TraceDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    # TFDS looks for download checksums beside a builder's code. Nothing is downloaded, and
    # its lookup fails on jaxdistill, a namespace package.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description="Reasoning traces as conversations (jaxdistill).",
          features=tfds.features.FeaturesDict({"messages": tfds.features.Sequence(
              {"role": tfds.features.Text(), "content": tfds.features.Text()})}),
          disable_shuffling=True)  # input order, as the other sources keep it

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      return examples()

  TraceDataset.name = name
  return TraceDataset
