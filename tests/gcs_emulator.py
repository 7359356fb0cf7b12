"""An in-process, in-memory GCS emulator (the `gcp-storage-emulator` package) for tests, with
the object-generation behaviour of real Cloud Storage that tensorstore relies on.

The emulator sends no `x-goog-generation` header with an object's bytes and ignores the
`ifGenerationMatch` / `ifGenerationNotMatch` preconditions. Tensorstore's OCDBT (Orbax's
checkpoint format) reads its manifest, then writes it back on the condition that nobody
changed it, and compares generations: without the header it records generation 0 and fails
intermittently with "Malformed StorageGeneration". `serve` wraps the emulator's object
read and upload handlers to answer as Cloud Storage does: the header on every read, 412
when `ifGenerationMatch` does not hold (0 = the object must not exist), 304 when
`ifGenerationNotMatch` names the current generation.

  with gcs_emulator.serve("bucket") as url:   # STORAGE_EMULATOR_HOST points at it inside
    ...
"""

from __future__ import annotations

import contextlib
import os
import socket
from http import HTTPStatus


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _generation(storage, bucket: str, name: str) -> int | None:
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _failed(request, response, current: int | None) -> bool:
  """Answers 412 or 304 when a precondition of the request does not hold."""
  match = request.query.get("ifGenerationMatch")
  if match is not None and int(match[0]) != (current or 0):
    response.status = HTTPStatus.PRECONDITION_FAILED
    return True
  not_match = request.query.get("ifGenerationNotMatch")
  if not_match is not None and current is not None and int(not_match[0]) == current:
    response.status = HTTPStatus.NOT_MODIFIED
    return True
  return False


def _reads(handler):
  def read(request, response, storage, *args, **kwargs):
    current = _generation(storage, request.params["bucket_name"], request.params["object_id"])
    if _failed(request, response, current):
      return None
    if current is not None:
      response["x-goog-generation"] = str(current)
    return handler(request, response, storage, *args, **kwargs)
  return read


def _uploads(handler):
  def upload(request, response, storage, *args, **kwargs):
    name = request.query.get("name")  # media uploads (tensorstore's); others pass through
    if name and _failed(request, response, _generation(storage, request.params["bucket_name"],
                                                       name[0])):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return upload


@contextlib.contextmanager
def serve(bucket: str):
  """Runs the emulator with `bucket` created; yields `gs://<bucket>`. Inside, only
  STORAGE_EMULATOR_HOST is set (jaxdistill.storage derives tensorstore's settings from it);
  every variable it or storage sets is restored afterwards."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
  saved_env = {k: os.environ.get(k) for k in names}
  saved_handlers = server.HANDLERS
  wrapped = {objects.get: _reads(objects.get), objects.download: _reads(objects.download),
             objects.insert: _uploads(objects.insert)}
  server.HANDLERS = tuple((regex, {m: wrapped.get(f, f) for m, f in methods.items()})
                          for regex, methods in saved_handlers)
  port = _free_port()
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.start()
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  try:
    yield f"gs://{bucket}"
  finally:
    emulator.stop()
    server.HANDLERS = saved_handlers
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
