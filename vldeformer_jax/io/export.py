"""The one export format: a self-contained directory holding everything needed to encode.

Conversion writes it, training writes it at the end of a run, and `Encoder.load`, evaluation and indexing
read it, so there is exactly one way to hand a model from one stage to the next:

  EXPORT/
    model_config.json   ModelConfig (sizes, pooling, lengths, compute dtype)
    vocab.txt           the tokenizer vocabulary (lower-cased BERT wordpieces)
    params/             orbax (StandardCheckpointHandler): the float32 parameter tree of `init_params`
    export.json         {"format": "vldeformer_jax.export", "version": 1, "fingerprint": sha256, "source": ...}

Writes go to a temporary sibling directory that is renamed into place only when complete, so a failed or
interrupted write never leaves a half-written EXPORT. Reads restore onto the reading process's own devices
whatever topology wrote the export (one device, eight, several processes): orbax records the writer's
shardings, and `read_export` replaces them with the reader's. The fingerprint (sha256 over sorted
parameter paths, dtypes, shapes and bytes) lets a reader detect a corrupt or swapped parameter set and lets
an index or an evaluation record exactly which weights produced it.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vldeformer_jax.io import files as fileio
from vldeformer_jax.model.config import ModelConfig

FORMAT = "vldeformer_jax.export"
VERSION = 1
CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.txt"
PARAMS_DIR = "params"
META_FILE = "export.json"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Export:
  """A read export: the parameter tree (numpy), its config, the vocabulary path and export.json."""
  params: dict[str, Any]
  model_config: ModelConfig
  vocab_file: str
  metadata: dict[str, Any]

  @property
  def fingerprint(self) -> str:
    return self.metadata["fingerprint"]


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def host_array(x) -> np.ndarray:
  """A leaf as host numpy; arrays sharded over several processes are gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # the only API that gathers across processes
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def export_fingerprint(params) -> str:
  """sha256 over the sorted parameter paths, each with its dtype, shape and little-endian bytes."""
  leaves = jax.tree.flatten_with_path(params)[0]
  h = hashlib.sha256()
  for name, leaf in sorted((_path_str(p), leaf) for p, leaf in leaves):
    a = host_array(leaf)
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a)
    h.update(f"{name}\0{a.dtype.name}\0{a.shape}\0".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _resolve_vocab(vocab_file: str | os.PathLike) -> str:
  vocab_file = os.fspath(vocab_file)
  if os.path.isdir(vocab_file):
    vocab_file = os.path.join(vocab_file, VOCAB_FILE)
  if not os.path.isfile(vocab_file):
    raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_file}")
  return vocab_file


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


def write_export(path: str | os.PathLike, params, model_config: ModelConfig, vocab_file: str | os.PathLike,
                 metadata: dict[str, Any] | None = None, *, overwrite: bool = False) -> str:
  """Writes an export directory atomically; returns the parameter fingerprint.

  `params` is the parameter tree (numpy or jax arrays, possibly sharded); `metadata` (JSON-serialisable)
  is merged into export.json, e.g. {"source": "converted from ...", "step": 1234}. Refuses an existing
  `path` unless `overwrite`. With several processes every process must call this (orbax writes the
  shards collectively); process 0 writes the small files and renames.
  """
  path = os.path.abspath(os.fspath(path))
  if not isinstance(model_config, ModelConfig):
    raise TypeError(f"write_export: model_config must be a ModelConfig, got {type(model_config).__name__}")
  vocab_file = _resolve_vocab(vocab_file)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"export directory already exists: {path} (pass overwrite=True to replace it)")
  fingerprint = export_fingerprint(params)
  meta = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "source": None,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax_version": jax.__version__}
  for key, value in (metadata or {}).items():
    if key in ("format", "version", "fingerprint"):
      raise ValueError(f"write_export: metadata key {key!r} is reserved")
    meta[key] = value
  try:
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"write_export: metadata is not JSON-serialisable: {e}") from e

  primary = jax.process_index() == 0
  parent, base = os.path.split(path)
  # Same name on every process (orbax writes collectively into it); a fresh one for a single process.
  suffix = "multihost" if jax.process_count() > 1 else uuid.uuid4().hex[:8]
  tmp = os.path.join(parent, f".{base}.tmp-{suffix}")
  if primary:
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  _sync("vldeformer_export_tmp_created")
  try:
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
    if primary:
      model_config.to_json(os.path.join(tmp, CONFIG_FILE))
      shutil.copyfile(vocab_file, os.path.join(tmp, VOCAB_FILE))
      with open(os.path.join(tmp, META_FILE), "w") as f:
        f.write(meta_text)
      fileio.replace_dir(tmp, path)  # an existing export only with overwrite=True: checked above
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  _sync("vldeformer_export_renamed")
  _log.info("wrote export %s (fingerprint %s)", path, fingerprint[:16])
  return fingerprint


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """export.json of an export, checked for format and version."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"export directory not found: {path}")
  for name in (META_FILE, CONFIG_FILE, VOCAB_FILE, PARAMS_DIR):
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f"export {path}: missing {name} (not a complete vldeformer_jax export)")
  meta_path = os.path.join(path, META_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path}: not valid JSON (line {e.lineno}: {e.msg})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: field 'format' is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                     f"expected {FORMAT!r}")
  if meta.get("version") != VERSION:
    raise ValueError(f"{meta_path}: field 'version' is {meta.get('version')!r}; this code reads version {VERSION}")
  if not isinstance(meta.get("fingerprint"), str):
    raise ValueError(f"{meta_path}: field 'fingerprint' is missing")
  return meta


def _restore_device() -> jax.Device:
  """Where `read_export` materialises parameters on their way to host numpy: this process's first CPU
  device when the CPU backend is up (no accelerator memory spent on a host copy), else its first device."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # e.g. JAX_PLATFORMS=tpu: no CPU backend
    return jax.local_devices()[0]


