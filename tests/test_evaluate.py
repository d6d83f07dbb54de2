"""evaluate / evaluate_cross_encoder / re-ranking on a tiny exported model: the same numbers as a brute-force
computation written here (one forward per item or pair, float64 ranks by loops)."""
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
from model_helpers import tiny_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  img_feature_dim=12, max_text_len=12, max_regions=5)
WORDS = "a the dog cat car red blue green left right of above small big".split()


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
  return img @ txt.T, np.array(txt2img)


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
  for d in ("i2t", "t2i"):
    for k, v in ref[d].items():
      assert got[d][k] == pytest.approx(v, abs=1e-9), (d, k, got[d][k], v)


def test_evaluate_equals_brute_force_and_is_the_same_on_8_devices(setup):
  enc, recs = setup
  sim, txt2img = brute(enc, recs)
  got = evaluate.evaluate(enc, recs, progress=False, return_embeddings=True)
  img, txt, gallery = got.pop("_embeddings")
  np.testing.assert_array_equal(gallery.txt2img, txt2img)
  np.testing.assert_allclose(img @ txt.T, sim, atol=1e-5)
  ref = loop_metrics(sim, txt2img)
  assert_metrics_equal(got, ref)
  assert got["num_images"] == 9 and got["num_captions"] == len(txt2img)
  assert got["rsum"] == pytest.approx(sum(ref[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = evaluate.evaluate(enc, recs, mesh=mesh, progress=False)
  assert_metrics_equal(sharded, ref)
  assert sharded["mAP@R"] == pytest.approx(got["mAP@R"])
  # A key list selects and orders images like the test_1k key file.
  keys = [recs[4]["image_id"], recs[1]["image_id"], recs[7]["image_id"]]
  sub = evaluate.evaluate(enc, recs, image_ids=keys, progress=False)
  cols = [j for i in (4, 1, 7) for j in np.flatnonzero(txt2img == i)]
  ref_sub = loop_metrics(sim[np.ix_([4, 1, 7], cols)], np.array([{4: 0, 1: 1, 7: 2}[txt2img[j]] for j in cols]))
  assert_metrics_equal(sub, ref_sub)


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
  np.testing.assert_allclose(got_scores, ref, atol=1e-5)
  cross = evaluate.evaluate_cross_encoder(enc, recs, progress=False)
  assert_metrics_equal(cross, loop_metrics(ref, txt2img))
  assert cross["model"] == "cross_encoder" and cross["timing"]["pairs"] == ref.size
  # Re-ranking every item = ranking by the cross-encoder; re-ranking the top-1 changes nothing.
  full = evaluate.evaluate(enc, recs, rerank_top_k=len(caps), progress=False)
  assert_metrics_equal(full["reranked"], loop_metrics(ref, txt2img))
  assert full["reranked"]["pairs_scored"] == len(recs) * len(caps) + len(caps) * len(recs)
  one = evaluate.evaluate(enc, recs, rerank_top_k=1, progress=False)
  assert_metrics_equal(one["reranked"], {d: one[d] for d in ("i2t", "t2i")})
  # Re-ranking the top-3: inside the shortlist the cross-encoder order, outside the embedding order.
  sim, _ = brute(enc, recs)
  part = evaluate.evaluate(enc, recs, rerank_top_k=3, progress=False)
  adj_i2t, adj_t2i = sim.copy(), sim.T.copy()
  for m, c in ((adj_i2t, ref), (adj_t2i, ref.T)):
    for q in range(len(m)):
      top = np.argsort(-m[q], kind="stable")[:3]
      m[q, top] = 10.0 + c[q, top]
  ref_part = {"i2t": loop_metrics(adj_i2t, txt2img)["i2t"], "t2i": loop_metrics(adj_t2i.T, txt2img)["t2i"]}
  assert_metrics_equal(part["reranked"], ref_part)


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
  lib = evaluate.evaluate(enc, prepare.load_split(str(tmp_path / "data"), name, "test"), progress=False)
  assert_metrics_equal(res["decomposed"], lib)
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
  assert dec["total_s"] == pytest.approx(dec["encode_images_s"] + dec["encode_captions_s"] + dec["search_s"])
  assert cross["extrapolated"] and cross["sample_pairs"] == 40
  assert cross["total_s"] == pytest.approx(cross["measured_s"] / 40 * 9 * n_txt)
  assert res["split"]["speedup"] == pytest.approx(cross["total_s"] / dec["total_s"])
  coco = res["coco5k"]
  assert (coco["num_images"], coco["num_captions"]) == (60, 300)  # COCO-5K size (5000, 25000) by default
  assert res["speedup_gallery"] == "60 images x 300 captions" and res["speedup"] == coco["speedup"]
  assert coco["cross_encoder_s"] == pytest.approx(cross["per_pair_s"] * 60 * 300)
  assert coco["decomposed_s"] == pytest.approx(dec["per_image_s"] * 60 + dec["per_caption_s"] * 300
                                               + coco["decomposed_search_s"])
  assert [r["num_images"] for r in res["vs_gallery_size"]] == [4, 9]
  assert [r["num_captions"] for r in res["vs_gallery_size"]] == [20, 45]
  timing.plot_vs_gallery_size(res, str(tmp_path / "t.png"))
  assert open(tmp_path / "t.png", "rb").read(4) == b"\x89PNG"
