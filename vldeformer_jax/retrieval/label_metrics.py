"""Label-based retrieval metrics: mAP@all, mAP@K and mAP@R where a retrieved item is relevant when it shares
at least one label with the query (IDCMR, PeerJ CS 2021, and the cross-modal hashing literature).

Instance metrics (retrieval/metrics.py) count only an image's own captions as relevant; here relevance comes
from label sets. Demo records carry no label field, but their `tags` (detector class names) do: the set of tag
words of an image is its label set (`labels_from_tags`), and a caption has the label set of its image.

Definitions, for one query with relevance r_1..r_N over the items sorted by descending score:
- Tie rule (the one of metrics.py): a stable sort, so among equal scores the item with the lower index comes
  first. With no ties the numbers equal `sklearn.metrics.average_precision_score` (mAP@all); with ties
  sklearn groups tied items, this module does not.
- P@k = (1/k) * sum_{i<=k} r_i.
- AP@all = (1/|rel|) * sum_k r_k P@k, |rel| = all relevant items of the query.
- AP@K (named `label_mAP@K`, e.g. `label_mAP@10`): sum_{k<=K} r_k P@k divided by the number of relevant items
  in the top K (the hashing-literature convention, e.g. DCMH / IDCMR); 0 when the top K holds none.
- AP@R: R = |rel|; (1/R) * sum_{k<=R} r_k P@k (Musgrave et al., 2020; the instance mAP@R of metrics.py is this
  with the image's own captions as the only relevant items).
Queries with no relevant item at all are left out of every mean and counted (`queries_without_relevant`).
All values in percent, like metrics.py.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

LABEL_MAP_KS = (10, 50)
_CHUNK_BYTES = 64 << 20


def labels_from_tags(tags) -> frozenset[str]:
  """A record's label set: the distinct words of its `tags` (bytes or str)."""
  text = tags.decode("utf-8") if isinstance(tags, bytes) else str(tags)
  return frozenset(text.split())


