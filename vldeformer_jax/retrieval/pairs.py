"""Scoring (caption, image) pairs with the early-interaction head, without spending time on padding.

Every cross-encoder number (the folds of the demo, `evaluate_cross_encoder`, re-ranking, the speed
comparison) scores pairs through here, so the baseline runs as fast as this code can make it.
"""
from __future__ import annotations

import numpy as np


def trimmed_length(mask: np.ndarray, multiple: int = 8) -> np.ndarray:
  """Each row's real token count rounded up to `multiple` (at most the padded width): the width that row's
  batch may be cut to without dropping a token."""
  width = mask.shape[1]
  return np.minimum(width, -(-mask.sum(axis=1) // multiple) * multiple)


def score_pairs(encoder, text_x: dict, image_x: dict, text_rows: np.ndarray, image_rows: np.ndarray,
                batch_size: int | None = None) -> np.ndarray:
  """Cross-encoder logit margins of the pairs (text_x[text_rows[p]], image_x[image_rows[p]]), float32 [P].

  Pairs are grouped by their caption's real length (rounded up to 8 tokens) and each group's captions are
  cut to that width before packing, so the early-interaction forward spends no time on caption padding
  (at most three widths, so three compiled shapes, for the demo's 22-token captions). Padded key positions
  get exactly zero attention either way (an additive -10000 mask), so the scores are those of the padded
  input up to float32 rounding.
  """
  widths = trimmed_length(text_x["attention_mask"])[text_rows]
  out = np.empty(len(text_rows), np.float32)
  for width in np.unique(widths):
    sel = np.flatnonzero(widths == width)
    text = {k: v[text_rows[sel], :width] for k, v in text_x.items()}
    image = {k: v[image_rows[sel]] for k, v in image_x.items()}
    out[sel] = encoder.match_logit_margin_inputs(text, image, batch_size=batch_size)
  return out
