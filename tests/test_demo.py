"""The whole demo on tiny sizes: data, stage 1, stage 2, an ablation, evaluation, timing, report; then a
second run that reuses everything."""
import json
import os

import numpy as np
import pytest


from repo_configs import config_module  # noqa: E402

tiny = config_module("tiny")
from vldeformer_jax.demo import job as demo  # noqa: E402
from vldeformer_jax.demo import evaluation
from model_helpers import embed_depth
from tolerances import approx64, assert_rank_metrics_within, gamma


def tiny_configs():
  s1 = tiny.get_config("early_interaction")
  s2 = tiny.get_config()
  s2.data.negatives.num_per_pair = 1
  for c in (s1, s2):
    c.data.generate_num_train = 32
    c.data.generate_num_test = 12
    c.train.global_batch_size = 8
    c.train.num_steps = 3
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.train.async_checkpoints = False
  return s1, s2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  plan = demo.DemoPlan(corpus_images=64, downstream_train=32, downstream_test=20, folds=2, fold_images=4,
                       rerank_top_k=2, eval_batch_size=16, ablations=("ablation_stage1_no_negatives", "ablation_random"),
                       stage2_num_steps=None, stage2_global_batch_size=None, stage1_num_steps=None,
                       gallery_sizes=(4, 50, 500), timing_pairs=10_000, bootstrap_samples=50,
                       code_bits=16, code_steps=20, progress=False)
  s1, s2 = tiny_configs()
  out = demo.run_demo(workdir, s1, s2, plan)
  return workdir, plan, out


def _results(workdir, name):
  with open(os.path.join(workdir, "results", f"{name}.json")) as f:
    return json.load(f)


