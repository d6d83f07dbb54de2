"""Training: `train_and_evaluate(config, workdir)`, the jitted train step, and the train state.

One function runs a whole training job the way big_vision and the Flax examples do: validate the config
(before anything compiles), build the mesh over every device of every host, initialise (resume from the
workdir's latest checkpoint, else an export, else random), then loop: one jitted, state-donating step per
global batch, metrics to JSON lines / TensorBoard / tqdm, asynchronous checkpoints with the input
pipeline's state, retrieval evaluation with the best checkpoint kept, and an export at the end.

The step:
- objective 'decompose' (stage 2): the one encoder embeds the caption branch and the image branch (and the
  composed negatives, flattened [B*K, ...] then [B, K, D]) with dropout, then the global InfoNCE
  (`losses.sharded_contrastive_loss`: embeddings all-gathered, exact full-batch gradient);
- objective 'early_interaction' (stage 1): `early_interaction.early_interaction_loss`.
Parameters are float32, the compute dtype is `ModelConfig.dtype`. The dropout key of a step is
`fold_in(seed key, step)` and the model runs on global arrays, so dropout masks (threefry, partitionable)
do not depend on how many devices hold the batch. Gradient accumulation scans over micro-batches inside
the one jitted step; each micro-batch is its own contrastive pool.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vldeformer_jax import checkpoint as ckpt_lib
from vldeformer_jax import config_validation
from vldeformer_jax import metrics as metrics_lib
from vldeformer_jax import optim
from vldeformer_jax import parallel
from vldeformer_jax import train_setup
from vldeformer_jax.model import VLDeformer
from vldeformer_jax.model_config import ModelConfig

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree (checkpointed as it is)."""
  step: jax.Array             # int32 scalar: optimiser updates applied so far
  params: Any                 # the model's parameter tree (float32)
  log_temperature: jax.Array  # float32 scalar; trained only with loss.learnable_temperature
  opt_state: Any              # optax state over `trainable()`

  def trainable(self) -> dict[str, Any]:
    return {"model": self.params, "log_temperature": self.log_temperature}


def create_state(params, log_temperature, tx: optax.GradientTransformation) -> TrainState:
  # A strongly typed float32 scalar, also inside the optimiser state: a weak-typed one (e.g. jnp.log(0.07))
  # gives weak-typed Adam moments, the jitted step returns them strongly typed, and its second call then
  # compiles the whole step again (a minute for BERT-base on a CPU).
  log_temperature = jnp.asarray(log_temperature, jnp.float32)
  trainable = {"model": params, "log_temperature": log_temperature}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, log_temperature=log_temperature,
                    opt_state=tx.init(trainable))


def state_shardings(abstract_state: TrainState, mesh, tx) -> TrainState:
  """Parameters by `parallel.param_shardings`, Adam moments like their parameters, scalars replicated."""
  repl = parallel.replicated(mesh)
  p_shard = parallel.param_shardings(abstract_state.params, mesh)
  trainable_shard = {"model": p_shard, "log_temperature": repl}
  return TrainState(step=repl, params=p_shard, log_temperature=repl,
                    opt_state=optim.opt_state_shardings(tx, abstract_state.opt_state, trainable_shard, repl))


# ------------------------------------------------------------------------------------------------------
# Losses.


def _embed(model: VLDeformer, params, batch, prefix: str, rng, with_images: bool):
  ids, tt, mask = (batch[f"{prefix}input_ids"], batch[f"{prefix}token_type_ids"],
                   batch[f"{prefix}attention_mask"])
  feats = batch[f"{prefix}img_feats"] if with_images else None
  lead = ids.shape[:-1]
  if len(lead) == 2:  # composed negatives [B, K, ...] -> [B*K, ...] (rows stay on their device)
    ids, tt, mask = (x.reshape((-1,) + x.shape[2:]) for x in (ids, tt, mask))
    feats = None if feats is None else feats.reshape((-1,) + feats.shape[2:])
  emb = model.apply({"params": params}, ids, tt, mask, feats, deterministic=False,
                    method=VLDeformer.embed, rngs={"dropout": rng})
  return emb.reshape(lead + emb.shape[-1:])


def make_decompose_loss(model: VLDeformer, config, mesh) -> Callable:
  """(trainable, batch, rng) -> (loss, metrics): the contrastive objective of spec 4.1 / 11.5-11.7."""
  from vldeformer_jax import losses
  lc = config.loss
  contrastive = losses.sharded_contrastive_loss(
      mesh, name=lc.name, beta=lc.beta, tau_plus=lc.tau_plus, margin=lc.margin, chunk_size=lc.chunk_size)

  def loss_fn(trainable, batch, rng):
    params = trainable["model"]
    r_text, r_image, r_neg_text, r_neg_image = jax.random.split(rng, 4)
    text = _embed(model, params, batch, "text_", r_text, with_images=False)
    image = _embed(model, params, batch, "image_", r_image, with_images=True)
    neg_text = neg_image = None
    if "neg_text_input_ids" in batch:
      neg_text = _embed(model, params, batch, "neg_text_", r_neg_text, with_images=False)
      neg_image = _embed(model, params, batch, "neg_image_", r_neg_image, with_images=True)
    log_t = trainable["log_temperature"]
    if not lc.learnable_temperature:
      log_t = jax.lax.stop_gradient(log_t)
    temperature = jnp.exp(log_t)
    loss, metrics = contrastive(text, image, neg_text, neg_image, (temperature, temperature))
    return loss, dict(metrics, loss=loss)

  return loss_fn


