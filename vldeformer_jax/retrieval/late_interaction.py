"""Late interaction (TERAN's MrSw score) on the decomposed encoder's token states: score, re-score, store.

API (what the index, evaluation and training use):

  mrsw_scores(word_states [Q, W, D], word_mask [Q, W], token_states [G, T, D], token_mask [G, T],
              normalize=False) -> [Q, G] float32                      every caption against every image (jit-able)
  mrsw_pairs(word_states [P, W, D], word_mask [P, W], token_states [P, T, D], token_mask [P, T],
             normalize=False) -> [P] float32                          pair p = (caption row p, image row p)
  score_pairs(word_states, word_mask, token_states, token_mask, text_rows [P], image_rows [P], *,
              normalize=False, chunk_size=256) -> np.ndarray [P]      host arrays (or stored tokens), gathered
                                                                      and scored chunk_size pairs at a time
  rescore_shortlist(word_states, word_mask, token_states, token_mask, shortlist [Q, k], *,
                    queries="captions" | "images", normalize=False, chunk_size=256) -> np.ndarray [Q, k]
        queries="captions": row q of `shortlist` holds image indices (t2i); "images": caption indices (i2t)
  quantize_tokens(states [..., D], dtype="float32" | "bfloat16" | "int8") -> {"values", ["scales"]}
  dequantize_tokens(stored) -> float32 [..., D]; `token_states` above may be an array or such a dict
  content_mask(attention_mask [N, L], segment_len) -> int32 jax.Array [N, L]
        1 on the real words / tags of the first `segment_len` positions (no CLS, SEP, padding) and on every
        later unmasked position (regions); jnp, so it also runs inside the jitted train step
  late_interaction_loss / sharded_late_interaction_loss (training/late_interaction_term.py): the training term

Token states come from `Encoder.text_token_states*` / `Encoder.image_token_states*` (retrieval/encoder.py):
the last layer's sequence output of the decomposed (single-modality) forward, L2-normalised per token.

The score (docs/method.md §7.5; Messina et al., TERAN, ACM TOMM 2021, "MrSw"):

  S(I, C) = sum over the caption's real words w of  max over the image's real tokens r  cos(w, r)

with `normalize=True` divided by the caption's number of real words (the length-normalised variant, which
stops long captions outscoring short ones on every image). Every state is L2-normalised here (again: a
stored bf16 / int8 state is no longer exactly unit), so the score is built from cosines.

Masking, and where this differs from TERAN's code: a padded image token is -inf inside the max, so it can
never be the best match, and a padded word contributes exactly 0 to the sum. TERAN's implementation zero-
pads the region and word features and takes the max over a similarity matrix with the padding inside: a
padded region then has cosine 0 with every word and wins the max whenever all of a word's real
similarities are negative, so the score depends on how much padding the batch happened to carry. Here it
does not (tests/test_late_interaction.py: extra padding and region order change nothing). An image with no
real token scores -inf for any caption with a real word (it matches nothing); a caption with no real word
scores 0 (normalised: 0).

Why a re-scorer by chunks: the full [Q, G, W, T] similarity tensor is far too large for a real gallery (5K
queries x 1K images x 35 x 105 is 1.8e10 floats), and late interaction is meant for the shortlist of a
cheap first stage (the pooled cosine, a compact code). `score_pairs` gathers each chunk's candidates'
tokens on the host from the stored gallery (float32, bf16 or int8 with a per-token scale) and sends only
those to the device, one compiled shape for every chunk (the last one padded), so no query ever touches
the whole gallery's tokens.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

TOKEN_DTYPES = ("float32", "bfloat16", "int8")
_EPS = 1e-12


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS * _EPS))


def _reduce(sims: jax.Array, word_mask: jax.Array, token_mask: jax.Array, normalize: bool) -> jax.Array:
  """sims [..., W, T] -> [...]: max over real tokens (padding -inf), sum over real words (padding 0)."""
  sims = jnp.where(token_mask[..., None, :] > 0, sims, -jnp.inf)
  best = jnp.where(word_mask > 0, jnp.max(sims, axis=-1), 0.0)
  total = jnp.sum(best, axis=-1)
  if normalize:
    total = total / jnp.maximum(jnp.sum((word_mask > 0).astype(jnp.float32), axis=-1), 1.0)
  return total


@functools.partial(jax.jit, static_argnames=("normalize",))
def mrsw_scores(word_states, word_mask, token_states, token_mask, normalize: bool = False) -> jax.Array:
  """S_MrSw of every caption q against every image g: [Q, G] float32 (see the module docstring).

  word_states [Q, W, D], word_mask [Q, W] (1 = a real word), token_states [G, T, D], token_mask [G, T]
  (1 = a real tag or region). Memory is Q * G * W * T floats: for a batch or a small gallery; use
  `rescore_shortlist` for a gallery's shortlists."""
  w, v = _unit(word_states), _unit(token_states)
  sims = jnp.einsum("qwd,gtd->qgwt", w, v, precision=jax.lax.Precision.HIGHEST)
  word_mask = jnp.broadcast_to(word_mask[:, None, :], sims.shape[:3])
  token_mask = jnp.broadcast_to(token_mask[None, :, :], sims.shape[:2] + token_mask.shape[-1:])
  return _reduce(sims, word_mask, token_mask, normalize)


