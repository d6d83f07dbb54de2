"""Re-ranking scores (retrieval/rerank.py) through `evaluate` on a tiny random model: `decomposed` keeps the
first stage's order, `mixed` at weight 0 / 1 is the pure margin / cosine, `cross` uses the cross-encoder it
is given, `late` ranks each shortlist by MrSw of the encoder's token states.

Tolerances (tests/tolerances.py): rule EXACT where both sides rank identical float32 scores; rule RANKS
(`assert_rank_metrics_within`) against scores recomputed elsewhere, with the F32-PAIR bound of those scores.
"""
import numpy as np
import pytest

from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval import evaluate
from vldeformer_jax.retrieval import late_interaction as li
from vldeformer_jax.retrieval import rerank
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval.gallery import load_gallery
from model_helpers import logit_bounds, match_depth, tiny_params
from tolerances import assert_bitwise, assert_rank_metrics_within, gamma, U32
from test_evaluate import CFG, make_records


@pytest.fixture(scope="module")
def setup():
  tok = inputs.load_tokenizer()
  enc = Encoder(CFG, tiny_params(CFG, 0), tok, batch_size=8, progress=False)
  other = Encoder(CFG, tiny_params(CFG, 1), tok, batch_size=8, progress=False)  # another cross-encoder
  recs = make_records(9)
  return enc, other, recs


def metrics_of(result):
  return {d: result[d] for d in ("i2t", "t2i", "rsum", "mAP@R")}


def test_mixed_scores_endpoints_and_scale():
  rng = np.random.default_rng(0)
  cos = rng.uniform(-1, 1, (7, 5)).astype(np.float32)
  margin = (20 * rng.normal(size=(7, 5))).astype(np.float32)
  assert_bitwise(rerank.mixed_scores(cos, margin, 0.0), margin)  # rule EXACT: 0 * x + 1 * m = m
  c = np.std(margin.astype(np.float64)) / np.std(cos.astype(np.float64))
  for w in (0.3, 1.0):
    ref = w * c * cos.astype(np.float64) + (1 - w) * margin.astype(np.float64)
    # Rule F32 (as F64's formula with u = 2^-24): the float32 c (1 rounding), c * cos, w * (.), (1 - w), its
    # product and the sum: 6 roundings of terms at most |w c cos| + |(1 - w) m|.
    bound = 6 * U32 / (1 - 6 * U32) * (w * c * np.abs(cos) + (1 - w) * np.abs(margin))
    got = rerank.mixed_scores(cos, margin, w)
    assert np.all(np.abs(got - ref) <= bound)
  with pytest.raises(ValueError, match="outside"):
    rerank.mixed_scores(cos, margin, 1.5)


def test_rerank_scores_in_evaluate(setup):
  enc, other, recs = setup
  k = 4
  run = lambda **kw: evaluate.evaluate(enc, recs, rerank_top_k=k, progress=False, return_embeddings=True, **kw)  # noqa: E731
  base = run(rerank_score="decomposed")
  # `decomposed` re-scores the shortlist by the cosines that chose it: the first stage's ranks, rule EXACT.
  assert metrics_of(base["reranked"]) == metrics_of(base)
  assert base["reranked"]["timing"]["score_s"] == 0.0 and base["reranked"]["pairs_scored"] == 9 * k + len(base["_embeddings"][1]) * k
  # `mixed` at weight 0 is the margin bit for bit: the same re-ranked metrics as `cross` (rule EXACT).
  cross = run(rerank_score="cross", cross_encoder=other)
  mixed0 = run(rerank_score="mixed", rerank_weight=0.0, cross_encoder=other)
  assert metrics_of(mixed0["reranked"]) == metrics_of(cross["reranked"])
  # At weight 1 it is c times the cosine, c > 0: the cosines' order wherever neighbouring shortlisted
  # cosines differ by more than the product's rounding (2 u relative), checked here; then rule EXACT.
  img, txt, _ = base["_embeddings"]
  sim = img @ txt.T
  for m in (sim, sim.T):
    s = np.sort(np.take_along_axis(m, rerank.top_k_rows(m, k), 1), axis=1)
    assert np.all(np.diff(s, axis=1) > 4 * U32 * np.abs(s[:, 1:])), "shortlisted cosines too close to decide"
  mixed1 = run(rerank_score="mixed", rerank_weight=1.0, cross_encoder=other)
  assert metrics_of(mixed1["reranked"]) == metrics_of(base)
  assert mixed1["reranked"]["rerank_weight"] == 1.0 and mixed1["reranked"]["rerank_score"] == "mixed"
  # `cross` with every item in the shortlist ranks by the given cross-encoder's margins (not `enc`'s):
  # against `other`'s margins of every pair, within their F32-PAIR bound (rule RANKS).
  everything = evaluate.evaluate(enc, recs, rerank_top_k=100, progress=False, rerank_score="cross",
                                 cross_encoder=other)
  margins, gallery, _ = evaluate.cross_encoder_scores(other, recs, progress=False)
  bound = 2 * gamma(match_depth(CFG) + 1) * 2 * logit_bounds(other.params)[0]
  assert_rank_metrics_within(everything["reranked"], margins, gallery.txt2img, bound)
  own, _, _ = evaluate.cross_encoder_scores(enc, recs, progress=False)
  assert np.any(np.argsort(-own, 1)[:, 0] != np.argsort(-margins, 1)[:, 0])  # the two heads do differ


