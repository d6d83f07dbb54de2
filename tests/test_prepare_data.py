"""VinVL files -> tfds array_record: an exact round trip through the CLI, and named errors on bad input."""
import base64
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch

from vldeformer_jax.data import prepare
from vldeformer_jax.data import vinvl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = 2054


def _make_source(seed=0, feature_dim=F, n_train=7, n_test=6):
  """Images with random features (incl. one with 1 box), tags (incl. an empty one) and captions."""
  rng = np.random.default_rng(seed)
  ids = [int(i) for i in rng.choice(np.arange(1, 10**6), n_train + n_test, replace=False)]
  words = ["dog", "cat", "tennis racket", "man", "shirt"]
  images = {}
  for k, image_id in enumerate(ids):
    n = 1 if k == 1 else int(rng.integers(2, 6))
    n_tags = 0 if k == 2 else int(rng.integers(1, 5))
    images[image_id] = {
        "features": rng.standard_normal((n, feature_dim)).astype(np.float32) * 10,
        "tags": [words[int(j)] for j in rng.integers(len(words), size=n_tags)],
        "captions": [f"caption {c} of image {image_id} with ünïcode" for c in range(int(rng.integers(1, 6)))],
    }
  return ids[:n_train], ids[n_train:], images


def _write_tsv(path, rows, lineidx=True):
  offsets = []
  with open(path, "wb") as f:
    for row in rows:
      offsets.append(f.tell())
      f.write(row + b"\n")
  if lineidx:
    with open(os.path.splitext(path)[0] + ".lineidx", "w") as f:
      f.write("".join(f"{o}\n" for o in offsets))


def _feature_row(image_id, feats, num_boxes=None):
  b64 = base64.b64encode(feats.astype("<f4").tobytes())
  return b"\t".join([str(image_id).encode(), str(len(feats) if num_boxes is None else num_boxes).encode(), b64])


def _write_vinvl(root, train, test, images, *, captions_ext=".pt", feature_rows=None, prediction_rows=None):
  """Writes the VinVL layout: captions in root/captions, features in root/features. Returns both dirs."""
  cap_dir, feat_dir = os.path.join(root, "captions"), os.path.join(root, "features")
  os.makedirs(cap_dir)
  os.makedirs(feat_dir)
  rng = np.random.default_rng(1)
  everything = train + test
  row_order = [everything[i] for i in rng.permutation(len(everything))]
  rows = [_feature_row(i, images[i]["features"]) for i in row_order]
  if feature_rows:
    rows = feature_rows(row_order, rows)
  _write_tsv(os.path.join(feat_dir, "features.tsv"), rows)
  with open(os.path.join(feat_dir, "imageid2idx.json"), "w") as f:
    json.dump({str(i): r for r, i in enumerate(row_order)}, f)
  pred_order = list(reversed(row_order))  # not row-aligned: exercises the index-by-image-id path
  preds = []
  for k, i in enumerate(pred_order):
    objects = [{"class": c, "rect": [0, 0, 1, 1], "conf": 0.9} for c in images[i]["tags"]]
    payload = objects if k % 2 else {"objects": objects, "image_h": 480, "image_w": 640}
    preds.append(str(i).encode() + b"\t" + json.dumps(payload).encode())
  if prediction_rows:
    preds = prediction_rows(pred_order, preds)
  _write_tsv(os.path.join(feat_dir, "predictions.tsv"), preds)
  for split, split_ids in (("train", train), ("test", test)):
    # Half the values as lists, half as JSON strings of lists (both occur in VinVL files).
    caps = {i: (images[i]["captions"] if k % 2 else json.dumps(images[i]["captions"]))
            for k, i in enumerate(split_ids)}
    if captions_ext == ".pt":
      torch.save(caps, os.path.join(cap_dir, f"{split}_captions.pt"))
    else:
      with open(os.path.join(cap_dir, f"{split}_captions.json"), "w") as f:
        json.dump({str(k): v for k, v in caps.items()}, f)
  test_keys = [test[i] for i in rng.permutation(len(test))]
  keys_1k = [test[i] for i in rng.permutation(len(test))[:4]]
  for name, keys in (("test_img_keys.tsv", test_keys), ("test_img_keys_1k.tsv", keys_1k)):
    with open(os.path.join(cap_dir, name), "w") as f:
      f.write("".join(f"{k}\n" for k in keys))
  return cap_dir, feat_dir, {"train": train, "test": test_keys, "test_1k": keys_1k}


