"""Where a run's files live: local paths and `gs://` URLs through one layer, and the start-up
check that a URL can be reached.

Local paths go to `os` and `open` exactly as before (same speed, same semantics). A `gs://`
URL goes through `etils.epath` over fsspec/gcsfs, the layer Orbax itself uses for a
checkpoint's directories (its arrays go through tensorstore). Only `gs://` is accepted: any
other `scheme://` is refused rather than becoming a local directory named `scheme:`.

Cloud Storage has objects, not files, so three things differ from a disk:
- no rename: `atomic_write` writes the object under its final name, since an upload becomes
  visible only when it completes (a reader sees the old object or the new, never a torn one),
  which is what the local `*.tmp` + `os.replace` gives;
- no append: an `Appender` keeps the file's bytes in memory and uploads the whole object on
  `flush` (so a reader or a resumed run again sees only complete earlier versions);
- no directories: `makedirs` does nothing (a prefix exists once an object is under it).
Readers that need a real file (the JSONL index and `os.pread`, SentencePiece, safetensors
memory maps) use `local_copy`/`local_dir`: a copy under `$JAXDISTILL_CACHE` (default
`~/.cache/jaxdistill/remote`), keyed by the object's generation, downloaded once per host.

Credentials are Google's Application Default Credentials, as gcsfs and tensorstore find them.
`STORAGE_EMULATOR_HOST=http://host:port` points everything at a GCS emulator: gcsfs reads it
itself, and the first `gs://` use here derives tensorstore's `TENSORSTORE_GCS_HTTP_URL` and a
dummy `GOOGLE_AUTH_TOKEN_FOR_TESTING` from it unless they are set.
"""

from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
import urllib.parse

SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Remote files a tokenizer never needs (local_dir skips them when asked to).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")

# One fsspec backend for gs:// even where TensorFlow is installed (the tfds extra), so that
# gcsfs's credentials and STORAGE_EMULATOR_HOST apply to Orbax's directories as well as ours;
# set EPATH_USE_TF=true to have epath use tf.io.gfile instead.
os.environ.setdefault("EPATH_USE_TF", "false")


def is_url(path) -> bool:
  """True for `scheme://...` (remote, or an unsupported scheme), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def _checked(url: str) -> str:
  scheme = _URL.match(url).group(1)
  if scheme not in SCHEMES:
    raise ValueError(f"{url}: {scheme}:// is not supported; use a local path or gs://")
  return url


def bucket_of(url: str) -> str:
  return urllib.parse.urlparse(url).netloc


# -- Path arithmetic --------------------------------------------------------------------------

def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  """The parent directory; a bucket's root (`gs://bucket`) is its own parent."""
  if not is_url(path):
    return os.path.dirname(path)
  head = posixpath.dirname(path.rstrip("/"))
  return head if len(head) > len(_URL.match(path).group(0)) else path.rstrip("/")


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def absolute(path: str) -> str:
  """`os.path.abspath` for a local path; a URL unchanged (without a trailing slash)."""
  if is_url(path):
    return _checked(path).rstrip("/") if path.count("/") > 2 else _checked(path)
  return os.path.abspath(path)


# -- The gs:// backend ------------------------------------------------------------------------

def _emulator() -> str:
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if host in ("", "default"):
    return ""
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _prepare() -> None:
  """Settings that must precede the first use of gcsfs and tensorstore (emulator only)."""
  emulator = _emulator()
  if not emulator:
    return
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  # gcsfs's bucket-layout lookup calls the real Storage Control API, which an emulator
  # lacks; the flag is read when gcsfs is first imported.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _fs():
  """The fsspec filesystem for gs:// (the instance epath uses too: fsspec caches it by its
  arguments)."""
  _prepare()
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.filesystem("gcs", finalize_on_close=True)
  except ImportError as e:
    raise ImportError("gs:// paths need gcsfs: pip install -e '.[gcs]'") from e


def _epath(url: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  _prepare()
  return epath.Path(_checked(url))


# -- File operations --------------------------------------------------------------------------

def open(path: str, mode: str = "r", encoding: str | None = None):  # pylint: disable=redefined-builtin
  """A file object for reading or writing `path` (modes r, w, rb, wb; text is UTF-8).
  Appending to a gs:// object is not possible: use `Appender`."""
  if not is_url(path):
    if "b" not in mode:
      encoding = encoding or "utf-8"
    return builtins.open(path, mode, encoding=encoding)
  if mode.replace("b", "") not in ("r", "w"):
    raise ValueError(f"{path}: mode {mode!r}; gs:// objects are read or written whole "
                     "(use storage.Appender to append)")
  f = _epath(path).open(mode.replace("b", "") + "b")
  return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding or "utf-8")


