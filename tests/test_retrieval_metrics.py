"""Retrieval metrics: known answers on hand-built matrices, and agreement with a plain loop implementation.

Ranks are exact (comparisons of given scores). The metrics are float64 arithmetic on them: rule F64 of
tests/tolerances.py, with n the length of the mean (queries) plus the operations around it and the scale
of a percentage (100; 600 for rsum).
"""
import numpy as np
import pytest

from vldeformer_jax.retrieval import metrics
from tolerances import approx64


def pct(value, n):
  """A percentage (or rank) from a mean over n queries, by rule F64."""
  return approx64(value, n=n + 4, scale=100)


def reference_metrics(sim, txt2img):
  """Plain loops + stable argsort: the definition of docs/method.md §7.2, written independently of metrics.py."""
  n_img, n_txt = sim.shape
  i2t, ap = [], []
  for i in range(n_img):
    order = np.argsort(-sim[i], kind="stable")
    gt = [p for p, j in enumerate(order) if txt2img[j] == i]
    i2t.append(gt[0])
    r = len(gt)
    ap.append(sum((m + 1) / (p + 1) for m, p in enumerate(gt) if p < r) / r)
  t2i = []
  for j in range(n_txt):
    order = np.argsort(-sim[:, j], kind="stable")
    t2i.append(int(np.flatnonzero(order == txt2img[j])[0]))
  i2t, t2i = np.array(i2t), np.array(t2i)
  out = {}
  for name, r in (("i2t", i2t), ("t2i", t2i)):
    out[name] = {f"R@{k}": 100.0 * np.mean(r < k) for k in (1, 5, 10)}
    out[name]["medr"] = np.floor(np.median(r)) + 1
  out["rsum"] = sum(out[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  out["mAP@R"] = {"i2t": 100.0 * np.mean(ap), "t2i": 100.0 * np.mean(t2i == 0)}
  return out, i2t, t2i


def assert_same(got, ref, n):
  """Rule F64 for metrics over at most n queries of at most n ground-truth items each (AP sums R terms)."""
  for d in ("i2t", "t2i"):
    for k in ("R@1", "R@5", "R@10", "medr"):
      assert got[d][k] == pct(ref[d][k], n), (d, k)
  assert got["rsum"] == approx64(ref["rsum"], n=n + 10, scale=600)
  for d in ("i2t", "t2i"):
    assert got["mAP@R"][d] == pct(ref["mAP@R"][d], 3 * n), d


def test_hand_built_several_captions_per_image():
  # 3 images; captions 0,1 -> image 0; 2,3,4 -> image 1; 5 -> image 2.
  txt2img = np.array([0, 0, 1, 1, 1, 2])
  sim = np.array([
      [0.1, 0.9, 0.8, 0.2, 0.0, 0.3],  # image 0: sorted caps 1,2,5,3,0,4 -> first GT (cap 1) at 0
      [0.9, 0.1, 0.2, 0.5, 0.3, 0.4],  # image 1: sorted 0,3,5,4,2,1 -> first GT (cap 3) at 1
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # image 2: cap 5 last -> 5
  ])
  i2t, t2i, pos = metrics.ranks(sim, txt2img)
  np.testing.assert_array_equal(i2t, [0, 1, 5])
  # t2i: column 0 (image 0): scores .1 .9 .5 -> order 1,2,0 -> rank 2; col 1: .9,.1,.4 -> 0;
  # col 2 (image 1): .8,.2,.3 -> order 0,2,1 -> 2; col 3: .2,.5,.2 -> order 1,0,2 -> 0;
  # col 4: 0,.3,.1 -> order 1,2,0 -> 0; col 5 (image 2): .3,.4,0 -> order 1,0,2 -> 2.
  np.testing.assert_array_equal(t2i, [2, 0, 2, 0, 0, 2])
  m = metrics.retrieval_metrics(sim, txt2img)
  assert m["i2t"] == {"R@1": pct(100 / 3, 3), "R@5": pct(200 / 3, 3), "R@10": 100.0,
                      "medr": 2.0, "meanr": pct(1 + 2.0, 3)}
  assert m["t2i"]["R@1"] == pct(50.0, 6)
  assert m["t2i"]["R@5"] == 100.0
  assert m["t2i"]["medr"] == 2.0  # median of [2,0,2,0,0,2] = 1 -> floor(1) + 1
  # mAP@R, i2t: image 0 (R=2): GT at positions 0 and 4 -> (1/1) / 2 = 0.5.
  # image 1 (R=3): GT (caps 2,3,4) at positions 4, 1, 3 -> within top-3 only pos 1: (1/2) / 3 = 1/6.
  # image 2 (R=1): GT at 5 -> 0.
  assert m["mAP@R"]["i2t"] == pct(100 * (0.5 + 1 / 6 + 0) / 3, 3 * 3)
  assert m["mAP@R"]["t2i"] == pct(50.0, 6)
  assert m["rsum"] == approx64(100 / 3 + 200 / 3 + 100 + 50 + 100 + 100, n=6 + 10, scale=600)


def test_ties_broken_by_index():
  # Every score equal: stable descending order is the index order.
  txt2img = np.array([1, 0, 0, 1, 2, 2])
  sim = np.zeros((3, 6), np.float32)
  i2t, t2i, _ = metrics.ranks(sim, txt2img)
  np.testing.assert_array_equal(i2t, [1, 0, 4])  # first caption index of each image
  np.testing.assert_array_equal(t2i, txt2img)  # the image's own index
  # A tie at the top between a GT and a non-GT item: the lower index wins.
  sim = np.array([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1]] + [[0.0] * 6] * 2)
  i2t, _, _ = metrics.ranks(sim, txt2img)
  assert i2t[0] == 1  # caption 0 (image 1) ties with caption 1 (GT of image 0) and comes first
  sim[0, 0] = 0.4999
  assert metrics.ranks(sim, txt2img)[0][0] == 0


@pytest.mark.parametrize("seed,n_img,caps,quantise", [(0, 37, 5, False), (1, 50, 3, True), (2, 23, 1, True)])
def test_matches_loop_reference_on_random_data(seed, n_img, caps, quantise):
  rng = np.random.default_rng(seed)
  txt2img = np.repeat(np.arange(n_img), caps)
  rng.shuffle(txt2img)  # captions of an image need not be contiguous
  sim = rng.normal(size=(n_img, n_img * caps)).astype(np.float32)
  if quantise:  # many ties
    sim = np.round(sim, 0)
  sim[txt2img, np.arange(len(txt2img))] += 1.0  # make it a little better than chance
  got = metrics.retrieval_metrics(sim, txt2img)
  ref, i2t, t2i = reference_metrics(sim, txt2img)
  r_i2t, r_t2i, _ = metrics.ranks(sim, txt2img)
  np.testing.assert_array_equal(r_i2t, i2t)
  np.testing.assert_array_equal(r_t2i, t2i)
  assert_same(got, ref, n_img * caps)


def test_chunking_does_not_change_ranks(monkeypatch):
  rng = np.random.default_rng(3)
  txt2img = np.repeat(np.arange(40), 5)
  sim = np.round(rng.normal(size=(40, 200)), 1)
  full = metrics.ranks(sim, txt2img)
  monkeypatch.setattr(metrics, "_CHUNK_BYTES", 1000)  # chunks of a handful of queries
  small = metrics.ranks(sim, txt2img)
  for a, b in zip(full, small):
    np.testing.assert_array_equal(a, b)


def test_coco1k_folds_and_5k_known_answer():
  # 5000 images, 2 captions each (captions 2i, 2i+1 -> image i). Each image's own captions score 0.5;
  # one caption of image (i + 1000) % 5000 scores 1.0 for image i. Over all 5000 images every query has
  # exactly one wrong item above its GT (rank 1); inside a fold of 1000 consecutive images that item is
  # outside the fold, so every rank is 0.
  n = 5000
  txt2img = np.repeat(np.arange(n), 2)
  sim = np.zeros((n, 2 * n), np.float16)
  sim[txt2img, np.arange(2 * n)] = 0.5
  sim[np.arange(n), 2 * ((np.arange(n) + 1000) % n)] = 1.0
  m5 = metrics.protocol_metrics(sim, txt2img, "coco5k")
  assert m5["i2t"]["R@1"] == 0.0 and m5["i2t"]["R@5"] == 100.0 and m5["i2t"]["medr"] == 2.0
  # t2i: caption 2g is beaten by image g - 1000 (score 1.0); caption 2g+1 is not beaten by anything.
  assert m5["t2i"]["R@1"] == 50.0 and m5["t2i"]["R@5"] == 100.0
  assert m5["mAP@R"]["i2t"] == pct(100 * 0.5 * (1 / 2), 3 * n)  # GT at positions 1, 2; R = 2
  m1 = metrics.protocol_metrics(sim, txt2img, "coco1k")
  assert m1["num_folds"] == 5 and m1["num_images"] == 1000 and m1["num_captions"] == 2000
  for d in ("i2t", "t2i"):
    assert m1[d]["R@1"] == 100.0 and m1[d]["medr"] == 1.0
  assert m1["rsum"] == 600.0 and m1["mAP@R"]["i2t"] == 100.0


def test_coco1k_is_the_mean_of_independent_folds():
  rng = np.random.default_rng(4)
  n, fold = 30, 10
  txt2img = np.repeat(np.arange(n), 5)
  sim = rng.normal(size=(n, 5 * n))
  m = metrics.protocol_metrics(sim, txt2img, "coco1k", fold_size=fold)
  refs = []
  for f in range(3):
    rows = slice(f * fold, (f + 1) * fold)
    cols = slice(f * fold * 5, (f + 1) * fold * 5)
    refs.append(reference_metrics(sim[rows, cols], txt2img[cols] - f * fold)[0])
  mean = {d: {k: np.mean([r[d][k] for r in refs]) for k in refs[0][d]} for d in ("i2t", "t2i", "mAP@R")}
  mean["rsum"] = np.mean([r["rsum"] for r in refs])
  assert_same(m, mean, 5 * n)  # and the mean of 3 folds
  assert len(m["folds"]) == 3


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="txt2img has shape"):
    metrics.retrieval_metrics(np.zeros((2, 3)), [0, 1])
  with pytest.raises(ValueError, match=r"have no caption \(first indices: \[1\]\)"):
    metrics.retrieval_metrics(np.zeros((2, 3)), [0, 0, 0])
  with pytest.raises(ValueError, match="only 5"):
    metrics.protocol_metrics(np.zeros((5, 5)), np.arange(5), "coco1k")
  with pytest.raises(ValueError, match="unknown protocol"):
    metrics.protocol_metrics(np.zeros((5, 5)), np.arange(5), "coco2k")
