"""The demo's measurements: the cross-encoder against the decomposed model on disjoint folds, every
decomposed model on the whole test split with bootstrap intervals, and retrieve-then-re-rank.

- Folds: the first `folds x fold_images` test images, cut into disjoint folds (as COCO 1K cuts COCO 5K);
  the stage-1 cross-encoder scores every (image, caption) pair of each fold; the decomposed model is ranked
  on exactly the same images and captions. The drop (cross-encoder minus decomposed average recall) gets a
  Student-t interval over the folds (`retrieval.intervals.fold_interval`).
- Full split: each decomposed model ranks all test images and captions; its average recall, and the
  differences that answer the ablation's questions, get paired bootstrap intervals over the test images.
- Re-rank: the main decomposed model's top-k, in both directions, re-scored by the stage-1 cross-encoder
  on the full split (retrieve, then re-rank), with the time the re-scoring took.
Each piece is cached as JSON in `<workdir>/results/`, so a second run recomputes nothing.
"""
from __future__ import annotations

import os
import time

import numpy as np

from vldeformer_jax.retrieval import binary_codes
from vldeformer_jax.retrieval import intervals
from vldeformer_jax.retrieval import metrics
from vldeformer_jax.retrieval import modes
from vldeformer_jax.retrieval.evaluate import cross_encoder_scores, rerank, similarity
from vldeformer_jax.retrieval.gallery import embed_gallery
from vldeformer_jax.training import code_distillation


def avg_recall(result: dict) -> float:
  """Mean of the six R@K (i2t and t2i R@1/5/10), in points (rsum / 6)."""
  return float(sum(result[d][f"R@{k}"] for d in ("i2t", "t2i") for k in metrics.RECALL_KS) / 6)


PICTURE_QUERIES = 20  # captions of the first fold whose top-5 images are kept for the retrieval picture


def _top5(scores_t2i: np.ndarray) -> list[list[int]]:
  """Each of the first PICTURE_QUERIES captions' 5 best images (fold positions), best first."""
  q = scores_t2i[:PICTURE_QUERIES]
  return np.argsort(-q, axis=1, kind="stable")[:, :5].tolist()


def fold_rows(num_images: int, folds: int, fold_images: int) -> list[np.ndarray]:
  """Image positions of each fold: consecutive, disjoint, from the start of the split."""
  if folds * fold_images > num_images:
    raise ValueError(f"{folds} folds of {fold_images} images need {folds * fold_images} test images; the split "
                     f"has {num_images}")
  return [np.arange(f * fold_images, (f + 1) * fold_images) for f in range(folds)]


def class_set_groups(gallery, scenes: dict) -> np.ndarray:
  """An id per image of the gallery: images whose captions describe the same multiset of object classes
  share it (in the demo world these are the group siblings that differ by one colour, size or position)."""
  keys = {}
  return np.array([keys.setdefault(tuple(sorted(o["class"] for o in scenes.get(str(int(i)), []))), len(keys))
                   for i in gallery.image_ids], np.int64)


def fine_grained_accuracy(sim: np.ndarray, txt2img: np.ndarray, groups: np.ndarray) -> dict:
  """How a model tells an image from its look-alikes: over captions whose image has siblings (other images
  with the same object classes), the % ranked above every sibling; and, for contrast, the % ranked above
  every image with other classes. A model that matches classes but not attributes scores high on the
  second and low on the first."""
  txt2img = np.asarray(txt2img)
  own = sim[txt2img, np.arange(len(txt2img))]
  same = groups[None, :] == groups[txt2img][:, None]  # [N_txt, N_img]
  same[np.arange(len(txt2img)), txt2img] = False
  scores = sim.T
  has = same.any(axis=1)
  beat_siblings = own > np.where(same, scores, -np.inf).max(axis=1)
  beat_others = own > np.where(~same & (np.arange(sim.shape[0])[None, :] != txt2img[:, None]), scores, -np.inf).max(axis=1)
  return {"above_every_sibling": float(100 * beat_siblings[has].mean()) if has.any() else None,
          "above_every_other_class_set": float(100 * beat_others[has].mean()) if has.any() else None,
          "captions_with_siblings": int(has.sum())}


def decomposed_on_split(encoder, gallery, rows_per_fold, batch_size: int, progress: bool,
                        groups: np.ndarray | None = None) -> dict:
  """Metrics of one decomposed model on the full split and on each fold, plus the per-query ranks the
  bootstrap needs (ranks stored as lists: JSON)."""
  img, txt, _ = embed_gallery(encoder, gallery, batch_size, progress=progress)
  sim = similarity(img, txt)
  i2t, t2i, _ = metrics.ranks(sim, gallery.txt2img)
  folds, top5 = [], None
  for rows in rows_per_fold:
    s, t = metrics.subset(sim, gallery.txt2img, rows)
    folds.append(metrics.retrieval_metrics(s, t))
    top5 = top5 if top5 is not None else _top5(s.T)
  out = {"full": metrics.retrieval_metrics(sim, gallery.txt2img), "folds": folds,
         "ranks": {"i2t": i2t.tolist(), "t2i": t2i.tolist()}, "fold0_t2i_top5": top5}
  if groups is not None:
    out["fine_grained"] = fine_grained_accuracy(sim, gallery.txt2img, groups)
  return out


