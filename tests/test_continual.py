"""Continual retrieval: the accuracy-matrix maths (retrieval/continual.py) by hand, and the index's per-entry
encoder fingerprints with the add policies (retrieval/index.py: add_items)."""
import json
import os

import numpy as np
import pytest

from vldeformer_jax.retrieval import continual
from vldeformer_jax.retrieval import index as index_lib


def test_accuracy_matrix_maths_hand_computed():
  r2 = [[80.0, 10.0], [60.0, 70.0]]
  assert continual.average_accuracy(r2) == pytest.approx(65.0)
  assert continual.forgetting(r2) == pytest.approx(20.0)
  assert continual.backward_transfer(r2) == pytest.approx(-20.0)
  r3 = [[50, 5, 1], [40, 60, 2], [45, 30, 70]]
  s = continual.summary(r3)
  assert s["average_accuracy"] == pytest.approx((45 + 30 + 70) / 3)
  assert s["forgetting"] == pytest.approx(((50 - 45) + (60 - 30)) / 2)  # max over earlier rows, minus last
  assert s["backward_transfer"] == pytest.approx(((45 - 50) + (30 - 60)) / 2)
  assert s["R"] == [[50, 5, 1], [40, 60, 2], [45, 30, 70]]
  assert continual.forgetting([[42.0]]) == 0.0 and continual.average_accuracy([[42.0]]) == 42.0
  # a task that improves later has negative forgetting contribution (no clipping)
  assert continual.forgetting([[10, 0], [30, 50]]) == pytest.approx(-20.0)
  with pytest.raises(ValueError):
    continual.forgetting([[1, 2, 3]])


def unit(rng, n, d=4):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_add_items_same_encoder_appends_and_other_encoder_is_refused(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "idx")
  a = unit(rng, 3)
  index_lib.write_index(path, a, [1, 2, 3], ["x", "y", "z"], fingerprint="A" * 64, side="images",
                        metadata={"dataset": "d"})
  b = unit(rng, 2)
  meta = index_lib.add_items(path, b, [4, 5], ["u", "v"], fingerprint="A" * 64)
  idx = index_lib.Index.load(path)
  assert meta["num"] == 5 and meta["dataset"] == "d" and "policy" not in meta
  assert idx.entry_fingerprints == ["A" * 64] * 5 and idx.ids.tolist() == [1, 2, 3, 4, 5]
  np.testing.assert_array_equal(idx.embeddings, np.concatenate([a, b]))
  with pytest.raises(index_lib.EncoderMismatchError, match=r"encoded by AAAAAAAAAAAA\.\.\.; the new items are "
                     r"encoded by BBBBBBBBBBBB\.\.\.: refused; add with policy 'keep'"):
    index_lib.add_items(path, unit(rng, 1), [6], ["w"], fingerprint="B" * 64)
  assert index_lib.Index.load(path).meta["num"] == 5  # untouched
  with pytest.raises(ValueError, match="policy"):
    index_lib.add_items(path, unit(rng, 1), [6], ["w"], fingerprint="B" * 64, policy="merge")


def test_keep_and_reindex_policies(tmp_path):
  rng = np.random.default_rng(1)
  old, new = unit(rng, 3), unit(rng, 2)
  for policy in ("keep", "reindex"):
    path = str(tmp_path / policy)
    index_lib.write_index(path, old, [1, 2, 3], ["x", "y", "z"], fingerprint="A" * 64, side="images",
                          compact="int8")
    calls = []
    re = unit(rng, 3)

    def reencode(ids, texts):
      calls.append((ids.tolist(), texts))
      return re

    meta = index_lib.add_items(path, new, [4, 5], ["u", "v"], fingerprint="B" * 64, policy=policy,
                               reencode=reencode)
    idx = index_lib.Index.load(path)
    assert meta["policy"] == policy and idx.fingerprint == "B" * 64 and meta["compact"] == "int8"
    assert idx.codes.shape == (5, 4)
    if policy == "keep":
      assert calls == [] and idx.entry_fingerprints == ["A" * 64] * 3 + ["B" * 64] * 2
      assert idx.meta["encoders"] == ["A" * 64, "B" * 64]
      np.testing.assert_array_equal(idx.embeddings, np.concatenate([old, new]))
    else:
      assert calls == [([1, 2, 3], ["x", "y", "z"])] and idx.entry_fingerprints == ["B" * 64] * 5
      np.testing.assert_array_equal(idx.embeddings, np.concatenate([re, new]))
    top = idx.search(np.asarray(idx.embeddings[4:5]), k=1, exact=True)
    assert top.indices[0, 0] == 4
  with pytest.raises(ValueError, match="reencode"):
    index_lib.add_items(str(tmp_path / "keep"), new, [6, 7], ["s", "t"], fingerprint="C" * 64, policy="reindex")


