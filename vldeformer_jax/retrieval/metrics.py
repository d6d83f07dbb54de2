"""Retrieval metrics from one similarity matrix: ranks, R@K, median rank, rsum, mAP@R, and the protocols.

Kept apart from the encoder so that the numbers can be checked on hand-built matrices, and so that
re-ranked or cross-encoder score matrices go through exactly the same code.

Definitions (docs/method.md §7.2):
- `sim` is [N_img, N_txt]; `txt2img[j]` is the image of caption j (any number of captions per image, each
  image at least one).
- i2t rank of image i: the 0-based position of its *first* ground-truth caption in row i sorted by
  descending score; t2i rank of caption j: the position of its image in column j sorted likewise.
- Tie rule (deterministic, documented): a stable sort on descending score, i.e. among equal scores the
  item with the lower index comes first. The position of item g in a row is therefore
  `#{x: s_x > s_g} + #{x < g: s_x == s_g}`, which is what is computed here without sorting at all
  (vectorised comparisons, chunked over queries so memory stays bounded for COCO-5K-size matrices).
- R@K: percentage of queries with rank < K. medr: floor(median(rank)) + 1 (1-based). rsum: the sum of the
  six R@K. mAP@R: mean average precision at R, R = the number of relevant items of the query (the image's
  caption count for i2t, 1 for t2i): AP@R = (1/R) * sum over relevant items at position p < R of
  (number of relevant items at positions <= p) / (p + 1).

Protocols: `coco5k`/`flickr1k`/`full` use every image of the split; `coco1k` averages the metrics over
consecutive folds of 1000 images (5 folds on COCO 5K), each fold with its own captions. The single 1K key
file of the reference code is the dataset's `test_1k` split, evaluated like `full` (see evaluate.py).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# One protocol per matrix, and `all` (every one of them that the split's size allows; evaluate.py).
MATRIX_PROTOCOLS = ("full", "coco5k", "coco1k", "flickr1k")
PROTOCOLS = MATRIX_PROTOCOLS + ("all",)
# Bytes of boolean temporaries allowed per chunk of queries (comparisons are [chunk, R, N]).
_CHUNK_BYTES = 64 << 20


def _check(sim: np.ndarray, txt2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  sim = np.asarray(sim)
  txt2img = np.asarray(txt2img)
  if sim.ndim != 2:
    raise ValueError(f"similarity matrix must be 2-D [N_img, N_txt], got shape {sim.shape}")
  if txt2img.shape != (sim.shape[1],):
    raise ValueError(f"txt2img has shape {txt2img.shape}; expected ({sim.shape[1]},), one image index per "
                     f"caption (column) of the [N_img, N_txt] = {sim.shape} similarity matrix")
  if txt2img.size and (txt2img.min() < 0 or txt2img.max() >= sim.shape[0]):
    raise ValueError(f"txt2img holds image indices outside [0, {sim.shape[0]}): "
                     f"min {txt2img.min()}, max {txt2img.max()}")
  counts = np.bincount(txt2img, minlength=sim.shape[0])
  if sim.shape[0] and counts.min() == 0:
    missing = np.flatnonzero(counts == 0)
    raise ValueError(f"{len(missing)} image(s) have no caption (first indices: {missing[:5].tolist()}); "
                     "every image needs at least one ground-truth caption")
  return sim, txt2img.astype(np.int64)


def caption_table(txt2img: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Captions of each image as a padded table: (indices [N_img, C_max] (-1 = padding), counts [N_img])."""
  counts = np.bincount(txt2img, minlength=num_images)
  order = np.argsort(txt2img, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  c_max = int(counts.max()) if num_images else 0
  slot = np.arange(len(order)) - starts[txt2img[order]]
  table = np.full((num_images, c_max), -1, np.int64)
  table[txt2img[order], slot] = order
  return table, counts


def positions(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based positions of `targets` in each row of `scores` sorted descending, ties broken by index.

  scores [Q, N]; targets [Q, T] int (-1 = padding, returned as N). Returns int64 [Q, T]. No sort: the
  position of g is #{x: s_x > s_g} + #{x < g: s_x == s_g} (equal to a stable descending sort).
  """
  q, n = scores.shape
  valid = targets >= 0
  safe = np.where(valid, targets, 0)
  s_t = np.take_along_axis(scores, safe, axis=1)  # [Q, T]
  chunk = max(1, _CHUNK_BYTES // max(1, n * targets.shape[1]))
  out = np.empty(targets.shape, np.int64)
  idx = np.arange(n)
  for a in range(0, q, chunk):
    s = scores[a:a + chunk, None, :]  # [c, 1, N]
    st = s_t[a:a + chunk, :, None]  # [c, T, 1]
    before = (s > st) | ((s == st) & (idx[None, None, :] < safe[a:a + chunk, :, None]))
    out[a:a + chunk] = before.sum(-1)
  return np.where(valid, out, n)


def ranks(sim: np.ndarray, txt2img: np.ndarray, sim_t2i: np.ndarray | None = None):
  """Per-query ranks: (i2t first-hit rank [N_img], t2i rank [N_txt], i2t GT positions [N_img, C_max]).

  `sim_t2i` (same shape) replaces `sim` for the t2i direction, e.g. after re-ranking each caption's
  top-K images; by default both directions read `sim`.
  """
  sim, txt2img = _check(sim, txt2img)
  sim_t2i = sim if sim_t2i is None else np.asarray(sim_t2i)
  if sim_t2i.shape != sim.shape:
    raise ValueError(f"sim_t2i has shape {sim_t2i.shape}, expected {sim.shape}")
  table, _ = caption_table(txt2img, sim.shape[0])
  pos_i2t = positions(sim, table)
  i2t = pos_i2t.min(axis=1) if table.size else np.zeros(sim.shape[0], np.int64)
  # t2i: columns as rows, in chunks so that the transposed copy stays small.
  n_txt = sim.shape[1]
  t2i = np.empty(n_txt, np.int64)
  col_chunk = max(1, _CHUNK_BYTES // max(1, 4 * sim.shape[0]))
  for a in range(0, n_txt, col_chunk):
    cols = np.ascontiguousarray(sim_t2i[:, a:a + col_chunk].T)
    t2i[a:a + col_chunk] = positions(cols, txt2img[a:a + col_chunk, None])[:, 0]
  return i2t, t2i, pos_i2t


def average_precision_at_r(pos: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """AP@R per query from the sorted-or-not positions [Q, T] of its relevant items (padding = large)."""
  pos = np.sort(pos, axis=1)
  m = np.arange(1, pos.shape[1] + 1)[None, :]  # number of relevant items up to and including this one
  r = counts[:, None]
  hit = (pos < r) & (m <= r)
  return np.sum(np.where(hit, m / (pos + 1.0), 0.0), axis=1) / counts


def _direction(rank: np.ndarray) -> dict[str, float]:
  out = {f"R@{k}": float(100.0 * np.mean(rank < k)) for k in RECALL_KS}
  out["medr"] = float(np.floor(np.median(rank)) + 1)
  out["meanr"] = float(np.mean(rank) + 1)
  return out


def retrieval_metrics(sim: np.ndarray, txt2img: Sequence[int], sim_t2i: np.ndarray | None = None) -> dict:
  """The evaluation JSON for one similarity matrix [N_img, N_txt] (see the module docstring)."""
  txt2img = np.asarray(txt2img)
  i2t, t2i, pos_i2t = ranks(sim, txt2img, sim_t2i)
  counts = np.bincount(txt2img, minlength=np.asarray(sim).shape[0])
  m_i2t = _direction(i2t)
  m_t2i = _direction(t2i)
  return {
      "i2t": m_i2t,
      "t2i": m_t2i,
      "rsum": float(sum(m_i2t[f"R@{k}"] + m_t2i[f"R@{k}"] for k in RECALL_KS)),
      "mAP@R": {
          "i2t": float(100.0 * np.mean(average_precision_at_r(pos_i2t, counts))),
          "t2i": float(100.0 * np.mean(t2i == 0)),  # R = 1: AP@1 is 1 exactly when the image is first
      },
      "num_images": int(np.asarray(sim).shape[0]),
      "num_captions": int(np.asarray(sim).shape[1]),
  }


def average_metrics(results: Sequence[dict]) -> dict:
  """Mean of every number over several metric dicts (the folds of COCO 1K); counts are summed."""
  if not results:
    raise ValueError("average_metrics: no results to average")

  def mean(key_path):
    vals = []
    for r in results:
      for k in key_path:
        r = r[k]
      vals.append(r)
    return float(np.mean(vals))

  out = {}
  for top, val in results[0].items():
    if isinstance(val, dict):
      out[top] = {k: mean((top, k)) for k, v in val.items() if isinstance(v, (int, float))}
    elif top in ("num_images", "num_captions"):
      out[top] = int(sum(r[top] for r in results))
    elif isinstance(val, (int, float)):
      out[top] = mean((top,))
  return out


def fold_slices(num_images: int, fold_size: int = 1000) -> list[slice]:
  """Consecutive folds of `fold_size` images (COCO 1K: 5 folds of the 5K test set); a short tail is dropped.

  Raises when the split has fewer images than one fold.
  """
  if num_images < fold_size:
    raise ValueError(f"protocol needs folds of {fold_size} images but the split has only {num_images}")
  return [slice(a, a + fold_size) for a in range(0, num_images - fold_size + 1, fold_size)]


def subset(sim: np.ndarray, txt2img: np.ndarray, image_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The sub-matrix of the given images and all their captions, with txt2img re-indexed."""
  image_rows = np.asarray(image_rows)
  remap = np.full(np.asarray(sim).shape[0], -1, np.int64)
  remap[image_rows] = np.arange(len(image_rows))
  cols = np.flatnonzero(remap[txt2img] >= 0)
  return np.asarray(sim)[np.ix_(image_rows, cols)], remap[txt2img[cols]]


def protocol_metrics(sim: np.ndarray, txt2img: np.ndarray, protocol: str = "full", fold_size: int = 1000,
                     sim_t2i: np.ndarray | None = None) -> dict:
  """Metrics under a protocol: `full`/`coco5k`/`flickr1k` (every image), `coco1k` (mean over folds).

  For `coco1k` the result is the fold average plus `"folds"`: the list of per-fold results.
  """
  sim, txt2img = _check(sim, txt2img)
  if protocol in ("full", "coco5k", "flickr1k"):
    expected = {"coco5k": 5000, "flickr1k": 1000}.get(protocol)
    if expected and sim.shape[0] != expected:
      log.warning("protocol %s expects %d images but the split has %d: the numbers are not comparable to "
                  "published %s results", protocol, expected, sim.shape[0], protocol)
    out = retrieval_metrics(sim, txt2img, sim_t2i)
  elif protocol == "coco1k":
    folds = []
    for sl in fold_slices(sim.shape[0], fold_size):
      rows = np.arange(sl.start, sl.stop)
      s, t = subset(sim, txt2img, rows)
      s2 = None if sim_t2i is None else subset(sim_t2i, txt2img, rows)[0]
      folds.append(retrieval_metrics(s, t, s2))
    out = average_metrics(folds)
    out["num_images"] = folds[0]["num_images"]
    out["num_captions"] = folds[0]["num_captions"]
    out["num_folds"] = len(folds)
    out["folds"] = folds
  else:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {MATRIX_PROTOCOLS}")
  out["protocol"] = protocol
  return out
