"""What a person watches during training: JSON lines, TensorBoard events and a PNG of the curves.

Why not `clu.metric_writers`: it does not import without TensorFlow. tensorboardX writes the
same event files without it. The JSON-lines file (`workdir/metrics.jsonl`, one `{"step": .., "split":
.., name: value}` object per line) is the source of truth: tests and the PNG read it, and a resumed run
first drops the lines of steps after its checkpoint so the file has each step once, as if the run had not
been interrupted. Only process 0 writes; other processes get a writer that does nothing (and the workdir
lock, `io.workdir`, keeps a second run out).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Mapping

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def _tb_name(name: str) -> str:
  """TensorBoard tag characters: 'i2t_R@1' -> 'i2t_R_at_1' (tensorboardX would rename it with a warning)."""
  return name.replace("@", "_at_")


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and to TensorBoard events under `workdir/tensorboard`."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_after(self.path, resume_step if resume_step is not None else 0)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")
    for k, v in record.items():
      if k in ("step", "split") or not isinstance(v, (int, float)):
        continue
      self._tb.add_scalar(f"{split}/{_tb_name(k)}", v, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl file, in order (a torn last line from a killed run is skipped)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # only a process killed mid-write leaves this, and only on the last line
  return records


def truncate_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without the records of steps after `step`, each (step, split) once (the
  first record of it: a file written before runs took the workdir lock may hold a step twice)."""
  if not os.path.exists(path):
    return
  kept, seen = [], set()
  for r in read_metrics(path):
    key = (r.get("step", 0), r.get("split", "train"))
    if key[0] <= step and key not in seen:
      seen.add(key)
      kept.append(r)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in kept:
      f.write(json.dumps(r, allow_nan=True) + "\n")
  os.replace(tmp, path)


def plot_curves(metrics_path: str, png_path: str, *, title: str = "") -> str | None:
  """Draws every numeric series of metrics.jsonl, one panel per metric (train and eval), to `png_path`."""
  records = read_metrics(metrics_path)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = defaultdict(lambda: ([], []))
  for r in records:
    for k, v in r.items():
      if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
        continue
      if not math.isfinite(v):
        continue
      xs, ys = series[(r.get("split", "train"), k)]
      xs.append(r["step"])
      ys.append(v)
  keys = sorted(series)
  cols = 3
  rows = max(1, math.ceil(len(keys) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    xs, ys = series[key]
    ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
    ax.set_title(f"{key[0]}/{key[1]}", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, png_path)
  return png_path
