"""gs:// paths for real, against a GCS emulator started in this process (in-memory): training
into a gs:// workdir (data from the bucket too) and resuming it, metrics there, JSONL and
Parquet sources read from it, ArrayRecord refused, unreachable URLs stopped at start-up,
Hugging Face export and import, evaluation outputs; and local paths through the same layer
(`jaxdistill/storage.py`)."""

import json
import os
from unittest import mock

import pytest

from jaxdistill import evaluate, generate, hf, main as main_lib, model as model_lib
from jaxdistill import model_config, startup, storage
from jaxdistill.data import sources
from jaxdistill.eval import metrics as eval_metrics
from tests import gcs_emulator
from tests.test_main import _load
from tests.trees import assert_trees_close, checkpoint_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(ROOT, "jaxdistill", "assets", "tiny_traces.jsonl")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """gs://bucket on an in-memory emulator (tests/gcs_emulator.py), remote copies cached in a
  temporary directory."""
  cache = os.environ.get("JAXDISTILL_CACHE")
  os.environ["JAXDISTILL_CACHE"] = str(tmp_path_factory.mktemp("remote-cache"))
  try:
    with gcs_emulator.serve("bucket") as url:
      yield url
  finally:
    if cache is None:
      os.environ.pop("JAXDISTILL_CACHE")
    else:
      os.environ["JAXDISTILL_CACHE"] = cache


def _config(*overrides):
  # Cheap to compile (the test's main cost): one layer, one ~260-token trace a row, 4 steps,
  # and FSDP, whose parameter shards Orbax writes as they are (replicated ones it slices).
  return _load("configs/tiny.py", "model.num_layers=1", "mesh.shape=(1,8,1,1)",
               "data.seq_len=288", "train.loss_chunk=288", "train.num_steps=4",
               "train.checkpoint_every=2", "train.log_every=1", *overrides)


def _rows(url):
  with storage.open(url) as f:
    return [json.loads(line) for line in f]


