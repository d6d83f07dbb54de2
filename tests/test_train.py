"""The training loop on configs/tiny.py: end to end through launch/train.py, the sharded step, NaN handling.

- `launch/train.py --config=configs/tiny.py` trains 12 steps on 8 simulated devices and writes rolling
  checkpoints, the best checkpoint, metrics.jsonl (every step once; the learning rate equal to the
  schedule), TensorBoard events, a PNG, and an export that `Encoder.load` reads; the export holds exactly
  the final checkpoint's parameters, and the logged retrieval numbers equal an independent evaluation of
  the export;
- one train step on 8 devices equals the same step on 1 device within 1e-5 (dropout on, hard negatives
  on): the dropout masks and the gathered loss do not depend on the device count;
- a NaN loss stops the run with its step number and leaves the last good checkpoint as the latest.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from vldeformer_jax import optim, parallel, train, train_setup  # noqa: E402
from vldeformer_jax.metrics import read_metrics  # noqa: E402
from vldeformer_jax.model import VLDeformer  # noqa: E402

TRAIN_KEYS = {"loss", "t2i_accuracy", "i2t_accuracy", "pos_sim", "neg_sim", "grad_norm", "param_norm",
              "learning_rate", "temperature"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """The tiny demo dataset, generated once per session (as `configs/tiny.py` does in a workdir)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tiny_data")
  train_setup.generate_demo(tiny.get_config(), data_dir)
  return data_dir


@pytest.fixture(scope="session")
def jit_cache(tmp_path_factory):
  """A persistent compilation cache shared by the subprocess runs: the same program compiles once."""
  return str(tmp_path_factory.getbasetemp() / "jit_cache")


def launch(workdir, data_dir, cache_dir, *overrides, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_trains_end_to_end_through_launch(tmp_path, tiny_data, jit_cache):
  workdir = tmp_path / "run"
  r = launch(workdir, tiny_data, jit_cache)
  assert r.returncode == 0, r.stderr[-4000:]
  c = tiny.get_config()
  steps = c.train.num_steps
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [9, 12]
  assert os.listdir(workdir / "best") == ["12"]

  records = read_metrics(str(workdir / "metrics.jsonl"))
  train_records = [m for m in records if m["split"] == "train"]
  assert [m["step"] for m in train_records] == list(range(1, steps + 1))
  for m in train_records:
    assert TRAIN_KEYS <= set(m), sorted(m)
    assert np.isfinite(m["loss"])
  schedule = optim.learning_rate_schedule(c.train.learning_rate, c.train.warmup_steps, steps)
  for m in train_records:  # the update of step s uses the schedule at s - 1 (0 first, as in PyTorch)
    np.testing.assert_allclose(m["learning_rate"], float(schedule(m["step"] - 1)), rtol=1e-5)
  assert "first_step_seconds" in train_records[0] and "examples_per_sec" in train_records[1]
  np.testing.assert_allclose([m["temperature"] for m in train_records], c.loss.temperature, rtol=1e-6)
  (eval_record,) = [m for m in records if m["split"] == "eval"]
  assert eval_record["step"] == steps
  for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"):
    assert key in eval_record

  with open(workdir / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))

  # The export: Encoder.load reads it, it holds exactly the last checkpoint's parameters, and the logged
  # retrieval numbers are those of an independent evaluation of it.
  from vldeformer_jax.encoder import Encoder
  from vldeformer_jax.export import read_export
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval.evaluate import evaluate
  ex = read_export(str(workdir / "export"))
  assert ex.metadata["step"] == steps
  saved = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(steps) / "state"))
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved["params"])[0])
  flat_export = dict(jax.tree_util.tree_flatten_with_path(ex.params)[0])
  assert len(flat_export) == len(flat_saved) > 0
  for path, value in flat_export.items():
    np.testing.assert_array_equal(np.asarray(flat_saved[path]), value)
  encoder = Encoder.load(str(workdir / "export"))
  assert encoder.fingerprint == ex.fingerprint
  emb = encoder.embed_texts(["a small red dog left of a blue car"])
  assert emb.shape == (1, c.model.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  source = prepare.load_split(tiny_data, c.data.name, c.data.eval_split)
  results = evaluate(encoder, source, protocol=c.eval.protocol, batch_size=c.eval.batch_size)
  for direction in ("i2t", "t2i"):
    for k in ("R@1", "R@5", "R@10"):
      np.testing.assert_allclose(eval_record[f"{direction}_{k}"], results[direction][k], atol=1e-9)


def _step_config(tiny_data):
  c = tiny.get_config()
  c.data.data_dir = tiny_data
  c.model.num_hidden_layers = 1
  c.data.negatives.num_per_pair = 1  # composed hard negatives: [B, K, ...] flattened through the encoder
  return c


def _run_steps(c, mesh, batches, num_steps):
  mc, _, vocab = train_setup.model_config_from(c)
  tx, schedule = optim.make_optimizer(c.train, 10)
  init = train_setup.Init(mc, vocab, None, "test")

  class NoCheckpoints:
    def latest_step(self):
      return None

  state, _, _ = train_setup.initial_state(c, init, tx, mesh, NoCheckpoints())
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = train.jit_train_step(train.make_train_step(VLDeformer(mc), c, mesh, tx, schedule), shardings, mesh)
  metrics = []
  for b in batches[:num_steps]:
    state, m = step(state, parallel.global_batch(b, mesh), jax.random.key(7))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_sharded_step_equals_single_device(tiny_data):
  c = _step_config(tiny_data)
  assert c.model.hidden_dropout_prob > 0 and c.model.attention_probs_dropout_prob > 0
  data = train_setup.open_data(c, "/nonexistent")
  mc, _, vocab = train_setup.model_config_from(c)
  with train_setup.make_iterator(c, data, vocab, "/nonexistent") as it:
    batches = [{k: v for k, v in next(it).items() if k != "image_id"} for _ in range(2)]
  assert batches[0]["neg_image_img_feats"].shape[:2] == (c.train.global_batch_size, 1)
  mesh8 = parallel.make_mesh(devices=jax.devices()[:8])
  mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
  s8, m8 = _run_steps(c, mesh8, batches, 2)
  s1, m1 = _run_steps(c, mesh1, batches, 2)
  for a, b in zip(m8, m1):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert int(s8.step) == int(s1.step) == 2
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s8.params)[0], jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert m8[1]["loss"] != m8[0]["loss"]  # the step actually trained


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_data, jit_cache):
  workdir = tmp_path / "nan"
  r = launch(workdir, tiny_data, jit_cache, "--config.model.num_hidden_layers=1",
             "--config.model.hidden_dropout_prob=0.0", "--config.model.attention_probs_dropout_prob=0.0",
             "--config.train.learning_rate=1e30", "--config.train.warmup_steps=0",
             "--config.train.max_grad_norm=0.0", "--config.train.checkpoint_every=1",
             "--config.train.max_to_keep=100", "--config.train.eval_every=-1")
  assert r.returncode != 0
  logged = [m["step"] for m in read_metrics(str(workdir / "metrics.jsonl")) if m["split"] == "train"]
  bad_step = logged[-1] + 1
  assert re.search(rf"FloatingPointError: training diverged: the loss is (nan|inf|-inf) at step {bad_step}\b",
                   r.stderr), r.stderr[-3000:]
  assert logged == list(range(1, bad_step))
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved == logged  # every good step checkpointed, nothing after the NaN
  assert not (workdir / "export").exists()
