"""math-verify comparisons in bounded worker processes: each request under a wall-clock and an
address-space limit, so a pathological answer never hangs or exhausts the grader."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import queue
import subprocess
import sys
import threading
from multiprocessing import connection


class SymbolicChecker:
  """Runs math-verify comparisons in worker processes, each under a wall-clock and memory bound.

  A request goes to an idle worker over a pipe; if no reply comes within `timeout_s` the
  worker is killed (SIGKILL, so even C-level sympy/gmpy loops stop) and restarted before its
  next use, and the result is "timeout". A worker that dies (e.g. on its address-space limit
  of `memory_mb`) gives "crashed". Nothing here uses signals, so `run` works from any thread;
  `workers` requests run at once, further callers wait for a free worker. Results are cached
  per request, so the 64 samples of one problem that agree cost one comparison.
  """

  def __init__(self, workers: int = 1, timeout_s: float = 5.0, memory_mb: int = 2048,
               start_timeout_s: float = 120.0, cache_size: int = 100_000):
    if workers < 1 or timeout_s <= 0:
      raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
    self.timeout_s = timeout_s
    self._idle: queue.LifoQueue = queue.LifoQueue()
    for _ in range(workers):
      self._idle.put(_Worker(memory_mb, start_timeout_s))
    self._cache: dict = {}
    self._cache_size = cache_size
    self._lock = threading.Lock()

  def run(self, request: tuple) -> tuple[str, object]:
    """(status, value): status "ok" with the worker's answer, else "timeout" or "crashed"."""
    with self._lock:
      if request in self._cache:
        return self._cache[request]
    worker = self._idle.get()
    try:
      result = worker.call(request, self.timeout_s)
    finally:
      self._idle.put(worker)
    with self._lock:
      if len(self._cache) >= self._cache_size:
        self._cache.clear()
      self._cache[request] = result
    return result

  def close(self) -> None:
    """Stops the workers (a later `run` starts them again)."""
    workers = []
    while True:
      try:
        workers.append(self._idle.get_nowait())
      except queue.Empty:
        break
    for w in workers:
      w.stop()
      self._idle.put(w)

  def __enter__(self) -> SymbolicChecker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Worker:
  """One worker process and its pipes; started on first use and after a kill."""

  def __init__(self, memory_mb: int, start_timeout_s: float):
    self.memory_mb, self.start_timeout_s = memory_mb, start_timeout_s
    self.process = self.send = self.recv = None

  def call(self, request: tuple, timeout_s: float) -> tuple[str, object]:
    if self.process is None or self.process.poll() is not None:
      self._start()
    try:
      self.send.send(request)
      if self.recv.poll(timeout_s):
        return self.recv.recv()
    except (EOFError, OSError):
      self.stop()
      return "crashed", None
    self.stop()
    return "timeout", None

  def _start(self) -> None:
    # A plain subprocess, not multiprocessing: spawn would re-run the caller's __main__ (a
    # script without a main guard would recurse), and fork would copy a parent holding
    # JAX/XLA threads mid-state.
    self.stop()
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    code = ("import sys; from jaxdistill.eval import symbolic; "
            "symbolic._worker_main(*sys.argv[1:])")
    self.process = subprocess.Popen(
        [sys.executable, "-c", code, str(to_child), str(to_parent), str(self.memory_mb)],
        pass_fds=(to_child, to_parent), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_child)
    os.close(to_parent)
    self.send = connection.Connection(from_parent, readable=False)
    self.recv = connection.Connection(from_child, writable=False)
    try:
      hello = self.recv.recv() if self.recv.poll(self.start_timeout_s) else "no reply"
    except EOFError:
      hello = "exited"
    if hello != "ready":
      self.stop()
      raise RuntimeError(f"the symbolic grading worker did not start: {hello}")

  def stop(self) -> None:
    if self.process is not None:
      self.process.kill()
      self.process.wait()
      self.send.close()
      self.recv.close()
    self.process = self.send = self.recv = None


def _worker_main(read_fd: str, write_fd: str, memory_mb: str) -> None:
  """The worker loop: answers ("equal" | "integer", gold, pred, allow_relation) requests."""
  import resource
  recv = connection.Connection(int(read_fd), writable=False)
  send = connection.Connection(int(write_fd), readable=False)
  limit = int(memory_mb) << 20
  if limit:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)
  try:  # loaded before "ready", so start-up is not timed as comparison work
    importlib.import_module("math_verify")
  except ImportError as e:
    send.send(f"cannot import math_verify ({e}); pip install math-verify")
    return
  send.send("ready")
  while True:
    try:
      mode, gold, pred, allow_relation = recv.recv()
    except EOFError:  # the parent is gone
      return
    try:
      value = _symbolic(mode, gold, pred, allow_relation)
      send.send(("ok", value))
    except MemoryError:
      send.send(("crashed", None))
    except Exception as e:  # a parser bug must not take the grading run down with it
      send.send(("ok", (None if mode == "integer" else False, f"error: {type(e).__name__}")))


def _symbolic(mode: str, gold: str, pred: str, allow_relation: bool) -> tuple:
  import math_verify
  import sympy
  config = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]

  def parse(text):
    return math_verify.parse("\\boxed{" + text + "}", config, fallback_mode="no_fallback",
                             parsing_timeout=None)

  # The gold first: a gold that does not parse is compared as text by the caller.
  gold_parsed = parse(gold) if mode == "equal" else None
  if mode == "equal" and not gold_parsed:
    return False, "gold did not parse"
  pred_parsed = parse(pred)
  if not pred_parsed:
    return (None if mode == "integer" else False), "answer did not parse"
  if mode == "integer":
    expr = pred_parsed[0]
    if not isinstance(expr, sympy.Expr) or not expr.is_number:
      return None, "not a number"
    # A float is taken at its exact value: 33.0 is 33, 32.9999999999 is not.
    value = sympy.Rational(expr) if expr.is_Float else sympy.simplify(expr)
    return (int(value), None) if value.is_Integer else (None, "not an integer")
  equal = math_verify.verify(gold_parsed, pred_parsed, strict=True, timeout_seconds=None,
                             allow_set_relation_comp=allow_relation)
  return bool(equal), None


_default: SymbolicChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> SymbolicChecker:
  """The process-wide checker `grade` uses when given none (one worker, 5 s per comparison)."""
  global _default
  with _default_lock:
    if _default is None:
      _default = SymbolicChecker()
      atexit.register(_default.close)
    return _default
