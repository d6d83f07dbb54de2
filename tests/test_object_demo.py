"""The object-centric demo variant: one object per image, captions about its attributes, deterministic, same
world as the scene-centric demo, prepared through the real VinVL -> tfds path."""
import filecmp
import json
import os

import numpy as np
import pytest

from vldeformer_jax.data import demo_world as world
from vldeformer_jax.data import object_demo as demo
from vldeformer_jax.data import prepare
from vldeformer_jax.data import vinvl
from vldeformer_jax.model.inputs import load_tokenizer
from vldeformer_jax.retrieval.label_metrics import labels_from_tags

FILES = ("features.tsv", "features.lineidx", "imageid2idx.json", "predictions.tsv", "predictions.lineidx",
         "train_captions.json", "test_captions.json", "test_img_keys.tsv", world.SCENES_FILE)


def test_deterministic_one_object_per_image_captions_name_its_attributes(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  demo.write_object_demo_vinvl(a, seed=0, num_train=30, num_test=10)
  demo.write_object_demo_vinvl(b, seed=0, num_train=30, num_test=10)
  demo.write_object_demo_vinvl(c, seed=1, num_train=30, num_test=10)
  assert all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in FILES)
  assert not filecmp.cmp(os.path.join(a, "features.tsv"), os.path.join(c, "features.tsv"), shallow=False)
  with open(os.path.join(a, world.SCENES_FILE)) as f:
    scenes = json.load(f)
  caps = {**vinvl.load_captions(os.path.join(a, "train_captions.json")),
          **vinvl.load_captions(os.path.join(a, "test_captions.json"))}
  assert len(scenes) == len(caps) == 40
  tok = load_tokenizer()
  for iid, objs in scenes.items():
    assert len(objs) == 1
    o = objs[0]
    assert len(caps[int(iid)]) == 5 and len(set(caps[int(iid)])) == 5
    for cap in caps[int(iid)]:
      words = cap.split()
      assert o["class"] in words
      assert o["colour"] in words or set(words) & set(world.SIZE_WORDS[o["size"]])
      assert not set(words) & (set(world.COLOURS) - {o["colour"]})
      assert "[UNK]" not in tok.tokenize(cap)
  with open(os.path.join(a, "predictions.tsv"), "rb") as f:
    for line in f:
      iid, payload = line.rstrip(b"\n").split(b"\t")
      assert [x["class"] for x in json.loads(payload)["objects"]] == [scenes[iid.decode()][0]["class"]]


def test_same_world_prototypes_as_the_scene_demo():
  # The scene demo draws its prototypes first from default_rng(seed); the object variant reuses that draw.
  p_scene = world.world_prototypes(np.random.default_rng(3))
  rng = np.random.default_rng([3, 17])
  img = demo.object_images(rng, [5])[0]
  feats = world.region_features(3, p_scene, img)
  o = img.regions[0]
  direction = p_scene[0][o.cls]  # the class prototype dominates the region vector
  visual = feats[0, :world.VISUAL_DIM]
  cos = visual @ direction / np.linalg.norm(visual) / np.linalg.norm(direction)
  assert cos > 0.3


def test_prepare_object_demo_loads_with_one_label_per_record(tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  assert demo.prepare_object_demo(data_dir, seed=2, num_train=12, num_test=8) == demo.OBJECT_DEMO_NAME
  test = prepare.load_split(data_dir, demo.OBJECT_DEMO_NAME, "test")
  assert len(test) == 8 and len(prepare.load_split(data_dir, demo.OBJECT_DEMO_NAME, "train")) == 12
  for i in range(len(test)):
    rec = test[i]
    assert rec["features"].shape == (1, world.FEATURE_DIM) and len(rec["captions"]) == 5
    assert len(labels_from_tags(rec["tags"])) == 1

  def fail(*a, **k):
    raise AssertionError("regenerated a complete dataset")
  monkeypatch.setattr(demo, "write_object_demo_vinvl", fail)
  assert demo.prepare_object_demo(data_dir, seed=2, num_train=12, num_test=8) == demo.OBJECT_DEMO_NAME
  with pytest.raises(FileExistsError, match="holds another dataset"):
    demo.prepare_object_demo(data_dir, seed=3, num_train=12, num_test=8)


def test_make_demo_data_variant_object(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "launch/make_demo_data.py", f"--data_dir={tmp_path}", "--variant=object",
                        "--num_train=3", "--num_test=4"], cwd=root, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip().splitlines()[-1] == demo.OBJECT_DEMO_NAME
  assert len(prepare.load_split(str(tmp_path), demo.OBJECT_DEMO_NAME, "test")) == 4
  for extra, message in (([f"--data_dir={tmp_path}", "--variant=object", "--bitext"],
                          "--bitext apply to --variant=scene only"),
                         ([f"--vinvl_dir={tmp_path / 'v'}", "--overwrite"], "--overwrite apply to --data_dir")):
    args = [a for a in run.args if not a.startswith(("--data_dir", "--variant"))] + extra
    refused = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]
  assert not os.path.exists(tmp_path / "v")


def test_class_subset_for_continual_tasks(tmp_path):
  out = str(tmp_path / "a")
  demo.write_object_demo_vinvl(out, seed=0, num_train=20, num_test=6, classes=["dog", "cat"])
  with open(os.path.join(out, world.SCENES_FILE)) as f:
    assert {o[0]["class"] for o in json.load(f).values()} <= {"dog", "cat"}
  with pytest.raises(ValueError, match="unknown"):
    demo.write_object_demo_vinvl(str(tmp_path / "b"), classes=["unicorn"])
