"""Training checkpoints: orbax, asynchronous, with the input pipeline's state saved beside the model state.

Why a wrapper over `orbax.checkpoint.CheckpointManager`: the training loop needs four guarantees that are
easy to get subtly wrong, and keeping them here makes them testable on their own:
- a checkpoint is the model/optimiser state AND the data iterator state of the same step
  (`ocp.args.Composite(state=StandardSave, data=JsonSave)`), so a resumed run sees the same batches;
- restoring builds every array directly with the *current* mesh's sharding (an abstract tree of
  `jax.ShapeDtypeStruct(..., sharding=...)`), so a checkpoint written on 8 devices restores on 1;
- a run killed mid-save leaves only an orbax temporary directory, which `latest_step` never returns: the
  last finished checkpoint stays the resume point;
- saves are asynchronous (device-to-host copy at `save`, the write in the background); `close` waits;
- a checkpoint that cannot be restored (a truncated or missing file) does not stop a run:
  `restore_latest` falls back to the newest one that restores and moves the newer ones aside
  (`<step>.corrupt-<time>`, never deleted); when none restores nothing is moved and the error names them.
Opening a directory never deletes anything in it: orbax's clean-up of temporary directories is off, because
a reader (or a second run) would delete a live run's in-progress save; `io.workdir.clean_stale` does it
under the workdir's lock.
The "best" checkpoint (by an evaluation score) lives in its own manager so `max_to_keep` of the rolling
checkpoints never deletes it.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from vldeformer_jax.io import workdir as workdir_lib

log = logging.getLogger(__name__)


class CheckpointRestoreError(ValueError):
  """No checkpoint of a directory restores; the message is one line naming each and why."""


def _reason(e: BaseException) -> str:
  """An orbax / TensorStore error as one short line (they can span pages of JSON)."""
  cause = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
  text = " ".join(str(cause).split())
  text = re.sub(r"\s*See full TensorStore details.*$", "", text)  # a bound method's repr, not details
  return f"{type(cause).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) carrying `shardings`' leaves."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
  """Rolling checkpoints in `directory` (one orbax step directory per saved step)."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
               best_mode: str | None = None):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict | None = None) -> None:
    """Saves `state` (a pytree of jax arrays), `data_state` (JSON) and `meta` (JSON) under `step`."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta or {}))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of `step`; arrays land with the shardings carried by `abstract_state`."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"{self.directory}: no finished checkpoint for step {step} "
                              f"(have {sorted(self._manager.all_steps())})")
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax reports structure mismatches deep inside; name the checkpoint
      raise ValueError(f"{self.directory}/{step}: cannot restore the training state (damaged, or written "
                       f"by another model or optimiser config): {_reason(e)}") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, meta) of the newest checkpoint that restores, or None when there is none.

    A newer checkpoint that fails to restore while an older one restores is damaged (the same config
    restored the older one): it is logged in one line and moved aside to `<step>.corrupt-<time>`. When
    none restores (a damaged single checkpoint, or a config the checkpoints were not written by) nothing
    is moved and `CheckpointRestoreError` names each step and why.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, data_state, meta = self.restore(step, abstract_state)
      except Exception as e:  # orbax / TensorStore / JSON raise many types for a damaged directory
        failed.append((step, _reason(e)))
        continue
      for bad, why in failed:
        self._move_aside(bad, why, step)
      return step, state, data_state, meta
    if failed:
      listed = "; ".join(f"step {s}: {why}" for s, why in failed)
      raise CheckpointRestoreError(
          f"{self.directory}: no checkpoint restores ({listed}); if the config changed since they were "
          f"written, restore it, else move {self.directory} aside to start over")
    return None

  def _move_aside(self, step: int, why: str, fallback: int) -> None:
    path = os.path.join(self.directory, str(step))
    moved = workdir_lib.move_aside(path) if jax.process_index() == 0 else f"{path}.corrupt-*"
    log.warning("checkpoint %s cannot be restored (%s): moved to %s; resuming from step %d", path, why, moved,
                fallback)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"vldeformer_moved_aside_{step}")
    self._manager.reload()  # forget the moved step

  def read_meta(self, step: int) -> dict:
    """The JSON `meta` item of `step`, without touching the arrays."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpoint:
  """Keeps the single best checkpoint by a score (higher is better), with the score in its meta."""

  def __init__(self, directory: str, metric_name: str):
    self.metric_name = metric_name
    self._ckpt = Checkpoints(directory, max_to_keep=1)
    self.best_score: float | None = None
    self.best_step: int | None = self._ckpt.latest_step()
    if self.best_step is not None:
      try:
        self.best_score = self._ckpt.read_meta(self.best_step).get("score")
      except Exception as e:  # a damaged best checkpoint: judged again from scratch
        path = os.path.join(self._ckpt.directory, str(self.best_step))
        moved = workdir_lib.move_aside(path) if jax.process_index() == 0 else f"{path}.corrupt-*"
        log.warning("best checkpoint %s cannot be read (%s): moved to %s", path, _reason(e), moved)
        self._ckpt._manager.reload()
        self.best_step = None

  @property
  def directory(self) -> str:
    return self._ckpt.directory

  def update(self, step: int, score: float, state: Any, meta: dict | None = None) -> bool:
    """Saves `state` when `score` beats the best so far; True when saved."""
    if self.best_score is not None and score <= self.best_score:
      return False
    if self.best_step is not None and step <= self.best_step:
      return False  # a resumed run recomputing a step that was already judged
    self._ckpt.save(step, state, None, {"score": float(score), "metric": self.metric_name, **(meta or {})})
    self.best_score, self.best_step = float(score), step
    log.info("new best %s = %.4f at step %d -> %s", self.metric_name, score, step, self.directory)
    return True

  def close(self) -> None:
    self._ckpt.close()
