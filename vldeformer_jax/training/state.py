"""The train state: what changes during training, how it is sharded, and how it is born.

`TrainState` is one pytree (checkpointed as it is). `state_shardings` places it on a mesh: parameters by
`parallel.param_shardings`, Adam moments like their parameters, scalars replicated. `abstract_state`
gives the ShapeDtypeStructs with those shardings: the target that restores a checkpoint onto any mesh.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vldeformer_jax import parallel
from vldeformer_jax.io import checkpoint as ckpt_lib
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.model.vldeformer import init_params
from vldeformer_jax.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree (checkpointed as it is)."""
  step: jax.Array             # int32 scalar: optimiser updates applied so far
  params: Any                 # the model's parameter tree (float32)
  log_temperature: jax.Array  # float32 scalar; trained only with loss.learnable_temperature
  opt_state: Any              # optax state over `trainable()`

  def trainable(self) -> dict[str, Any]:
    return {"model": self.params, "log_temperature": self.log_temperature}


@flax.struct.dataclass
class BiasedTrainState(TrainState):
  """The state of a `loss.name = sigmoid` run: also the loss's learnable logit bias (a subclass, so the
  checkpoints of every other run keep the structure they always had)."""
  logit_bias: jax.Array       # float32 scalar: the sigmoid loss's bias, trained, never decayed

  def trainable(self) -> dict[str, Any]:
    return {**TrainState.trainable(self), "logit_bias": self.logit_bias}


def initial_logit_bias(config) -> float | None:
  """The logit bias a run starts from (`loss.bias_init` for the sigmoid loss), or None: no bias in the state."""
  return float(config.loss.bias_init) if config.loss.name == "sigmoid" else None


def create_state(params, log_temperature, tx: optax.GradientTransformation,
                 logit_bias: float | jax.Array | None = None) -> TrainState:
  """A fresh state; with `logit_bias` (the sigmoid loss) a `BiasedTrainState`."""
  # A strongly typed float32 scalar, also inside the optimiser state: a weak-typed one (e.g. jnp.log(0.07))
  # gives weak-typed Adam moments, the jitted step returns them strongly typed, and its second call then
  # compiles the whole step again (a minute for BERT-base on a CPU).
  log_temperature = jnp.asarray(log_temperature, jnp.float32)
  trainable = {"model": params, "log_temperature": log_temperature}
  fields = dict(step=jnp.zeros((), jnp.int32), params=params, log_temperature=log_temperature)
  if logit_bias is None:
    return TrainState(**fields, opt_state=tx.init(trainable))
  logit_bias = jnp.asarray(logit_bias, jnp.float32)
  trainable["logit_bias"] = logit_bias
  return BiasedTrainState(**fields, opt_state=tx.init(trainable), logit_bias=logit_bias)


def state_shardings(abstract_state: TrainState, mesh, tx) -> TrainState:
  """Parameters by `parallel.param_shardings`, Adam moments like their parameters, scalars replicated."""
  repl = parallel.replicated(mesh)
  p_shard = parallel.param_shardings(abstract_state.params, mesh)
  trainable_shard = {"model": p_shard, "log_temperature": repl}
  extra = {}
  if isinstance(abstract_state, BiasedTrainState):
    trainable_shard["logit_bias"] = extra["logit_bias"] = repl
  return type(abstract_state)(
      step=repl, params=p_shard, log_temperature=repl,
      opt_state=optim.opt_state_shardings(tx, abstract_state.opt_state, trainable_shard, repl), **extra)


def put_sharded(tree, shardings):
  """Host numpy tree -> global arrays with `shardings` (every process holds the same full values)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def fresh_state_fn(model_config: ModelConfig, log_t0: float, tx, logit_bias: float | None = None):
  """rng -> a randomly initialised TrainState (for `jax.eval_shape` and for `jax.jit(out_shardings=)`);
  `logit_bias`: see `create_state`."""

  def fresh(rng):
    bias = None if logit_bias is None else jnp.float32(logit_bias)
    return create_state(init_params(model_config, rng), jnp.float32(log_t0), tx, bias)
  return fresh


def abstract_state(model_config: ModelConfig, tx, mesh, log_temperature: float = 0.0,
                   logit_bias: float | None = None):
  """The train state's ShapeDtypeStructs carrying their shardings on `mesh`: the target to restore a
  checkpoint onto any mesh (e.g. one written on 8 devices, restored on 1). A sigmoid-loss run's state
  has a logit bias: pass any float (`initial_logit_bias(config)`)."""
  abstract = jax.eval_shape(fresh_state_fn(model_config, log_temperature, tx, logit_bias), jax.random.key(0))
  return ckpt_lib.abstract_like(abstract, state_shardings(abstract, mesh, tx))
