"""The sigmoid loss (`loss.name = sigmoid`, training/sigmoid_loss.py `sigmoid_loss`; docs/method.md §4.7).

- sharded over 8 devices (data=8 and data=2 x fsdp=2 x model=2), with its caption blocks rotating around
  the batch axes, it equals a dense float64 reference written from the definition (every pair's logit
  in one matrix): loss, gradients w.r.t. the encoder weight, each embedding, the temperature and the
  bias (rule F32), and the accuracies exactly (top-1 gaps checked against the rounding bound);
- the compiled sharded loss + gradient never all-gathers: it moves blocks with collective-permutes only;
- a hand-computed example;
- a train step with it keeps a learnable logit bias in a `BiasedTrainState`, which checkpoints and
  restores bit for bit, and which a state without the bias does not silently restore.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_configs import config_module

tiny = config_module("tiny")
from vldeformer_jax import parallel  # noqa: E402
from vldeformer_jax.io import checkpoint as ckpt_lib  # noqa: E402
from vldeformer_jax.model.vldeformer import VLDeformer  # noqa: E402
from vldeformer_jax.training import losses, optim, sigmoid_loss  # noqa: E402
from vldeformer_jax.training import setup as train_setup  # noqa: E402
from vldeformer_jax.training import state as state_lib  # noqa: E402
from vldeformer_jax.training import step as step_lib  # noqa: E402

import multiprocess_loss_worker as worker  # noqa: E402
import step_bounds  # noqa: E402
from tolerances import ELEMENTARY, assert_bitwise, assert_f32, f32_bound, max_abs  # noqa: E402

TEMPERATURE, BIAS = 0.1, -2.0  # logits cos / T + b in [-12, 8]: both sides of the sigmoid are exercised
G, K, F, D = worker.GLOBAL_ROWS, worker.NUM_NEG, worker.FEAT_DIM, worker.EMB_DIM
PAIRS = G * G * (1 + 2 * K)  # caption x image, caption x composed image, composed caption x image
L = 1.0 / TEMPERATURE + abs(BIAS)
# Rule F32 sizes: the embedding (F), its inverse norm (D, rsqrt) and the cosine (D), the logit (2), the
# softplus (exp, log), the sum over every pair; the gradients add the sum over the pairs a row takes part
# in and over every embedded row (for the shared weight).
N_LOSS = F + 2 * D + 4 + 2 * ELEMENTARY + PAIRS
N_GRAD = N_LOSS + G * (1 + 2 * K) + D + 2 * G * (1 + K)
N_COS = F + 2 * D + ELEMENTARY + 2


def dense_reference(xp, t, v, nt, nv, temperature, bias):
  """The definition with every logit in one matrix: xp is numpy / jax.numpy (float64 either way)."""
  def norm(x):
    return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
  t, v, nt, nv = norm(t), norm(v), norm(nt.reshape(-1, D)), norm(nv.reshape(-1, D))
  x = t @ v.T / temperature + bias
  z = 2.0 * np.eye(G) - 1.0
  softplus = lambda y: xp.logaddexp(y, 0.0)  # noqa: E731
  total = xp.sum(softplus(-z * x))
  total += xp.sum(softplus(t @ nv.T / temperature + bias)) + xp.sum(softplus(nt @ v.T / temperature + bias))
  return total / G


@functools.lru_cache(maxsize=None)
def reference():
  """float64 (loss, grads w.r.t. (w, {embedding offsets}, temperature, bias), t2i / i2t logit matrices)."""
  p = worker.make_problem()
  with jax.enable_x64(True):
    def objective(w, offsets, temperature, bias):
      embs = [jnp.asarray(p[k], jnp.float64) @ w + offsets[k] for k in worker.EMB_KEYS]
      return dense_reference(jnp, *embs, temperature, bias)
    offsets = {k: jnp.zeros(p[k].shape[:-1] + (D,), jnp.float64) for k in worker.EMB_KEYS}
    loss, grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3)))(
        jnp.asarray(p["w"], jnp.float64), offsets, jnp.float64(TEMPERATURE), jnp.float64(BIAS))
    grads = jax.tree.map(np.asarray, grads)
  embs = [p[k].astype(np.float64) @ p["w"].astype(np.float64) for k in worker.EMB_KEYS]
  t, v, nt, nv = [e / np.linalg.norm(e, axis=-1, keepdims=True) for e in embs]
  t2i = np.concatenate([t @ v.T, t @ nv.reshape(-1, D).T], axis=1)   # caption rows: images, composed images
  i2t = np.concatenate([v @ t.T, v @ nt.reshape(-1, D).T], axis=1)   # image rows: captions, composed captions
  return float(loss), grads, t2i, i2t


@functools.lru_cache(maxsize=None)
def sharded(mesh_shape):
  mesh = parallel.make_mesh(*mesh_shape, devices=jax.devices()[:8])
  p = worker.make_problem()
  feats = parallel.global_batch({k: p[k] for k in worker.EMB_KEYS}, mesh)
  w = jax.device_put(p["w"], parallel.replicated(mesh))
  loss_fn = sigmoid_loss.sharded_sigmoid_loss(mesh)

  def objective(w, offsets, temperature, bias):
    embs = {k: jnp.einsum("...f,fd->...d", feats[k], w) + offsets[k] for k in worker.EMB_KEYS}
    return loss_fn(embs["text"], embs["image"], embs["neg_text"], embs["neg_image"], temperature, bias)

  offsets = {k: jax.jit(lambda x: jnp.zeros(x.shape[:-1] + (D,), jnp.float32),
                        out_shardings=parallel.batch_sharding(mesh))(feats[k]) for k in worker.EMB_KEYS}
  fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True))
  args = (w, offsets, jnp.float32(TEMPERATURE), jnp.float32(BIAS))
  (loss, metrics), grads = fn(*args)
  hlo = fn.lower(*args).compile().as_text()
  return float(loss), jax.tree.map(float, jax.device_get(metrics)), jax.tree.map(np.asarray, grads), hlo


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_sigmoid_loss_and_gradients_equal_dense_reference(mesh_shape):
  loss64, grads64, t2i, i2t = reference()
  loss, metrics, grads, _ = sharded(mesh_shape)
  # Rule F32 against float64: the loss sums PAIRS softplus terms of at most L + 1 each, divided by G.
  assert_f32(loss, loss64, n=N_LOSS, scale=PAIRS / G * (L + 1))
  assert metrics["loss"] == loss
  # Gradients: sigmoids of logits up to L sit between the rounding and the gradient (scale L |g|).
  worst = 0.0
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads64)):
    assert_f32(got, want, n=N_GRAD, scale=L * max_abs(want), err_msg=jax.tree_util.keystr(path))
    worst = max(worst, float(np.max(np.abs(got - want))) / max_abs(want))
  assert max_abs(grads[0]) > 1e-3 and abs(float(grads[2])) > 1e-3 and abs(float(grads[3])) > 1e-3
  for k in worker.EMB_KEYS:
    assert max_abs(grads[1][k]) > 1e-5, k
  # Accuracies (the positive strictly above every other column of its row): the reference's gaps between
  # the positive and the best other column exceed twice the cosine bound, so they are exact here.
  bound = f32_bound(N_COS, 1.0, pair=True)
  for name, sims in (("t2i_accuracy", t2i), ("i2t_accuracy", i2t)):
    pos = np.diagonal(sims[:, :G])
    others = np.where(np.eye(G, sims.shape[1], dtype=bool), -np.inf, sims).max(axis=1)
    assert np.min(np.abs(pos - others)) > bound
    assert metrics[name] == np.mean(pos > others), (name, metrics[name], np.mean(pos > others))
    assert 0.0 < metrics[name] < 1.0  # not degenerate
  assert_f32(metrics["pos_logit"], np.mean(np.diagonal(t2i[:, :G])) / TEMPERATURE + BIAS, n=N_COS + G + 2,
             scale=L)
  print(f"\nmesh {mesh_shape}: loss {loss:.7f} vs float64 {loss64:.7f} (relative {abs(loss - loss64) / loss64:.1e}); "
        f"largest gradient error relative to its tensor's largest entry {worst:.1e}")


def test_sharded_sigmoid_never_gathers_the_pool():
  _, _, _, hlo = sharded((8, 1, 1))
  assert "all-gather" not in hlo
  assert "collective-permute" in hlo


def test_sigmoid_hand_computed_example():
  t = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # Orthonormal pairs, T = 1, b = 0: positives softplus(-1), negatives softplus(0) = log 2; two of each,
  # divided by G = 2. Rule F32 (n: 2-d cosines, the softplus, a 4-term sum and the division).
  loss, m = sigmoid_loss.sigmoid_loss(t, 3.0 * t, temperature=1.0, bias=0.0)
  want = np.log1p(np.exp(-1.0)) + np.log(2.0)
  assert_f32(loss, want, n=2 * 2 + 4 + 2 * ELEMENTARY + 4 + 1, scale=2 * (1 + np.log(2.0)))
  assert float(m["t2i_accuracy"]) == 1.0 and float(m["i2t_accuracy"]) == 1.0  # rule EXACT: 1 > 0
  with pytest.raises(ValueError, match="sigmoid loss is `sigmoid_loss`"):
    losses.contrastive_loss(t, t, name="sigmoid")


def test_sigmoid_train_step_keeps_a_learnable_bias_that_checkpoints(tmp_path):
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path / "data")
  c.model.num_hidden_layers = 1
  c.loss.name, c.loss.temperature, c.loss.learnable_temperature = "sigmoid", 0.1, True
  train_setup.generate_demo(c, c.data.data_dir)
  data = train_setup.open_data(c, "/nonexistent")
  mc, _, vocab = train_setup.model_config_from(c)
  with train_setup.make_iterator(c, data, vocab, "/nonexistent") as it:
    batches = [{k: v for k, v in next(it).items() if k != "image_id"} for _ in range(2)]
  mesh = parallel.make_mesh(devices=jax.devices()[:8])
  tx, schedule = optim.make_optimizer(c.train, 10)

  class NoCheckpoints:
    def latest_step(self):
      return None

  state, _, _ = train_setup.initial_state(c, train_setup.Init(mc, vocab, None, "test"), tx, mesh, NoCheckpoints())
  assert isinstance(state, state_lib.BiasedTrainState) and float(state.logit_bias) == c.loss.bias_init
  step = step_lib.jit_train_step(step_lib.make_train_step(VLDeformer(mc), c, mesh, tx, schedule),
                                 jax.tree.map(lambda x: x.sharding, state), mesh, step_bounds.FAST_COMPILE)
  for b in batches:
    state, metrics = step(state, parallel.global_batch(b, mesh), jax.random.key(0))
  assert isinstance(state, state_lib.BiasedTrainState)
  assert float(metrics["logit_bias"]) == float(state.logit_bias) != c.loss.bias_init  # trained (lr > 0 at step 2)
  assert float(metrics["temperature"]) != c.loss.temperature
  assert np.isfinite(float(metrics["loss"]))

  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=None)
  ckpts.save(2, state, {"step": 2})
  ckpts.wait()
  restored, _, _ = ckpts.restore(2, state_lib.abstract_state(mc, tx, mesh,
                                                            logit_bias=state_lib.initial_logit_bias(c)))
  assert isinstance(restored, state_lib.BiasedTrainState)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(state)):
    assert_bitwise(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))  # rule EXACT
  with pytest.raises(ValueError, match="cannot restore the training state"):
    ckpts.restore(2, state_lib.abstract_state(mc, tx, mesh))  # a state without the bias
  ckpts.close()
