"""evaluate / evaluate_cross_encoder / re-ranking on a tiny exported model: the same numbers as a brute-force
computation written here (one forward per item or pair, float64 ranks by loops).

Tolerances (tests/tolerances.py): embeddings and scores by rule F32-PAIR (the library batches the same
float32 forward differently); rank metrics by its RANKS rule (`assert_rank_metrics_within`).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vldeformer_jax.io import export

from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import evaluate
from model_helpers import embed_depth, logit_bounds, match_depth, tiny_params
from tolerances import approx64, assert_f32, assert_rank_metrics_within, assert_within, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  img_feature_dim=12, max_text_len=12, max_regions=5)
WORDS = "a the dog cat car red blue green left right of above small big".split()
D = CFG.hidden_size
# Rule F32-PAIR bounds: a cosine of unit vectors whose both sides come from another program (Cauchy-Schwarz:
# sqrt(D) times an entry's bound per side, plus the dot product's rounding); the same embeddings' cosine in
# float32 against float64 (rule F32); a logit margin (two logits) from another program.
SIM_PAIR = 2 * np.sqrt(D) * 2 * gamma(embed_depth(CFG)) + gamma(D + 2)
SIM_OWN = gamma(D + 2)


def margin_pair_bound(params):
  return 2 * gamma(match_depth(CFG) + 1) * 2 * logit_bounds(params)[0]


def make_records(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image_id": 1000 + i,
           "features": rng.normal(size=(int(rng.integers(1, 8)), CFG.img_feature_dim)).astype(np.float32),
           "tags": " ".join(rng.choice(WORDS[2:5], 3)).encode(),
           "captions": [" ".join(rng.choice(WORDS, int(rng.integers(3, 14)))).encode()
                        for _ in range(int(rng.integers(1, 4)))]} for i in range(n)]


@pytest.fixture(scope="module")
def setup():
  enc = Encoder(CFG, tiny_params(CFG, 0), inputs.load_tokenizer(), batch_size=8)
  recs = make_records(9)
  return enc, recs


def brute(enc, recs):
  """Embeddings one item at a time through the model, float64 similarity, loop ranks."""
  model, params, tok = VLDeformer(CFG), enc.params, enc.tokenizer
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=VLDeformer.embed))
  img, txt, txt2img = [], [], []
  for i, r in enumerate(recs):
    x = inputs.image_inputs(tok, [r["features"]], [r["tags"].decode()], CFG.max_text_len, CFG.max_regions,
                            CFG.img_feature_dim)
    img.append(np.asarray(apply(params, x["input_ids"], x["token_type_ids"], x["attention_mask"],
                                x["img_feats"]))[0])
    for c in r["captions"]:
      t = inputs.text_inputs(tok, [c.decode()], CFG.max_text_len)
      txt.append(np.asarray(apply(params, t["input_ids"], t["token_type_ids"], t["attention_mask"]))[0])
      txt2img.append(i)
  img, txt = np.array(img, np.float64), np.array(txt, np.float64)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return img @ txt.T, np.array(txt2img), (img, txt)


def own_sim(result):
  """float64 cosines of the embeddings a library call returned (`return_embeddings=True`)."""
  img, txt, _ = result.pop("_embeddings")
  return np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T


def loop_metrics(sim, txt2img):
  i2t = [min(p for p, j in enumerate(np.argsort(-row, kind="stable")) if txt2img[j] == i)
         for i, row in enumerate(sim)]
  t2i = [int(np.flatnonzero(np.argsort(-sim[:, j], kind="stable") == txt2img[j])[0]) for j in range(sim.shape[1])]
  out = {}
  for name, r in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
    out[name] = {f"R@{k}": 100.0 * np.mean(r < k) for k in (1, 5, 10)}
    out[name]["medr"] = np.floor(np.median(r)) + 1
  return out


def assert_metrics_equal(got, ref):
  """Rule EXACT for rank metrics from the same ranks (the same float32 scores): the same formula."""
  for d in ("i2t", "t2i"):
    for k, v in ref[d].items():
      assert got[d][k] == v, (d, k, got[d][k], v)


def test_evaluate_equals_brute_force_and_is_the_same_on_8_devices(setup):
  enc, recs = setup
  sim, txt2img, (img64, txt64) = brute(enc, recs)
  got = evaluate.evaluate(enc, recs, progress=False, return_embeddings=True)
  img, txt, gallery = got["_embeddings"]
  np.testing.assert_array_equal(gallery.txt2img, txt2img)
  # Rule F32-PAIR: the batched embeddings are the one-at-a-time ones (unit vectors, scale 1).
  assert_f32(img, img64, n=embed_depth(CFG), scale=1.0, pair=True)
  assert_f32(txt, txt64, n=embed_depth(CFG), scale=1.0, pair=True)
  assert_within(img @ txt.T, sim, SIM_PAIR, rule="rule F32-PAIR (cosines)")
  # The metrics: of the library's own float32 cosines (bound SIM_OWN: exact where decided), and of the
  # brute-force ones (bound SIM_PAIR).
  assert_rank_metrics_within(got, own_sim(got), txt2img, SIM_OWN)
  assert_rank_metrics_within(got, sim, txt2img, SIM_PAIR)
  # This test's interval helper against the loops on the same scores (bound 0: exact ranks).
  assert_rank_metrics_within(loop_metrics(sim, txt2img), sim, txt2img, 0.0)
  assert got["num_images"] == 9 and got["num_captions"] == len(txt2img)
  # Rule F64: rsum is the sum of the six percentages.
  assert got["rsum"] == approx64(sum(got[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)), n=6, scale=600)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = evaluate.evaluate(enc, recs, mesh=mesh, progress=False, return_embeddings=True)
  assert_f32(sharded["_embeddings"][0], img64, n=embed_depth(CFG), scale=1.0, pair=True)
  assert_rank_metrics_within(sharded, own_sim(sharded), txt2img, SIM_OWN)
  assert_rank_metrics_within(sharded, sim, txt2img, SIM_PAIR)
  # A key list selects and orders images like the test_1k key file.
  keys = [recs[4]["image_id"], recs[1]["image_id"], recs[7]["image_id"]]
  sub = evaluate.evaluate(enc, recs, image_ids=keys, progress=False, return_embeddings=True)
  cols = [j for i in (4, 1, 7) for j in np.flatnonzero(txt2img == i)]
  sub_txt2img = np.array([{4: 0, 1: 1, 7: 2}[txt2img[j]] for j in cols])
  assert_rank_metrics_within(sub, own_sim(sub), sub_txt2img, SIM_OWN)
  assert_rank_metrics_within(sub, sim[np.ix_([4, 1, 7], cols)], sub_txt2img, SIM_PAIR)


def test_cross_encoder_and_reranking_equal_brute_force(setup):
  enc, recs = setup
  model, tok = VLDeformer(CFG), enc.tokenizer
  # the ranking score is the logit margin logit[1] - logit[0] (same order as softmax[1], no ties at 1.0)
  score = jax.jit(lambda p, x: (lambda l: l[:, 1] - l[:, 0])(model.apply(
      {"params": p}, x["input_ids"], x["token_type_ids"], x["attention_mask"], x["img_feats"],
      method=VLDeformer.match_logits)))
  caps = [c.decode() for r in recs for c in r["captions"]]
  txt2img = np.array([i for i, r in enumerate(recs) for _ in r["captions"]])
  ref = np.zeros((len(recs), len(caps)))
  for i, r in enumerate(recs):
    x = inputs.image_inputs(tok, [r["features"]], [r["tags"].decode()], CFG.max_text_len, CFG.max_regions,
                            CFG.img_feature_dim)
    for j, c in enumerate(caps):
      ref[i, j] = float(score(enc.params, inputs.pack_pairs(inputs.text_inputs(tok, [c], CFG.max_text_len), x))[0])
  got_scores, _, _ = evaluate.cross_encoder_scores(enc, recs, progress=False)
  # Rule F32-PAIR: the batched margins are the one-pair-at-a-time ones.
  margin_bound = margin_pair_bound(enc.params)
  assert_within(got_scores, ref, margin_bound, rule="rule F32-PAIR (logit margins)")
  cross = evaluate.evaluate_cross_encoder(enc, recs, progress=False)
  # Rule EXACT: the ranks of the same float32 scores (evaluate_cross_encoder runs cross_encoder_scores as
  # above); and against the one-at-a-time scores within their bound.
  assert_metrics_equal(cross, loop_metrics(got_scores.astype(np.float64), txt2img))
  assert_rank_metrics_within(cross, ref, txt2img, margin_bound)
  assert cross["model"] == "cross_encoder" and cross["timing"]["pairs"] == ref.size
  # Re-ranking every item = ranking by the cross-encoder (whose pairs it scores in batches of its own);
  # re-ranking the top-1 changes nothing (rule EXACT: the same embedding scores).
  full = evaluate.evaluate(enc, recs, rerank_top_k=len(caps), progress=False)
  assert_rank_metrics_within(full["reranked"], ref, txt2img, margin_bound)
  assert full["reranked"]["pairs_scored"] == len(recs) * len(caps) + len(caps) * len(recs)
  one = evaluate.evaluate(enc, recs, rerank_top_k=1, progress=False)
  assert_metrics_equal(one["reranked"], {d: one[d] for d in ("i2t", "t2i")})
  # Re-ranking the top-3: inside the shortlist the cross-encoder order, outside the embedding order. The
  # shortlists come from the library's own cosines, decided by more than their float32 rounding.
  part = evaluate.evaluate(enc, recs, rerank_top_k=3, progress=False, return_embeddings=True)
  sim = own_sim(part)
  for m in (sim, sim.T):
    third_fourth = -np.sort(-m, axis=1)[:, 2:4]
    assert np.all(third_fourth[:, 0] - third_fourth[:, 1] > 2 * SIM_OWN), "a shortlist is not decided"
  adj_i2t, adj_t2i = sim.copy(), sim.T.copy()
  for m, c in ((adj_i2t, ref), (adj_t2i, ref.T)):
    for q in range(len(m)):
      top = np.argsort(-m[q], kind="stable")[:3]
      m[q, top] = 10.0 + c[q, top]
  # Shortlisted scores (10 + margin) move by the margins' bound; the others stay below them.
  assert_rank_metrics_within(part["reranked"], adj_i2t, txt2img, margin_bound, sim_t2i=adj_t2i.T)


def test_protocol_all_and_bad_protocol(setup):
  enc, recs = setup
  out = evaluate.evaluate(enc, recs, protocol="all", fold_size=3, progress=False)
  folds = out["protocols"]["coco1k"]
  assert folds["num_folds"] == 3 and folds["num_images"] == 3
  with pytest.raises(ValueError, match="unknown protocol"):
    evaluate.evaluate(enc, recs, protocol="coco2k", progress=False)


def test_cli_writes_json_equal_to_library(tmp_path):
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.data import prepare
  cfg = CFG.replace(img_feature_dim=2054)
  export.write_export(str(tmp_path / "export"), tiny_params(cfg, 0), cfg, inputs.BUNDLED_VOCAB)
  name = demo.prepare_demo(str(tmp_path / "data"), seed=1, num_train=4, num_test=12)
  out = tmp_path / "res" / "eval.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  run = subprocess.run([sys.executable, "launch/evaluate.py", f"--export={tmp_path / 'export'}",
                        f"--data_dir={tmp_path / 'data'}", f"--dataset={name}", "--split=test", "--protocol=all",
                        "--rerank_top_k=2", "--cross_encoder", "--cross_max_images=4", "--batch_size=8",
                        f"--output={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "i2t R@1" in run.stdout and "re-ranked top-2" in run.stdout
  res = json.load(open(out))
  assert not [p for p in os.listdir(out.parent) if p != "eval.json"]  # no temporary left behind
  assert set(res) >= {"decomposed", "coco1k_keyfile", "cross_encoder", "decomposed_same_subset"}
  enc = Encoder.load(str(tmp_path / "export"), batch_size=8)
  lib = evaluate.evaluate(enc, prepare.load_split(str(tmp_path / "data"), name, "test"), progress=False,
                          return_embeddings=True)
  txt2img = lib["_embeddings"][2].txt2img
  # The CLI embeds on 2 devices: rule F32-PAIR for its cosines against the library's own (the CFG's depth;
  # the image feature width adds to the region projection).
  sim_pair = 2 * np.sqrt(D) * 2 * gamma(embed_depth(cfg) + cfg.img_feature_dim) + gamma(D + 2)
  assert_rank_metrics_within(res["decomposed"], own_sim(lib), txt2img, sim_pair)
  assert res["decomposed"]["num_images"] == 12 and res["cross_encoder"]["num_images"] == 4
  assert res["coco1k_keyfile"]["num_images"] == 12  # the demo's key file lists every test image
  bad = subprocess.run([sys.executable, "launch/evaluate.py", f"--export={tmp_path / 'nope'}",
                        f"--data_dir={tmp_path / 'data'}", f"--dataset={name}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "export directory not found" in bad.stderr


def test_timing_compare_is_consistent(setup, tmp_path):
  from vldeformer_jax.retrieval import timing
  enc, recs = setup
  res = timing.compare(enc, recs, sample_pairs=40, gallery_sizes=(4, 9), reference_size=(60, 300))
  dec, cross = res["split"]["decomposed"], res["split"]["cross_encoder"]
  n_txt = sum(len(r["captions"]) for r in recs)
  assert dec["num_images"] == 9 and dec["num_captions"] == n_txt and not dec["extrapolated"]
  # Rule F64: float64 arithmetic on the measured seconds, recomputed here by another grouping (n: the
  # operations on both sides, scale: the magnitude of the terms).
  parts = dec["encode_images_s"] + dec["encode_captions_s"] + dec["search_s"]
  assert dec["total_s"] == approx64(parts, n=4, scale=parts)
  assert cross["extrapolated"] and cross["sample_pairs"] == 40
  extrapolated = cross["measured_s"] / 40 * 9 * n_txt
  assert cross["total_s"] == approx64(extrapolated, n=8, scale=extrapolated)
  ratio = cross["total_s"] / dec["total_s"]
  assert res["split"]["speedup"] == approx64(ratio, n=2, scale=ratio)
  coco = res["coco5k"]
  assert (coco["num_images"], coco["num_captions"]) == (60, 300)  # COCO-5K size (5000, 25000) by default
  assert res["speedup_gallery"] == "60 images x 300 captions" and res["speedup"] == coco["speedup"]
  pairs_s = cross["per_pair_s"] * 60 * 300
  assert coco["cross_encoder_s"] == approx64(pairs_s, n=8, scale=pairs_s)
  dec_s = dec["per_image_s"] * 60 + dec["per_caption_s"] * 300 + coco["decomposed_search_s"]
  assert coco["decomposed_s"] == approx64(dec_s, n=12, scale=dec_s)
  assert [r["num_images"] for r in res["vs_gallery_size"]] == [4, 9]
  assert [r["num_captions"] for r in res["vs_gallery_size"]] == [20, 45]
  timing.plot_vs_gallery_size(res, str(tmp_path / "t.png"))
  assert open(tmp_path / "t.png", "rb").read(4) == b"\x89PNG"
