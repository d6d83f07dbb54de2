"""Caption and tag tokenisation for the input pipeline, from a per-word wordpiece cache.

Why: the pipeline tokenises every caption and tag string of every batch, twice with hard negatives (the
composed caption and tags are new strings each time), and the tokenizer call was a quarter of the
pipeline's time at the VinVL shape (BENCHMARKS.md table 6). The strings are made of few distinct words
(a dataset's vocabulary), so each word's wordpieces are looked up in a dict filled on first sight.

Exactness: BERT's uncased tokenizer normalises (clean control characters, lower-case, strip accents,
space out CJK characters), splits on whitespace and punctuation, then runs WordPiece on each piece; for
text of printable ASCII characters (0x20-0x7e) nothing crosses a space, so the wordpieces of the text are
the concatenation of those of its space-separated words. Texts with any other character go to the
tokenizer whole. The result equals `model.inputs.tokenize_segments` byte for byte (tests/test_wordpieces.py).
"""
from __future__ import annotations

import re
import threading
from typing import Sequence

import numpy as np

_PLAIN = re.compile(r"[\x20-\x7e]*\Z")
TOKENIZER_LOCK = threading.Lock()  # HF fast tokenizers are not safe to share between threads (tokenizers#537)
_MAX_CACHED_WORDS = 1 << 20


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class WordpieceTokenizer:
  """`segments(texts, max_len, token_type)`: `[CLS] wordpieces [SEP]` padded rows, as
  `inputs.tokenize_segments`, with per-word wordpieces cached. Picklable (the cache is not shipped)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._words: dict[str, tuple[int, ...]] = {}

  def __getstate__(self):
    return {"tokenizer": self.tokenizer, "_words": {}}

  def _encode(self, texts: list[str]) -> list[list[int]]:
    if not texts:
      return []
    with TOKENIZER_LOCK:
      return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

  def wordpieces(self, texts: Sequence) -> list[list[int]]:
    """The wordpiece ids of each text, no special tokens."""
    texts = [_as_str(t) for t in texts]
    words = self._words
    out: list[list[int] | None] = [None] * len(texts)
    whole, missing = [], set()
    for i, text in enumerate(texts):
      if _PLAIN.match(text):
        for w in text.split(" "):
          if w and w not in words:
            missing.add(w)
      else:
        whole.append(i)
    if missing:
      missing = sorted(missing)
      if len(words) + len(missing) > _MAX_CACHED_WORDS:  # a new dict: other threads keep reading theirs
        self._words = words = {}
      words.update(zip(missing, map(tuple, self._encode(missing))))
    for i, ids in zip(whole, self._encode([texts[i] for i in whole])):
      out[i] = list(ids)
    for i, text in enumerate(texts):
      if out[i] is None:
        row = []
        for w in text.split(" "):
          if w:
            row.extend(words[w])
        out[i] = row
    return out

  def segments(self, texts: Sequence, max_len: int, token_type: int) -> dict[str, np.ndarray]:
    pieces = self.wordpieces(texts)
    n = len(pieces)
    ids = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), np.int32)
    cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
    for i, wp in enumerate(pieces):
      row = [cls] + wp[:max_len - 2] + [sep]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return {"input_ids": ids, "token_type_ids": mask * token_type, "attention_mask": mask}
