"""The package's import graph: one direction of flow, no cycles, no dependence on the checkout.

Layers, lowest first (ARCHITECTURE.md): a module may import its own subpackage's modules and any lower
layer, never a higher one, lazily inside a function or not. Every import of `vldeformer_jax` modules is
read from the source (AST, function bodies included), so a lazy upward import is caught like any other.

  python tests/test_architecture.py     # prints the graph, module by module
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "vldeformer_jax"
# Lowest first. `vldeformer_jax` itself (the package __init__) sits above all of them.
LAYERS = ("parallel", "model", "io", "data", "retrieval", "training", "demo", "cli")


def module_names() -> dict[str, str]:
  """module name -> file path, for every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules `path` imports (`from a.b import c` counts a.b.c when that is a module)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] in (PACKAGE, "configs"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] not in (PACKAGE, "configs"):
        continue
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.add(sub if sub in modules else node.module)
  return found


def graph() -> dict[str, set[str]]:
  modules = module_names()
  return {m: imports_of(p, modules) - {m} for m, p in sorted(modules.items())}


def layer(module: str) -> int:
  """Index in LAYERS of the module's subpackage; the package root is above every layer."""
  parts = module.split(".")
  return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)


def subpackage(module: str) -> str:
  return ".".join(module.split(".")[:2])


def upward_edges(g: dict[str, set[str]]) -> list[str]:
  bad = []
  for src, targets in g.items():
    for dst in targets:
      if dst.split(".")[0] != PACKAGE:
        bad.append(f"{src} -> {dst} (the library must not import {dst.split('.')[0]}/)")
      elif subpackage(src) != subpackage(dst) and layer(dst) > layer(src):
        bad.append(f"{src} (layer {subpackage(src)}) -> {dst} (higher layer {subpackage(dst)})")
  return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Every elementary cycle's first discovery, by depth-first search with colours."""
  found, colour, stack = [], {}, []

  def visit(m):
    colour[m] = "grey"
    stack.append(m)
    for n in sorted(g.get(m, ())):
      if colour.get(n) == "grey":
        found.append(stack[stack.index(n):] + [n])
      elif n not in colour:
        visit(n)
    stack.pop()
    colour[m] = "black"

  for m in sorted(g):
    if m not in colour:
      visit(m)
  return found


def test_every_module_sits_in_a_known_layer():
  unknown = sorted(m for m in graph() if len(m.split(".")) > 1 and m.split(".")[1] not in LAYERS)
  assert not unknown, f"modules outside the layers of ARCHITECTURE.md: {unknown}"


def test_no_upward_import():
  assert not upward_edges(graph())


def test_no_import_cycle():
  assert not cycles(graph())


def test_the_checker_sees_cycles_and_upward_edges():
  g = {"vldeformer_jax.model.a": {"vldeformer_jax.training.b"}, "vldeformer_jax.training.b": {"vldeformer_jax.model.a"},
       "vldeformer_jax.data.c": {"configs.tiny"}}
  assert cycles(g) == [["vldeformer_jax.model.a", "vldeformer_jax.training.b", "vldeformer_jax.model.a"]]
  assert len(upward_edges(g)) == 2


def test_no_sys_path_edits_in_launch_or_tests():
  offenders = []
  for folder in ("launch", "tests"):
    for f in sorted(os.listdir(os.path.join(ROOT, folder))):
      if f.endswith(".py") and f != os.path.basename(__file__):
        text = open(os.path.join(ROOT, folder, f)).read()
        if "sys.path.insert" in text or "sys.path.append" in text:
          offenders.append(f"{folder}/{f}")
  assert not offenders


def test_library_works_from_outside_the_checkout(tmp_path):
  """`pip install .` (a real, non-editable install into a fresh target), then a notebook in another
  directory: the installed package alone provides everything, the demo's stage configs and the bundled
  vocabulary included; neither the checkout nor `configs/` is importable there."""
  site = tmp_path / "site"
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), ROOT], capture_output=True, text=True, timeout=300)
  assert pip.returncode == 0, pip.stderr[-3000:]
  script = textwrap.dedent("""
      import importlib.util, vldeformer_jax
      from vldeformer_jax.demo.job import run_demo, default_configs
      from vldeformer_jax.model import inputs
      stage1, stage2 = default_configs()
      assert stage1.objective == "early_interaction" and stage2.data.negatives.num_per_pair == 1
      ids = inputs.load_tokenizer(inputs.BUNDLED_VOCAB)("a red car")["input_ids"]
      assert importlib.util.find_spec("configs") is None
      print("package", vldeformer_jax.__file__, "ids", ids)
      """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(site)  # the installed copy first, ahead of the suite's editable install
  work = tmp_path / "notebook"
  work.mkdir()
  r = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"package {site}" in r.stdout, r.stdout


if __name__ == "__main__":
  g = graph()
  for m, targets in g.items():
    print(m)
    for t in sorted(targets):
      print(f"    -> {t}")
  problems = upward_edges(g) + [" -> ".join(c) for c in cycles(g)]
  print("\n".join(problems) if problems else "no cycle, no upward edge")
  sys.exit(1 if problems else 0)