def _assert_records(src, ids, images):
  assert len(src) == len(ids)
  for k, image_id in enumerate(ids):
    rec = src[k]
    assert int(rec["image_id"]) == image_id
    assert rec["features"].dtype == np.float32
    np.testing.assert_array_equal(rec["features"], images[image_id]["features"])
    assert rec["tags"].decode() == " ".join(images[image_id]["tags"])
    assert [c.decode() for c in rec["captions"]] == images[image_id]["captions"]
    # One detector class per region (multi-word ones kept whole), or none where the counts differ.
    tags, boxes = images[image_id]["tags"], len(images[image_id]["features"])
    assert [c.decode() for c in rec["region_classes"]] == (tags if len(tags) == boxes else [])


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_round_trip_is_exact_and_keeps_key_order(tmp_path):
  train, test, images = _make_source()
  cap_dir, feat_dir, order = _write_vinvl(str(tmp_path / "src"), train, test, images)
  out = str(tmp_path / "tfds")
  res = _run_cli(f"--captions_dir={cap_dir}", f"--features_dir={feat_dir}", "--name=roundtrip",
                 f"--data_dir={out}")
  assert res.returncode == 0, res.stderr
  assert sorted(os.listdir(os.path.join(out, "roundtrip"))) == ["1.0.0"]  # no temp dir left
  for split in ("train", "test", "test_1k"):
    _assert_records(prepare.load_split(out, "roundtrip", split), order[split], images)
    _assert_records(tfds.data_source("roundtrip", data_dir=out, split=split), order[split], images)
  builder = tfds.builder("roundtrip", data_dir=out)
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test", "test_1k")} == {
      "train": len(train), "test": len(test), "test_1k": 4}
  assert builder.info.features["features"].shape == (None, F)
  assert prepare.read_metadata(out, "roundtrip")["feature_dim"] == F


def test_json_captions_no_key_file_small_shards_and_inferred_feature_dim(tmp_path):
  train, test, images = _make_source(seed=3, feature_dim=7)
  cap_dir, feat_dir, order = _write_vinvl(str(tmp_path / "src"), train, test, images, captions_ext=".json")
  os.remove(os.path.join(cap_dir, "test_img_keys.tsv"))
  order["test"] = test  # without a key file: the captions file's order
  out = str(tmp_path / "tfds")
  prepare.prepare_vinvl(cap_dir, feat_dir, "small_shards", out, shard_bytes=1)  # one example per shard
  info = tfds.builder("small_shards", data_dir=out).info
  assert info.splits["train"].shard_lengths == [1] * len(train)
  for split in ("train", "test", "test_1k"):
    _assert_records(prepare.load_split(out, "small_shards", split), order[split], images)
  with pytest.raises(FileExistsError, match="already exists"):
    prepare.prepare_vinvl(cap_dir, feat_dir, "small_shards", out)
  prepare.prepare_vinvl(cap_dir, feat_dir, "small_shards", out, overwrite=True)
  assert sorted(os.listdir(os.path.join(out, "small_shards"))) == ["1.0.0"]


def test_missing_lineidx_is_rebuilt_and_logged(tmp_path, caplog):
  train, test, images = _make_source(seed=4, feature_dim=5)
  cap_dir, feat_dir, order = _write_vinvl(str(tmp_path / "src"), train, test, images)
  expected = {}
  for name in ("features", "predictions"):
    path = os.path.join(feat_dir, f"{name}.lineidx")
    with open(path) as f:
      expected[name] = f.read()
    os.remove(path)
  out = str(tmp_path / "tfds")
  with caplog.at_level(logging.WARNING, logger="vldeformer_jax.data.vinvl"):
    prepare.prepare_vinvl(cap_dir, feat_dir, "rebuilt", out)
  for name in ("features", "predictions"):
    path = os.path.join(feat_dir, f"{name}.lineidx")
    assert f"{path} is missing: rebuilding it" in caplog.text
    with open(path) as f:
      assert f.read() == expected[name]
  for split in ("train", "test", "test_1k"):
    _assert_records(prepare.load_split(out, "rebuilt", split), order[split], images)


