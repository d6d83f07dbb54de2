"""Several prepared datasets as one training source, each with a sampling weight.

The authors trained their Flickr30K model on COCO + Flickr30K together (docs/method.md §6.1); users mix
datasets for the same reason. `MixtureSource` is a random-access source like a single split (`len`,
`[i]` -> record), so the input pipeline keeps every guarantee it has for one dataset: the global batch of a
step is a pure function of (seed, step), the same for any process count, and resumes exactly.

An epoch of the mixture is a fixed list of `size` virtual records: dataset d fills `round(size * w_d)`
of them (the largest-remainder rounding, so the counts add up to `size`). Within dataset d, virtual slot k
reads record `perm_d[k % len_d]` of a permutation seeded by (seed, d): a dataset whose share exceeds its
size is repeated, a smaller share reads a fixed seeded subset. The pipeline then shuffles the whole epoch
(`pipeline.epoch_permutation`), so every global batch draws from all datasets in proportion to the weights.
By default `size` is the smallest epoch in which every dataset's share covers all its records:
`max_d(len_d / w_d)`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

_STREAM_MIXTURE = 4  # a random stream of its own (pipeline.py uses 1-3)
_SPEC = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*:\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*$")


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'name_a:0.7,name_b:0.3' -> [(name, weight)], weights normalised to sum 1; ValueError naming the item."""
  items = []
  for item in spec.split(","):
    m = _SPEC.match(item)
    if not m:
      raise ValueError(f"config.data.mixture: {item.strip()!r} is not 'dataset_name:weight' (in {spec!r})")
    items.append((m.group(1), float(m.group(2))))
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise ValueError(f"config.data.mixture: a dataset appears twice in {spec!r}")
  total = sum(w for _, w in items)
  if any(w <= 0 for _, w in items) or not total > 0:
    raise ValueError(f"config.data.mixture: weights must be positive, got {spec!r}")
  return [(n, w / total) for n, w in items]


def share_counts(size: int, weights: Sequence[float]) -> np.ndarray:
  """Records of each dataset in an epoch of `size`: largest-remainder rounding of size * w (sums to size)."""
  exact = np.asarray(weights, np.float64) * size
  counts = np.floor(exact).astype(np.int64)
  for d in np.argsort(-(exact - counts), kind="stable")[:size - int(counts.sum())]:
    counts[d] += 1
  return counts


class MixtureSource:
  """Random-access records of several sources mixed by weight (see the module docstring)."""

  def __init__(self, sources: Sequence[Any], weights: Sequence[float], *, seed: int, size: int | None = None,
               names: Sequence[str] | None = None):
    if len(sources) != len(weights) or not sources:
      raise ValueError(f"MixtureSource: {len(sources)} sources and {len(weights)} weights")
    lengths = [len(s) for s in sources]
    self.names = list(names or [f"source{d}" for d in range(len(sources))])
    if min(lengths) < 1:
      raise ValueError(f"MixtureSource: {self.names[lengths.index(min(lengths))]} is empty")
    total = float(sum(weights))
    self.weights = [float(w) / total for w in weights]
    self.size = int(size or max(math.ceil(n / w) for n, w in zip(lengths, self.weights)))
    self.sources, self.lengths = list(sources), lengths
    self.counts = share_counts(self.size, self.weights)
    self._starts = np.concatenate([[0], np.cumsum(self.counts)])
    self._perms = [np.random.default_rng([seed, _STREAM_MIXTURE, d]).permutation(n) for d, n in enumerate(lengths)]

  def __len__(self) -> int:
    return self.size

  def locate(self, index: int) -> tuple[int, int]:
    """(dataset, record index in it) of virtual record `index`."""
    if not 0 <= index < self.size:
      raise IndexError(f"MixtureSource index {index} out of range [0, {self.size})")
    d = int(np.searchsorted(self._starts, index, side="right") - 1)
    k = index - int(self._starts[d])
    return d, int(self._perms[d][k % self.lengths[d]])

  def dataset_of(self, indices) -> np.ndarray:
    """The dataset of each virtual index (vectorised)."""
    return np.searchsorted(self._starts, np.asarray(indices), side="right") - 1

  def __getitem__(self, index: int) -> dict:
    d, i = self.locate(int(index))
    return self.sources[d][i]

  def describe(self) -> str:
    return ", ".join(f"{n} {w:.0%} ({c} of {self.size} per epoch from {ln} images)"
                     for n, w, c, ln in zip(self.names, self.weights, self.counts, self.lengths))