def test_an_index_without_entry_encoders_reads_as_one_encoder(tmp_path):
  path = str(tmp_path / "old")
  index_lib.write_index(path, unit(np.random.default_rng(2), 2), [1, 2], ["x", "y"], fingerprint="A" * 64,
                        side="captions")
  meta_path = os.path.join(path, "meta.json")
  meta = json.load(open(meta_path))
  del meta["files"][index_lib.ENTRY_ENCODERS], meta["encoders"]
  os.remove(os.path.join(path, index_lib.ENTRY_ENCODERS))
  json.dump(meta, open(meta_path, "w"))
  idx = index_lib.Index.load(path)
  assert idx.entry_encoders is None and idx.entry_fingerprints == ["A" * 64] * 2


def test_run_continual_two_tasks_keep_and_reindex(tmp_path):
  import importlib.util
  from vldeformer_jax.data import object_demo as demo
  from vldeformer_jax.training import continual as run
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                      "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config()
  config.train.num_steps = 3
  config.train.checkpoint_every = 3
  data = str(tmp_path / "data")
  tasks = []
  for t, classes in enumerate((["dog", "cat"], ["car", "bus"])):
    name = demo.prepare_object_demo(data, seed=0, num_train=32, num_test=6, name=f"task{t}", classes=classes)
    tasks.append({"name": name, "data_dir": data})
  res = run.run_continual(config, str(tmp_path / "run"), tasks)
  assert json.load(open(tmp_path / "run" / "continual.json")) == json.loads(json.dumps(res))
  keep, reindex = res["policies"]["keep"], res["policies"]["reindex"]
  assert np.asarray(keep["R"]).shape == (2, 2)
  # Row 0 and the newest task's column are the same under both policies (same encoder, same entries).
  assert keep["R"][0] == reindex["R"][0] and keep["R"][1][1] == reindex["R"][1][1]
  assert keep["forgetting"] == pytest.approx(keep["R"][0][0] - keep["R"][1][0])
  fps = index_lib.Index.load(str(tmp_path / "run" / "index_keep")).entry_fingerprints
  assert len(set(fps[:6])) == 1 and len(set(fps[6:])) == 1 and fps[0] != fps[6]
  assert len(set(index_lib.Index.load(str(tmp_path / "run" / "index_reindex")).entry_fingerprints)) == 1
  assert "average accuracy" in run.format_continual(res)
  # R[1, 0] by hand: task 0's captions by encoder 1 against task 0's images by encoder 0 (keep) or 1 (reindex).
  # The two task datasets share image ids (one world seed): entries are told apart by their task.
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval import metrics
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.retrieval.gallery import load_gallery
  g = load_gallery(prepare.load_split(data, "task0", "test"))
  e0, e1 = (Encoder.load(str(tmp_path / "run" / f"task{i}" / "export")) for i in (0, 1))
  txt = e1.embed_text_inputs(g.text_inputs(e1))
  for enc, got in ((e0, keep["R"][1][0]), (e1, reindex["R"][1][0])):
    img = enc.embed_image_inputs(g.image_inputs(enc, range(g.num_images)))
    assert got == metrics.retrieval_metrics(img @ txt.T, g.txt2img)["t2i"]["R@1"]


def test_launcher_refuses_bad_groups(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "launch/continual.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                      "--groups=0"], cwd=root, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == ["usage error: --groups must be >= 1, got 0"]
