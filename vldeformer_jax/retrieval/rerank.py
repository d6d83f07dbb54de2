"""Retrieve, then re-rank: each query's top-k from the decomposed cosine re-scored by the score a user picks.

Scores (`RERANK_SCORES`, docs/method.md §7.3 and §7.5):
- `cross`: the early-interaction head's logit margin logit[1] - logit[0] (`Encoder.match_logit_margin_inputs`,
  through `retrieval.pairs.score_pairs`), from `cross_encoder` (by default the decomposed encoder's own
  weights; the demo's is the stage-1 export).
- `decomposed`: the decomposed cosine itself. It keeps the first stage's order, so its metrics are the
  un-re-ranked ones: the control every other score is compared with, at no cost.
- `mixed`: w * c * cosine + (1 - w) * margin, as ALBEF and BLIP-2 add their ITC similarity to their ITM
  score for the top-k. The two live on different scales (a cosine within [-1, 1], a margin in logits that
  spans tens), so a plain sum would be the margin alone: c puts the cosine on the margin's scale by
  matching their standard deviations over the shortlisted pairs of the direction (c = std(margin) /
  std(cosine), one factor per direction and run; c = 1 where the cosines do not vary). w = `weight` is then
  the cosine's share of the spread. w = 0 is the margin exactly (0 * x + 1 * m = m in floating point) and
  w = 1 the cosine times a positive constant (the cosine's order).
- `late` / `late_normalized`: TERAN's MrSw score on the decomposed encoder's token states
  (retrieval/late_interaction.py), summed over the caption's words or divided by their number. Still
  decomposed: every image's and caption's token states come from single-modality forwards, so a gallery's
  can be stored in the index; no cross-encoder forward.

Every score is evaluated only on the shortlists, k per query and direction; the re-ranked matrix keeps each
query's shortlist above everything else in the new order (ties: the first stage's order) and the rest in
the first stage's order below it, so the usual metrics read it (a re-ranked R@K with K > k mixes both).
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from vldeformer_jax.retrieval import late_interaction
from vldeformer_jax.retrieval.pairs import score_pairs

RERANK_SCORES = ("cross", "decomposed", "mixed", "late", "late_normalized")
NEEDS_MATCH_HEAD = ("cross", "mixed")


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of each row's top-k, stable descending (ties by index, as in metrics.py)."""
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rerank_matrix(sim: np.ndarray, top: np.ndarray, new: np.ndarray) -> np.ndarray:
  """`sim` with each row's shortlist `top` [Q, K] moved above everything else, ordered by `new` [Q, K]
  (ties keep the first stage's order); values 2 + (K - position) are exact, so no precision is lost."""
  k = top.shape[1]
  order = np.lexsort((np.broadcast_to(np.arange(k), new.shape), -new), axis=1)
  out = np.array(sim, np.float32, copy=True)
  new_vals = np.empty(new.shape, np.float32)
  np.put_along_axis(new_vals, order, (2.0 + k - np.arange(k, dtype=np.float32))[None, :].repeat(len(top), 0),
                    axis=1)
  np.put_along_axis(out, top, new_vals, axis=1)
  return out


