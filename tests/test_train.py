"""The train step and the loop's failure handling on configs/tiny.py (the end-to-end run through
launch/train.py and resuming are in test_resume.py).

- one train step on 8 devices equals the same step on 1 device within float32 rounding (dropout on, hard
  negatives on; bounds from tests/tolerances.py and the AdamW update below): the dropout masks and the
  gathered loss do not depend on the device count;
- a NaN loss stops the run with its step number and leaves the last good checkpoint as the latest.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
from tolerances import ELEMENTARY, assert_f32, assert_within, gamma, transformer_depth  # noqa: E402



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


def adam_moments(state):
  """(mu, nu) of the optax Adam state inside `state.opt_state`, as trees like the trainable tree."""
  (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(x, optax.ScaleByAdamState)]
  return adam.mu, adam.nu


def adamw_bounds(err, mu, nu, params, lr, train, t):
  """Per element, how far two runs' first moments and parameters after AdamW step `t` can differ when
  each run's (clipped) gradients are within `err` of the exact ones at every step, the parameters before
  the step being equal (tests/tolerances.py, rule F32-PAIR through the optimiser).

  mu_t and nu_t are weighted means of the step gradients (bias-corrected weights w_s summing to 1; of g^2
  for nu), so |delta mu_hat| <= err and |delta sqrt(nu_hat)| <= err; |mu_hat| / sqrt(nu_hat) <= D =
  sqrt(sum_s w1_s^2 / w2_s) (Cauchy-Schwarz); the update mu_hat / (sqrt(nu_hat) + eps) then moves by at
  most (1 + D) err / (sqrt(nu_hat) + eps) per run (twice that between two runs), and never by more than
  2 D. Each side adds its own rounding of the moments and the update.
  """
  b1, b2, eps, wd = train.adam_b1, train.adam_b2, train.adam_eps, train.weight_decay
  w1 = np.array([(1 - b1) * b1 ** (t - s) for s in range(1, t + 1)]) / (1 - b1 ** t)
  w2 = np.array([(1 - b2) * b2 ** (t - s) for s in range(1, t + 1)]) / (1 - b2 ** t)
  d = float(np.sqrt(np.sum(w1 ** 2 / w2)))
  mu_bound = jax.tree.map(lambda e, m: 2 * (1 - b1 ** t) * e + 2 * gamma(2 * t) * np.abs(m), err, mu)

  def param_bound(e, v, p):
    root = np.sqrt(np.asarray(v, np.float64) / (1 - b2 ** t))
    direction = np.minimum(2 * d, 2 * (1 + d) * e / (root + eps) + 2 * gamma(12) * d)
    return lr * direction + 2 * gamma(4) * (np.abs(p) + lr * (d + wd * np.abs(p)))
  return mu_bound, jax.tree.map(param_bound, err, nu, params)


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
  # Rule F32-PAIR sizes: one BERT forward per branch (the longer: tags + regions), the contrastive loss over
  # a pool of P = G (1 + K) columns with logits up to L = 1 / T; the gradients add the backward pass and
  # the sum over every token row of the batch that a shared weight sees.
  mc = train_setup.model_config_from(c)[0]
  g, k, seq = c.train.global_batch_size, c.data.negatives.num_per_pair, mc.tag_len + mc.max_regions
  pool, logit = g * (1 + k), 1.0 / c.loss.temperature
  n_fwd = transformer_depth(hidden=mc.hidden_size, intermediate=mc.intermediate_size, layers=mc.num_hidden_layers,
                            heads=mc.num_attention_heads, seq_len=seq, pooling_len=seq)
  n_loss = n_fwd + 2 * mc.hidden_size + pool + g + 6 * ELEMENTARY + 8
  n_grad = n_loss + n_fwd + pool + g + 2 * g * (1 + k) * seq
  mu, nu = adam_moments(s1)
  nnz = sum(int(np.count_nonzero(np.asarray(v))) for v in jax.tree.leaves(nu))  # gradient entries that are not 0
  lr, temp = m1[1]["learning_rate"], c.loss.temperature
  for a, b in zip(m8, m1):
    assert set(a) == set(b) == {"loss", "t2i_loss", "i2t_loss", "pos_sim", "neg_sim", "hard_neg_sim", "grad_norm",
                                "param_norm", "t2i_accuracy", "i2t_accuracy", "learning_rate", "temperature"}, set(a)
    for key in ("loss", "t2i_loss", "i2t_loss"):  # cross-entropies: terms up to 2 L + log P per direction
      assert_f32(a[key], b[key], n=n_loss, scale=2 * (2 * logit + np.log(pool)), pair=True, err_msg=key)
    for key in ("pos_sim", "neg_sim", "hard_neg_sim"):  # means of up to G x P cosines (scale 1)
      assert_f32(a[key], b[key], n=n_fwd + mc.hidden_size + g * pool, scale=1.0, pair=True, err_msg=key)
    # The gradients through the softmax (scale L |g|), then the norm's sum over the non-zero entries.
    assert_f32(a["grad_norm"], b["grad_norm"], n=n_grad + nnz, scale=logit * b["grad_norm"], pair=True)
    assert_f32(a["learning_rate"], b["learning_rate"], n=13 + ELEMENTARY, scale=c.train.learning_rate, pair=True)
    assert_f32(a["temperature"], b["temperature"], n=1 + ELEMENTARY, scale=temp * (1 + abs(np.log(temp))), pair=True)
    # Not compared: the accuracies (argmax counts over a random model's cosines: a near tie within rounding
    # may flip one query; the losses cover the same logits) and param_norm (a sum over ~1e6 parameters,
    # whose worst-case bound says little; the parameters themselves are compared below).
  assert int(s8.step) == int(s1.step) == 2
  assert m1[0]["learning_rate"] == 0.0 and lr > 0  # step 1 leaves the parameters as they were
  # The clipped gradients of each step, per tensor: the softmax's L times the tensor's largest gradient
  # (from Adam's second moment: max_s |g_s| <= sqrt(nu_hat / min_s w2_s)), plus the clip factor's error.
  # The attention key bias is the exception: its exact gradient is 0 (it shifts all of a query's scores
  # alike), so its float32 gradient is the rounding of terms as large as the key kernel's gradient, which
  # is its scale; Adam turns that noise into steps of +-lr, which the bound allows.
  b2 = c.train.adam_b2
  w2_min = min((1 - b2) * b2, 1 - b2) / (1 - b2 ** 2)
  g_max = jax.tree.map(lambda v: np.sqrt(np.asarray(v, np.float64) / (1 - b2 ** 2) / w2_min), nu)
  tensor_max = {jax.tree_util.keystr(p): float(x.max(initial=0.0))
                for p, x in jax.tree_util.tree_flatten_with_path(g_max)[0]}

  def grad_err(path, g):
    name = jax.tree_util.keystr(path)
    scale = tensor_max[name.replace("['key']['bias']", "['key']['kernel']")]
    return gamma(n_grad) * logit * scale + (gamma(nnz) + gamma(n_grad) * logit) * g
  err = jax.tree_util.tree_map_with_path(grad_err, g_max)
  mu_bound, p_bound = adamw_bounds(err, mu, nu, s1.trainable(), lr, c.train, t=2)
  mu8, _ = adam_moments(s8)
  for name, got, want, bound in (("mu", mu8, mu, mu_bound), ("params", s8.trainable(), s1.trainable(), p_bound)):
    for (path, x), y, e in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                               jax.tree.leaves(bound)):
      assert_within(x, y, e, rule="rule F32-PAIR through AdamW", err_msg=f"{name}{jax.tree_util.keystr(path)}")
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
  full-batch gradient: accumulated and plain steps must agree (the micro-batch split is per device).
  Two steps: the first (learning rate 0) fills Adam's moments, the second moves the parameters, both
  from the same parameters, so the runs differ only by the rounding of the gradients (rule F32-PAIR,
  through `adamw_bounds`)."""
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
    for _ in range(2):
      state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(0))
    results.append((np.asarray(state.params["w"]), jax.device_get(metrics), jax.device_get(state)))
  # The gradient (2 / N) X^T (X w - y) in float32: a 5-term dot product, the residual, the sum over the
  # 16 rows (in the accumulated run two sums of 8 and their mean), a few scalings: n = 5 + 16 + 8. Its
  # terms' magnitude per weight, in float64: (2 / N) sum_r |x_ri| (sum_j |x_rj w_j| + |y_r|).
  x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
  scale = 2 / len(x) * np.abs(x).T @ (np.abs(x) @ np.abs(w0.astype(np.float64)) + np.abs(y))
  n_grad = 5 + 16 + 8
  g = 2 / len(x) * x.T @ (x @ w0 - y)
  err = gamma(n_grad) * scale
  if np.linalg.norm(g) > c.train.max_grad_norm:  # clipped by 1 / |g|: that norm's relative error too
    err = (err + np.abs(g) * (np.linalg.norm(err) / np.linalg.norm(g) + gamma(5 + 3))) / np.linalg.norm(g)
  (w1, m1, s1), (w2, m2, s2) = results
  mu, nu = adam_moments(s1)
  mu_bound, p_bound = adamw_bounds({"model": {"w": err}, "log_temperature": 0.0}, mu, nu, s1.trainable(),
                                   float(m1["learning_rate"]), c.train, t=2)
  assert_within(w2, w1, p_bound["model"]["w"], rule="rule F32-PAIR through AdamW")
  assert_within(adam_moments(s2)[0]["model"]["w"], mu["model"]["w"], mu_bound["model"]["w"],
                rule="rule F32-PAIR through AdamW")
  # The last step's metrics, at the same parameters: the loss (terms up to the largest squared residual
  # magnitude) and the norm of the gradient (its terms' magnitudes).
  assert_f32(m2["loss"], m1["loss"], n=5 + 2 + 16 + 8, scale=np.mean((np.abs(x) @ np.abs(w0) + np.abs(y)) ** 2),
             pair=True)
  assert_f32(m2["grad_norm"], m1["grad_norm"], n=n_grad + 5 + 3, scale=np.linalg.norm(scale), pair=True)
  assert np.abs(w1 - w0).max() > 0.5 * float(m1["learning_rate"])  # the second step moved the weights (~ lr)


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
