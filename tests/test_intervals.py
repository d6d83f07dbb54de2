"""Intervals and the demo's look-alike measurement, against hand-computed values."""
import math

import numpy as np
import pytest

from vldeformer_jax.demo import evaluation
from vldeformer_jax.retrieval import intervals, metrics


def test_fold_interval_is_the_student_t_interval():
  values = [1.0, 2.0, 3.0, 0.5, 1.5]
  out = intervals.fold_interval(values)
  sd = math.sqrt(sum((v - 1.6) ** 2 for v in values) / 4)  # sample sd, by hand
  half = 2.776 * sd / math.sqrt(5)  # t_{0.975, 4}
  assert out["mean"] == pytest.approx(1.6) and out["sd"] == pytest.approx(sd)
  assert out["ci95"] == pytest.approx([1.6 - half, 1.6 + half]) and out["n"] == 5
  assert intervals.t_quantile_975(1) == 12.706 and intervals.t_quantile_975(100) == 1.96
  with pytest.raises(ValueError):
    intervals.fold_interval([1.0])


def test_bootstrap_value_matches_the_metrics_and_pairs_cancel():
  rng = np.random.default_rng(0)
  sim = rng.normal(size=(40, 200))
  txt2img = np.repeat(np.arange(40), 5)
  sim[txt2img, np.arange(200)] += 1.5
  ranks = metrics.ranks(sim, txt2img)[:2]
  rsum = metrics.retrieval_metrics(sim, txt2img)["rsum"]
  one = intervals.bootstrap_avg_recall(ranks, txt2img, num_samples=200, seed=3)
  assert one["value"] == pytest.approx(rsum / 6)
  assert one["ci95"][0] < one["value"] < one["ci95"][1]
  assert one == intervals.bootstrap_avg_recall(ranks, txt2img, num_samples=200, seed=3)  # seeded
  same = intervals.bootstrap_avg_recall(ranks, txt2img, baseline=ranks, num_samples=50)
  assert same["value"] == 0.0 and same["ci95"] == [0.0, 0.0] and "paired" in same["method"]
  perfect = (np.zeros(40, np.int64), np.zeros(200, np.int64))
  assert intervals.bootstrap_avg_recall(perfect, txt2img, num_samples=20)["ci95"] == [100.0, 100.0]
  # One image (and its captions) always missed at R@1 only: a paired difference of exactly that image's share.
  worse = (np.where(np.arange(40) == 0, 3, 0), np.where(txt2img == 0, 3, 0))
  d = intervals.bootstrap_avg_recall(perfect, txt2img, baseline=worse, num_samples=200)
  assert d["value"] == pytest.approx((100 / 40 + 100 / 40) / 6)  # i2t R@1 and t2i R@1 each lose 1/40


def test_fine_grained_accuracy_by_hand():
  # 3 images x 4 captions; images 0 and 1 are siblings (same classes). Caption 1 (image 1) scores its
  # sibling (image 0) higher than its own image: beaten by a sibling, but above the other class set.
  sim = np.array([[0.9, 0.8, 0.5, 0.2],
                  [0.6, 0.7, 0.1, 0.0],
                  [0.1, 0.2, 0.3, 0.9]], np.float32)
  txt2img = np.array([0, 1, 2, 2])
  groups = np.array([0, 0, 1])
  out = evaluation.fine_grained_accuracy(sim, txt2img, groups)
  assert out == {"above_every_sibling": 50.0, "above_every_other_class_set": 100.0, "captions_with_siblings": 2}
  scenes = {"7": [{"class": "dog"}, {"class": "cat"}], "8": [{"class": "cat"}, {"class": "dog"}],
            "9": [{"class": "dog"}]}

  class G:
    image_ids = np.array([7, 8, 9])
  assert evaluation.class_set_groups(G, scenes).tolist() == [0, 0, 1]


def test_drop_over_folds():
  def m(v):
    return {"i2t": {"R@1": v, "R@5": v, "R@10": v}, "t2i": {"R@1": v, "R@5": v, "R@10": v}}
  out = evaluation.drop_over_folds([m(90), m(80), m(85)], [m(89), m(78), m(85)])
  assert out["per_fold"] == [1.0, 2.0, 0.0] and out["mean"] == pytest.approx(1.0) and out["n"] == 3
