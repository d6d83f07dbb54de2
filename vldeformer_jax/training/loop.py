"""`train_and_evaluate(config, workdir)`: one whole training job, the way big_vision and the Flax examples
run one.

Validate the config (before anything compiles), build the mesh over every device of every host,
initialise (resume from the workdir's latest checkpoint, else an export, else random: docs/method.md §6.2),
then loop: one jitted, state-donating step per global batch (`training.step`), metrics to JSON lines /
TensorBoard / tqdm, asynchronous checkpoints with the input pipeline's state, retrieval evaluation with the
best checkpoint kept, and an export at the end.

Faults: the run holds the workdir's lock (`io.workdir`: a second run on it stops at once) and first removes
what an interrupted run left; a damaged latest checkpoint is moved aside and the previous one resumed
(`io.checkpoint`); a run resumed at its final step (killed after its last checkpoint) finishes what the end
of training does: the final evaluation and `best/` when missing, the export when missing or stale.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from vldeformer_jax import parallel
from vldeformer_jax.io import checkpoint as ckpt_lib
from vldeformer_jax.io import export as export_lib
from vldeformer_jax.io import workdir as workdir_lib
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training import config_checks
from vldeformer_jax.training import data_checks
from vldeformer_jax.training import metric_writers
from vldeformer_jax.training import optim
from vldeformer_jax.training import setup
from vldeformer_jax.training import step as step_lib
from vldeformer_jax.training.evaluator import Evaluator

log = logging.getLogger(__name__)


class StepTimer:
  """Examples per second over the steps since the last log line, compile time kept apart.

  The first step of a process includes compiling, so it is timed on its own (`first_step_seconds`);
  evaluation pauses the clock (`restart`), so its time never lowers the training throughput.
  """

  def __init__(self, global_batch_size: int):
    self.global_batch_size = global_batch_size
    self.first_step_seconds: float | None = None
    self.restart()

  def restart(self) -> None:
    self._start, self._steps = time.perf_counter(), 0

  def step_done(self) -> None:
    if self.first_step_seconds is None:
      self.first_step_seconds = time.perf_counter() - self._start
      self.restart()
    else:
      self._steps += 1

  def throughput(self) -> dict[str, float]:
    """`examples_per_sec` over the window, or `first_step_seconds` (compile + one step) when it is empty."""
    if not self._steps:
      return {"first_step_seconds": float(self.first_step_seconds or 0.0)}
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    return {"examples_per_sec": self._steps * self.global_batch_size / elapsed}


def _finite_or_raise(step: int, metrics: dict, ckpts: ckpt_lib.Checkpoints) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    ckpts.wait()
    last = ckpts.latest_step()
    raise FloatingPointError(
        f"training diverged: the loss is {loss} at step {step} (grad norm {float(metrics.get('grad_norm', 'nan'))});"
        f" the last good checkpoint is step {last} in {ckpts.directory}; no checkpoint was written after it")


def _window_mean(window: list[dict]) -> dict[str, float]:
  mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
  mean["learning_rate"] = float(window[-1]["learning_rate"])  # the current one, not the window's mean
  return mean


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the training job described by `config` in `workdir`; returns a summary dict.

  Writes `workdir/checkpoints/<step>` (rolling), `workdir/best/<step>`, `workdir/metrics.jsonl`,
  `workdir/tensorboard/`, `workdir/curves.png`, `workdir/model_config.json` and `workdir/export` (the
  final parameters in the export format), holding `workdir/LOCK` meanwhile. Raises
  `config_checks.ConfigError` before compiling anything when the config is invalid (or does not fit the
  data), `io.workdir.WorkdirLocked` when another run holds the workdir, and
  `io.checkpoint.CheckpointRestoreError` when checkpoints exist but none restores.
  """
  workdir = os.path.abspath(workdir)
  config_checks.check(config, workdir=workdir)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.hold_workdir(workdir):
    if jax.process_index() == 0:
      workdir_lib.clean_stale(workdir)
    if jax.process_count() > 1:
      from orbax.checkpoint import multihost
      multihost.sync_global_processes("vldeformer_workdir_cleaned")
    return _train_and_evaluate(config, workdir)


def _has_eval_record(metrics_path: str, step: int) -> bool:
  return any(r.get("step") == step and r.get("split") == "eval" for r in metric_writers.read_metrics(metrics_path))


def _export_is_current(path: str, params, step: int) -> bool:
  """True when `path` is a complete export of exactly `params` written at `step`."""
  try:
    meta = export_lib.read_metadata(path)
    if meta.get("step") != step or meta["fingerprint"] != export_lib.export_fingerprint(params):
      return False
    export_lib.read_export(path)  # the stored parameters match the fingerprint
  except (FileNotFoundError, ValueError, KeyError) as e:
    log.info("export %s is not complete (%s): rewritten", path, e)
    return False
  return True