def test_training_in_a_gs_workdir_resumes_like_an_uninterrupted_run(bucket, tmp_path,
                                                                   monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" directory would appear here
  storage.upload_dir(os.path.dirname(TRACES), f"{bucket}/assets")
  workdir = f"{bucket}/run"
  config = _config(f"data.sources={bucket}/assets/tiny_traces.jsonl")
  full = main_lib.run(config, workdir)
  assert full.step == 4
  assert sorted(int(s) for s in storage.listdir(f"{workdir}/checkpoints")) == [2, 4]
  # What tensorstore wrote reads back bitwise.
  assert_trees_close(checkpoint_params(workdir, 4), full.params)
  assert [r["step"] for r in _rows(f"{workdir}/metrics.jsonl")] == [1, 2, 3, 4]
  assert storage.glob(f"{workdir}/tensorboard/events.*")
  with storage.open(f"{workdir}/manifest.json") as f:
    assert json.load(f)["weight_source"]["kind"] == "random"

  # As if killed after step 2's checkpoint: the rerun resumes there (its metrics rows follow
  # the first run's) and ends where the uninterrupted run did, bit for bit.
  storage.rmtree(f"{workdir}/checkpoints/4")
  resumed = main_lib.run(config, workdir)
  assert resumed.step == 4
  assert [r["step"] for r in _rows(f"{workdir}/metrics.jsonl")] == [1, 2, 3, 4, 3, 4]
  assert_trees_close(resumed.params, full.params)
  assert_trees_close(checkpoint_params(workdir, 4), full.params)
  assert not os.path.exists(tmp_path / "gs:")


def _items(src, prefix=""):
  return [(it.record, it.location.removeprefix(prefix), it.error)
          for it in (src[i] for i in range(len(src)))]


def test_jsonl_and_parquet_from_gs_give_the_local_records(bucket, tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  local = tmp_path / "data"
  local.mkdir()
  lines = [json.dumps({"i": i, "text": f"ré {i}"}) for i in range(25)]
  lines[3], lines[7] = "{not json", ""  # a bad record and an empty line, as located items
  (local / "a.jsonl").write_bytes("\r\n".join(lines[:12]).encode() + b"\n")
  (local / "b.jsonl").write_text("\n".join(lines[12:]), encoding="utf-8")
  rows = [{"q": f"problem {i}", "n": i} for i in range(30)]
  pq.write_table(pa.Table.from_pylist(rows[:17]), local / "p0.parquet", row_group_size=5)
  pq.write_table(pa.Table.from_pylist(rows[17:]), local / "p1.parquet", row_group_size=5)
  remote = f"{bucket}/data"
  storage.upload_dir(str(local), remote)
  for pattern in ("*.jsonl", "*.parquet"):
    want = _items(sources.open_source(str(local / pattern)), str(local))
    got = sources.open_source(f"{remote}/{pattern}")
    assert _items(got, remote) == want and len(want) in (24, 30)
    assert got[0].location.startswith(f"{remote}/")
  # A single file, through a process boundary (Grain workers pickle sources).
  import pickle  # pylint: disable=g-import-not-at-top
  jsonl = pickle.loads(pickle.dumps(sources.open_source(f"{remote}/a.jsonl")))
  assert _items(jsonl, remote) == _items(sources.open_source(str(local / "a.jsonl")), str(local))


def test_remote_array_record_is_refused_at_start_up(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  local = tmp_path / "prepared"
  local.mkdir()
  sources.write_array_record(str(local / "rows-00000.array_record"), [{"a": 1}])
  storage.upload_dir(str(local), f"{bucket}/prepared")
  with pytest.raises(ValueError, match="ArrayRecord files are read by a C\\+\\+ reader"):
    sources.open_source(f"{bucket}/prepared")
  with mock.patch.object(startup, "find_weight_source") as find:
    with pytest.raises(ValueError, match=f"data.sources: {bucket}/prepared: ArrayRecord"):
      main_lib.run(_config(f"data.sources={bucket}/prepared"), str(tmp_path / "run"))
  find.assert_not_called()  # stopped before anything was read or created


@pytest.mark.parametrize("case", ["no such bucket", "emulator down"])
def test_unreachable_workdir_stops_at_start_up_without_a_local_gs_directory(
    case, bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = f"{bucket}/run" if case == "emulator down" else "gs://no-such-bucket/run"
  if case == "emulator down":
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{gcs_emulator._free_port()}")
  message = {"no such bucket": "bucket gs://no-such-bucket does not exist",
             "emulator down": "nothing answers at the emulator's address"}[case]
  with mock.patch.object(startup, "find_weight_source") as find:
    with pytest.raises(ValueError, match=message) as e:
      main_lib.run(_config(), workdir)
  find.assert_not_called()
  assert f"--workdir={workdir}" in str(e.value) and "STORAGE_EMULATOR_HOST=" in str(e.value)
  assert not os.path.exists(tmp_path / "gs:")


def test_hugging_face_export_to_gs_and_import_from_it(bucket):
  """convert_checkpoint's two directions through a bucket: an export written locally then
  uploaded, an import from a local copy of it; the parameters come back bitwise."""
  model = model_lib.create_model(model_config.PRESETS["tiny"].replace(num_layers=1), seed=3)
  hf.save_hf_model(model, f"{bucket}/hf")
  assert "model.safetensors" in storage.listdir(f"{bucket}/hf")
  assert hf.read_config(f"{bucket}/hf")["num_hidden_layers"] == 1
  back = hf.load_hf_model(f"{bucket}/hf")
  assert_trees_close(model_lib.flat_params(back), model_lib.flat_params(model))


def test_evaluation_outputs_on_gs(bucket):
  """generate.py's and evaluate.py's files in a bucket, without sampling: an interrupted
  output's torn line cut off, its provenance refused when settings change, then grades,
  summary, report and plot written beside it."""
  task_dir = f"{bucket}/eval/aime24"
  out = f"{task_dir}/generations.jsonl"
  record = {"weights": {"kind": "random"}, "seed": 0}
  generate.check_provenance(out, record)
  rows = [{"id": i, "answer": "7", "response": [f"\\boxed{{{7 if i else 3}}}"] * 2,
           "completion_token_ids": [[1, 2], [3]], "finish_reason": ["stop", "stop"]}
          for i in range(3)]
  with storage.Appender(out) as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"id": 3, "resp')
  assert generate.count_done(out) == 3
  assert storage.size(out) == len("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match="seed: 0 -> 1"):
    generate.check_provenance(out, dict(record, seed=1))
  problems, tokens, _ = evaluate.grade_file(out, "aime", None, f"{task_dir}/graded.jsonl")
  assert [[v.correct for v in p] for p in problems] == [[False] * 2, [True] * 2, [True] * 2]
  assert [r["correct"] for r in _rows(f"{task_dir}/graded.jsonl")] == [[False] * 2,
                                                                     [True] * 2, [True] * 2]
  summary = dict(eval_metrics.summarize(problems, tokens=tokens), model={"init": "test"},
                 sampling={"temperature": 0.6, "top_p": 0.95, "top_k": 0,
                           "max_new_tokens": 8, "cache_dtype": "float32"})
  evaluate._write_json(summary, f"{task_dir}/summary.json")  # pylint: disable=protected-access
  evaluate._plot_budget(summary, "aime24", f"{task_dir}/budget.png")  # pylint: disable=protected-access
  evaluate.write_report({"aime24": summary}, f"{bucket}/eval/report.md")
  with storage.open(f"{task_dir}/summary.json") as f:
    assert json.load(f)["avg@n"] == pytest.approx(2 / 3)
  with storage.open(f"{task_dir}/budget.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with storage.open(f"{bucket}/eval/report.md") as f:
    assert "| aime24 | 3 |" in f.read()


def test_local_paths_go_through_the_same_layer_as_before(tmp_path):
  d = str(tmp_path)
  assert not storage.is_url(d) and storage.is_url("gs://b/x")
  assert storage.join(d, "a", "b") == os.path.join(d, "a", "b")
  assert storage.dirname(os.path.join(d, "f")) == d
  assert storage.absolute("rel") == os.path.abspath("rel")
  assert storage.join("gs://b/run", "x") == "gs://b/run/x"
  assert storage.dirname("gs://b/run/x") == "gs://b/run" and storage.dirname("gs://b") == "gs://b"
  storage.makedirs(os.path.join(d, "sub"))
  path = os.path.join(d, "sub", "f.json")
  with storage.atomic_write(path) as f:
    f.write('{"a": 1}')
  assert not os.path.exists(path + ".tmp") and storage.listdir(os.path.join(d, "sub")) == [
      "f.json"]
  with pytest.raises(RuntimeError), storage.atomic_write(path) as f:
    f.write("half")
    raise RuntimeError  # a failed write leaves the old file
  with storage.open(path) as f:
    assert json.load(f) == {"a": 1}
  log = os.path.join(d, "log.jsonl")
  for text in ("1\n", "2\n"):
    with storage.Appender(log) as a:
      a.write(text)
  assert open(log).read() == "1\n2\n" and storage.size(log) == 4
  assert storage.glob(os.path.join(d, "*.jsonl")) == [log]
  assert storage.local_copy(log) == log and storage.isfile(log) and storage.isdir(d)
  storage.check_reachable(os.path.join(d, "not-yet"), writable=True)  # local: left as it was
  with pytest.raises(ValueError, match="s3:// is not supported"):
    storage.check_reachable("s3://b/run", writable=True, what="--workdir")
  with pytest.raises(ValueError, match="s3:// is not supported"):
    storage.exists("s3://b/run")
