"""The training input pipeline: coverage, process-count invariance, resumption, the inputs of docs/method.md §3, negatives.

Global batches are compared exactly (every key, every byte) between 1 process, 2, 4 and 8 simulated
processes, 2 real `jax.distributed` processes (tests/pipeline_worker.py), grain worker processes, and runs
resumed from a JSON state.
"""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from vldeformer_jax.model import inputs
from vldeformer_jax.data import negatives, pipeline

import pipeline_worker as worker

TOKENIZER = inputs.load_tokenizer()
SOURCE = worker.SyntheticSource()
VOCAB = negatives.build_tag_vocabulary(SOURCE, progress=False)
G = worker.PIPELINE["global_batch_size"]
SPE = worker.NUM_IMAGES // G  # 5 steps per epoch, 3 images dropped per epoch


def make(process_index=0, process_count=1, source=SOURCE, **overrides):
  kwargs = dict(worker.PIPELINE, tokenizer=TOKENIZER, process_index=process_index, process_count=process_count,
                tag_vocabulary=VOCAB)
  kwargs.update(overrides)
  return pipeline.make_train_iterator(source, **kwargs)


def global_batches(process_count, steps=worker.STEPS, **overrides):
  """{key: [steps, G, ...]}: the process-local batches of every simulated process, stitched in order."""
  per_process = [worker.run_iterator(lambda p=p: make(p, process_count, **overrides), steps)
                 for p in range(process_count)]
  return {k: np.concatenate([b[k] for b in per_process], axis=1) for k in per_process[0]}


def assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference():
  """1 process, no prefetch threads: the batches every other setting must reproduce."""
  return global_batches(1, prefetch=0)


def test_keys_shapes_and_dtypes(reference):
  s, lt, r, f, k = worker.STEPS, 16, 5, worker.FEATURE_DIM, 2
  want = {"text_input_ids": (s, G, lt), "text_token_type_ids": (s, G, lt), "text_attention_mask": (s, G, lt),
          "image_input_ids": (s, G, lt), "image_token_type_ids": (s, G, lt), "image_attention_mask": (s, G, lt + r),
          "image_img_feats": (s, G, r, f), "image_id": (s, G)}
  want.update({f"neg_{key}": shape[:2] + (k,) + shape[2:] for key, shape in want.items() if key != "image_id"})
  assert {key: v.shape for key, v in reference.items()} == want
  for key, v in reference.items():
    assert v.dtype == (np.int64 if key == "image_id" else np.float32 if key.endswith("img_feats") else np.int32)


def test_each_epoch_sees_each_image_at_most_once_across_hosts(reference):
  ids = reference["image_id"][:2 * SPE].reshape(2, SPE * G)  # two full epochs
  all_ids = {1000 + 7 * i for i in range(worker.NUM_IMAGES)}
  for epoch in ids:
    assert len(set(epoch.tolist())) == SPE * G and set(epoch.tolist()) <= all_ids
  assert ids[0].tolist() != ids[1].tolist()  # a new permutation each epoch
  # The dropped remainder is the tail of each epoch's seeded permutation.
  for e in range(2):
    perm = pipeline.epoch_permutation(worker.PIPELINE["seed"], e, worker.NUM_IMAGES)
    assert ids[e].tolist() == (1000 + 7 * perm[:SPE * G]).tolist()


def test_divisible_source_every_image_exactly_once_on_2_hosts():
  source = worker.SyntheticSource(num_images=4 * G)
  batches = global_batches(2, steps=8, source=source, negatives_per_pair=0)
  for epoch in batches["image_id"].reshape(2, -1):
    assert sorted(epoch.tolist()) == [1000 + 7 * i for i in range(4 * G)]


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_same_global_batches_for_any_process_count(reference, process_count):
  assert_batches_equal(global_batches(process_count), reference)


