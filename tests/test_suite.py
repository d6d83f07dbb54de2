"""The evaluation suite (retrieval/suite.py, launch/evaluate.py --suite): the suite file, the re-rank depth
guard, per-dataset numbers equal to `evaluate` + `label_map_metrics`, determinism, the launcher."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vldeformer_jax.io import export
from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import evaluate, label_metrics, suite
from vldeformer_jax.retrieval.encoder import Encoder
from model_helpers import tiny_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  img_feature_dim=12, max_text_len=12, max_regions=5)
WORDS = "a the dog cat car red blue green left right of above small big".split()


def records(n, seed, objects):
  rng = np.random.default_rng(seed)
  return [{"image_id": 1000 + i,
           "features": rng.normal(size=(1 if objects else 3, CFG.img_feature_dim)).astype(np.float32),
           "tags": " ".join(rng.choice(WORDS[2:5], 1 if objects else 2)).encode(),
           "captions": [" ".join(rng.choice(WORDS, 5)).encode() for _ in range(2)]} for i in range(n)]


DATA = {"scene_a": records(7, 0, False), "scene_b": records(5, 1, False), "objs": records(6, 2, True)}
SUITE = {"label_map_ks": [3], "datasets": [
    {"name": "scene_a", "data_dir": "d", "tag": "scene"}, {"name": "scene_b", "data_dir": "d", "tag": "scene"},
    {"name": "objs", "data_dir": "d", "tag": "object", "label": "objects"}]}


def fake_load_split(data_dir, name, split):
  assert split == "test"
  return DATA[name]


def test_load_suite_defaults_and_refusals(tmp_path):
  path = tmp_path / "s.json"
  path.write_text(json.dumps(SUITE))
  s = suite.load_suite(str(path))
  assert s["protocol"] == "full" and s["rerank_top_k"] == 0 and s["datasets"][0]["split"] == "test"
  assert s["datasets"][0]["data_dir"] == str(tmp_path / "d")  # relative to the suite file
  assert [d["label"] for d in s["datasets"]] == ["scene_a/test", "scene_b/test", "objects"]
  (tmp_path / "s.yaml").write_text("datasets:\n  - {name: x, data_dir: /data, tag: object}\n")
  assert suite.load_suite(str(tmp_path / "s.yaml"))["datasets"][0]["tag"] == "object"
  bad = [({"datasets": []}, "non-empty"), ({"datasets": [{"name": "x", "data_dir": "d", "tag": "both"}]}, "tag"),
         ({"datasets": [{"name": "x", "data_dir": "d"}]}, "needs"), ({**SUITE, "ks": 1}, "unknown keys"),
         ({"datasets": [{"name": "x", "data_dir": "d", "tag": "scene"}] * 2}, "used twice"),
         ({**SUITE, "protocol": "coco2k"}, "protocol")]
  for s, match in bad:
    with pytest.raises(ValueError, match=match):
      suite.load_suite(s)


def test_rerank_depth_guard():
  suite.check_rerank_depth(0)
  suite.check_rerank_depth(10)
  suite.check_rerank_depth(50)
  with pytest.raises(suite.RerankDepthError, match=r"re-rank depth 5 is smaller than the largest K reported \(R@10\)"):
    suite.check_rerank_depth(5)
  enc = Encoder(CFG, tiny_params(CFG, 0), inputs.load_tokenizer(), batch_size=8)
  with pytest.raises(suite.RerankDepthError):  # before any dataset is read
    suite.evaluate_suite(enc, {**SUITE, "rerank_top_k": 9}, load_split=None)


def test_suite_equals_evaluate_plus_label_map_and_is_deterministic():
  enc = Encoder(CFG, tiny_params(CFG, 0), inputs.load_tokenizer(), batch_size=8)
  res = suite.evaluate_suite(enc, SUITE, load_split=fake_load_split)
  again = suite.evaluate_suite(enc, SUITE, load_split=fake_load_split)
  assert json.dumps(res, sort_keys=True) == json.dumps(again, sort_keys=True)
  assert list(res["datasets"]) == ["scene_a/test", "scene_b/test", "objects"]
  for label, name in (("scene_a/test", "scene_a"), ("objects", "objs")):
    direct = evaluate.evaluate(enc, DATA[name], progress=False, return_embeddings=True)
    img, txt, gallery = direct["_embeddings"]
    got = res["datasets"][label]
    assert got["i2t"] == direct["i2t"] and got["t2i"] == direct["t2i"] and got["rsum"] == direct["rsum"]
    assert "timing" not in got
    labels, _ = label_metrics.label_matrix([label_metrics.labels_from_tags(r["tags"]) for r in DATA[name]])
    want = label_metrics.label_map_metrics(evaluate.similarity(img, txt), labels, gallery.txt2img, ks=[3])
    assert {k: got["label_map"][k] for k in want} == want
  scene = [res["datasets"][k] for k in ("scene_a/test", "scene_b/test")]
  assert res["by_tag"]["scene"]["rsum"] == pytest.approx(np.mean([m["rsum"] for m in scene]))
  assert res["by_tag"]["scene"]["num_datasets"] == 2 and res["by_tag"]["object"]["num_datasets"] == 1
  assert res["by_tag"]["object"]["label_mAP@all i2t"] == res["datasets"]["objects"]["label_map"]["label_mAP@all"]["i2t"]
  table = suite.format_suite_table(res)
  assert "mean scene (2)" in table and "objects" in table and len(table.splitlines()) == 2 + 3 + 2


def test_rerank_score_and_weight_from_the_suite_or_its_overrides():
  assert suite.load_suite(SUITE)["rerank_score"] == "cross"
  s = suite.load_suite({**SUITE, "rerank_score": "mixed"},
                       {"rerank_top_k": 10, "rerank_weight": 0.25, "rerank_score": None})  # None: the file's
  assert (s["rerank_top_k"], s["rerank_score"], s["rerank_weight"]) == (10, "mixed", 0.25)
  with pytest.raises(ValueError, match="unknown rerank_score 'bm25'"):
    suite.load_suite(SUITE, {"rerank_score": "bm25"})
  with pytest.raises(ValueError, match="rerank_weight must be a number, got 'half'"):
    suite.load_suite({**SUITE, "rerank_weight": "half"})
  enc = Encoder(CFG, tiny_params(CFG, 0), inputs.load_tokenizer(), batch_size=8)
  for score in ("decomposed", "late"):
    res = suite.evaluate_suite(enc, {**SUITE, "rerank_top_k": 10, "rerank_score": score}, load_split=fake_load_split)
    assert res["rerank_score"] == score and "rerank_weight" not in res
    direct = evaluate.evaluate(enc, DATA["objs"], rerank_top_k=10, rerank_score=score, progress=False)
    got = res["datasets"]["objects"]["reranked"]
    assert got["rerank_score"] == score
    assert {k: got[k] for k in ("i2t", "t2i", "rsum")} == {k: direct["reranked"][k] for k in ("i2t", "t2i", "rsum")}


def test_run_suite_refuses_an_untrained_head_only_for_the_scores_that_use_it(tmp_path, monkeypatch):
  from vldeformer_jax.data import prepare
  from vldeformer_jax.io.export import UntrainedHeadError
  export.write_export(str(tmp_path / "raw"), tiny_params(CFG, 0), CFG, inputs.BUNDLED_VOCAB,
                      metadata={"untrained": ["classifier/kernel", "classifier/bias"]})
  monkeypatch.setattr(prepare, "load_split", fake_load_split)
  for score in ("cross", "mixed"):
    with pytest.raises(UntrainedHeadError):
      suite.run_suite(str(tmp_path / "raw"), SUITE, rerank_top_k=10, rerank_score=score, progress=False)
  res = suite.run_suite(str(tmp_path / "raw"), SUITE, rerank_top_k=10, rerank_score="late", progress=False)
  assert res["rerank_score"] == "late" and res["datasets"]["objects"]["reranked"]["rerank_score"] == "late"


def test_launcher_suite_run_and_depth_refusal(tmp_path):
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.data import object_demo
  cfg = CFG.replace(img_feature_dim=demo.FEATURE_DIM)
  export.write_export(str(tmp_path / "export"), tiny_params(cfg, 0), cfg, inputs.BUNDLED_VOCAB)
  data = str(tmp_path / "data")
  demo.prepare_demo(data, seed=1, num_train=2, num_test=6)
  object_demo.prepare_object_demo(data, seed=1, num_train=2, num_test=6)
  path = tmp_path / "suite.json"
  path.write_text(json.dumps({"datasets": [
      {"name": demo.DEMO_NAME, "data_dir": "data", "tag": "scene"},
      {"name": object_demo.OBJECT_DEMO_NAME, "data_dir": "data", "tag": "object"}]}))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  refused = subprocess.run([sys.executable, "launch/evaluate.py", f"--export={tmp_path / 'no_export'}",
                            f"--suite={path}", "--rerank_top_k=5"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert refused.stderr.strip().splitlines() == [
      "error: re-rank depth 5 is smaller than the largest K reported (R@10): a re-ranked R@10 would mix "
      "re-ranked and unre-ranked positions; use rerank_top_k >= 10 or 0"]
  one_dataset = subprocess.run([sys.executable, "launch/evaluate.py", f"--export={tmp_path / 'export'}",
                                f"--suite={path}", "--protocol=coco1k", "--split=val"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
  assert one_dataset.returncode == 2 and one_dataset.stderr.strip().splitlines()[-1] == (
      "usage error: --split, --protocol: not with --suite (the suite file sets them)"), one_dataset.stderr[-2000:]
  out = tmp_path / "res" / "suite.json"
  run = subprocess.run([sys.executable, "launch/evaluate.py", f"--export={tmp_path / 'export'}", f"--suite={path}",
                        "--batch_size=8", f"--output={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.load(open(out))
  assert sorted(os.listdir(out.parent)) == ["suite.json", "suite.txt"]
  assert open(out.parent / "suite.txt").read().strip() == suite.format_suite_table(res)
  assert set(res["by_tag"]) == {"scene", "object"} and res["model"] == "export"
  assert res["datasets"][f"{object_demo.OBJECT_DEMO_NAME}/test"]["num_images"] == 6
  assert "mean object (1)" in run.stdout


def test_the_demo_suite_file_loads():
  s = suite.load_suite(os.path.join(ROOT, "configs", "suite_demo.json"))
  assert [d["tag"] for d in s["datasets"]] == ["scene", "object"]
  assert s["datasets"][0]["data_dir"] == os.path.join(ROOT, "runs", "demo", "data")