def exists(path: str) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs().isfile(_checked(path)) if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory; [] for a missing gs:// prefix."""
  if not is_url(path):
    return os.listdir(path)
  return [p.name for p in _epath(path).iterdir()] if isdir(path) else []


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a shell pattern (a gs:// pattern gives gs:// URLs)."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(pattern))
  scheme = _URL.match(_checked(pattern)).group(0)
  return sorted(scheme + p.removeprefix(scheme) for p in _fs().glob(pattern))


def has_magic(pattern: str) -> bool:
  return bool(re.search(r"[*?\[]", pattern))


def makedirs(path: str) -> None:
  """`os.makedirs(exist_ok=True)`; nothing for gs:// (no directories there)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_url(path):
    _fs().rm(_checked(path))
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  if is_url(path):
    _epath(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def move(src: str, dst: str) -> None:
  """Moves a file or directory. On gs:// a copy of every object then a delete: not atomic."""
  if is_url(src) or is_url(dst):
    if not (is_url(src) and is_url(dst)):
      raise ValueError(f"cannot move {src} to {dst}: both or neither must be gs://")
    _fs().mv(_checked(src), _checked(dst), recursive=True)
  else:
    shutil.move(src, dst)


def size(path: str) -> int:
  return int(_fs().info(_checked(path))["size"]) if is_url(path) else os.path.getsize(path)


def json_lines(path: str):
  """(line number, object) for each non-blank line of JSONL `path`; a line that is not a JSON
  object is an error naming the file and line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got "
                         f"{type(record).__name__}")
      yield number, record


def version(path: str) -> str:
  """What changes when the file changes: size and mtime locally, size and generation (or
  update time) of a gs:// object."""
  if not is_url(path):
    st = os.stat(path)
    return f"{st.st_size}:{int(st.st_mtime)}"
  info = _fs().info(_checked(path))
  return f"{info['size']}:{info.get('generation') or info.get('updated') or info.get('etag')}"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = None):
  """Writes `path` so that readers see the old file or the complete new one: locally through
  `path.tmp` and `os.replace`, on gs:// by one upload once the block ends without an error
  (an object appears only when its upload completes)."""
  if is_url(path):
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    data = buffer.getvalue()
    _fs().pipe_file(_checked(path), data if "b" in mode else data.encode(encoding or "utf-8"))
    return
  tmp = path + ".tmp"
  try:
    with open(tmp, mode, encoding) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class Appender:
  """Appends text to a file, made durable at each `flush`.

  Locally an append-mode file. On gs:// the file's bytes are held in memory (read once, when
  it exists) and the whole object is uploaded on `flush`, at most every `min_interval`
  seconds unless `force`d, and at `close`: an object cannot be appended to, and composing
  pieces onto it would end at Cloud Storage's component limit on long runs.
  """

  def __init__(self, path: str, min_interval: float = 0.0):
    self.path, self.min_interval = path, min_interval
    self._remote = is_url(path)
    self._file = None
    self._data = bytearray()
    self._dirty, self._flushed_at = False, 0.0
    if not self._remote:
      self._file = builtins.open(path, "a", encoding="utf-8")
    elif exists(path):
      with open(path, "rb") as f:
        self._data += f.read()

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)
    else:
      self._data += text.encode("utf-8")
      self._dirty = True

  def flush(self, force: bool = False) -> bool:
    """Makes what was written durable (on gs:// only when due); True when it did."""
    if self._file is not None:
      self._file.flush()
      return True
    now = time.monotonic()
    if not (self._dirty and (force or now - self._flushed_at >= self.min_interval)):
      return False
    _fs().pipe_file(_checked(self.path), bytes(self._data))
    self._dirty, self._flushed_at = False, now
    return True

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush(force=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# -- Local copies of remote files -------------------------------------------------------------

def cache_root() -> str:
  return os.environ.get("JAXDISTILL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxdistill", "remote")


def _cache_dir(key: str) -> str:
  return os.path.join(cache_root(), hashlib.sha256(key.encode()).hexdigest()[:24])


def local_copy(path: str) -> str:
  """`path` itself when local; for a gs:// object, a local copy of it (downloaded once per
  version of the object, into `cache_root()`; concurrent processes on one host each download
  and the last `os.replace` wins, with identical bytes)."""
  if not is_url(path):
    return path
  target = os.path.join(_cache_dir(f"{path}@{version(path)}"), basename(path))
  if not os.path.exists(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".download-")
    os.close(fd)
    try:
      _fs().get_file(path, tmp)
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return target


def local_dir(path: str, skip: tuple[str, ...] = ()) -> str:
  """`path` itself when local; for a gs:// directory, a local copy of the files directly in
  it (not its subdirectories), less those whose names end with a suffix in `skip`."""
  if not is_url(path):
    return path
  files = [info for info in _fs().ls(_checked(path), detail=True)
           if info["type"] == "file" and not info["name"].endswith(skip)]
  if not files:
    raise FileNotFoundError(f"no files under {path}")
  stamp = ",".join(f"{posixpath.basename(i['name'])}:{i['size']}:{i.get('generation')}"
                   for i in sorted(files, key=lambda i: i["name"]))
  target = _cache_dir(f"{path}@{stamp}")
  if not os.path.isdir(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".download-")
    try:
      for info in files:
        _fs().get_file("gs://" + info["name"], os.path.join(tmp, posixpath.basename(
            info["name"])))
      os.replace(tmp, target)
    except OSError:
      if not os.path.isdir(target):  # another process finished first: theirs is as good
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return target


def upload_dir(local: str, url: str) -> None:
  """Copies the files of local directory `local` (recursively) under gs:// `url`."""
  for root, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
      _fs().put_file(os.path.join(root, name), posixpath.join(_checked(url), rel))


# -- The start-up check -----------------------------------------------------------------------

def _situation() -> str:
  """Where gs:// requests go and with which credentials, for error messages."""
  emulator = _emulator()
  if emulator:
    return (f"requests go to the GCS emulator at STORAGE_EMULATOR_HOST={emulator} (no "
            "credentials); unset STORAGE_EMULATOR_HOST to use Google Cloud Storage")
  try:
    method = _fs().credentials.method
  except Exception as e:  # pylint: disable=broad-except
    return f"requests go to Google Cloud Storage; finding credentials failed ({e})"
  if method == "anon":
    return ("requests go to Google Cloud Storage without credentials (none found): run "
            "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key, or give the VM's service account storage access; "
            "STORAGE_EMULATOR_HOST=http://host:port points at an emulator instead")
  return f"requests go to Google Cloud Storage with credentials from {method}"


def _refuse(what: str, url: str, problem: str, change: str) -> ValueError:
  label = f"{what}={url}" if what else url
  return ValueError(f"{label}: {problem}; {_situation()}. {change}")


def _answering(emulator: str, timeout: float = 3.0) -> bool:
  u = urllib.parse.urlparse(emulator)
  try:
    with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                  timeout=timeout):
      return True
  except OSError:
    return False