def _restore_target(ckptr: ocp.Checkpointer, params_dir: str):
  """The abstract tree that restores the stored parameters whatever topology wrote them.

  Shapes and dtypes come from the saved metadata; each leaf carries a sharding onto one device of *this*
  process. Without a sharding orbax reuses the writer's (e.g. 8 devices, or 2 processes x 4) and refuses
  it on any other topology ("Topology mismatch detected"), even a one-device process.
  """
  sharding = jax.sharding.SingleDeviceSharding(_restore_device())
  tree = ckptr.metadata(params_dir).item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding), tree)


def read_export(path: str | os.PathLike, dtype=None, *, verify: bool = True) -> Export:
  """Reads an export written by `write_export`; parameters come back as host numpy arrays.

  Any writer topology restores here (one device, several, several processes): the parameters are read
  onto one device of this process (`_restore_target`). With several processes every process must call
  this (orbax's restore ends with a barrier) and each gets the full parameters.

  `dtype` (e.g. "bfloat16"): restore the floating parameters in that dtype instead of float32 (halves host
  memory; the compute dtype is the model config's). `verify` recomputes the fingerprint of the stored
  float32 parameters and refuses an export whose parameters do not match export.json.
  """
  path = os.path.abspath(os.fspath(path))
  meta = read_metadata(path)
  model_config = ModelConfig.from_json(os.path.join(path, CONFIG_FILE), strict=True)
  params_dir = os.path.join(path, PARAMS_DIR)
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    params = ckptr.restore(params_dir, args=ocp.args.StandardRestore(_restore_target(ckptr, params_dir)))
  except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
    raise ValueError(f"export {path}: cannot restore the parameters in {params_dir}: "
                     f"{type(e).__name__}: {e}") from e
  params = jax.tree.map(np.asarray, params)
  if verify:
    got = export_fingerprint(params)
    if got != meta["fingerprint"]:
      raise ValueError(f"export {path}: the parameters' fingerprint {got[:16]}... does not match "
                       f"{META_FILE} ({meta['fingerprint'][:16]}...): the export is corrupt or was modified")
  if dtype is not None:
    dtype = np.dtype(jax.numpy.dtype(dtype))
    params = jax.tree.map(lambda a: a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a, params)
  return Export(params=params, model_config=model_config, vocab_file=os.path.join(path, VOCAB_FILE),
                metadata=meta)


# ------------------------------------------------------------------------------------------------------
# Parameters that were never trained.
#
# Conversion initialises what a checkpoint lacks (an Oscar+/VinVL pre-training checkpoint or a plain BERT has
# no `classifier.*`, the early-interaction match head), and a decomposition run never trains that head
# (stage 2 has no gradient into it). export.json lists such parameters under `untrained`, so nothing
# re-ranks or scores pairs with a head that is random noise without being told to.

UNTRAINED_KEY = "untrained"
MATCH_HEAD_PREFIX = "classifier/"
ALLOW_UNTRAINED_FLAG = "--allow_untrained_head"


class UntrainedHeadError(ValueError):
  """The early-interaction match head of an export was never trained."""


def untrained_params(metadata: dict[str, Any]) -> list[str]:
  """Parameter paths an export's weights were never trained on (conversion exports written before
  `untrained` existed: their `freshly_initialised` list)."""
  return list(metadata.get(UNTRAINED_KEY, metadata.get("freshly_initialised", [])))


def untrained_after_training(before: list[str], objective: str, mlm_weight: float) -> list[str]:
  """What stays untrained after training with `objective`: the decomposition trains the encoder (and a
  projection); the early-interaction objective trains the encoder and the match head (and the MLM head when
  `mlm_weight` > 0). Neither trains the other's head."""
  trained = ("bert/", "projection/") if objective == "decompose" else (
      ("bert/", MATCH_HEAD_PREFIX) + (("cls/",) if mlm_weight > 0 else ()))
  return sorted(p for p in before if not p.startswith(trained))


def match_head_error(path: str, metadata: dict[str, Any], flag: str = ALLOW_UNTRAINED_FLAG) -> str | None:
  """The one-line refusal for scoring pairs with this export's match head, or None when it was trained."""
  head = [p for p in untrained_params(metadata) if p.startswith(MATCH_HEAD_PREFIX)]
  if not head:
    return None
  return (f"export {path}: its early-interaction match head ({', '.join(head)}) was never trained "
          f"(export.json '{UNTRAINED_KEY}'), so its pair scores are noise; train it with objective "
          f"'early_interaction', or pass {flag} to use it anyway")