def make_early_interaction_loss(model: VLDeformer, config) -> Callable:
  from vldeformer_jax import early_interaction

  def loss_fn(trainable, batch, rng):
    return early_interaction.early_interaction_loss(model, trainable["model"], batch, rng, config)

  return loss_fn


# ------------------------------------------------------------------------------------------------------
# The step.


def make_train_step(model: VLDeformer, config, mesh, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: Callable | None = None) -> Callable:
  """The un-jitted step `(state, batch, rng) -> (state, metrics)`; `jit_train_step` compiles it.

  `rng` is the run's base key; the step's key is `fold_in(rng, state.step)` (and the micro-batch index
  under gradient accumulation), so a resumed run draws the same dropout masks.
  """
  if loss_fn is None:
    loss_fn = (make_decompose_loss(model, config, mesh) if config.objective == "decompose"
               else make_early_interaction_loss(model, config))
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


# ------------------------------------------------------------------------------------------------------
# The loop.


def _is_primary() -> bool:
  return jax.process_index() == 0


def _finite_or_raise(step: int, metrics: dict, ckpts: ckpt_lib.Checkpoints) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    ckpts.wait()
    last = ckpts.latest_step()
    raise FloatingPointError(
        f"training diverged: the loss is {loss} at step {step} (grad norm {float(metrics.get('grad_norm', 'nan'))});"
        f" the last good checkpoint is step {last} in {ckpts.directory}; no checkpoint was written after it")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the training job described by `config` in `workdir`; returns a summary dict.

  Writes `workdir/checkpoints/<step>` (rolling), `workdir/best/<step>`, `workdir/metrics.jsonl`,
  `workdir/tensorboard/`, `workdir/curves.png`, `workdir/model_config.json` and `workdir/export` (the
  final parameters in the export format). Raises `config_validation.ConfigError` before compiling anything
  when the config is invalid.
  """
  workdir = os.path.abspath(workdir)
  config_validation.check(config, workdir=workdir)
  primary = _is_primary()
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model)
  log.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count())

  data = train_setup.open_data(config, workdir)
  total_steps = train_setup.total_steps(config, len(data.train))
  init = train_setup.initial_model(config, workdir)  # model config + where the weights come from
  model_config: ModelConfig = init.model_config
  config_validation.check_against_data(config, model_config, data)
  model = VLDeformer(model_config)
  tx, schedule = optim.make_optimizer(config.train, total_steps)

  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep,
                               async_save=config.train.async_checkpoints)
  state, data_state, start_step = train_setup.initial_state(config, init, tx, mesh, ckpts)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  best = ckpt_lib.BestCheckpoint(os.path.join(workdir, "best"), config.eval.best_metric)

  iterator = train_setup.make_iterator(config, data, init.vocab_file, workdir)
  if data_state:
    iterator.set_state(data_state)
  train_step = jit_train_step(make_train_step(model, config, mesh, tx, schedule), shardings, mesh)
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  writer = metrics_lib.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  evaluator = train_setup.Evaluator(config, data, model_config, init.vocab_file, mesh)
  summary = {"start_step": start_step, "total_steps": total_steps, "workdir": workdir}
  from tqdm import tqdm
  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not primary,
             dynamic_ncols=True)
  window, t_window, timed_steps, first_step_seconds = [], time.perf_counter(), 0, 0.0
  try:
    for step in range(start_step + 1, total_steps + 1):
      local = {k: v for k, v in next(iterator).items() if k != "image_id"}
      batch = parallel.global_batch(local, mesh)
      state, metrics = train_step(state, batch, base_rng)
      metrics = jax.device_get(metrics)
      _finite_or_raise(step, metrics, ckpts)
      window.append(metrics)
      bar.update(1)
      if step == start_step + 1:  # the first step of a process includes compiling: timed on its own
        first_step_seconds = time.perf_counter() - t_window
        t_window, timed_steps = time.perf_counter(), 0
      else:
        timed_steps += 1
      if step % config.train.log_every == 0 or step == total_steps:
        mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        mean["learning_rate"] = float(window[-1]["learning_rate"])
        if timed_steps:
          elapsed = time.perf_counter() - t_window
          mean["examples_per_sec"] = timed_steps * config.train.global_batch_size / max(elapsed, 1e-9)
        else:
          mean["first_step_seconds"] = first_step_seconds  # compile + one step
        writer.write(step, mean)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{mean['learning_rate']:.2e}",
                        ex_s=f"{mean.get('examples_per_sec', 0.0):.1f}")
        window, t_window, timed_steps = [], time.perf_counter(), 0
      if step % config.train.checkpoint_every == 0 or step == total_steps:
        ckpts.save(step, state, iterator.get_state(), {"model_config": model_config.to_dict()})
      every = config.train.eval_every
      if (every > 0 and step % every == 0) or (every >= 0 and step == total_steps):
        results = evaluator.run(state.params, step)
        if results is not None:
          writer.write(step, evaluator.flat(results), split="eval")
          best.update(step, evaluator.score(results), state, {"results": results})
          summary["eval"] = results
        t_window, timed_steps = time.perf_counter(), 0
    bar.close()
    ckpts.wait()
    final_step = int(jax.device_get(state.step))
    summary["final_step"] = final_step
    summary["export"] = train_setup.write_final_export(workdir, state.params, model_config, init, final_step,
                                                       config)
    writer.flush()
    if primary:
      summary["curves"] = metrics_lib.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                                                  title=os.path.basename(workdir))
  finally:
    bar.close()
    writer.close()
    iterator.close()
    ckpts.close()
    best.close()
  summary["best"] = {"step": best.best_step, "score": best.best_score, "metric": best.metric_name}
  return summary