def _corrupt_feature_row(target, fn):
  def edit(row_order, rows):
    r = row_order.index(target)
    rows[r] = fn(rows[r])
    return rows
  return edit


def _bad_inputs(images, train):
  victim = train[3]  # not the first image: F is read from the first one
  return {
      "truncated_base64_padding": (
          dict(feature_rows=_corrupt_feature_row(victim, lambda row: row[:-3])),
          ["features.tsv line {row}", f"(image {victim})", "base64"]),
      "truncated_base64_whole_floats": (
          dict(feature_rows=_corrupt_feature_row(victim, lambda row: row[:-16])),
          ["features.tsv line {row}", f"(image {victim})", "values expected"]),
      "wrong_feature_count": (
          dict(feature_rows=_corrupt_feature_row(victim, lambda row: _feature_row(
              victim, images[victim]["features"], num_boxes=len(images[victim]["features"]) + 1))),
          ["features.tsv line {row}", f"(image {victim})",
           f"num_boxes {len(images[victim]['features']) + 1} x feature dim 6"]),
      "malformed_predictions_json": (
          dict(prediction_rows=lambda order, rows: [
              r[:-2] if i == victim else r for i, r in zip(order, rows)]),
          ["predictions.tsv line {pred_row}", f"(image {victim})", "malformed predictions JSON"]),
  }


@pytest.mark.parametrize("case", ["truncated_base64_padding", "truncated_base64_whole_floats",
                                  "wrong_feature_count", "malformed_predictions_json"])
def test_bad_rows_name_file_line_and_image_and_leave_no_output(tmp_path, case):
  train, test, images = _make_source(seed=5, feature_dim=6)
  kwargs, fragments = _bad_inputs(images, train)[case]
  cap_dir, feat_dir, _ = _write_vinvl(str(tmp_path / "src"), train, test, images, **kwargs)
  with open(os.path.join(feat_dir, "imageid2idx.json")) as f:
    row = json.load(f)[str(train[3])] + 1
  pred_ids = [int(line.split(b"\t")[0]) for line in open(os.path.join(feat_dir, "predictions.tsv"), "rb")]
  pred_row = pred_ids.index(train[3]) + 1
  out = str(tmp_path / "tfds")
  os.makedirs(out)
  with pytest.raises(vinvl.VinvlFormatError) as e:
    prepare.prepare_vinvl(cap_dir, feat_dir, "bad", out)
  for fragment in fragments:
    assert fragment.format(row=row, pred_row=pred_row) in str(e.value)
  assert os.listdir(out) == []  # nothing half-written


def test_image_without_features_is_named_before_anything_is_written(tmp_path):
  train, test, images = _make_source(seed=6, feature_dim=6)
  cap_dir, feat_dir, _ = _write_vinvl(str(tmp_path / "src"), train, test, images)
  path = os.path.join(feat_dir, "imageid2idx.json")
  with open(path) as f:
    id2idx = json.load(f)
  del id2idx[str(test[2])]
  with open(path, "w") as f:
    json.dump(id2idx, f)
  out = str(tmp_path / "tfds")
  os.makedirs(out)
  with pytest.raises(vinvl.VinvlFormatError) as e:
    prepare.prepare_vinvl(cap_dir, feat_dir, "bad", out)
  msg = str(e.value)
  assert f"image {test[2]}" in msg and "test_captions.pt" in msg and path in msg and "no features" in msg
  assert os.listdir(out) == []


