"""Bi-modal hard negatives (docs/method.md §5): a word-replaced caption and a region/tag-mixed image.

The released VLDeformer code builds these in `NegativeRetrievalDataset` but never trains on them; this
project composes them in the input pipeline, next to each positive pair. Differences from the reference,
on purpose: no spaCy. An "object word" is a caption word found in the dataset's tag vocabulary (the set of
words of the detector tags over the training split), which is the label set the reference drew its
replacements from, so a replaced word is always another detector label.

Everything here is pure numpy and deterministic given a `numpy.random.Generator`: the pipeline seeds one
per (seed, epoch, image), so the negatives do not depend on the process count or on the worker count.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np

_TOKEN_RE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)
CACHE_FORMAT = "vldeformer_jax.tag_vocabulary"


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def tag_words(tags) -> list[str]:
  """The lower-cased words of a tag string (detector class names joined by spaces), in order."""
  return _as_str(tags).lower().split()


class TagVocabulary:
  """The sorted words of the detector tags of a split, with an O(1) membership test and word index."""

  def __init__(self, words: Iterable[str]):
    self.words: tuple[str, ...] = tuple(sorted({_as_str(w).lower() for w in words if _as_str(w).strip()}))
    if not self.words:
      raise ValueError("tag vocabulary is empty: the dataset's records have no tag words")
    self._index = {w: i for i, w in enumerate(self.words)}

  def __len__(self) -> int:
    return len(self.words)

  def __contains__(self, word: str) -> bool:
    return word in self._index

  def index(self, word: str) -> int:
    return self._index[word]

  def __eq__(self, other) -> bool:
    return isinstance(other, TagVocabulary) and self.words == other.words

  def __repr__(self) -> str:
    return f"TagVocabulary({len(self.words)} words)"


def as_vocabulary(vocabulary: TagVocabulary | Sequence[str]) -> TagVocabulary:
  return vocabulary if isinstance(vocabulary, TagVocabulary) else TagVocabulary(vocabulary)


def build_tag_vocabulary(source, *, cache_path: str | None = None, progress: bool = True) -> TagVocabulary:
  """Scans the `tags` of every record of `source` (random access: `len`, `[i]`) for its tag words.

  Reading a VinVL split means reading every record's region features too, so with `cache_path` the
  result is stored as JSON (written to a temporary sibling, then renamed) and read back on the next call
  when its record count matches the source.
  """
  n = len(source)
  if cache_path and os.path.exists(cache_path):
    with open(cache_path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("format") != CACHE_FORMAT or "words" not in cached:
      raise ValueError(f"{cache_path}: not a tag vocabulary cache (expected format {CACHE_FORMAT!r})")
    if cached.get("num_records") == n:
      return TagVocabulary(cached["words"])
  words = set()
  indices = range(n)
  if progress:
    from tqdm import tqdm
    indices = tqdm(indices, desc="tag vocabulary", unit="rec", mininterval=2.0)
  for i in indices:
    record = source[i]
    if "tags" not in record:
      raise KeyError(f"record {i} of the source has no 'tags' field (fields: {sorted(record)})")
    words.update(tag_words(record["tags"]))
  vocabulary = TagVocabulary(words)
  if cache_path:
    directory = os.path.dirname(os.path.abspath(cache_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tag_vocabulary.", dir=directory)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": CACHE_FORMAT, "num_records": n, "words": list(vocabulary.words)}, f)
      os.replace(tmp, cache_path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  return vocabulary


def _split_token(token: str) -> tuple[str, str, str]:
  """'(dog),' -> ('(', 'dog', '),'): leading punctuation, the word, trailing punctuation."""
  lead, core, trail = _TOKEN_RE.match(token).groups()
  return lead, core, trail


def _other_word(vocabulary: TagVocabulary, word: str, rng: np.random.Generator) -> str:
  """A uniformly drawn vocabulary word different from `word`."""
  if word in vocabulary:
    if len(vocabulary) < 2:
      raise ValueError(f"tag vocabulary has the single word {word!r}: no different word to replace it with")
    j = int(rng.integers(len(vocabulary) - 1))
    return vocabulary.words[j + (j >= vocabulary.index(word))]
  return vocabulary.words[int(rng.integers(len(vocabulary)))]


def negative_caption(caption, tag_vocabulary: TagVocabulary | Sequence[str], rng: np.random.Generator,
                     replace_ratio: float = 0.3) -> str:
  """The caption with ceil(ratio * #object words) (at least 1) of its object words replaced.

  Words are the whitespace-separated tokens; an object word is one whose letters (lower-cased, leading and
  trailing punctuation set aside) are in the tag vocabulary. Each chosen word is replaced by a different
  vocabulary word, its punctuation kept. A caption without object words gets the same number of random
  word positions replaced. Words are re-joined with single spaces, as in the reference.
  """
  if not 0.0 <= replace_ratio <= 1.0:
    raise ValueError(f"replace_ratio must be in [0, 1], got {replace_ratio}")
  vocabulary = as_vocabulary(tag_vocabulary)
  tokens = [_split_token(t) for t in _as_str(caption).split()]
  candidates = [i for i, (_, core, _) in enumerate(tokens) if core.lower() in vocabulary]
  if not candidates:
    candidates = [i for i, (_, core, _) in enumerate(tokens) if core]
  if not candidates:  # nothing word-like to replace: the negative is one random label
    return vocabulary.words[int(rng.integers(len(vocabulary)))]
  count = min(len(candidates), max(1, math.ceil(replace_ratio * len(candidates))))
  chosen = rng.choice(len(candidates), size=count, replace=False)
  for c in sorted(int(c) for c in chosen):
    i = candidates[c]
    lead, core, trail = tokens[i]
    tokens[i] = (lead, _other_word(vocabulary, core.lower(), rng), trail)
  return " ".join(lead + core + trail for lead, core, trail in tokens)


def _random_half(n: int, rng: np.random.Generator) -> np.ndarray:
  """floor(n/2) distinct indices of range(n), in increasing order."""
  return np.sort(rng.choice(n, size=n // 2, replace=False)) if n >= 2 else np.zeros((0,), np.int64)


def negative_image(features_a: np.ndarray, tags_a, features_b: np.ndarray, tags_b,
                   rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """A composed image: a random floor(n/2) of a's regions then a random floor(m/2) of b's, and the same
  mix of the two tag word lists. Region rows are copied unchanged and keep their order within each image.

  Returns (features [floor(n/2) + floor(m/2), F] float32, tags as one space-joined string).
  """
  features_a = np.asarray(features_a, np.float32)
  features_b = np.asarray(features_b, np.float32)
  if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
    raise ValueError(f"negative_image: region features must be [n, F] and [m, F] with the same F, got "
                     f"{features_a.shape} and {features_b.shape}")
  rows_a, rows_b, tags = negative_image_rows(len(features_a), tags_a, len(features_b), tags_b, rng)
  features = np.concatenate([features_a[rows_a], features_b[rows_b]], axis=0)
  return features, tags


def negative_image_rows(n: int, tags_a, m: int, tags_b, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, str]:
  """What `negative_image` draws, without touching the features: (rows of a, rows of b, tags), so a
  caller can copy the rows straight into its batch (data/pipeline.py). Same draws, same order."""
  rows_a = _random_half(n, rng)
  rows_b = _random_half(m, rng)
  words_a, words_b = tag_words(tags_a), tag_words(tags_b)
  keep_a = _random_half(len(words_a), rng)
  keep_b = _random_half(len(words_b), rng)
  return rows_a, rows_b, " ".join([words_a[i] for i in keep_a] + [words_b[i] for i in keep_b])


def draw_other_index(rng: np.random.Generator, num_images: int, exclude: int) -> int:
  """A uniformly drawn image index in [0, num_images) other than `exclude`."""
  if num_images < 2:
    raise ValueError(f"hard negatives need at least 2 images to mix, the source has {num_images}")
  j = int(rng.integers(num_images - 1))
  return j + (j >= exclude)
