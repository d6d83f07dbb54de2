"""Continual-retrieval bookkeeping: the accuracy matrix R[i, j] and what is read from it.

R[i, j] is the accuracy on task j (e.g. t2i R@1 in percent over task j's test images) measured after
training on tasks 0..i (T tasks, so R is [T, T]; entries with j > i are measured too, before task j is
trained). With T the number of tasks:
- average accuracy ACC = (1/T) * sum_j R[T-1, j] (after the last task);
- forgetting (Chaudhry et al., 2018) F = (1/(T-1)) * sum_{j<T-1} (max_{i<T-1} R[i, j] - R[T-1, j]);
- backward transfer (Lopez-Paz & Ranzato, 2017) BWT = (1/(T-1)) * sum_{j<T-1} (R[T-1, j] - R[j, j]).
With one task, F and BWT are 0.
"""
from __future__ import annotations

import numpy as np


def _square(r) -> np.ndarray:
  r = np.asarray(r, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f"the accuracy matrix must be square [T, T] with T >= 1, got shape {r.shape}")
  return r


def average_accuracy(r) -> float:
  r = _square(r)
  return float(r[-1].mean())


def forgetting(r) -> float:
  r = _square(r)
  t = r.shape[0]
  if t == 1:
    return 0.0
  return float(np.mean(r[:-1, :-1].max(axis=0) - r[-1, :-1]))


def backward_transfer(r) -> float:
  r = _square(r)
  t = r.shape[0]
  if t == 1:
    return 0.0
  return float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def summary(r) -> dict:
  """{"R": the matrix as lists, "average_accuracy", "forgetting", "backward_transfer"}."""
  r = _square(r)
  return {"R": r.tolist(), "average_accuracy": average_accuracy(r), "forgetting": forgetting(r),
          "backward_transfer": backward_transfer(r)}