def label_matrix(label_sets: Sequence[Iterable[str]], vocabulary: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
  """bool [N, C] multi-hot matrix of the label sets, and the vocabulary (sorted, unless given)."""
  label_sets = [set(s) for s in label_sets]
  vocab = sorted(set().union(*label_sets)) if vocabulary is None else list(vocabulary)
  col = {w: i for i, w in enumerate(vocab)}
  out = np.zeros((len(label_sets), len(vocab)), bool)
  for r, s in enumerate(label_sets):
    for w in s:
      if w not in col:
        raise KeyError(f"label {w!r} of item {r} is not in the vocabulary")
      out[r, col[w]] = True
  return out, vocab


def relevance(query_labels: np.ndarray, item_labels: np.ndarray) -> np.ndarray:
  """bool [Q, N]: query q and item n share at least one label."""
  q = np.asarray(query_labels, np.float32)
  n = np.asarray(item_labels, np.float32)
  return (q @ n.T) > 0


def average_precisions(scores: np.ndarray, rel: np.ndarray, ks: Sequence[int] = LABEL_MAP_KS) -> dict:
  """Per-query AP@all, AP@K (each k of `ks`) and AP@R from scores [Q, N] and relevance [Q, N] (bool).

  Returns {"all": [Q], k: [Q] for each k, "R": [Q], "num_relevant": [Q]} (fractions, not percent); queries
  without any relevant item get NaN.
  """
  scores = np.asarray(scores)
  rel = np.asarray(rel, bool)
  if scores.shape != rel.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and relevance {rel.shape} must be the same [Q, N] shape")
  for k in ks:
    if int(k) < 1:
      raise ValueError(f"mAP@K needs K >= 1, got {k}")
  q, n = scores.shape
  out = {"all": np.full(q, np.nan), "R": np.full(q, np.nan), "num_relevant": rel.sum(1)}
  for k in ks:
    out[int(k)] = np.full(q, np.nan)
  chunk = max(1, _CHUNK_BYTES // max(1, 16 * n))
  ranks_1 = np.arange(1, n + 1, dtype=np.float64)[None, :]
  for a in range(0, q, chunk):
    s, r = scores[a:a + chunk], rel[a:a + chunk]
    order = np.argsort(-s, axis=1, kind="stable")  # ties: lower index first (metrics.py's rule)
    hit = np.take_along_axis(r, order, axis=1)
    cum = np.cumsum(hit, axis=1)
    prec_hit = np.where(hit, cum / ranks_1, 0.0)
    total = cum[:, -1] if n else np.zeros(len(s), np.int64)
    has = total > 0
    sl = slice(a, a + len(s))
    with np.errstate(invalid="ignore", divide="ignore"):
      out["all"][sl] = np.where(has, prec_hit.sum(1) / total, np.nan)
      in_r = ranks_1 <= total[:, None]
      out["R"][sl] = np.where(has, np.where(in_r, prec_hit, 0.0).sum(1) / total, np.nan)
      for k in ks:
        kk = min(int(k), n)
        found = cum[:, kk - 1] if kk else np.zeros(len(s), np.int64)
        ap_k = np.where(found > 0, prec_hit[:, :kk].sum(1) / np.maximum(found, 1), 0.0)
        out[int(k)][sl] = np.where(has, ap_k, np.nan)
  return out


def _means(aps: dict, ks) -> dict:
  valid = ~np.isnan(aps["all"])
  mean = lambda x: float(100.0 * np.mean(x[valid])) if valid.any() else float("nan")
  res = {"all": mean(aps["all"]), "R": mean(aps["R"])}
  res.update({int(k): mean(aps[int(k)]) for k in ks})
  res["without_relevant"] = int((~valid).sum())
  return res


def label_map_metrics(sim: np.ndarray, image_labels: np.ndarray, txt2img: Sequence[int],
                      ks: Sequence[int] = LABEL_MAP_KS, sim_t2i: np.ndarray | None = None) -> dict:
  """Label mAPs of both directions from one similarity matrix [N_img, N_txt].

  image_labels: bool [N_img, C] (`label_matrix`); a caption's labels are its image's (`txt2img`). i2t ranks
  captions for each image (rows of `sim`), t2i ranks images for each caption (columns of `sim_t2i`, default
  `sim`). Returns {"label_mAP@all": {"i2t", "t2i"}, "label_mAP@<k>": ..., "label_mAP@R": ...,
  "queries_without_relevant": {"i2t", "t2i"}, "num_labels"}.
  """
  sim = np.asarray(sim)
  txt2img = np.asarray(txt2img, np.int64)
  img_lab = np.asarray(image_labels, bool)
  if img_lab.ndim != 2 or img_lab.shape[0] != sim.shape[0]:
    raise ValueError(f"image_labels has shape {img_lab.shape}; expected ({sim.shape[0]}, num_labels)")
  if txt2img.shape != (sim.shape[1],):
    raise ValueError(f"txt2img has shape {txt2img.shape}; expected ({sim.shape[1]},)")
  txt_lab = img_lab[txt2img]
  sim_t2i = sim if sim_t2i is None else np.asarray(sim_t2i)
  i2t = _means(average_precisions(sim, relevance(img_lab, txt_lab), ks), ks)
  t2i = _means(average_precisions(sim_t2i.T, relevance(txt_lab, img_lab), ks), ks)
  out = {"label_mAP@all": {"i2t": i2t["all"], "t2i": t2i["all"]}}
  for k in ks:
    out[f"label_mAP@{int(k)}"] = {"i2t": i2t[int(k)], "t2i": t2i[int(k)]}
  out["label_mAP@R"] = {"i2t": i2t["R"], "t2i": t2i["R"]}
  out["queries_without_relevant"] = {"i2t": i2t["without_relevant"], "t2i": t2i["without_relevant"]}
  out["num_labels"] = int(img_lab.shape[1])
  return out
