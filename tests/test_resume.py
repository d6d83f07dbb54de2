"""Training end to end through launch/train.py, and resuming it.

- `launch/train.py --config=configs/tiny.py` trains 12 steps on 8 simulated devices and writes rolling
  checkpoints, the best checkpoint, metrics.jsonl (every step once; the learning rate equal to the
  schedule), TensorBoard events, a PNG, and an export that `Encoder.load` reads; the export holds exactly
  the final checkpoint's parameters, and the logged retrieval numbers equal an independent evaluation of
  the export;
- a run killed with SIGKILL mid-training and restarted equals the uninterrupted run, bitwise on CPU
  (losses and metrics of every step, final parameters);
- a checkpoint written on 8 devices restores on a 1-device mesh with equal values.

The runs go through `launch/train.py` with configs/tiny.py (dropout on), as a user would; they share a
persistent compilation cache so the identical train step compiles once.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from repo_configs import config_module  # noqa: E402

tiny = config_module("tiny")
from vldeformer_jax.io import checkpoint  # noqa: E402
from vldeformer_jax.training import optim
from vldeformer_jax import parallel
from vldeformer_jax.training import setup as train_setup
from vldeformer_jax.training import state as state_lib
from vldeformer_jax.io.export import read_export  # noqa: E402
from vldeformer_jax.training.metric_writers import read_metrics  # noqa: E402
from vldeformer_jax.model.config import ModelConfig  # noqa: E402

TRAIN_KEYS = {"loss", "t2i_accuracy", "i2t_accuracy", "pos_sim", "neg_sim", "grad_norm", "param_norm",
              "learning_rate", "temperature"}
TIMING_KEYS = ("examples_per_sec", "first_step_seconds")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  data_dir = str(base / "tiny_data")
  train_setup.generate_demo(tiny.get_config(), data_dir)  # skipped when another test file made it
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
              JAX_COMPILATION_CACHE_DIR=str(base / "jit_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"), data_dir


def _cmd(workdir, data_dir):
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", ]


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _train_losses(workdir):
  return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
          for m in read_metrics(os.path.join(workdir, "metrics.jsonl")) if m["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
  environ, data_dir = env
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir


def test_tiny_trains_end_to_end_through_launch(env, uninterrupted):
  _, data_dir = env
  workdir = pathlib.Path(uninterrupted)
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
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.io.export import read_export
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
  source = prepare.load_split(data_dir, c.data.name, c.data.eval_split)
  results = evaluate(encoder, source, protocol=c.eval.protocol, batch_size=c.eval.batch_size,
                     mesh=parallel.make_mesh())  # as the trainer's evaluator: same programs, same numbers
  for direction in ("i2t", "t2i"):
    for k in ("R@1", "R@5", "R@10"):
      np.testing.assert_allclose(eval_record[f"{direction}_{k}"], results[direction][k], atol=1e-9)


def test_sigkill_then_resume_equals_uninterrupted_run(env, uninterrupted, tmp_path):
  environ, data_dir = env
  total = tiny.get_config().train.num_steps
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=environ, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not _finished_steps(workdir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  resume_from = _finished_steps(workdir)[-1]
  assert 0 < resume_from < total, _finished_steps(workdir)

  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"resumed step {resume_from}" in r.stderr

  # Same losses and metrics at every step (metrics.jsonl holds each step once), same final parameters.
  resumed, straight = _train_losses(workdir), _train_losses(uninterrupted)
  assert [m["step"] for m in resumed] == [m["step"] for m in straight] == list(range(1, total + 1))
  assert resumed == straight
  a, b = read_export(os.path.join(workdir, "export")), read_export(os.path.join(uninterrupted, "export"))
  assert a.metadata["step"] == b.metadata["step"] == total
  leaves_a = jax.tree_util.tree_flatten_with_path(a.params)[0]
  leaves_b = jax.tree.leaves(b.params)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)
  assert a.fingerprint == b.fingerprint


def test_checkpoint_from_8_devices_restores_on_1(uninterrupted):
  c = tiny.get_config()
  mc = ModelConfig.from_json(os.path.join(uninterrupted, "model_config.json"))
  tx, _ = optim.make_optimizer(c.train, c.train.num_steps)
  ckpts = checkpoint.Checkpoints(os.path.join(uninterrupted, "checkpoints"), max_to_keep=None)
  step = ckpts.latest_step()
  mesh8 = parallel.make_mesh(devices=jax.devices()[:8])
  mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
  on8, data8, _ = ckpts.restore(step, state_lib.abstract_state(mc, tx, mesh8))
  on1, data1, _ = ckpts.restore(step, state_lib.abstract_state(mc, tx, mesh1))
  ckpts.close()
  assert data8 == data1 and data1["step"] == step
  for x in jax.tree.leaves(on1):
    assert len(x.sharding.device_set) == 1
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(on8))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(on8)[0], jax.tree.leaves(on1)):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  exported = read_export(os.path.join(uninterrupted, "export")).params
  for x, y in zip(jax.tree.leaves(on1.params), jax.tree.leaves(exported)):
    assert np.array_equal(np.asarray(x), y)
