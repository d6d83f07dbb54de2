"""Label-based mAP (retrieval/label_metrics.py) against hand-computed values and sklearn."""
import numpy as np
import pytest

from vldeformer_jax.retrieval import label_metrics as lm


def test_average_precisions_hand_computed():
  # One query, relevant at ranks 1, 3, 5 of 5: P@1 = 1, P@3 = 2/3, P@5 = 3/5.
  scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
  rel = np.array([[1, 0, 1, 0, 1]], bool)
  ap = lm.average_precisions(scores, rel, ks=(1, 2, 3, 10))
  assert ap["all"][0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)  # 34/45
  assert ap["R"][0] == pytest.approx((1 + 2 / 3) / 3)  # R = 3: hits at 1 and 3
  assert ap[1][0] == pytest.approx(1.0)
  assert ap[2][0] == pytest.approx(1.0)  # one relevant in the top 2, P@1 = 1
  assert ap[3][0] == pytest.approx((1 + 2 / 3) / 2)
  assert ap[10][0] == pytest.approx(ap["all"][0])  # K beyond N = all
  assert ap["num_relevant"][0] == 3


def test_ties_lower_index_first_and_queries_without_relevant():
  scores = np.array([[0.5, 0.5], [0.5, 0.5], [0.3, 0.1]])
  rel = np.array([[0, 1], [1, 0], [0, 0]], bool)
  ap = lm.average_precisions(scores, rel, ks=(1,))
  assert ap["all"][0] == pytest.approx(0.5)  # the tie puts index 0 (irrelevant) first
  assert ap["all"][1] == pytest.approx(1.0)
  assert ap[1][0] == 0.0 and ap[1][1] == 1.0
  assert np.isnan(ap["all"][2])  # no relevant item: left out of the mean


def test_label_map_metrics_both_directions_hand_computed():
  labels, vocab = lm.label_matrix([lm.labels_from_tags(b"dog dog"), lm.labels_from_tags("cat")])
  assert vocab == ["cat", "dog"] and labels.tolist() == [[False, True], [True, False]]
  txt2img = [0, 0, 1]
  sim = np.array([[0.9, 0.1, 0.8],
                  [0.2, 0.3, 0.1]])
  m = lm.label_map_metrics(sim, labels, txt2img, ks=(1,))
  # i2t: image 0 ranks c0(rel) c2 c1(rel) -> AP 5/6, AP@R (R=2) 1/2, AP@1 1; image 1 ranks c1 c0 c2(rel) -> 1/3, 0, 0
  assert m["label_mAP@all"]["i2t"] == pytest.approx(100 * (5 / 6 + 1 / 3) / 2)
  assert m["label_mAP@R"]["i2t"] == pytest.approx(100 * (1 / 2 + 0) / 2)
  assert m["label_mAP@1"]["i2t"] == pytest.approx(50.0)
  # t2i: c0 -> img0 first (AP 1), c1 (dog) -> img1 first (AP 1/2), c2 (cat) -> img0 first (AP 1/2)
  assert m["label_mAP@all"]["t2i"] == pytest.approx(100 * 2 / 3)
  assert m["label_mAP@R"]["t2i"] == pytest.approx(100 / 3)
  assert m["queries_without_relevant"] == {"i2t": 0, "t2i": 0}
  assert m["num_labels"] == 2


def test_map_all_agrees_with_sklearn_without_ties():
  skm = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  scores = rng.standard_normal((20, 40))  # continuous: no ties
  rel = rng.random((20, 40)) < 0.3
  rel[:, 0] = True  # every query has a relevant item
  ap = lm.average_precisions(scores, rel)
  want = [skm.average_precision_score(rel[q], scores[q]) for q in range(len(rel))]
  np.testing.assert_allclose(ap["all"], want, rtol=1e-12)
  # and through label_map_metrics: labels -> relevance, i2t over the full matrix
  labels = rng.random((12, 4)) < 0.4
  labels[:, 0] |= ~labels.any(1)
  txt2img = np.repeat(np.arange(12), 3)
  sim = rng.standard_normal((12, 36))
  m = lm.label_map_metrics(sim, labels, txt2img)
  rel_i2t = (labels.astype(int) @ labels[txt2img].T.astype(int)) > 0
  want_i2t = np.mean([skm.average_precision_score(rel_i2t[q], sim[q]) for q in range(12)])
  assert m["label_mAP@all"]["i2t"] == pytest.approx(100 * want_i2t)
  want_t2i = np.mean([skm.average_precision_score(rel_i2t.T[c], sim[:, c]) for c in range(36)])
  assert m["label_mAP@all"]["t2i"] == pytest.approx(100 * want_t2i)


def test_bad_shapes_refused():
  with pytest.raises(ValueError):
    lm.average_precisions(np.zeros((2, 3)), np.zeros((2, 2), bool))
  with pytest.raises(ValueError):
    lm.label_map_metrics(np.zeros((2, 3)), np.zeros((3, 1), bool), [0, 0, 1])
  with pytest.raises(KeyError):
    lm.label_matrix([{"a"}], vocabulary=["b"])