def test_report_holds_the_comparison(demo_run):
  workdir, plan, out = demo_run
  for name in ("report.json", "report.md", "curves.png", "recall.png", "timing.png", "retrieval.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "report.json")) as f:
    rep = json.load(f)
  assert rep == json.loads(json.dumps(out))
  # Two disjoint folds of 4 test images, each with its 20 captions: every pair scored by the cross-encoder.
  assert rep["cross_encoder_pairs"] == 2 * 4 * 20
  assert rep["data"]["pretraining_corpus"]["images"] == 64 and rep["data"]["downstream"]["train_images"] == 32
  assert rep["data"]["downstream"]["test_images"] == 20
  cross = [_results(workdir, f"cross_encoder_fold{f}") for f in range(2)]
  dec = _results(workdir, "stage2")["folds"]
  drops = [evaluation.avg_recall(c) - evaluation.avg_recall(d) for c, d in zip(cross, dec)]
  drop = rep["avg_recall_drop"]
  # Rule F64 (tests/tolerances.py): the report's float64 arithmetic on the same percentages.
  assert drop["per_fold"] == approx64(drops, n=16, scale=100) and drop["mean"] == approx64(sum(drops) / 2, n=20,
                                                                                           scale=100)
  assert drop["n"] == 2 and drop["ci95"][0] <= drop["mean"] <= drop["ci95"][1]
  assert (cross[0]["num_images"], cross[0]["num_captions"]) == (4, 20) == (dec[1]["num_images"], dec[1]["num_captions"])
  # The decomposed fold metrics are those of evaluating the fold's records on their own.
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.retrieval.evaluate import evaluate
  source = prepare.load_split(os.path.join(workdir, "data"), "tiny_demo", "test")
  encoder = Encoder.load(os.path.join(workdir, "stage2", "export"), batch_size=16)
  alone = evaluate(encoder, [source[i] for i in range(4, 8)], progress=False, return_embeddings=True)
  img, txt, gallery = alone.pop("_embeddings")
  # Rule RANKS: the demo embedded the whole split, this the fold alone (other batches: rule F32-PAIR on
  # both sides of a cosine of unit vectors, sqrt(D) times an entry's bound each, plus the dot product).
  dim = encoder.model_config.embed_dim
  bound = 2 * np.sqrt(dim) * 2 * gamma(embed_depth(encoder.model_config)) + gamma(dim + 2)
  assert_rank_metrics_within(dec[1], np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T, gallery.txt2img,
                             bound)
  assert rep["decomposed_full_split"]["num_images"] == 20
  rr = rep["reranked"]
  assert rr["rerank_top_k"] == 2 and rr["pairs_scored"] == 20 * 2 + 100 * 2
  t = rep["timing"]
  last = t["vs_gallery_size"][-1]
  assert rep["speedup_gallery"] == "500 images x 2500 captions" == t["coco5k"]["gallery"]
  ratio = last["cross_encoder_s"] / last["decomposed_s"]
  assert rep["speedup"] == approx64(ratio, n=2, scale=ratio)  # rule F64
  assert [r["cross_encoder_extrapolated"] for r in t["vs_gallery_size"]] == [False, True, True]
  assert set(rep["ablations"]) == {"stage1_no_decomposition", "stage2", "ablation_stage1_no_negatives",
                                   "ablation_random"}
  for a in rep["ablations"].values():
    assert a["avg_recall_full_ci95"][0] <= a["avg_recall_full"] <= a["avg_recall_full_ci95"][1]
  questions = [d["question"] for d in rep["ablation_differences"]]
  assert questions == ["what the bi-modal hard negatives add", "early-interaction pre-training vs random init"]
  full = {n: _results(workdir, n)["full"] for n in ("stage2", "ablation_stage1_no_negatives")}
  assert rep["ablation_differences"][0]["avg_recall_difference"] == approx64(  # rule F64
      evaluation.avg_recall(full["stage2"]) - evaluation.avg_recall(full["ablation_stage1_no_negatives"]), n=16,
      scale=100)
  md = open(os.path.join(workdir, "report.md")).read()
  assert "extrapolated" in md and "95% interval" in md and "How the two sets differ" in md
  modes = {r["mode"]: r for r in rep["retrieval_modes"]["rows"]}
  assert {"float", "int8", "sign", "simhash-16", "simhash-16+rescore", "distilled-16", "distilled-16+rescore",
          "late_rerank@2", "cross_rerank@2", "faiss_ivf", "faiss_hnsw"} <= set(modes), sorted(modes)
  # Re-ranking the float top-2 reorders inside it, so R@10 is the float search's exactly (rule EXACT: the
  # same top-10 lists beyond the first two).
  for name in ("late_rerank@2", "cross_rerank@2"):
    assert modes[name]["t2i"]["R@10"] == modes["float"]["t2i"]["R@10"], name
    assert modes[name]["i2t"]["R@10"] == modes["float"]["i2t"]["R@10"], name
  assert modes["distilled-16"]["bits"] == 16 and "Retrieval modes" in md


def test_second_run_reuses_every_stage(demo_run):
  workdir, plan, out = demo_run
  exports = {r: os.path.getmtime(os.path.join(workdir, r, "export", "export.json"))
             for r in ("stage1", "stage2")}
  s1, s2 = tiny_configs()
  s1.train.num_steps = -1  # would be rejected if training ran again
  again = demo.run_demo(workdir, s1, s2, plan)
  assert again["avg_recall_drop"] == out["avg_recall_drop"]
  assert again["ablation_differences"] == out["ablation_differences"]  # the bootstrap is seeded
  assert again["cross_encoder"] == out["cross_encoder"]
  for r, t in exports.items():
    assert os.path.getmtime(os.path.join(workdir, r, "export", "export.json")) == t, r


def test_stage_configs_of_the_ablations(tmp_path):
  s1, s2 = tiny_configs()
  plan = demo.DemoPlan(stage2_num_steps=7, stage2_global_batch_size=None, stage1_num_steps=None, bert_num_steps=2,
                       bert_global_batch_size=4)
  runs = demo.stage_configs(s1, s2, str(tmp_path), plan)
  assert list(runs) == ["stage1", "stage2", "ablation_stage1_no_negatives", "ablation_bert", "ablation_random"]
  s1_export = os.path.join(str(tmp_path), "stage1", "export")
  expect = {  # name: (init_export, hard negatives per pair, steps, batch)
      "stage1": ("", 0, 3, 8),
      "stage2": (s1_export, 1, 7, 8),
      "ablation_stage1_no_negatives": (s1_export, 0, 7, 8),
      "ablation_bert": (os.path.join(str(tmp_path), "bert_export"), 0, 2, 4),
      "ablation_random": ("", 0, 7, 8),
  }
  for name, (c, run_dir) in runs.items():
    got = (c.init_export, c.data.negatives.num_per_pair, c.train.num_steps, c.train.global_batch_size)
    assert got == expect[name], name
    assert run_dir == os.path.join(str(tmp_path), name)
    assert c.data.data_dir == os.path.join(str(tmp_path), "data")
    assert c.train.eval_every == (plan.curve_every if name in demo.CURVE_RUNS else -1)
    assert c.model.hidden_dropout_prob == 0.0 and c.data.generate_seed == s1.data.generate_seed
    assert c.data.corpus_size == (plan.corpus_images if name == "stage1" else 0)
  assert runs["stage1"][0].objective == "early_interaction"
  with pytest.raises(ValueError, match="ablation_nope"):
    demo.stage_configs(s1, s2, str(tmp_path), demo.DemoPlan(ablations=("ablation_nope",)))