@functools.partial(jax.jit, static_argnames=("normalize",))
def mrsw_pairs(word_states, word_mask, token_states, token_mask, normalize: bool = False) -> jax.Array:
  """S_MrSw of pair p = (caption row p, image row p): [P] float32. Shapes [P, W, D], [P, W], [P, T, D], [P, T]."""
  sims = jnp.einsum("pwd,ptd->pwt", _unit(word_states), _unit(token_states),
                    precision=jax.lax.Precision.HIGHEST)
  return _reduce(sims, word_mask, token_mask, normalize)


# ------------------------------------------------------------------------------------ stored token states


def quantize_tokens(states, dtype: str = "int8") -> dict[str, np.ndarray]:
  """Token states [..., D] (float) as stored: {"values"} for float32 / bfloat16, {"values" int8, "scales"
  float32 [...]} for int8 (symmetric, one scale per token: max |x| / 127, so each entry is off by at most
  half a step, scale / 2). Unit-norm states keep their cosines to within ~D * scale / 2 per entry."""
  if dtype not in TOKEN_DTYPES:
    raise ValueError(f"quantize_tokens: dtype {dtype!r}; expected one of {TOKEN_DTYPES}")
  x = np.asarray(states, np.float32)
  if dtype == "float32":
    return {"values": x}
  if dtype == "bfloat16":
    return {"values": np.asarray(jnp.asarray(x, jnp.bfloat16))}
  scales = np.max(np.abs(x), axis=-1) / 127.0
  safe = np.where(scales > 0, scales, 1.0)
  values = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
  return {"values": values, "scales": scales.astype(np.float32)}


def dequantize_tokens(stored) -> np.ndarray:
  """The float32 token states of `quantize_tokens`' output (an array passes through as float32)."""
  if not isinstance(stored, Mapping):
    return np.asarray(stored, np.float32)
  values = np.asarray(stored["values"]).astype(np.float32)
  return values * np.asarray(stored["scales"], np.float32)[..., None] if "scales" in stored else values


def _take_stored(stored, rows: np.ndarray):
  """Rows of a stored token array (array or quantised dict), still in their stored dtype."""
  if isinstance(stored, Mapping):
    return {k: np.asarray(v)[rows] for k, v in stored.items()}
  return np.asarray(stored)[rows]