def cross_scores(cross_encoder, gallery, top_t: np.ndarray, top_i: np.ndarray, batch_size: int | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Cross-encoder margins of each image's shortlisted captions [N_img, k] and each caption's shortlisted
  images [N_txt, k]; the work is grouped by image so each image's regions are read once per direction."""
  text_all = gallery.text_inputs(cross_encoder)
  n_img = gallery.num_images
  i2t = np.empty(top_t.shape, np.float32)
  t2i = np.empty(top_i.shape, np.float32)
  chunk = 64
  for a in tqdm(range(0, n_img, chunk), desc="re-rank", disable=not progress):
    imgs = np.arange(a, min(a + chunk, n_img))
    img_x = gallery.image_inputs(cross_encoder, imgs)
    k = top_t.shape[1]
    i2t[imgs] = score_pairs(cross_encoder, text_all, img_x, top_t[imgs].reshape(-1),
                            np.repeat(np.arange(len(imgs)), k), batch_size).reshape(len(imgs), k)
    q, slot = np.nonzero((top_i >= a) & (top_i < a + len(imgs)))  # t2i pairs whose image is in this chunk
    if len(q):
      t2i[q, slot] = score_pairs(cross_encoder, text_all, img_x, q, top_i[q, slot] - a, batch_size)
  return i2t, t2i


def mixed_scores(cosine: np.ndarray, margin: np.ndarray, weight: float) -> np.ndarray:
  """w * c * cosine + (1 - w) * margin, c = std(margin) / std(cosine) over all the entries given (see the
  module docstring); float32 like its inputs."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"rerank weight {weight} is outside [0, 1]")
  cos, m = np.asarray(cosine, np.float32), np.asarray(margin, np.float32)
  sc, sm = float(np.std(cos, dtype=np.float64)), float(np.std(m, dtype=np.float64))
  c = np.float32(sm / sc if sc > 0 and sm > 0 else 1.0)
  w = np.float32(weight)
  return w * (c * cos) + (np.float32(1) - w) * m


def gallery_token_states(encoder, gallery, batch_size: int | None = None, chunk: int = 1024,
                         progress: bool = True) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """((word states, word mask) of every caption, (token states, token mask) of every image) of the
  decomposed `encoder` (`Encoder.text_token_states_inputs` / `image_token_states_inputs`), read `chunk`
  items at a time."""
  words, wmask, toks, tmask = [], [], [], []
  for a in tqdm(range(0, len(gallery.captions), chunk), desc="word states", disable=not progress):
    s, m = encoder.text_token_states_inputs(gallery.text_inputs(encoder, range(a, min(a + chunk, len(gallery.captions)))),
                                            batch_size=batch_size)
    words.append(s), wmask.append(m)
  for a in tqdm(range(0, gallery.num_images, chunk), desc="image token states", disable=not progress):
    s, m = encoder.image_token_states_inputs(gallery.image_inputs(encoder, range(a, min(a + chunk, gallery.num_images))),
                                             batch_size=batch_size)
    toks.append(s), tmask.append(m)
  return (np.concatenate(words), np.concatenate(wmask)), (np.concatenate(toks), np.concatenate(tmask))


def rerank(encoder, gallery, sim: np.ndarray, top_k: int, *, score: str = "cross", weight: float = 0.5,
           cross_encoder=None, batch_size: int | None = None, progress: bool = True,
           token_states=None) -> tuple[np.ndarray, np.ndarray, dict]:
  """(i2t matrix, t2i matrix, info): each image's top-k captions and each caption's top-k images of `sim`
  [N_img, N_txt] (the decomposed cosines of `encoder`) re-scored by `score` (`RERANK_SCORES`).

  `cross_encoder`: scores pairs for `cross` / `mixed` (default `encoder`). `weight`: `mixed` only.
  `token_states`: `gallery_token_states` output to reuse (`late*`; computed here otherwise).
  info: `pairs_scored` (shortlist entries, both directions), `rerank_weight` (`mixed`), `timing`:
  {`score_s` (seconds spent computing the new scores of the shortlists: forward passes for `cross`, the
  MrSw re-scoring for `late*`, 0 for `decomposed`), `token_states_s` (`late*` without `token_states`:
  encoding every caption's and image's token states; an index stores the gallery's, a query's come from
  its own forward)} (under `timing`, which a suite's deterministic JSON leaves out)."""
  if score not in RERANK_SCORES:
    raise ValueError(f"unknown re-rank score {score!r}; expected one of {RERANK_SCORES}")
  n_img, n_txt = sim.shape
  top_t = top_k_rows(sim, min(top_k, n_txt))  # [N_img, k] caption indices
  top_i = top_k_rows(sim.T, min(top_k, n_img))  # [N_txt, k] image indices
  cos_i2t, cos_t2i = np.take_along_axis(sim, top_t, 1), np.take_along_axis(sim.T, top_i, 1)
  timing = {"score_s": 0.0}
  info = {"pairs_scored": int(top_t.size + top_i.size), "timing": timing}
  if score == "decomposed":
    new_i2t, new_t2i = cos_i2t, cos_t2i
  elif score in ("cross", "mixed"):
    t = time.perf_counter()
    new_i2t, new_t2i = cross_scores(cross_encoder or encoder, gallery, top_t, top_i, batch_size, progress)
    timing["score_s"] = time.perf_counter() - t
    if score == "mixed":
      new_i2t, new_t2i = mixed_scores(cos_i2t, new_i2t, weight), mixed_scores(cos_t2i, new_t2i, weight)
      info["rerank_weight"] = float(weight)
  else:
    if token_states is None:
      t = time.perf_counter()
      token_states = gallery_token_states(encoder, gallery, batch_size, progress=progress)
      timing["token_states_s"] = time.perf_counter() - t
    (words, wmask), (toks, tmask) = token_states
    normalize = score == "late_normalized"
    t = time.perf_counter()
    new_i2t = late_interaction.rescore_shortlist(words, wmask, toks, tmask, top_t, queries="images",
                                                 normalize=normalize)
    new_t2i = late_interaction.rescore_shortlist(words, wmask, toks, tmask, top_i, queries="captions",
                                                 normalize=normalize)
    timing["score_s"] = time.perf_counter() - t
  return rerank_matrix(sim, top_t, new_i2t), rerank_matrix(sim.T, top_i, new_t2i).T, info