def test_rows_are_the_spec_inputs_of_their_image(reference):
  """Each row is text_inputs of one of the image's first 5 captions and image_inputs of the image."""
  ids = reference["image_id"]
  chosen = {}
  for s in range(ids.shape[0]):
    epoch = s // SPE
    for row in range(G):
      index = (int(ids[s, row]) - 1000) // 7
      rec = SOURCE[index]
      first = [c.decode() for c in rec["captions"][:5]]
      text = inputs.text_inputs(TOKENIZER, first, 16)["input_ids"]
      match = [c for c in range(len(first)) if np.array_equal(text[c], reference["text_input_ids"][s, row])]
      assert match, (s, row)
      chosen[(epoch, index)] = match[0]
      image = inputs.image_inputs(TOKENIZER, [rec["features"]], [rec["tags"].decode()], 16, 5, worker.FEATURE_DIM)
      for key, v in image.items():
        np.testing.assert_array_equal(reference[f"image_{key}"][s, row], v[0], err_msg=key)
  # Images with 7 captions draw among the first 5 only, and every one of those 5 is drawn somewhere.
  long_ones = [c for (e, i), c in chosen.items() if i % 3 == 2]
  assert max(long_ones) <= 4 and set(long_ones) == set(range(5))


def test_resume_from_json_state_gives_the_same_batches(reference):
  resumed = worker.run_iterator(make, worker.STEPS, worker.RESUME_AT)
  assert_batches_equal(resumed, reference)


def test_state_resumes_on_another_process_count(reference):
  """A state saved by a 2-process run resumes a 1-process run at the same global step."""
  it = make(1, 2)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  assert state["step"] == 7
  single = make()
  single.set_state(state)
  rest = worker.stack_batches([next(single) for _ in range(worker.STEPS - 7)])
  single.close()
  assert_batches_equal(rest, {k: v[7:] for k, v in reference.items()})


def test_negatives_in_the_batch(reference):
  """Composed images copy exact rows: floor(n/2) of the positive's, then floor(m/2) of one other image's;
  composed captions change only object words, into vocabulary words."""
  r = worker.PIPELINE["max_regions"]
  for s in range(3):
    for row in range(G):
      own = (int(reference["image_id"][s, row]) - 1000) // 7
      own_feats = SOURCE[own]["features"][:r]
      pos_words = TOKENIZER.decode(
          reference["text_input_ids"][s, row], skip_special_tokens=True).split()
      for k in range(2):
        mask = reference["neg_image_attention_mask"][s, row, k, 16:]
        feats = reference["neg_image_img_feats"][s, row, k]
        n_valid = int(mask.sum())
        assert mask[:n_valid].all() and not feats[n_valid:].any()
        src = feats[:n_valid, 0].astype(int)
        n_own = len(own_feats) // 2
        assert (src[:n_own] == own).all()
        others = set(src[n_own:].tolist())
        assert len(others) <= 1 and own not in others
        if others:
          other_feats = SOURCE[others.pop()]["features"][:r]
          assert n_valid - n_own == len(other_feats) // 2
          np.testing.assert_array_equal(feats[n_own:n_valid], other_feats[feats[n_own:n_valid, 1].astype(int)])
        np.testing.assert_array_equal(feats[:n_own], own_feats[feats[:n_own, 1].astype(int)])
        assert len(set(feats[:n_valid, 1][:n_own].tolist())) == n_own  # distinct regions
        neg_words = TOKENIZER.decode(
            reference["neg_text_input_ids"][s, row, k], skip_special_tokens=True).split()
        assert len(neg_words) == len(pos_words)
        diff = [i for i, (a, b) in enumerate(zip(pos_words, neg_words)) if a != b]
        objects = [w for w in pos_words if w in VOCAB]
        assert len(diff) == (max(1, math.ceil(0.3 * len(objects))) if objects
                             else max(1, math.ceil(0.3 * len(pos_words))))
        assert all(neg_words[i] in VOCAB for i in diff)
        if objects:
          assert all(pos_words[i] in VOCAB for i in diff)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="global_batch_size 8 is not a positive multiple of the process count 3"):
    make(0, 3)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    make(global_batch_size=64)
  it = make()
  state = it.get_state()
  with pytest.raises(ValueError, match="'seed' is 11, but this pipeline has 12"):
    make(seed=12).set_state(state)
  with pytest.raises(ValueError, match=r"record \d+ \(image_id \d+\): 'features' has shape \(\d, 6\), "
                                       r"expected \[n, 7\]"):
    make(feature_dim=7).batch_at(0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_jax_processes_see_the_same_global_batches(reference, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, worker.__file__, "--port", str(port), "--process_id", str(i), "--num_processes", "2",
       "--out", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  outs = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(2)]
  for i, o in enumerate(outs):
    assert (int(o["process_index"]), int(o["process_count"]), int(o["global_devices"])) == (i, 2, 8)
  for prefix in ("straight_", "resumed_"):
    stitched = {k[len(prefix):]: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0] if k.startswith(prefix)}
    assert_batches_equal(stitched, reference)


