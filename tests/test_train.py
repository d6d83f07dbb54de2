"""The train step and the loop's failure handling on configs/tiny.py (the end-to-end run through
launch/train.py and resuming are in test_resume.py).

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
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from repo_configs import config_module  # noqa: E402

tiny = config_module("tiny")
from vldeformer_jax.training import optim  # noqa: E402
from vldeformer_jax import parallel
from vldeformer_jax.training import state as state_lib
from vldeformer_jax.training import step as step_lib
from vldeformer_jax.training import setup as train_setup
from vldeformer_jax.training.metric_writers import read_metrics  # noqa: E402
from vldeformer_jax.model.vldeformer import VLDeformer  # noqa: E402



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
  # Cheaper XLA CPU codegen: this run is about control flow, not numbers.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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
  step = step_lib.jit_train_step(step_lib.make_train_step(VLDeformer(mc), c, mesh, tx, schedule), shardings, mesh)
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


def test_gradient_accumulation_equals_full_batch_for_a_mean_loss():
  """With a loss that is a mean over rows, averaging the gradients of 2 equal micro-batches is the
  full-batch gradient: accumulated and plain steps must agree (the micro-batch split is per device)."""
  c = tiny.get_config()
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((16, 5)).astype(np.float32), "y": rng.standard_normal((16,)).astype(np.float32)}
  w0 = rng.standard_normal((5,)).astype(np.float32)

  def loss_fn(trainable, b, _):
    err = b["x"] @ trainable["model"]["w"] - b["y"]
    loss = jnp.mean(err ** 2)
    return loss, {"loss": loss}

  mesh = parallel.make_mesh(devices=jax.devices()[:8])
  results = []
  for accum in (1, 2):
    c.train.grad_accum_steps = accum
    tx, schedule = optim.make_optimizer(c.train, 10)
    state = state_lib.create_state({"w": jnp.asarray(w0)}, jnp.float32(0.0), tx)
    state = jax.device_put(state, parallel.replicated(mesh))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = step_lib.jit_train_step(step_lib.make_train_step(None, c, mesh, tx, schedule, loss_fn=loss_fn), shardings, mesh)
    for _ in range(3):
      state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(0))
    results.append((np.asarray(state.params["w"]), jax.device_get(metrics)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(results[0][1]["grad_norm"], results[1][1]["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
  assert not np.allclose(results[0][0], w0)


def test_train_step_compiles_once_from_a_weak_typed_temperature():
  """create_state with a weak-typed log temperature (jnp.log of a Python float): the state the jitted step
  returns has the same types as the one it got, so later steps reuse the first compilation."""
  c = tiny.get_config()
  tx, schedule = optim.make_optimizer(c.train, 10)
  state = state_lib.create_state({"w": jnp.ones((5,), jnp.float32)}, jnp.log(0.07), tx)
  assert not any(getattr(x, "weak_type", False) for x in jax.tree.leaves(state))
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  state = jax.device_put(state, parallel.replicated(mesh))

  def loss_fn(trainable, b, _):
    loss = jnp.mean((b["x"] @ trainable["model"]["w"]) ** 2)
    return loss, {"loss": loss}

  step = step_lib.jit_train_step(step_lib.make_train_step(None, c, mesh, tx, schedule, loss_fn=loss_fn),
                              jax.tree.map(lambda x: x.sharding, state), mesh)
  batch = parallel.global_batch({"x": np.ones((4, 5), np.float32)}, mesh)
  for _ in range(3):
    state, _ = step(state, batch, jax.random.key(0))
  assert step._cache_size() == 1
