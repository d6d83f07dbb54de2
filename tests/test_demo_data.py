"""The demo dataset: deterministic per seed, tokenisable without [UNK], relations that match the boxes,
and prepared through the real VinVL -> tfds path (skipped when already complete)."""
import collections
import filecmp
import json
import os

import pytest

from vldeformer_jax.data import demo_world as demo
from vldeformer_jax.data import prepare
from vldeformer_jax.data import vinvl
from vldeformer_jax.model.inputs import load_tokenizer
from tolerances import assert_within, gamma

FILES = ("features.tsv", "features.lineidx", "imageid2idx.json", "predictions.tsv", "predictions.lineidx",
         "train_captions.json", "test_captions.json", "test_img_keys.tsv", "test_img_keys_1k.tsv", "scenes.json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo") / "seed0")
  demo.write_demo_vinvl(out, seed=0, num_train=240, num_test=60)
  return out


def _load(out):
  captions = {**vinvl.load_captions(os.path.join(out, "train_captions.json")),
              **vinvl.load_captions(os.path.join(out, "test_captions.json"))}
  preds = {}
  with open(os.path.join(out, "predictions.tsv"), "rb") as f:
    for line in f:
      image_id, payload = line.rstrip(b"\n").split(b"\t")
      preds[int(image_id)] = json.loads(payload)
  return captions, preds


def test_same_seed_same_files_other_seed_differs(demo_dir, tmp_path):
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  demo.write_demo_vinvl(again, seed=0, num_train=240, num_test=60)
  demo.write_demo_vinvl(other, seed=1, num_train=240, num_test=60)
  assert sorted(os.listdir(demo_dir)) == sorted(FILES)
  for name in FILES:
    assert filecmp.cmp(os.path.join(demo_dir, name), os.path.join(again, name), shallow=False), name
  for name in ("features.tsv", "train_captions.json", "predictions.tsv"):
    assert not filecmp.cmp(os.path.join(demo_dir, name), os.path.join(other, name), shallow=False), name


def test_every_word_tokenises_without_unk_and_classes_are_single_wordpieces(demo_dir):
  tok = load_tokenizer()
  captions, preds = _load(demo_dir)
  texts = [c for caps in captions.values() for c in caps]
  texts += [" ".join(o["class"] for o in p["objects"]) for p in preds.values()]
  texts += demo.vocabulary()
  ids = tok(texts, add_special_tokens=False)["input_ids"]
  assert all(tok.unk_token_id not in row for row in ids)
  for word in demo.CLASSES + demo.COLOURS:
    assert len(tok.tokenize(word)) == 1, word
  used = {w for t in texts for w in t.split()}
  assert used <= set(demo.vocabulary())


def test_layout_sizes_and_boxes(demo_dir):
  captions, preds = _load(demo_dir)
  assert len(captions) == 300 and all(len(c) == 5 for c in captions.values())
  test_keys = vinvl.load_image_keys(os.path.join(demo_dir, "test_img_keys.tsv"))
  test_caps = vinvl.load_captions(os.path.join(demo_dir, "test_captions.json"))
  assert sorted(test_keys) == sorted(test_caps) and test_keys != list(test_caps)  # own order
  feats = vinvl.VinvlFeatures(demo_dir)
  try:
    for image_id, pred in preds.items():
      f = feats.region_features(image_id)
      assert f.shape == (len(pred["objects"]), demo.FEATURE_DIM) and 1 <= len(f) <= 10
      w, h = pred["image_w"], pred["image_h"]
      for row, obj in zip(f, pred["objects"]):
        x1, y1, x2, y2 = obj["rect"]
        # The JSON rect is rounded to 0.01 px (a width / height moves by up to 0.01 px), the features
        # hold float32 of the unrounded ratios (<= 1): quantisation + rule F32 (tests/tolerances.py).
        assert_within(row[-6:], [x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h],
                      0.01 / min(w, h) + gamma(2), rule="0.01 px rounding + rule F32")
      assert feats.tags(image_id) == " ".join(o["class"] for o in pred["objects"])
  finally:
    feats.close()
  # Images come in groups over one class set: most share their tag multiset with another image.
  bags = collections.Counter(tuple(sorted(o["class"] for o in p["objects"])) for p in preds.values())
  shared = sum(n for n in bags.values() if n > 1) / len(preds)
  assert shared > 0.5, shared


def test_caption_relations_agree_with_the_boxes(demo_dir):
  """'the <..> X is <rel> the <..> Y' with X, Y each detected once: the box centres must agree."""
  captions, preds = _load(demo_dir)
  checked = 0
  for image_id, caps in captions.items():
    centres = collections.defaultdict(list)
    for o in preds[image_id]["objects"]:
      x1, y1, x2, y2 = o["rect"]
      centres[o["class"]].append(((x1 + x2) / 2, (y1 + y2) / 2))
    for c in caps:
      if not c.startswith("the ") or " is " not in c:
        continue
      left, right = c[4:].split(" is ")
      rel = next(r for r, phrases in demo.RELATION_WORDS.items() for p in phrases if right.startswith(p + " the "))
      phrase = next(p for p in demo.RELATION_WORDS[rel] if right.startswith(p + " the "))
      a, b = left.split()[-1], right[len(phrase) + 5:].split()[-1]
      if a == b or len(centres[a]) != 1 or len(centres[b]) != 1:
        continue
      (ax, ay), (bx, by) = centres[a][0], centres[b][0]
      assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[rel], (image_id, c)
      checked += 1
  assert checked >= 20, checked


def test_prepare_demo_goes_through_prepare_and_skips_when_complete(tmp_path, monkeypatch):
  data_dir = str(tmp_path / "tfds")
  assert demo.prepare_demo(data_dir, seed=2, num_train=40, num_test=12) == demo.DEMO_NAME
  sizes = {s: len(prepare.load_split(data_dir, demo.DEMO_NAME, s)) for s in ("train", "test", "test_1k")}
  assert sizes == {"train": 40, "test": 12, "test_1k": 12}
  rec = prepare.load_split(data_dir, demo.DEMO_NAME, "train")[0]
  assert rec["features"].shape[1] == demo.FEATURE_DIM and len(rec["captions"]) == 5
  # The scratch VinVL files are gone; the scene descriptions (for drawing images) stay beside the dataset.
  assert sorted(os.listdir(data_dir)) == sorted([demo.DEMO_NAME, os.path.basename(demo.scenes_path(data_dir, demo.DEMO_NAME))])
  with open(demo.scenes_path(data_dir, demo.DEMO_NAME)) as f:
    scenes = json.load(f)
  assert len(scenes) == 52 and all(1 <= len(objs) <= 5 for objs in scenes.values())

  def fail(*a, **k):
    raise AssertionError("regenerated a complete demo dataset")
  monkeypatch.setattr(demo, "write_demo_vinvl", fail)
  assert demo.prepare_demo(data_dir, seed=2, num_train=40, num_test=12) == demo.DEMO_NAME
  with pytest.raises(FileExistsError, match="holds another dataset"):
    demo.prepare_demo(data_dir, seed=3, num_train=40, num_test=12)
