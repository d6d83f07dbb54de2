"""The jitted train step: `(state, batch, rng) -> (state, metrics)` for either objective.

Parameters are float32, the compute dtype is `ModelConfig.dtype`. The dropout key of a step is
`fold_in(seed key, step)` and the model runs on global arrays, so dropout masks (threefry, partitionable)
do not depend on how many devices hold the batch (the decomposition keys them by row, training/decompose.py).

Two ways to run a global batch that does not fit in one forward/backward pass:
- gradient caching (`train.micro_batch_size` > 0, decomposition only; training/grad_cache.py): the batch is
  embedded in micro-batches, the loss and its gradient are taken over the whole pool, and each micro-batch's
  embedding gradient is pulled back through the encoder. Same objective, same gradient as one pass.
- gradient accumulation (`train.grad_accum_steps` > 1) scans over micro-batches, each its own loss: exact
  only for losses that are means over rows, so the config check refuses it for contrastive objectives.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vldeformer_jax import parallel
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training import decompose
from vldeformer_jax.training import early_interaction
from vldeformer_jax.training.state import TrainState


def make_train_step(model: VLDeformer, config, mesh, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: Callable | None = None) -> Callable:
  """The un-jitted step `(state, batch, rng) -> (state, metrics)`; `jit_train_step` compiles it.

  `rng` is the run's base key; the step's key is `fold_in(rng, state.step)` (and the micro-batch index
  under gradient accumulation), so a resumed run draws the same dropout masks. With
  `config.train.micro_batch_size` > 0 the decomposition's gradient comes from gradient caching.
  """
  micro_batch_size = int(config.train.get("micro_batch_size", 0))
  cached = None
  if loss_fn is None:
    decomposing = config.objective == "decompose"
    loss_fn = (decompose.make_loss_fn(model, config, mesh) if decomposing
               else early_interaction.make_loss_fn(model, config))
    if micro_batch_size > 0:
      if not decomposing or int(config.train.grad_accum_steps) > 1:
        raise ValueError("train.micro_batch_size (gradient caching) applies to objective 'decompose' only, "
                         "with train.grad_accum_steps 1")
      cached = decompose.make_cached_value_and_grad(model, config, mesh, micro_batch_size)
  grad_fn = cached or jax.value_and_grad(loss_fn, has_aux=True)
  accum = int(config.train.grad_accum_steps)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    trainable = state.trainable()
    if accum == 1 or cached is not None:
      (_, metrics), grads = grad_fn(trainable, batch, rng)
    else:
      # [G, ...] -> [accum, G/accum, ...] taking every accum-th row, so each device keeps its own rows.
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        (_, m), g = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.eval_shape(lambda: grad_fn(trainable, jax.tree.map(lambda x: x[0], micro), rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    metrics = dict(metrics)
    metrics.update(
        grad_norm=optax.tree.norm(grads["model"]),
        param_norm=optax.tree.norm(new["model"]),
        learning_rate=schedule(state.step),
        temperature=jnp.exp(new["log_temperature"]))
    extra = {}
    if "logit_bias" in new:  # the sigmoid loss's bias (BiasedTrainState)
      extra["logit_bias"] = metrics["logit_bias"] = new["logit_bias"]
    new_state = state.replace(step=state.step + 1, params=new["model"], log_temperature=new["log_temperature"],
                              opt_state=opt_state, **extra)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return step


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh, compiler_options: dict | None = None) -> Callable:
  """One jit per step: the state donated, batch-sharded inputs, replicated metrics. `compiler_options`:
  XLA options for this compilation (e.g. a cheaper CPU code generation in tests)."""
  repl = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl), donate_argnums=(0,), compiler_options=compiler_options)