@jax.jit
def _dequantize_device(stored):
  if isinstance(stored, dict):
    values = stored["values"].astype(jnp.float32)
    return values * stored["scales"][..., None] if "scales" in stored else values
  return stored.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _pairs_stored(words, word_mask, stored, token_mask, normalize):
  return mrsw_pairs(words, word_mask, _dequantize_device(stored), token_mask, normalize=normalize)


def content_mask(attention_mask, segment_len: int) -> jax.Array:
  """The positions that count as words (caption) or tokens (image) for late interaction, int32 [N, L].

  The first `segment_len` positions are a `[CLS] pieces [SEP] [PAD]...` segment (docs/method.md §3): its
  [CLS] (position 0) and its [SEP] (the last unmasked position of the segment) are dropped, they carry no
  word. Unmasked positions after the segment (an image's regions) all count. jnp, so it runs inside a
  jitted training step too (`np.asarray` it on the host)."""
  m = jnp.asarray(attention_mask).astype(jnp.int32)
  pos = jnp.arange(m.shape[1])[None, :]
  n_real = jnp.sum(m[:, :segment_len], axis=1, keepdims=True)
  drop = ((pos == 0) | (pos == n_real - 1)) & (pos < segment_len)
  return jnp.where(drop, 0, m)


def score_pairs(word_states, word_mask, token_states, token_mask, text_rows, image_rows, *,
                normalize: bool = False, chunk_size: int = 256) -> np.ndarray:
  """S_MrSw of the pairs (caption text_rows[p], image image_rows[p]) as float32 numpy [P].

  The states live on the host (numpy; `token_states` may be a `quantize_tokens` dict): each chunk of
  `chunk_size` pairs gathers its captions' words and its images' tokens there and sends only those to the
  device (the last chunk padded with empty pairs, so one compiled shape)."""
  text_rows, image_rows = np.asarray(text_rows, np.int64), np.asarray(image_rows, np.int64)
  if text_rows.shape != image_rows.shape or text_rows.ndim != 1:
    raise ValueError(f"score_pairs: text_rows {text_rows.shape} and image_rows {image_rows.shape} must be equal 1-D")
  words, wmask, tmask = np.asarray(word_states), np.asarray(word_mask), np.asarray(token_mask)
  out = np.empty(len(text_rows), np.float32)
  chunk_size = max(1, min(int(chunk_size), len(text_rows)))
  for a in range(0, len(text_rows), chunk_size):
    t, i = text_rows[a:a + chunk_size], image_rows[a:a + chunk_size]
    n = len(t)
    pad = chunk_size - n
    if pad:  # padded pairs reuse row 0 and are dropped below
      t, i = np.pad(t, (0, pad)), np.pad(i, (0, pad))
    s = _pairs_stored(words[t], wmask[t], _take_stored(token_states, i), tmask[i], normalize)
    out[a:a + n] = np.asarray(s)[:n]
  return out


def rescore_shortlist(word_states, word_mask, token_states, token_mask, shortlist, *, queries: str = "captions",
                      normalize: bool = False, chunk_size: int = 256) -> np.ndarray:
  """S_MrSw of each query's own shortlist, float32 [Q, k] (the first stage's order does not matter).

  queries="captions" (t2i): row q of `shortlist` [Q, k] holds gallery image indices and the query is
  caption q of `word_states`; "images" (i2t): row q holds caption indices and the query is image q of
  `token_states`. Pairs are scored `chunk_size` at a time (`score_pairs`)."""
  shortlist = np.asarray(shortlist, np.int64)
  q, k = shortlist.shape
  own = np.repeat(np.arange(q), k)
  if queries == "captions":
    text_rows, image_rows = own, shortlist.reshape(-1)
  elif queries == "images":
    text_rows, image_rows = shortlist.reshape(-1), own
  else:
    raise ValueError(f"rescore_shortlist: queries={queries!r}; expected 'captions' or 'images'")
  return score_pairs(word_states, word_mask, token_states, token_mask, text_rows, image_rows,
                     normalize=normalize, chunk_size=chunk_size).reshape(q, k)
