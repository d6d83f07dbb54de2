"""Input files read one way, and atomic file writes: a reader (or a crashed run) never sees half a file or
half a directory.

`read_json` / `read_yaml` name the file in every error (missing, malformed with its line), so a launcher's
one-line report says which file is wrong. Everything is written to a temporary sibling and renamed into
place; rename is atomic on one filesystem.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import numpy as np


def _tmp_sibling(path: str, suffix: str = "") -> str:
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


def json_default(x):
  """`json.dump` default for numpy scalars and arrays."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")


def read_json(path: str, *, what: str, error: type[Exception] = ValueError) -> Any:
  """The JSON value of `path`: a missing file raises FileNotFoundError('{what} not found: PATH'), malformed
  JSON `error('PATH: malformed JSON: ...')`, so every reader names the file the same way."""
  _require_file(path, what)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise error(f"{path}: malformed JSON: {e}") from None


def read_yaml(path: str, *, what: str, error: type[Exception] = ValueError) -> Any:
  """`read_json` for a YAML file: malformed YAML raises `error('PATH: malformed YAML (line N): ...')`."""
  import yaml
  _require_file(path, what)
  with open(path, encoding="utf-8") as f:
    try:
      return yaml.safe_load(f)
    except yaml.YAMLError as e:
      where = getattr(e, "problem_mark", None)
      line = f" (line {where.line + 1})" if where is not None else ""
      raise error(f"{path}: malformed YAML{line}: {getattr(e, 'problem', None) or e}") from None


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary sibling and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_sibling(path)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str, obj: Any) -> None:
  """Pretty, key-sorted JSON (numpy values allowed) written atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def copy_file_atomic(src: str, dst: str) -> None:
  tmp = _tmp_sibling(dst)
  try:
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_figure_atomic(fig, path: str, dpi: int = 110) -> None:
  """Saves a matplotlib figure atomically and closes it."""
  import matplotlib.pyplot as plt
  tmp = _tmp_sibling(path, suffix=os.path.splitext(path)[1])
  try:
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def replace_dir(tmp: str, final: str) -> None:
  """Renames the finished directory `tmp` to `final`. An existing `final` is moved aside first, put back
  if the rename fails, and removed only once the new one is in place."""
  old = None
  if os.path.exists(final):
    old = _tmp_sibling(final, suffix=".old")
    os.rename(final, old)
  try:
    os.rename(tmp, final)
  except OSError:
    if old:
      os.rename(old, final)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)