def check_reachable(url: str, *, writable: bool = False, what: str = "") -> None:
  """Stops a run at start-up when `url` cannot be used, with a message that names it, says
  where requests go and with which credentials, and what to change. Local paths pass (they
  fail later as they always did); a gs:// URL must be of a supported scheme, have gcsfs
  installed, name a bucket that exists, exist itself unless `writable` (a pattern must match
  something), and take a small probe object when `writable`.

  Args:
    url: a local path, or a gs:// URL (a file, a directory prefix or a glob).
    writable: the run writes under `url` (a workdir, an output directory).
    what: the setting it came from, e.g. "--workdir", for the message.
  Raises:
    ValueError: saying what is wrong and what to change.
  """
  if not is_url(url):
    return
  scheme = _URL.match(url).group(1)
  if scheme not in SCHEMES:
    raise ValueError(f"{what + '=' if what else ''}{url}: {scheme}:// is not supported; give "
                     "a local path or a gs:// URL")
  try:
    fs = _fs()
  except ImportError as e:
    raise ValueError(f"{what + '=' if what else ''}{url}: {e}") from e
  emulator = _emulator()
  if emulator and not _answering(emulator):
    raise _refuse(what, url, "nothing answers at the emulator's address",
                  "Start the emulator, or fix or unset STORAGE_EMULATOR_HOST")
  try:
    if writable:
      probe = posixpath.join(url.rstrip("/"), f".write-probe-{socket.gethostname()}-"
                             f"{os.getpid()}")
      fs.pipe_file(probe, b"")
      fs.rm(probe)
      return
    if fs.glob(url) if has_magic(url) else fs.exists(url):
      return
    missing = FileNotFoundError(url)
  except FileNotFoundError as e:
    missing = e
  except Exception as e:  # pylint: disable=broad-except
    raise _refuse(what, url, f"{'writing' if writable else 'reading'} failed "
                  f"({type(e).__name__}: {str(e)[:300]})",
                  "Fix the credentials or the bucket's permissions") from e
  bucket = bucket_of(url)
  if not _bucket_exists(fs, bucket):
    raise _refuse(what, url, f"bucket gs://{bucket} does not exist or cannot be seen",
                  f"Create it (gcloud storage buckets create gs://{bucket}) or fix the "
                  "URL") from missing
  raise _refuse(what, url, "nothing is there",
                "Fix the URL, or copy the files there first") from missing


def _bucket_exists(fs, bucket: str) -> bool:
  try:
    return bool(fs.exists(f"gs://{bucket}"))
  except Exception:  # pylint: disable=broad-except
    return True  # unknown (e.g. no bucket-read permission): the message stays general
