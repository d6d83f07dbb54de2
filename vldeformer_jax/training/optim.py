"""The optimiser of docs/method.md §6.1: AdamW with decoupled weight decay, warm-up + half cosine, global-norm clipping.

Why its own module: the schedule and the weight-decay mask are the two places where a port silently
drifts from the reference (pytorch_transformers `AdamW` + `WarmupCosineSchedule`), so both are small,
pure functions that the tests can pin down:
- schedule: lr * s / warmup for s < warmup, then lr * 0.5 * (1 + cos(pi * p)), p = (s - warmup) /
  (total - warmup), floored at 0 (`optax.warmup_cosine_decay_schedule` is exactly this, evaluated at the
  number of updates already applied, so the first update uses lr 0 as the PyTorch scheduler does);
- no weight decay on any bias and on every LayerNorm scale (image LayerNorm included), decided by the
  parameter's path (docs/method.md §6.1: no weight decay there); everything outside the model (the log-temperature) is
  never decayed either.
Gradient accumulation is not an optax wrapper here: `train.py` scans over micro-batches inside one jitted
step, so one optimiser update happens per call and the step counter counts updates.
"""
from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then a half cosine to 0 at `total_steps`."""
  if total_steps <= 0:
    raise ValueError(f"train: total number of steps must be positive, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=0.0)


def _path_names(path) -> list[str]:
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    else:
      names.append(str(k))
  return names


def decays(path: str) -> bool:
  """Whether the parameter at '/'-joined `path` gets weight decay (docs/method.md §6.1: not biases, not LN scales)."""
  names = path.split("/")
  if names[-1] == "bias":
    return False
  if names[-1] == "scale" and any(n == "LayerNorm" for n in names):
    return False
  return True


def weight_decay_mask(params: Any) -> Any:
  """A tree of bools like `params`: True where weight decay applies. Leaves outside `model` are False."""
  def mask(path, _):
    names = _path_names(path)
    if names and names[0] == "model":
      return decays("/".join(names[1:]))
    return False
  return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(train_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW with the masked decoupled decay and the warm-up cosine schedule.

  `train_config` is the config's `train` block (`learning_rate`, `warmup_steps`, `weight_decay`,
  `max_grad_norm`, `adam_b1`, `adam_b2`, `adam_eps`). The optimised tree is `{"model": params, ...}`.
  """
  schedule = learning_rate_schedule(train_config.learning_rate, train_config.warmup_steps, total_steps)
  parts = []
  if train_config.max_grad_norm and train_config.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(train_config.max_grad_norm))
  parts.append(optax.adamw(
      learning_rate=schedule,
      b1=train_config.adam_b1,
      b2=train_config.adam_b2,
      eps=train_config.adam_eps,
      weight_decay=train_config.weight_decay,
      mask=weight_decay_mask))
  return optax.chain(*parts), schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        replicated) -> Any:
  """Shardings for the optimiser state: each params-shaped subtree (Adam's mu, nu) follows the parameters'
  shardings, every other leaf (counts, clipping state) is replicated."""
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated)


