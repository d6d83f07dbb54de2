"""The topic target of Patel et al. (ICMR 2019), docs/method.md §4.10: per image, the normalised bag of
the class words its captions name.

Patel et al. train the image side to predict the topic distribution (LDA) of the text around the image:
a target that a wrong or loose caption perturbs only in part, unlike the one-positive contrastive
pairing. Here the topics are the detector's class words: the topic vocabulary is the tag vocabulary of
the training split (data/negatives.py `build_tag_vocabulary`, whose cache the hard negatives share), and an
image's target is the histogram of those words over all its captions, divided by its sum. Why not the
tags themselves: the tags are an input of the image branch (docs/method.md §3.2), so predicting them would
be copying, and they do not depend on the text at all; the captions' class words are what the text says
the image is about. Why not LDA / NMF: the demo's captions name classes, colours, sizes and relations, and
the class words are the topics a fitted model would find, without its seed and its number of topics.

An image whose captions name no topic word gets an all-zero row; the loss leaves such rows out.
The batch keys: `image_topic_target` [B, V] float32 and the topic words as text-branch inputs,
`topic_word_input_ids` / `_token_type_ids` / `_attention_mask` [B, V, L] int32 (the same [V, L] rows
repeated per batch row, so they split over the batch axes like every batch key; the loss reads row 0).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

TARGET_KEY = "image_topic_target"
WORD_PREFIX = "topic_word_"
_WORD = re.compile(r"[a-z0-9]+")


def caption_words(caption) -> list[str]:
  """The lower-cased alphanumeric words of a caption (bytes or str), in order."""
  text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
  return _WORD.findall(text.lower())


def topic_targets(captions_per_image: Sequence[Sequence], words: Sequence[str]) -> np.ndarray:
  """[N, V] float32: row i = counts of each topic word over image i's captions, divided by their sum
  (all zeros when the captions name none)."""
  index = {w: j for j, w in enumerate(words)}
  counts = np.zeros((len(captions_per_image), len(words)), np.float64)
  for i, captions in enumerate(captions_per_image):
    for caption in captions:
      for w in caption_words(caption):
        j = index.get(w)
        if j is not None:
          counts[i, j] += 1
  total = counts.sum(axis=1, keepdims=True)
  return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0).astype(np.float32)


class TopicTargets:
  """The pipeline's topic option (data/pipeline.py `topics=`): the topic words and, per batch, the targets
  of the batch's images plus the words' text inputs. Picklable (grain workers)."""

  def __init__(self, words: Sequence[str]):
    self.words = tuple(words)
    if not self.words:
      raise ValueError("topic vocabulary is empty: the training split's records have no tag words")
    self._word_inputs = None

  def __getstate__(self):
    return dict(self.__dict__, _word_inputs=None)

  def __len__(self) -> int:
    return len(self.words)

  def batch(self, captions_per_image: Sequence[Sequence], wordpieces, max_len: int) -> dict[str, np.ndarray]:
    """`image_topic_target` [B, V] and `topic_word_*` [B, V, L]; `wordpieces`: the pipeline's
    data/wordpieces.py tokenizer (each word as a one-word caption, `[CLS] word [SEP]`)."""
    if self._word_inputs is None:
      self._word_inputs = wordpieces.segments(list(self.words), max_len, token_type=0)
    b = len(captions_per_image)
    out = {TARGET_KEY: topic_targets(captions_per_image, self.words)}
    for k, v in self._word_inputs.items():
      out[f"{WORD_PREFIX}{k}"] = np.broadcast_to(v[None], (b,) + v.shape).copy()
    return out