def test_cli_reports_bad_input_without_traceback(tmp_path):
  train, test, images = _make_source(seed=7, feature_dim=6)
  victim = test[1]
  cap_dir, feat_dir, _ = _write_vinvl(
      str(tmp_path / "src"), train, test, images,
      prediction_rows=lambda order, rows: [r.replace(b"\t", b"\t{oops", 1) if i == victim else r
                                           for i, r in zip(order, rows)])
  out = str(tmp_path / "tfds")
  res = _run_cli(f"--captions_dir={cap_dir}", f"--features_dir={feat_dir}", "--name=bad", f"--data_dir={out}")
  assert res.returncode == 1
  assert "prepare_data: error:" in res.stderr and f"(image {victim}): malformed predictions JSON" in res.stderr
  assert "Traceback" not in res.stderr
  assert not os.path.exists(out) or os.listdir(out) == []


def test_stale_imageid2idx_is_caught(tmp_path):
  train, test, images = _make_source(seed=8, feature_dim=6)
  cap_dir, feat_dir, _ = _write_vinvl(str(tmp_path / "src"), train, test, images)
  path = os.path.join(feat_dir, "imageid2idx.json")
  with open(path) as f:
    id2idx = json.load(f)
  a, b = str(train[2]), str(train[4])
  id2idx[a], id2idx[b] = id2idx[b], id2idx[a]
  with open(path, "w") as f:
    json.dump(id2idx, f)
  with pytest.raises(vinvl.VinvlFormatError, match=f"holds image {b}, but .*imageid2idx.json maps image {a}"):
    prepare.prepare_vinvl(cap_dir, feat_dir, "bad", str(tmp_path / "tfds"))


def test_key_file_image_without_captions_is_named(tmp_path):
  train, test, images = _make_source(seed=9, feature_dim=6)
  cap_dir, feat_dir, _ = _write_vinvl(str(tmp_path / "src"), train, test, images)
  path = os.path.join(cap_dir, "test_img_keys_1k.tsv")
  with open(path, "a") as f:
    f.write(f"{train[0]}\n")  # a training image: not in test_captions.pt
  with pytest.raises(vinvl.VinvlFormatError, match=f"test_img_keys_1k.tsv line 5: image {train[0]} has no captions"):
    prepare.prepare_vinvl(cap_dir, feat_dir, "bad", str(tmp_path / "tfds"))
  assert not os.path.exists(tmp_path / "tfds")


def test_numpy_scalar_caption_keys_load(tmp_path):
  """Caption files written from numpy code (np.int64 keys, np.str_ captions) load, as plain int / str."""
  path = str(tmp_path / "train_captions.pt")
  torch.save({np.int64(5): ["a red car"], np.int32(7): [np.str_("a dog"), "a cat"]}, path)
  caps = vinvl.load_captions(path)
  assert caps == {5: ["a red car"], 7: ["a dog", "a cat"]}
  assert all(type(k) is int for k in caps) and all(type(c) is str for cs in caps.values() for c in cs)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_unsafe_caption_pickle_is_refused_in_one_line(tmp_path):
  """A pickle that would run code is refused by the safe loader: one line naming the file and the supported
  formats, exit 1, no torch advice to unpickle unsafely, nothing written."""
  train, test, images = _make_source(seed=9, feature_dim=6)
  cap_dir, feat_dir, _ = _write_vinvl(str(tmp_path / "src"), train, test, images)
  bad = os.path.join(cap_dir, "train_captions.pt")
  torch.save({int(train[0]): _RunsCode()}, bad)
  out = str(tmp_path / "tfds")
  res = _run_cli(f"--captions_dir={cap_dir}", f"--features_dir={feat_dir}", "--name=unsafe", f"--data_dir={out}")
  assert res.returncode == 1
  lines = [line for line in res.stderr.splitlines() if line.startswith("prepare_data: error:")]
  assert lines == [f"prepare_data: error: {bad}: cannot be read safely as a dict of captions (it holds "
                   f"posix.system, which is not plain data); supported: {' or '.join(vinvl.CAPTION_FORMATS)}"]
  assert "weights_only" not in res.stderr and "pwned" not in res.stdout
  assert not os.path.exists(out) or os.listdir(out) == []