def _evaluate(evaluator, writer, best, state, step: int, summary: dict, *, record: bool = True) -> None:
  """Retrieval on the eval split: the result to metrics.jsonl (`record`), to `best/` if it is the best."""
  results = evaluator.run(state.params, step)
  if results is not None:
    if record:
      writer.write(step, evaluator.flat(results), split="eval")
    best.update(step, evaluator.score(results), state, {"results": results})
    summary["eval"] = results


def _finish_final_evaluation(config, data, evaluator, writer, best, state, final_step: int, summary: dict) -> None:
  """A run resumed at its final step (killed between its last checkpoint and the end) runs the final
  evaluation if its record or `best/` is missing, as the end of training would have."""
  recorded = _has_eval_record(writer.path, final_step)
  if config.train.eval_every >= 0 and data.eval is not None and (not recorded or best.best_step is None):
    log.info("resumed at the final step %d: the final evaluation is missing; running it", final_step)
    _evaluate(evaluator, writer, best, state, final_step, summary, record=not recorded)


def _train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  primary = jax.process_index() == 0
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.model)
  log.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(), jax.process_count())

  data = setup.open_data(config, workdir)
  # Checked against the data before anything is written or compiled (a failed start leaves no model files).
  data_checks.check_against_data(config, setup.initial_model(config, workdir, write=False).model_config, data)
  total_steps = setup.total_steps(config, len(data.train))
  init = setup.initial_model(config, workdir)  # model config + where the weights come from
  model_config: ModelConfig = init.model_config
  model = VLDeformer(model_config)
  tx, schedule = optim.make_optimizer(config.train, total_steps)

  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep,
                               async_save=config.train.async_checkpoints)
  state, data_state, start_step = setup.initial_state(config, init, tx, mesh, ckpts)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  best = ckpt_lib.BestCheckpoint(os.path.join(workdir, "best"), config.eval.best_metric)

  iterator = setup.make_iterator(config, data, init.vocab_file, workdir)
  if data_state:
    iterator.set_state(data_state)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(model, config, mesh, tx, schedule), shardings, mesh)
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  writer = metric_writers.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  evaluator = Evaluator(config, data, model_config, init.vocab_file, mesh)
  summary = {"start_step": start_step, "total_steps": total_steps, "workdir": workdir}
  bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not primary,
             dynamic_ncols=True)
  timer, window = StepTimer(config.train.global_batch_size), []
  try:
    for step in range(start_step + 1, total_steps + 1):
      local = {k: v for k, v in next(iterator).items() if k != "image_id"}
      state, metrics = train_step(state, parallel.global_batch(local, mesh), base_rng)
      metrics = jax.device_get(metrics)
      _finite_or_raise(step, metrics, ckpts)
      window.append(metrics)
      bar.update(1)
      timer.step_done()
      last = step == total_steps
      if step % config.train.log_every == 0 or last:
        mean = {**_window_mean(window), **timer.throughput()}
        writer.write(step, mean)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{mean['learning_rate']:.2e}",
                        ex_s=f"{mean.get('examples_per_sec', 0.0):.1f}")
        window = []
        timer.restart()
      if step % config.train.checkpoint_every == 0 or last:
        ckpts.save(step, state, iterator.get_state(), {"model_config": model_config.to_dict()})
      every = config.train.eval_every
      if (every > 0 and step % every == 0) or (every >= 0 and last):
        _evaluate(evaluator, writer, best, state, step, summary)
        timer.restart()
    bar.close()
    ckpts.wait()
    final_step = int(jax.device_get(state.step))
    summary["final_step"] = final_step
    export_path = os.path.join(workdir, "export")
    if start_step >= total_steps:  # resumed at the final step: finish what the end of training does
      _finish_final_evaluation(config, data, evaluator, writer, best, state, final_step, summary)
    if start_step < total_steps or not _export_is_current(export_path, state.params, final_step):
      summary["export"] = setup.write_final_export(workdir, state.params, model_config, init, final_step, config)
    else:
      summary["export"] = export_path
    writer.flush()
    if primary:
      summary["curves"] = metric_writers.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                                                     title=os.path.basename(workdir))
  finally:
    bar.close()
    writer.close()
    iterator.close()
    ckpts.close()
    best.close()
  summary["best"] = {"step": best.best_step, "score": best.best_score, "metric": best.metric_name}
  return summary
