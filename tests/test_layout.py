"""The package's shape: imports run one way (no cycles, inside functions included), the config
dict stops at the boundary, and settings dataclasses leave every default to configs/base.py."""

import ast
import dataclasses
import os
import typing

import pytest

from jaxdistill import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jaxdistill")
CONFIG_BOUNDARY = {"jaxdistill.main", "jaxdistill.settings"}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module under jaxdistill/."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(dirpath, name)
  return out


def _imports(path: str, modules) -> tuple[set[str], set[str]]:
  """(jaxdistill modules, top-level external packages) that a file imports anywhere in it."""
  ours, external = set(), set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from jaxdistill import model` imports jaxdistill.model; `from jaxdistill.model
      # import Transformer` imports jaxdistill.model.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] == "jaxdistill":
        ours.add(name)
      else:
        external.add(name.split(".")[0])
  return ours, external


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) for m, p in modules.items()}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(edges.get(m, ())):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(edges):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle_in_the_package():
  graph = _graph()
  edges = {m: {n for n in ours if n in graph and n != m} for m, (ours, _) in graph.items()}
  cycle = _find_cycle(edges)
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
  source = tmp_path / "a.py"
  source.write_text("def f():\n  from jaxdistill import b\n")
  ours, _ = _imports(str(source), {"jaxdistill.b"})
  assert ours == {"jaxdistill.b"}
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_only_main_and_settings_see_the_config_dict():
  seen = sorted(m for m, (_, external) in _graph().items() if "ml_collections" in external)
  assert set(seen) <= CONFIG_BOUNDARY, seen
  assert "jaxdistill.settings" in seen


def _settings_classes(cls, found=None):
  """The dataclasses a Settings is made of, recursively."""
  found = {} if found is None else found
  found[cls.__name__] = cls
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    for t in (hints[f.name], *typing.get_args(hints[f.name])):
      if dataclasses.is_dataclass(t) and t.__name__ not in found:
        _settings_classes(t, found)
  return found


def test_settings_dataclasses_declare_no_defaults():
  classes = _settings_classes(settings.Settings)
  assert {"Settings", "TrainConfig", "OptimConfig", "EvalConfig", "DataSettings",
          "ModelSettings", "InitSettings", "DemoSettings"} <= set(classes)
  defaulted = [f"{name}.{f.name}" for name, cls in classes.items() for f in dataclasses.fields(cls)
               if f.default is not dataclasses.MISSING
               or f.default_factory is not dataclasses.MISSING]
  assert not defaulted, f"defaults belong in configs/base.py: {defaulted}"


def _leaves(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _perturbed(v):
  if isinstance(v, bool):
    return not v
  if isinstance(v, (int, float)):
    return v + 1
  if isinstance(v, str):
    return v + "_x"
  return tuple(x + 1 for x in v)


def test_every_base_key_reaches_the_settings():
  """Changing any key of configs/base.py changes the parsed settings (or is refused): a key
  nothing reads would be a default with no effect."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top

  def parsed(path=None, value=None):
    c = ml_collections.ConfigDict(base.get_config().to_dict())
    if path and path[:2] == ("demo", "presets"):
      c.demo.preset = path[2]  # a preset's lengths count when it is the one chosen
    if path:
      node = c
      for k in path[:-1]:
        node = node[k]
      node[path[-1]] = value
    try:
      return dataclasses.replace(settings.parse(c), config_json="")
    except settings.ConfigError as e:
      return str(e)

  unread = []
  for path, value in _leaves(base.get_config().to_dict()):
    before = parsed(path, value)
    if parsed(path, _perturbed(value)) == before:
      unread.append(".".join(path))
  assert not unread, unread


@pytest.mark.parametrize("name", ["train", "optim", "eval", "data", "model"])
def test_base_values_land_in_the_settings(name):
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.train.lr, c.eval.num_samples, c.data.seq_len = 3e-4, 7, 1536
  c.model.attention_block, c.train.loss_chunk = 256, 333
  s = settings.parse(c)
  got = {"train": s.train.loss_chunk, "optim": s.optim.lr, "eval": s.eval.num_samples,
         "data": s.data.seq_len, "model": s.model.attention_block}[name]
  assert got == {"train": 333, "optim": 3e-4, "eval": 7, "data": 1536, "model": 256}[name]
