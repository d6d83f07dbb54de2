"""How sure a recall figure is: 95% intervals for average recall and for differences between models.

Average recall is the mean of the six R@K (i2t and t2i R@1/5/10). Two kinds of interval, each named in
every result it produces:

- over folds (`fold_interval`): K disjoint folds of test images each give one value (e.g. the recall drop
  of decomposition on that fold); the interval is the Student-t interval of their mean,
  mean +- t_{0.975, K-1} * sd / sqrt(K). It needs nothing but the per-fold numbers, and with few folds it is
  honestly wide.
- over images (`bootstrap_avg_recall`): resample the test images with replacement (each image with all its
  captions) and recompute average recall from the per-query ranks; with two models ranked on the same
  images, the difference is resampled pairwise, so what the two share (hard images) cancels. The interval
  is the 2.5th-97.5th percentile of B resamples (percentile bootstrap, seeded).
"""
from __future__ import annotations

import math

import numpy as np

from vldeformer_jax.retrieval.metrics import RECALL_KS

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (larger: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(dof: int) -> float:
  if dof < 1:
    raise ValueError(f"a t interval needs at least 2 values (dof {dof})")
  return _T975[dof - 1] if dof <= len(_T975) else 1.96


def fold_interval(values) -> dict:
  """{"mean", "ci95": [lo, hi], "sd", "n", "method"} of per-fold values (Student-t over the folds)."""
  v = np.asarray(values, np.float64)
  t = t_quantile_975(len(v) - 1)  # refuses a single value before its sd is computed
  mean, sd = float(v.mean()), float(v.std(ddof=1))
  half = t * sd / math.sqrt(len(v))
  return {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "n": int(len(v)),
          "method": f"Student-t over {len(v)} disjoint folds of test images (fold spread)"}


def avg_recall_from_ranks(i2t_rank: np.ndarray, t2i_rank: np.ndarray) -> float:
  """Mean of R@1/5/10 in both directions, in points, from 0-based first-hit ranks."""
  return float(np.mean([100.0 * np.mean(r < k) for r in (i2t_rank, t2i_rank) for k in RECALL_KS]))


def bootstrap_avg_recall(ranks, txt2img: np.ndarray, *, baseline=None, num_samples: int = 1000,
                         seed: int = 0) -> dict:
  """Percentile-bootstrap 95% interval over test images of average recall (or of its difference to
  `baseline`, paired: the same resampled images for both).

  `ranks` / `baseline`: (i2t rank [N_img], t2i rank [N_txt]) of `metrics.ranks`; `txt2img`: the image of
  each caption. Returns {"value", "ci95": [lo, hi], "num_samples", "method"}.
  """
  txt2img = np.asarray(txt2img)
  n_img = len(ranks[0])
  counts = np.bincount(txt2img, minlength=n_img)

  def hits(rk):
    i2t, t2i = (np.asarray(r) for r in rk)
    return ([(i2t < k).astype(np.float64) for k in RECALL_KS],
            [np.bincount(txt2img, (t2i < k).astype(np.float64), minlength=n_img) for k in RECALL_KS])

  def value(h, weights):
    """Average recall with each image counted `weights[i]` times (its captions too)."""
    i2t, t2i = h
    n_captions = float(weights @ counts)
    return float(np.mean([100.0 * (weights @ x) / weights.sum() for x in i2t]
                         + [100.0 * (weights @ x) / n_captions for x in t2i]))

  h, hb = hits(ranks), None if baseline is None else hits(baseline)
  ones = np.ones(n_img)
  point = value(h, ones) - (value(hb, ones) if hb else 0.0)
  rng = np.random.default_rng(seed)
  samples = np.empty(num_samples)
  for b in range(num_samples):
    w = np.bincount(rng.integers(n_img, size=n_img), minlength=n_img).astype(np.float64)
    samples[b] = value(h, w) - (value(hb, w) if hb else 0.0)
  lo, hi = np.percentile(samples, [2.5, 97.5])
  return {"value": point, "ci95": [float(lo), float(hi)], "num_samples": int(num_samples),
          "method": f"percentile bootstrap over the {n_img} test images ({num_samples} resamples"
                    + (", paired)" if baseline is not None else ")")}