@pytest.mark.parametrize("score", ["late", "late_normalized"])
def test_late_rerank_ranks_the_shortlist_by_mrsw(setup, score):
  enc, _, recs = setup
  gallery = load_gallery(recs)
  (words, w_mask), (toks, t_mask) = rerank.gallery_token_states(enc, gallery, progress=False)
  assert words.shape[0] == len(gallery.captions) and toks.shape[0] == 9
  full = np.asarray(li.mrsw_scores(words, w_mask, toks, t_mask, normalize=score == "late_normalized"),
                    np.float64).T  # [N_img, N_txt]
  out = evaluate.evaluate(enc, recs, rerank_top_k=100, progress=False, rerank_score=score)
  # Every item shortlisted: the ranks are those of MrSw on the same token states, up to the re-scorer's
  # own float32 rounding of each score (rule F32-PAIR of tests/test_late_interaction.py's chain, scale: the
  # longest caption's word count), rule RANKS.
  n = 2 * (CFG.hidden_size + 8 + 2) + CFG.hidden_size + CFG.max_text_len + 1
  bound = 2 * gamma(n) * (1.0 if score == "late_normalized" else float(w_mask.sum(1).max()))
  assert_rank_metrics_within(out["reranked"], full, gallery.txt2img, bound)
  assert out["reranked"]["timing"]["token_states_s"] > 0 and out["reranked"]["rerank_score"] == score
  # A shallow shortlist re-ranks inside it only: R@1 and everything below the depth come from MrSw, the
  # rest keep the decomposed order; here the depth-1 shortlist cannot change anything (rule EXACT).
  one = evaluate.evaluate(enc, recs, rerank_top_k=1, progress=False, rerank_score=score)
  assert metrics_of(one["reranked"]) == metrics_of(one)


def test_rerank_refuses_unknown_score(setup):
  enc, _, recs = setup
  with pytest.raises(ValueError, match="unknown re-rank score"):
    evaluate.evaluate(enc, recs, rerank_top_k=2, progress=False, rerank_score="bm25")


def test_run_evaluation_rerank_export(tmp_path):
  """`launch/evaluate.py --rerank_score --rerank_weight --rerank_export` (run_evaluation): the re-ranking
  pairs are scored by the other export; `mixed` at weight 0 is its `cross` (rule EXACT, same scores)."""
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.io import export
  from vldeformer_jax.io.export import UntrainedHeadError
  cfg = CFG.replace(img_feature_dim=2054)
  for name, seed in (("dec", 0), ("cross", 1)):
    export.write_export(str(tmp_path / name), tiny_params(cfg, seed), cfg, inputs.BUNDLED_VOCAB)
  data = demo.prepare_demo(str(tmp_path / "data"), seed=1, num_train=2, num_test=6)
  run = lambda **kw: evaluate.run_evaluation(str(tmp_path / "dec"), str(tmp_path / "data"), data,  # noqa: E731
                                             use_mesh=False, batch_size=8, rerank_top_k=3, **kw)["decomposed"]
  by_other = run(rerank_score="cross", rerank_export=str(tmp_path / "cross"))
  mixed0 = run(rerank_score="mixed", rerank_weight=0.0, rerank_export=str(tmp_path / "cross"),
               output=str(tmp_path / "mixed.json"))
  assert mixed0["reranked"]["rerank_weight"] == 0.0 and (tmp_path / "mixed.json").exists()
  metrics = ("i2t", "t2i", "rsum", "mAP@R")
  assert {m: mixed0["reranked"][m] for m in metrics} == {m: by_other["reranked"][m] for m in metrics}
  # The pairs are scored by --rerank_export: one whose match head was never trained is refused, although
  # the evaluated export's head is fine; `late` needs no head at all.
  export.write_export(str(tmp_path / "raw"), tiny_params(cfg, 2), cfg, inputs.BUNDLED_VOCAB,
                      metadata={"untrained": ["classifier/kernel", "classifier/bias"]})
  with pytest.raises(UntrainedHeadError):
    run(rerank_score="cross", rerank_export=str(tmp_path / "raw"))
  late = run(rerank_score="late", rerank_export=str(tmp_path / "raw"))
  assert late["reranked"]["rerank_score"] == "late" and "token_states_s" in late["reranked"]["timing"]
