"""Bi-modal hard negatives (docs/method.md §5): what a composed caption and a composed image may contain."""
import json
import math

import numpy as np
import pytest

from vldeformer_jax.data import negatives

VOCAB = negatives.TagVocabulary(["man", "dog", "tree", "car", "shirt", "table", "traffic", "light"])


def _split(text):
  return [negatives._split_token(t) for t in text.split()]


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_caption_changes_only_object_words_into_other_vocabulary_words(ratio):
  caption = "A Man, with a dog near the (tree) and a traffic light."
  src = _split(caption)
  objects = [i for i, (_, core, _) in enumerate(src) if core.lower() in VOCAB]
  assert len(objects) == 5
  want = max(1, math.ceil(ratio * len(objects)))
  outputs = set()
  for seed in range(40):
    out = negatives.negative_caption(caption, VOCAB, np.random.default_rng(seed), ratio)
    outputs.add(out)
    neg = _split(out)
    assert len(neg) == len(src)
    diff = [i for i, (a, b) in enumerate(zip(src, neg)) if a != b]
    assert len(diff) == want and set(diff) <= set(objects)
    for i in diff:
      (lead_a, core_a, trail_a), (lead_b, core_b, trail_b) = src[i], neg[i]
      assert (lead_a, trail_a) == (lead_b, trail_b)  # punctuation kept
      assert core_b in VOCAB and core_b != core_a.lower()
    assert out == negatives.negative_caption(caption, VOCAB, np.random.default_rng(seed), ratio)
  assert len(outputs) > 10  # the rng picks both the positions and the words


def test_caption_without_object_words_replaces_random_positions():
  caption = "a photo of something nice over there"
  seen_positions = set()
  for seed in range(30):
    neg = negatives.negative_caption(caption, VOCAB, np.random.default_rng(seed), 0.3).split()
    diff = [i for i, (a, b) in enumerate(zip(caption.split(), neg)) if a != b]
    assert len(neg) == 7 and len(diff) == math.ceil(0.3 * 7)
    assert all(neg[i] in VOCAB for i in diff)
    seen_positions.update(diff)
  assert seen_positions == set(range(7))


def test_caption_known_answers_and_bytes():
  two = negatives.TagVocabulary(["cat", "dog"])
  for seed in range(5):
    assert negatives.negative_caption(b"the dog", two, np.random.default_rng(seed)) == "the cat"
    assert negatives.negative_caption("the Dog.", two, np.random.default_rng(seed), 1.0) == "the cat."
  # Every other vocabulary word is a possible replacement.
  words = {negatives.negative_caption("dog", VOCAB, np.random.default_rng(s)) for s in range(200)}
  assert words == set(VOCAB.words) - {"dog"}
  with pytest.raises(ValueError, match="single word 'dog'"):
    negatives.negative_caption("a dog", negatives.TagVocabulary(["dog"]), np.random.default_rng(0))
  with pytest.raises(ValueError, match="replace_ratio"):
    negatives.negative_caption("a dog", VOCAB, np.random.default_rng(0), 1.5)


@pytest.mark.parametrize("n, m", [(7, 4), (1, 5), (2, 2), (6, 0)])
def test_image_takes_half_of_each_image_as_exact_rows(n, m):
  rng = np.random.default_rng(n * 10 + m)
  a = rng.normal(size=(n, 5)).astype(np.float32)
  b = rng.normal(size=(m, 5)).astype(np.float32)
  tags_a, tags_b = "man dog tree car shirt", b"table light traffic"
  seen = set()
  for seed in range(20):
    feats, tags = negatives.negative_image(a, tags_a, b, tags_b, np.random.default_rng(seed))
    assert feats.shape == (n // 2 + m // 2, 5) and feats.dtype == np.float32
    rows_a = [int(np.flatnonzero((a == r).all(axis=1))[0]) for r in feats[:n // 2]]
    rows_b = [int(np.flatnonzero((b == r).all(axis=1))[0]) for r in feats[n // 2:]]
    assert rows_a == sorted(set(rows_a)) and rows_b == sorted(set(rows_b))  # distinct, in source order
    np.testing.assert_array_equal(feats, np.concatenate([a[rows_a], b[rows_b]]))
    seen.add(tuple(rows_a))
    words = tags.split()
    assert len(words) == 5 // 2 + 3 // 2
    wa, wb = words[:2], words[2:]
    assert wa == [w for w in tags_a.split() if w in wa] and wb[0] in tags_b.decode().split()
    assert negatives.negative_image(a, tags_a, b, tags_b, np.random.default_rng(seed))[1] == tags
  if n >= 4:
    assert len(seen) > 1  # a random half, not a fixed one


def test_draw_other_index_is_never_the_positive_and_covers_the_rest():
  rng = np.random.default_rng(0)
  draws = [negatives.draw_other_index(rng, 6, 2) for _ in range(300)]
  assert set(draws) == {0, 1, 3, 4, 5}
  with pytest.raises(ValueError, match="at least 2 images"):
    negatives.draw_other_index(rng, 1, 0)


class _Records:
  def __init__(self, tags):
    self.tags, self.reads = tags, 0

  def __len__(self):
    return len(self.tags)

  def __getitem__(self, i):
    self.reads += 1
    return {"tags": self.tags[i]}


def test_tag_vocabulary_scan_and_cache(tmp_path):
  source = _Records([b"Man dog", "dog traffic light", b""])
  path = tmp_path / "sub" / "vocab.json"
  vocab = negatives.build_tag_vocabulary(source, cache_path=str(path), progress=False)
  assert vocab.words == ("dog", "light", "man", "traffic") and source.reads == 3
  assert json.loads(path.read_text())["words"] == list(vocab.words)
  assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temporary left behind
  again = negatives.build_tag_vocabulary(source, cache_path=str(path), progress=False)
  assert again == vocab and source.reads == 3  # read from the cache
  bigger = _Records([b"Man dog", "dog traffic light", b"", "cat"])
  assert "cat" in negatives.build_tag_vocabulary(bigger, cache_path=str(path), progress=False)
  path.write_text("{}")
  with pytest.raises(ValueError, match="vocab.json: not a tag vocabulary cache"):
    negatives.build_tag_vocabulary(source, cache_path=str(path), progress=False)
  with pytest.raises(KeyError, match="record 0 of the source has no 'tags' field"):
    negatives.build_tag_vocabulary([{"captions": []}], progress=False)
