"""The whole demo on tiny sizes: data, stage 1, stage 2, an ablation, evaluation, timing, report; then a
second run that reuses everything."""
import json
import os
import sys

import pytest


from repo_configs import config_module  # noqa: E402

tiny = config_module("tiny")
from vldeformer_jax.demo import job as demo  # noqa: E402
from vldeformer_jax.demo import report


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
  plan = demo.DemoPlan(cross_max_images=4, eval_batch_size=16, ablations=(), stage2_num_steps=None,
                       gallery_sizes=(4, 50, 500), timing_pairs=10_000, progress=False)
  s1, s2 = tiny_configs()
  out = demo.run_demo(workdir, s1, s2, plan)
  return workdir, plan, out


def test_report_holds_the_comparison(demo_run):
  workdir, plan, out = demo_run
  for name in ("report.json", "report.md", "curves.png", "recall.png", "timing.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "report.json")) as f:
    rep = json.load(f)
  assert rep == json.loads(json.dumps(out))
  cross, dec = rep["cross_encoder"], rep["decomposed"]
  assert cross["model"] == "cross_encoder" and dec["model"] == "decomposed"
  # Both on the same subset: the first 4 test images and their 5 captions each.
  assert (cross["num_images"], cross["num_captions"]) == (4, 20) == (dec["num_images"], dec["num_captions"])
  assert rep["decomposed_full_split"]["num_images"] == 12
  six = lambda m: [m[d][k] for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")]  # noqa: E731
  assert rep["avg_recall_drop"] == pytest.approx(sum(six(cross)) / 6 - sum(six(dec)) / 6)
  # Recall at 10 over 4 images (and over 20 captions for images) is always 100%.
  assert cross["t2i"]["R@10"] == 100.0 and dec["t2i"]["R@10"] == 100.0
  t = rep["timing"]
  last = t["vs_gallery_size"][-1]
  assert rep["speedup_gallery"] == "500 images x 2500 captions" == t["coco5k"]["gallery"]
  assert rep["speedup"] == pytest.approx(last["cross_encoder_s"] / last["decomposed_s"])
  cross_t, dec_t = t["split"]["cross_encoder"], t["split"]["decomposed"]
  assert last["cross_encoder_s"] == pytest.approx(500 * 2500 * cross_t["per_pair_s"])
  # Timed on the test split: every image and caption encoded once, every one of its 12 x 60 pairs scored.
  assert (dec_t["num_images"], dec_t["num_captions"]) == (12, 60) and cross_t["sample_pairs"] == 12 * 60
  assert [r["cross_encoder_extrapolated"] for r in t["vs_gallery_size"]] == [False, True, True]
  assert set(rep["ablations"]) == {"stage1_no_decomposition", "stage2"}
  assert rep["ablations"]["stage2"]["avg_recall_subset"] == pytest.approx(report.avg_recall(dec))
  md = open(os.path.join(workdir, "report.md")).read()
  assert "extrapolated" in md and "first 4 images" in md


def test_second_run_reuses_every_stage(demo_run):
  workdir, plan, out = demo_run
  exports = {r: os.path.getmtime(os.path.join(workdir, r, "export", "export.json"))
             for r in ("stage1", "stage2")}
  s1, s2 = tiny_configs()
  s1.train.num_steps = -1  # would be rejected if training ran again
  again = demo.run_demo(workdir, s1, s2, plan)
  assert again["avg_recall_drop"] == out["avg_recall_drop"]
  assert again["cross_encoder"] == out["cross_encoder"]
  for r, t in exports.items():
    assert os.path.getmtime(os.path.join(workdir, r, "export", "export.json")) == t, r


def test_stage_configs_of_the_ablations(tmp_path):
  s1, s2 = tiny_configs()
  plan = demo.DemoPlan(stage2_num_steps=7, bert_num_steps=2, bert_global_batch_size=4)
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
    assert c.data.data_dir == os.path.join(str(tmp_path), "data") and c.train.eval_every == -1
    assert c.model.hidden_dropout_prob == 0.0 and c.seed == s1.seed
  assert runs["stage1"][0].objective == "early_interaction"
  with pytest.raises(ValueError, match="ablation_nope"):
    demo.stage_configs(s1, s2, str(tmp_path), demo.DemoPlan(ablations=("ablation_nope",)))
