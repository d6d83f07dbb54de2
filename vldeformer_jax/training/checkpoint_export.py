"""A training checkpoint of a workdir (the best by evaluation, the latest, or a step) as an export.

Training keeps `best/<step>` by `eval.best_metric` and rolling `checkpoints/<step>`, but every consumer
(evaluation, the index, `Encoder.load`) reads exports. `export_checkpoint` restores the parameters of the
selected checkpoint onto this process's devices (any mesh: the train state's abstract form carries the
shardings) and writes them as an export under `<workdir>/exports/<which>-<step>` (reused when complete),
so the model selection picked is evaluated without hand-copying directories.
"""
from __future__ import annotations

import logging
import os

import ml_collections

from vldeformer_jax import parallel
from vldeformer_jax.io import checkpoint as ckpt_lib
from vldeformer_jax.io import export as export_lib
from vldeformer_jax.io.files import read_json
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.training import optim
from vldeformer_jax.training import setup
from vldeformer_jax.training import state as state_lib

log = logging.getLogger(__name__)

CHOICES = ("best", "latest")


def _training_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, setup.TRAIN_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {setup.TRAIN_CONFIG_FILE} (not a training workdir, or written "
                            "before runs saved their config)")
  return ml_collections.ConfigDict(read_json(path, what="training config"))


def select(workdir: str, which: str) -> tuple[str, int]:
  """(checkpoint directory, step) for `which`: 'best', 'latest' or a step number of `checkpoints/`."""
  rolling, best = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "best")
  if which == "best":
    directory = best
  elif which == "latest" or which.isdigit():
    directory = rolling
  else:
    raise ValueError(f"checkpoint {which!r}: expected one of {CHOICES} or a step number")
  ckpts = ckpt_lib.Checkpoints(directory, max_to_keep=None) if os.path.isdir(directory) else None
  steps = sorted(ckpts.all_steps()) if ckpts else []
  if ckpts:
    ckpts.close()
  if not steps:
    what = "no best checkpoint (was the run evaluated?)" if which == "best" else "no finished checkpoint"
    raise FileNotFoundError(f"{workdir}: {what} in {directory}")
  if which.isdigit():
    if int(which) not in steps:
      raise FileNotFoundError(f"{workdir}: no checkpoint for step {which} in {directory} (have {steps})")
    return directory, int(which)
  return directory, steps[-1]


def export_checkpoint(workdir: str, which: str = "best", output: str | None = None) -> str:
  """Writes the parameters of the selected checkpoint as an export; returns its path."""
  workdir = os.path.abspath(workdir)
  directory, step = select(workdir, which)
  output = os.path.abspath(output or os.path.join(workdir, "exports", f"{'step' if which.isdigit() else which}-{step}"))
  if os.path.isfile(os.path.join(output, export_lib.META_FILE)):
    meta = export_lib.read_metadata(output)
    if meta.get("checkpoint", {}).get("step") == step:
      log.info("checkpoint %s/%d: export %s exists", directory, step, output)
      return output
  config = _training_config(workdir)
  model_config = ModelConfig.from_json(os.path.join(workdir, setup.MODEL_CONFIG_FILE), strict=True)
  tx, _ = optim.make_optimizer(config.train, max(int(config.train.num_steps), 1))
  mesh = parallel.make_mesh()
  ckpts = ckpt_lib.Checkpoints(directory, max_to_keep=None)
  try:
    state, _, meta = ckpts.restore(step, state_lib.abstract_state(
        model_config, tx, mesh, logit_bias=state_lib.initial_logit_bias(config)))
  finally:
    ckpts.close()
  _, export_path, _ = setup.model_config_from(config)
  init = setup.Init(model_config, os.path.join(workdir, setup.VOCAB_FILE), export_path, "")
  untrained = export_lib.untrained_after_training(setup.untrained_at_init(init), config.objective,
                                                  float(config.loss.mlm_weight))
  selected = {"which": which, "step": step, "directory": directory}
  selected.update({k: meta[k] for k in ("metric", "score") if k in meta})
  export_lib.write_export(output, state.params, model_config,
                          os.path.join(workdir, setup.VOCAB_FILE), overwrite=True, metadata={
                              "source": f"vldeformer_jax.training.checkpoint_export of {workdir}",
                              "step": step, "objective": config.objective, "dataset": config.data.name,
                              "checkpoint": selected, export_lib.UNTRAINED_KEY: untrained})
  return output
