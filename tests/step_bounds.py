"""Rounding bounds for comparing whole train steps (decomposition objective) run two ways: on two meshes,
with and without gradient caching. Rules of tests/tolerances.py, carried through AdamW.

The derivation is the one of `adamw_bounds` in tests/test_train.py, kept here as its own small module so
the tests of gradient caching, meshes and the sigmoid loss share it:
- `step_depths`: n of rule F32 for the loss (one BERT forward per branch, the pool's logsumexp) and for the
  gradients (the backward pass again, and the sum over every token row of the batch a shared weight sees);
- `gradient_error`: per element, how far a run's clipped gradient can be from the exact one at any step
  up to t: the softmax's logit bound L times the tensor's largest gradient (read off Adam's second moment:
  max_s |g_s| <= sqrt(nu_t / ((1 - b2) b2^(t-1)))), plus the clip factor's error. The attention key bias
  has an exact gradient of 0 (it shifts all of a query's scores alike): its float32 gradient is the
  rounding of terms as large as the key kernel's gradient, which is its scale;
- `adamw_step_bound`: how far the two runs' parameters can move apart in AdamW step t when both runs'
  gradients are within that error at every step (|d mu_hat| <= err, |d sqrt(nu_hat)| <= err; the update
  mu_hat / (sqrt(nu_hat) + eps) moves by at most (1 + D) err / (sqrt(nu_hat) + eps), D =
  sqrt(sum_s w1_s^2 / w2_s), and never by more than 2 D), plus each side's rounding of the update.
Over several steps the per-step bounds are added: first order, i.e. a parameter difference of one step
changes the next step's gradient by far less than the rounding bound (the Hessian times differences of
a few ulps, against gradient bounds of gamma(n) L |g| >> ulp).
"""
from __future__ import annotations

import jax
import numpy as np
import optax

from tolerances import ELEMENTARY, gamma, transformer_depth


def step_depths(config, mc) -> dict[str, float]:
  """n of rule F32 for the step's loss and gradients, the loss's pool size, its logit bound L and the
  magnitude of its terms (`loss_scale`, the scale of rule F32 for the loss).

  For `loss.name = sigmoid` the logits are cos / T + bias (|bias| from `loss.bias_init`, the test's runs
  stay within a few steps of it) and the loss sums G x pool softplus terms.
  """
  g, k = config.train.global_batch_size, config.data.negatives.num_per_pair
  seq = mc.tag_len + mc.max_regions
  pool = g * (1 + k)
  logit = 1.0 / config.loss.temperature
  n_fwd = transformer_depth(hidden=mc.hidden_size, intermediate=mc.intermediate_size, layers=mc.num_hidden_layers,
                            heads=mc.num_attention_heads, seq_len=seq, pooling_len=seq)
  if config.loss.name == "sigmoid":
    # G (G + 2 G K) pair terms softplus(+-x) <= L + 1 each, summed, divided by G.
    logit += abs(config.loss.bias_init) + 1.0
    pairs = g * g * (1 + 2 * k)
    n_loss = n_fwd + 2 * mc.hidden_size + pairs + 2 * ELEMENTARY + 8
    loss_scale = pairs / g * (logit + 1.0)
  else:
    # Per direction a logsumexp over the pool (<= L + log pool) and the positive (<= L), summed.
    n_loss = n_fwd + 2 * mc.hidden_size + pool + g + 6 * ELEMENTARY + 8
    loss_scale = 2 * (2 * logit + np.log(pool))
  n_grad = n_loss + n_fwd + pool + g + 2 * g * (1 + k) * seq
  return {"fwd": n_fwd, "loss": n_loss, "grad": n_grad, "pool": pool, "logit": logit, "loss_scale": loss_scale}


def adam_moments(state):
  """(mu, nu) of the optax Adam state inside `state.opt_state`, as trees like `state.trainable()`."""
  (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(x, optax.ScaleByAdamState)]
  return adam.mu, adam.nu


def gradient_error(nu, t: int, b2: float, n_grad: float, logit: float):
  """Per element, a bound on |clipped gradient - exact| at every step <= t of a run whose Adam second
  moment after step t is `nu` (see the module docstring)."""
  nnz = sum(int(np.count_nonzero(np.asarray(v))) for v in jax.tree.leaves(nu))
  g_max = jax.tree.map(lambda v: np.sqrt(np.asarray(v, np.float64) / ((1 - b2) * b2 ** (t - 1))), nu)
  tensor_max = {jax.tree_util.keystr(p): float(x.max(initial=0.0))
                for p, x in jax.tree_util.tree_flatten_with_path(g_max)[0]}

  def err(path, g):
    name = jax.tree_util.keystr(path)
    scale = tensor_max[name.replace("['key']['bias']", "['key']['kernel']")]
    return gamma(n_grad) * logit * scale + (gamma(nnz) + gamma(n_grad) * logit) * g
  return jax.tree_util.tree_map_with_path(err, g_max)


def adamw_step_bound(err, nu, params, lr: float, train, t: int):
  """Per element, how far two runs' parameters can move apart in AdamW step t (see the module docstring);
  `nu`, `params`: the reference run's second moment and parameters after step t."""
  b1, b2, eps, wd = train.adam_b1, train.adam_b2, train.adam_eps, train.weight_decay
  w1 = np.array([(1 - b1) * b1 ** (t - s) for s in range(1, t + 1)]) / (1 - b1 ** t)
  w2 = np.array([(1 - b2) * b2 ** (t - s) for s in range(1, t + 1)]) / (1 - b2 ** t)
  d = float(np.sqrt(np.sum(w1 ** 2 / w2)))

  def bound(e, v, p):
    root = np.sqrt(np.asarray(v, np.float64) / (1 - b2 ** t))
    direction = np.minimum(2 * d, 2 * (1 + d) * e / (root + eps) + 2 * gamma(12) * d)
    return lr * direction + 2 * gamma(4) * (np.abs(p) + lr * (d + wd * np.abs(p)))
  return jax.tree.map(bound, err, nu, params)


def run_bound(history, train, n_grad: float, logit: float):
  """The summed per-step bounds over a run: `history` is [(state after step t, learning rate of step t)]
  of the reference run, t = 1, 2, ..."""
  total = None
  for t, (state, lr) in enumerate(history, start=1):
    _, nu = adam_moments(state)
    step = adamw_step_bound(gradient_error(nu, t, train.adam_b2, n_grad, logit), nu, state.trainable(), lr,
                            train, t)
    total = step if total is None else jax.tree.map(np.add, total, step)
  return total


# XLA options that make the CPU compilations of the tests' train steps cheaper (LLVM's expensive passes
# off): the programs, hence every bound above, are the same; only the machine code is less optimised.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
