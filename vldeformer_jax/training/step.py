"""The jitted train step: `(state, batch, rng) -> (state, metrics)` for either objective.

Parameters are float32, the compute dtype is `ModelConfig.dtype`. The dropout key of a step is
`fold_in(seed key, step)` and the model runs on global arrays, so dropout masks (threefry, partitionable)
do not depend on how many devices hold the batch. Gradient accumulation scans over micro-batches inside
the one jitted step; each micro-batch is its own contrastive pool.
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
  under gradient accumulation), so a resumed run draws the same dropout masks.
  """
  if loss_fn is None:
    loss_fn = (decompose.make_loss_fn(model, config, mesh) if config.objective == "decompose"
               else early_interaction.make_loss_fn(model, config))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = int(config.train.grad_accum_steps)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    trainable = state.trainable()
    if accum == 1:
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
    new_state = state.replace(step=state.step + 1, params=new["model"], log_temperature=new["log_temperature"],
                              opt_state=opt_state)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return step


def jit_train_step(step_fn: Callable, shardings: TrainState, mesh) -> Callable:
  """One jit per step: the state donated, batch-sharded inputs, replicated metrics."""
  repl = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl), donate_argnums=(0,))