def cross_encoder_fold(cross_encoder, gallery, rows, batch_size: int, progress: bool,
                       groups: np.ndarray | None = None) -> dict:
  """Every (image, caption) pair of one fold scored by the cross-encoder, ranked like the decomposed model."""
  records = [gallery.source[int(gallery.rows[r])] for r in rows]
  scores, sub, seconds = cross_encoder_scores(cross_encoder, records, batch_size, progress=progress)
  out = metrics.retrieval_metrics(scores, sub.txt2img)
  out["timing"] = {"score_pairs_s": seconds, "pairs": int(scores.size)}
  out["t2i_top5"] = _top5(scores.T)
  out["image_ids"] = sub.image_ids.tolist()
  out["captions"] = sub.captions[:PICTURE_QUERIES]
  out["txt2img"] = sub.txt2img[:PICTURE_QUERIES].tolist()
  if groups is not None:
    out["fine_grained"] = fine_grained_accuracy(scores, sub.txt2img, groups[np.asarray(rows)])
  return out


def reranked_on_split(encoder, cross_encoder, gallery, top_k: int, batch_size: int, progress: bool) -> dict:
  """The decomposed model's top-k (both directions) re-scored by the cross-encoder, on the full split."""
  img, txt, _ = embed_gallery(encoder, gallery, batch_size, progress=progress)
  sim = similarity(img, txt)
  t = time.perf_counter()
  sim_i2t, sim_t2i, pairs = rerank(cross_encoder, gallery, sim, top_k, batch_size, progress)
  seconds = time.perf_counter() - t
  out = metrics.retrieval_metrics(sim_i2t, gallery.txt2img, sim_t2i)
  out.update(rerank_top_k=int(top_k), pairs_scored=pairs, rerank_seconds=seconds,
             rerank_ms_per_query=1e3 * seconds / (sim.shape[0] + sim.shape[1]))
  return out


def retrieval_modes(encoder, cross_encoder, train_gallery, gallery, *, bits: int, steps: int, rerank_k: int,
                    batch_size: int, progress: bool) -> dict:
  """Every retrieval mode of the decomposed model on the full split (retrieval/modes.py: exact float, int8,
  sign bits, SimHash and distilled codes with a float re-score of a Hamming shortlist, late-interaction
  and cross-encoder re-ranking of the top `rerank_k`, faiss IVF / HNSW where faiss is installed).

  The code head is distilled on the train split's embeddings (training/code_distillation.py) and tested on
  this split, so the codes never see a test caption; its baseline is SimHash of the same length."""
  img, txt, _ = embed_gallery(encoder, train_gallery, batch_size, progress=progress)
  head, summary = code_distillation.distill(img, txt, train_gallery.txt2img,
                                            code_distillation.DistillConfig(bits=bits, steps=steps),
                                            progress=progress)
  heads = {f"simhash-{bits}": binary_codes.sign_baseline_head(img.shape[1], bits), f"distilled-{bits}": head}
  notes: list[str] = []
  rows = modes.gallery_rows(encoder, gallery, heads=heads, cross_encoder=cross_encoder, rerank_k=rerank_k,
                            notes=notes)
  return {"rows": rows, "notes": notes, "bits": int(bits), "rerank_k": int(rerank_k),
          "distillation": {k: v for k, v in summary.items() if k != "config"}}


def drop_over_folds(cross_folds: list[dict], decomposed_folds: list[dict]) -> dict:
  """Cross-encoder minus decomposed average recall per fold, and the t interval of the mean drop."""
  drops = [avg_recall(c) - avg_recall(d) for c, d in zip(cross_folds, decomposed_folds)]
  out = intervals.fold_interval(drops)
  out["per_fold"] = drops
  return out


def paired_difference(a: dict, b: dict, txt2img, num_samples: int) -> dict:
  """Average recall of model `a` minus model `b` on the full split, paired bootstrap over test images."""
  ranks = lambda r: (np.asarray(r["ranks"]["i2t"]), np.asarray(r["ranks"]["t2i"]))  # noqa: E731
  return intervals.bootstrap_avg_recall(ranks(a), txt2img, baseline=ranks(b), num_samples=num_samples)


def interval_of(result: dict, txt2img, num_samples: int) -> dict:
  """Average recall of one model on the full split with its bootstrap interval over test images."""
  return intervals.bootstrap_avg_recall((np.asarray(result["ranks"]["i2t"]), np.asarray(result["ranks"]["t2i"])),
                                        txt2img, num_samples=num_samples)


def results_dir(workdir: str) -> str:
  path = os.path.join(workdir, "results")
  os.makedirs(path, exist_ok=True)
  return path
