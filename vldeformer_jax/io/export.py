"""The one export format: a self-contained directory holding everything needed to encode.

Conversion writes it, training writes it at the end of a run, and `Encoder.load`, evaluation and indexing
read it, so there is exactly one way to hand a model from one stage to the next:

  EXPORT/
    model_config.json   ModelConfig (sizes, pooling, lengths, compute dtype)
    vocab.txt           the tokenizer vocabulary (lower-cased BERT wordpieces)
    params/             orbax (StandardCheckpointHandler): the float32 parameter tree of `init_params`
    export.json         {"format": "vldeformer_jax.export", "version": 1, "fingerprint": sha256, "source": ...}

Writes go to a temporary sibling directory that is renamed into place only when complete, so a failed or
interrupted write never leaves a half-written EXPORT. The fingerprint (sha256 over sorted parameter paths,
dtypes, shapes and bytes) lets a reader detect a corrupt or swapped parameter set and lets an index or an
evaluation record exactly which weights produced it.
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


def read_export(path: str | os.PathLike, dtype=None, *, verify: bool = True) -> Export:
  """Reads an export written by `write_export`; parameters come back as host numpy arrays.

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
    tree = ckptr.metadata(params_dir).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)
    params = ckptr.restore(params_dir, args=ocp.args.StandardRestore(target))
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
