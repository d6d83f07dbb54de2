"""Re-ranking the shortlist of one index query (`launch/index.py query --rerank_top_k K --rerank_score S`).

Why its own module: the index answers a query by its first stage (the pooled cosine: JAX scan, compact
codes or faiss); re-ranking re-scores that stage's top-K with a costlier score, the same scores
`evaluate --rerank_score` offers (retrieval/rerank.py, docs/method.md §7.3 and §7.5):
- `late` / `late_normalized`: TERAN's MrSw (retrieval/late_interaction.py) between the query's token states
  (one decomposed forward) and the token states the index stores (`build --store_tokens`); only the K
  shortlisted rows' states are read from disk. A text query against an images index (each caption word's
  best tag or region) or an image query against a captions index.
- `cross`: the early-interaction head's logit margin of (caption, image) pairs from a cross-encoder export
  (`--rerank_export`, default the query's export), refused when its match head was never trained, as
  `launch/evaluate.py` refuses it. The index stores no region features: a text query re-scored against an
  images index reads the K images' records from the split the index was built from (row r = record r,
  checked by image id).
- `mixed`: w * c * cosine + (1 - w) * margin over the K pairs (rerank.mixed_scores; c matches the spreads).
- `decomposed`: the first stage's own cosine (the order does not change: the control).

The re-ranked list is the K shortlisted rows ordered by the new score (ties: the first stage's order), then
the first stage's remaining rows in its order.
"""
from __future__ import annotations

import numpy as np

from vldeformer_jax.io import export as export_lib
from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval import gallery as gallery_lib
from vldeformer_jax.retrieval import late_interaction
from vldeformer_jax.retrieval import pairs
from vldeformer_jax.retrieval import rerank as rerank_lib

RERANK_SCORES = rerank_lib.RERANK_SCORES


def _text(x) -> str:
  return gallery_lib.text_of(x)


def _records(source, index, rows: np.ndarray) -> list[dict]:
  """The dataset records of an images index's rows (row r = record r of the split it was built from)."""
  if source is None:
    raise ValueError(f"re-ranking a text query against images index {index.path} with the cross-encoder reads "
                     "the images' regions from the split: give --data_dir/--dataset/--split (or build the index "
                     "with them)")
  recs = []
  for r in rows:
    rec = source[int(r)] if int(r) < len(source) else None
    if rec is None or int(rec["image_id"]) != int(index.ids[r]):
      raise ValueError(f"index {index.path}: row {int(r)} (image {int(index.ids[r])}) is not record {int(r)} of the "
                       "given split: re-rank with the split the index was built from")
    recs.append(rec)
  return recs


def late_scores(index, encoder, rows: np.ndarray, *, text=None, image_record=None,
                normalize: bool = False) -> np.ndarray:
  """S_MrSw of the query against the index rows `rows`, float32 [len(rows)]."""
  k = len(rows)
  shortlist = np.arange(k)[None, :]
  if text is not None and index.meta["side"] == "images":
    words, wmask = encoder.text_token_states([text])
    stored, tmask = index.token_rows(rows)
    return late_interaction.rescore_shortlist(words, wmask, stored, tmask, shortlist, queries="captions",
                                              normalize=normalize)[0]
  if image_record is not None and index.meta["side"] == "captions":
    toks, tmask = encoder.image_token_states([np.asarray(image_record["features"], np.float32)],
                                             [_text(image_record["tags"])])
    stored, wmask = index.token_rows(rows)
    words = late_interaction.dequantize_tokens(stored)
    return late_interaction.rescore_shortlist(words, wmask, toks, tmask, shortlist, queries="images",
                                              normalize=normalize)[0]
  raise ValueError(f"late interaction scores a caption against an image: a text query needs an images index, an "
                   f"image query a captions index (index {index.path} holds {index.meta['side']})")


def cross_margins(index, cross_encoder, rows: np.ndarray, *, text=None, image_record=None, source=None,
                  batch_size: int | None = None) -> np.ndarray:
  """The cross-encoder's logit margins of (query, row) pairs, float32 [len(rows)]."""
  if cross_encoder.match_head_error:
    raise export_lib.UntrainedHeadError(cross_encoder.match_head_error)
  cfg = cross_encoder.model_config
  k = len(rows)
  if text is not None and index.meta["side"] == "images":
    recs = _records(source, index, rows)
    text_x = inputs.text_inputs(cross_encoder.tokenizer, [text], cfg.max_text_len)
    image_x = cross_encoder.image_inputs([np.asarray(r["features"], np.float32) for r in recs],
                                         [_text(r["tags"]) for r in recs])
    return pairs.score_pairs(cross_encoder, text_x, image_x, np.zeros(k, np.int64), np.arange(k), batch_size)
  if image_record is not None and index.meta["side"] == "captions":
    text_x = inputs.text_inputs(cross_encoder.tokenizer, [index.texts[int(r)] for r in rows], cfg.max_text_len)
    image_x = cross_encoder.image_inputs([np.asarray(image_record["features"], np.float32)],
                                         [_text(image_record["tags"])])
    return pairs.score_pairs(cross_encoder, text_x, image_x, np.arange(k), np.zeros(k, np.int64), batch_size)
  raise ValueError(f"the cross-encoder scores a caption with an image: a text query needs an images index, an "
                   f"image query a captions index (index {index.path} holds {index.meta['side']})")


def rerank_rows(index, encoder, rows: np.ndarray, cosines: np.ndarray, top_k: int, *, score: str = "cross",
                weight: float = 0.5, text=None, image_record=None, cross_encoder=None, source=None,
                batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(new order of `rows`, the re-rank score of each row in that order, NaN past the shortlist): the first
  `top_k` rows (the first stage's order) re-scored by `score`, ahead of the rest in their first-stage order."""
  if score not in RERANK_SCORES:
    raise ValueError(f"unknown re-rank score {score!r}; expected one of {RERANK_SCORES}")
  if top_k < 1:
    raise ValueError(f"--rerank_top_k must be >= 1 to re-rank, got {top_k}")
  rows, cosines = np.asarray(rows, np.int64), np.asarray(cosines, np.float32)
  short, rest = rows[:top_k], rows[top_k:]
  if score == "decomposed":
    new = cosines[:top_k]
  elif score.startswith("late"):
    new = late_scores(index, encoder, short, text=text, image_record=image_record,
                      normalize=score == "late_normalized")
  else:
    new = cross_margins(index, cross_encoder or encoder, short, text=text, image_record=image_record,
                        source=source, batch_size=batch_size)
    if score == "mixed":
      new = rerank_lib.mixed_scores(cosines[:top_k][None], new[None], weight)[0]
  order = np.argsort(-np.asarray(new, np.float64), kind="stable")  # ties: the first stage's order
  return (np.concatenate([short[order], rest]),
          np.concatenate([np.asarray(new, np.float32)[order], np.full(len(rest), np.nan, np.float32)]))