# ------------------------------------------------------------------------------------------------------
# A real prepared dataset (tfds array_record, through data/prepare.py), read by a grain worker process.


@pytest.fixture(scope="module")
def demo_train(tmp_path_factory):
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.data import prepare
  data_dir = str(tmp_path_factory.mktemp("demo_data"))
  name = demo.prepare_demo(data_dir, seed=0, num_train=40, num_test=12)
  return prepare.load_split(data_dir, name, "train")


def test_prepared_dataset_resumed_into_a_grain_worker_process(demo_train):
  """On the tfds source: rows are the inputs (docs/method.md §3) of their record, composed images copy exact rows, 2
  processes stitch to the 1-process batches, and a JSON state restored into an iterator whose batches come
  from a grain worker process (the source and tokenizer pickled to it) continues identically.
  One worker, started once: each start imports jax, grain and transformers, seconds on 2 busy cores."""
  from vldeformer_jax.data import demo_world as demo
  records = [demo_train[i] for i in range(len(demo_train))]
  by_id = {int(r["image_id"]): r for r in records}
  vocab = negatives.build_tag_vocabulary(demo_train, progress=False)
  kwargs = dict(tokenizer=TOKENIZER, global_batch_size=8, seed=5, max_text_len=35, max_tag_len=12, max_regions=10,
                feature_dim=demo.FEATURE_DIM, negatives_per_pair=1, tag_vocabulary=vocab)
  steps, resume_at = 7, 3

  def run(process_index=0, process_count=1, worker_count=0, resume=None):
    def make_it():
      return pipeline.make_train_iterator(demo_train, process_index=process_index, process_count=process_count,
                                          worker_count=worker_count, **kwargs)
    if resume is None:
      return worker.run_iterator(make_it, steps)
    with make_it() as it:
      it.set_state(json.loads(json.dumps(resume)))
      tail = [next(it) for _ in range(steps - resume["step"])]
    assert all(type(v) is np.ndarray for v in tail[0].values())
    return worker.stack_batches(tail)

  ref = run()
  two = [run(p, 2) for p in range(2)]
  assert_batches_equal({k: np.concatenate([b[k] for b in two], axis=1) for k in ref}, ref)
  first = pipeline.make_train_iterator(demo_train, process_index=0, process_count=1, **kwargs)
  for _ in range(resume_at):
    next(first)
  resumed = run(worker_count=1, resume=first.get_state())
  first.close()
  assert_batches_equal(resumed, {k: v[resume_at:] for k, v in ref.items()})

  for s in range(2):
    for row in range(8):
      rec = by_id[int(ref["image_id"][s, row])]
      texts = inputs.text_inputs(TOKENIZER, list(rec["captions"][:5]), 35)["input_ids"]
      assert any(np.array_equal(t, ref["text_input_ids"][s, row]) for t in texts)
      image = inputs.image_inputs(TOKENIZER, [rec["features"]], [rec["tags"]], 12, 10, demo.FEATURE_DIM)
      np.testing.assert_array_equal(ref["image_img_feats"][s, row], image["img_feats"][0])
      np.testing.assert_array_equal(ref["image_input_ids"][s, row], image["input_ids"][0])
      feats = ref["neg_image_img_feats"][s, row, 0]
      n_own = len(rec["features"][:10]) // 2
      own_rows = {r.tobytes() for r in rec["features"][:10]}
      assert all(r.tobytes() in own_rows for r in feats[:n_own])
      n_valid = int(ref["neg_image_attention_mask"][s, row, 0, 12:].sum())
      others = [o for o in records if int(o["image_id"]) != int(rec["image_id"])
                and len(o["features"][:10]) // 2 == n_valid - n_own
                and all(r.tobytes() in {x.tobytes() for x in o["features"][:10]} for r in feats[n_own:n_valid])]
      assert others, (s, row)
