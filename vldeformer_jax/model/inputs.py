"""Model inputs: tokenisation and padding of docs/method.md §3, and the packing of early-interaction pairs.

A caption becomes `[CLS] wordpieces [SEP]` (token_type 0) padded to `max_text_len`; an image becomes
`[CLS] tag-wordpieces [SEP]` (token_type 1 on the real tokens, 0 on pads) padded to `max_tag_len` (docs/method.md §3.2:
both 35; `ModelConfig.tag_len`),
followed by its first `max_regions` region vectors, zero-padded; its attention mask covers the tag tokens
then the regions. The decomposed model embeds each alone; the early-interaction model reads
`[CLS] caption [SEP] tags [SEP]` + regions, which `pack_pairs` builds on device from the same two pieces,
so any caption can be paired with any image without tokenising again.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BUNDLED_VOCAB = os.path.join(os.path.dirname(__file__), "assets", "bert-base-uncased-vocab.txt")

TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask")
IMAGE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "img_feats")


@functools.lru_cache(maxsize=8)
def load_tokenizer(vocab_file: str | None = None):
  """A lower-casing BERT wordpiece tokenizer from a vocab.txt (default: the bundled bert-base-uncased one)."""
  from transformers import BertTokenizerFast  # the tokenizer is all this project takes from transformers
  vocab_file = vocab_file or BUNDLED_VOCAB
  if os.path.isdir(vocab_file):
    vocab_file = os.path.join(vocab_file, "vocab.txt")
  if not os.path.isfile(vocab_file):
    raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_file}")
  # transformers 5 silently ignores `vocab_file=`: pass the vocabulary itself as a dict.
  with open(vocab_file, encoding="utf-8") as f:
    vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
  return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tokenize_segments(tokenizer, texts: Sequence[str], max_len: int, token_type: int) -> dict[str, np.ndarray]:
  """`[CLS] text [SEP]` for each text, truncated to `max_len - 2` wordpieces and padded with [PAD] to
  `max_len`. token_type is `token_type` on [CLS]..[SEP] and 0 on pads; the mask is 1 on real tokens."""
  texts = [_as_str(t) for t in texts]
  wordpieces = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
  n = len(texts)
  ids = np.zeros((n, max_len), np.int32)
  mask = np.zeros((n, max_len), np.int32)
  for i, wp in enumerate(wordpieces):
    row = [tokenizer.cls_token_id] + list(wp[:max_len - 2]) + [tokenizer.sep_token_id]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return {"input_ids": ids, "token_type_ids": mask * token_type, "attention_mask": mask}


def pad_regions(region_features: Sequence[np.ndarray], max_regions: int, feature_dim: int):
  """Keeps the first `max_regions` rows of each [n_i, F] array, zero-pads: (feats [N, R, F], mask [N, R])."""
  n = len(region_features)
  feats = np.zeros((n, max_regions, feature_dim), np.float32)
  mask = np.zeros((n, max_regions), np.int32)
  for i, f in enumerate(region_features):
    f = np.asarray(f, np.float32)
    if f.ndim != 2 or f.shape[1] != feature_dim:
      raise ValueError(f"image {i}: region features have shape {f.shape}, expected [n, {feature_dim}]")
    k = min(len(f), max_regions)
    feats[i, :k] = f[:k]
    mask[i, :k] = 1
  return feats, mask


def text_inputs(tokenizer, captions: Sequence[str], max_text_len: int) -> dict[str, np.ndarray]:
  """Caption-branch inputs: input_ids, token_type_ids (0), attention_mask, each [N, max_text_len]."""
  return tokenize_segments(tokenizer, captions, max_text_len, token_type=0)


def image_inputs(tokenizer, region_features: Sequence[np.ndarray], tags: Sequence[str], max_tag_len: int,
                 max_regions: int, feature_dim: int) -> dict[str, np.ndarray]:
  """Image-branch inputs: tag tokens [N, L_g] (token_type 1), attention_mask [N, L_g + R], img_feats."""
  if len(region_features) != len(tags):
    raise ValueError(f"{len(region_features)} region feature arrays but {len(tags)} tag strings")
  seg = tokenize_segments(tokenizer, tags, max_tag_len, token_type=1)
  feats, region_mask = pad_regions(region_features, max_regions, feature_dim)
  return {
      "input_ids": seg["input_ids"],
      "token_type_ids": seg["token_type_ids"],
      "attention_mask": np.concatenate([seg["attention_mask"], region_mask], axis=1),
      "img_feats": feats,
  }


def pack_pairs(text: dict, image: dict) -> dict:
  """Early-interaction inputs `[CLS] caption [SEP] tags [SEP]` + regions from the two decomposed pieces.

  `text` and `image` are dicts as `text_inputs` / `image_inputs` return (numpy or jax arrays), row i of
  each forming pair i. The tag segment's own [CLS] is dropped and its tokens are shifted left to follow
  the caption, so the packed tokens are contiguous with positions 0..n-1 (as in VinVL), token_type 0 on
  the caption and 1 on the tags. Token length: L_t + L_g - 1 (`ModelConfig.packed_len`); the region part
  is unchanged. Traceable.
  """
  t_ids, t_type, t_mask = text["input_ids"], text["token_type_ids"], text["attention_mask"]
  lt, lg = t_ids.shape[1], image["input_ids"].shape[1]
  g_ids = image["input_ids"][:, 1:]
  g_type = image["token_type_ids"][:, 1:]
  g_mask = image["attention_mask"][:, 1:lg]
  region_mask = image["attention_mask"][:, lg:]
  out_len = lt + lg - 1
  n_text = jnp.sum(t_mask, axis=1, keepdims=True)  # real caption tokens, [CLS] and [SEP] included
  pos = jnp.arange(out_len)[None, :]
  from_tags = pos >= n_text
  tag_pos = jnp.clip(pos - n_text, 0, lg - 2)
  text_pos = jnp.clip(pos, 0, lt - 1)

  def pick(a_text, a_tags):
    a_text = jnp.take_along_axis(jnp.asarray(a_text), jnp.broadcast_to(text_pos, from_tags.shape), axis=1)
    a_tags = jnp.take_along_axis(jnp.asarray(a_tags), tag_pos, axis=1)
    return jnp.where(from_tags, a_tags, a_text)

  tag_valid = (pos - n_text) < (lg - 1)
  mask = jnp.where(tag_valid, pick(t_mask, g_mask), 0)
  return {
      "input_ids": jnp.where(mask > 0, pick(t_ids, g_ids), 0).astype(jnp.int32),
      "token_type_ids": jnp.where(mask > 0, pick(t_type, g_type), 0).astype(jnp.int32),
      "attention_mask": jnp.concatenate([mask.astype(jnp.int32), jnp.asarray(region_mask, jnp.int32)], axis=1),
      "img_feats": image["img_feats"],
  }


pack_pairs_jit = jax.jit(pack_pairs)
