"""Embedding a dataset split into an index (retrieval/index.py's format), by one process or by every process
of a jax.distributed job.

`build_index` embeds a split's images (tags + regions) or captions block by block, optionally with each row's
token states for late-interaction re-ranking, and writes the index directory through the format's writers
(retrieval/index.py). Run by every process of a jax.distributed job, each process embeds its contiguous share
of the rows (`process_rows`) into the one index (`_build_streamed`: the same directory a single process
writes); a process that fails makes every process fail (`_in_step`). `run_build` is `launch/index.py build`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import numpy as np
from tqdm import tqdm

from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import faiss_backend
from vldeformer_jax.retrieval import gallery as gallery_lib
# The format's constants and writers (private to the index's two writers: write_index and this build).
from vldeformer_jax.retrieval.index import (ENTRY_ENCODERS, META, TOKEN_DTYPES, _check_backend, _finish,
                                            _row_arrays, _temporary_sibling, _token_arrays, check_options)


def _embed_rows(encoder, gallery, source, side: str, lo: int, hi: int, batch_size, chunk: int,
                tokens: bool = False):
  """Yields (start, embeddings, texts, token states or None) blocks of the gallery rows [lo, hi): images
  (tags + regions, read `chunk` at a time) or captions (image-major, as load_gallery flattens them). With
  `tokens`, also the rows' L2-normalised token states and their mask (Encoder.*_token_states_inputs)."""
  step = chunk if side == "images" else chunk * 5
  for a in tqdm(range(lo, hi, step), desc=f"index {side}", disable=hi - lo <= step):
    pos = range(a, min(a + step, hi))
    if side == "images":
      x = gallery.image_inputs(encoder, pos)
      emb = encoder.embed_image_inputs(x, batch_size=batch_size)
      states = encoder.image_token_states_inputs(x, batch_size=batch_size) if tokens else None
      texts = [gallery_lib.text_of(source[int(gallery.rows[p])]["tags"]) for p in pos]
    else:
      x = gallery.text_inputs(encoder, pos)
      emb = encoder.embed_text_inputs(x, batch_size=batch_size)
      states = encoder.text_token_states_inputs(x, batch_size=batch_size) if tokens else None
      texts = [gallery.captions[p] for p in pos]
    yield a, emb, texts, states


def process_rows(num: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous rows [lo, hi) of a gallery of `num` that process `process_index` embeds: shares differ
  by at most one row, the earlier processes take the extra ones."""
  base, extra = divmod(num, process_count)
  lo = process_index * base + min(process_index, extra)
  return lo, lo + base + (process_index < extra)


def build_index(encoder, source, path: str, *, side: str = "images", compact: str | None = None,
                batch_size: int | None = None, metadata: dict | None = None, overwrite: bool = False,
                chunk: int = 1024, backend: str = "jax", faiss_index: str | None = None,
                faiss_params: dict | None = None, store_tokens: str | None = None) -> dict:
  """Embeds a split's images (tags + regions) or captions once and writes the index; returns meta.json.

  `store_tokens` ("bfloat16" | "int8"): also store each row's token states for late-interaction
  re-ranking (index.TOKEN_FILES). Run by every process of a `jax.distributed` job (jax.process_count() > 1),
  each process embeds its share of the rows (`process_rows`) into the one index (`_build_streamed`)."""
  if store_tokens not in TOKEN_DTYPES:
    raise ValueError(f"store_tokens must be one of {TOKEN_DTYPES}, got {store_tokens!r}")
  check_options(path, side, compact, backend, faiss_index)
  gallery = gallery_lib.load_gallery(source)
  ids = gallery.image_ids if side == "images" else gallery.image_ids[gallery.txt2img]
  return _build_streamed(encoder, gallery, source, path, ids, side=side, compact=compact, batch_size=batch_size,
                         metadata=metadata, overwrite=overwrite, chunk=chunk, backend=backend,
                         faiss_index=faiss_index, faiss_params=faiss_params, store_tokens=store_tokens)


def _gather_flags(ok: bool) -> np.ndarray:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return np.array([int(ok)], np.int32)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(np.array([int(ok)], np.int32))).reshape(-1)


def _in_step(what: str, fn):
  """fn() as one step of a multi-process build: every process reaches the same collective afterwards,
  failed or not, so none waits forever for one that gave up. The failing process raises its own error;
  the others raise one line naming it. (One process: just fn().)"""
  try:
    result = fn()
  except BaseException:
    _gather_flags(False)
    raise
  flags_ = _gather_flags(True)
  if not flags_.all():
    raise RuntimeError(f"index build: process(es) {np.flatnonzero(flags_ == 0).tolist()} failed while {what} "
                       "(see their error); no index was written")
  return result


def _build_streamed(encoder, gallery, source, path, ids, *, side, compact, batch_size, metadata, overwrite,
                    chunk, backend, faiss_index, faiss_params, store_tokens) -> dict:
  """Embeds the gallery into the index files block by block, by one process or by every process of a
  jax.distributed job (the directory then on a filesystem all of them share, as orbax checkpoints are
  in training).

  Why this layout: process 0 creates the temporary directory with each per-row array (.npy) at its final
  shape; each process embeds its contiguous share of the rows and writes them into those files through a
  memory map, at its own offset. No host ever holds or receives the whole gallery's embeddings (or token
  states), the writes run in parallel, and the finished directory is the ordinary single-file index, so
  `query`, `add_items` and the sha256 check read it unchanged (shards plus a manifest would need every
  reader to know shards). Process 0 then concatenates the per-process text lists, hashes the files (one
  sequential read), builds the faiss structure when asked, writes meta.json and renames the directory:
  the index appears complete or not at all. A process that fails makes every process fail (`_in_step`);
  a process that dies leaves only the hidden temporary directory `.NAME.tmp-*` behind.
  """
  import jax  # pylint: disable=import-outside-toplevel
  me, count = jax.process_index(), jax.process_count()
  n, dim = len(ids), encoder.model_config.embed_dim
  token = uuid.uuid4().int & 0x7FFFFFFF
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    # Every process must hold the same encoder and the same gallery: compare digests of both.
    digest = hashlib.sha256(encoder.fingerprint.encode() + np.asarray(ids, np.int64).tobytes()).digest()
    seen = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest[:8], np.int64).copy())).reshape(-1)
    if not (seen == seen[0]).all():
      raise ValueError(f"index build: the processes loaded different exports or galleries (process {me}: export "
                       f"fingerprint {encoder.fingerprint[:16]}..., {n} rows); give every process the same "
                       "--export, --data_dir, --dataset and --split")
    token = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([token], np.int64))).reshape(-1)[0])
  tmp = _temporary_sibling(path, overwrite, token=f"{token:08x}")  # every process refuses an existing index
  cfg = encoder.model_config
  width = (cfg.tag_len + cfg.max_regions) if side == "images" else cfg.max_text_len
  probe = _row_arrays(np.zeros((1, dim), np.float32), compact)  # each per-row array's dtype and row shape
  if store_tokens:
    probe.update(_token_arrays(np.ones((1, width, cfg.hidden_size), np.float32), np.ones((1, width)), store_tokens))

  def create():
    if me == 0:
      os.makedirs(os.path.dirname(tmp), exist_ok=True)
      os.makedirs(tmp)
      for name, a in probe.items():
        np.lib.format.open_memmap(os.path.join(tmp, name), mode="w+", dtype=a.dtype,
                                  shape=(n,) + a.shape[1:]).flush()
      np.save(os.path.join(tmp, "ids.npy"), np.asarray(ids, np.int64))
      np.save(os.path.join(tmp, ENTRY_ENCODERS), np.zeros(n, np.int32))

  def embed_share():
    lo, hi = process_rows(n, me, count)
    maps = {name: np.load(os.path.join(tmp, name), mmap_mode="r+") for name in probe} if hi > lo else {}
    texts = []
    for start, emb, txt, states in _embed_rows(encoder, gallery, source, side, lo, hi, batch_size, chunk,
                                               tokens=bool(store_tokens)):
      arrays = _row_arrays(emb, compact)
      if store_tokens:
        arrays.update(_token_arrays(*states, store_tokens))
      for name, a in arrays.items():
        maps[name][start:start + len(a)] = a
      texts.extend(txt)
    for m in maps.values():
      m.flush()
    fileio.write_json_atomic(os.path.join(tmp, f"texts.part-{me:05d}.json"), [str(t) for t in texts])

  def finish():
    if me != 0:
      return None
    parts = [os.path.join(tmp, f"texts.part-{p:05d}.json") for p in range(count)]
    texts = []
    for part in parts:
      with open(part) as f:
        texts.extend(json.load(f))
    if len(texts) != n:
      raise ValueError(f"index build: the processes wrote {len(texts)} texts for {n} rows")
    with open(os.path.join(tmp, "texts.json"), "w") as f:
      json.dump(texts, f)
    for part in parts:
      os.remove(part)
    extra = {"processes": count} if count > 1 else {}
    if store_tokens:
      extra["tokens"] = {"dtype": store_tokens, "width": int(width), "hidden": int(cfg.hidden_size)}
    return _finish(tmp, path, fingerprint=encoder.fingerprint, side=side, num=n, dim=dim, compact=compact,
                   encoders=[encoder.fingerprint], backend=backend, faiss_index=faiss_index,
                   faiss_params=faiss_params, metadata={**(metadata or {}), **extra})

  try:
    _in_step("creating the index files", create)
    _in_step("embedding their rows", embed_share)
    meta = _in_step("finishing the index (process 0)", finish)
  except BaseException:
    if me == 0:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if meta is None:  # the other processes return what process 0 wrote
    with open(os.path.join(os.path.abspath(path), META)) as f:
      meta = json.load(f)
  return meta


def run_build(export: str, data_dir: str, dataset: str, split: str, path: str, *, side: str = "images",
              compact: str | None = None, batch_size: int = 64, overwrite: bool = False, backend: str = "jax",
              faiss_index: str | None = None, faiss_params: dict | None = None,
              store_tokens: str | None = None) -> dict:
  """`launch/index.py build`: loads the export and the split, builds the index; returns its meta. The
  encoder shards each batch over this process's devices; under jax.distributed every process embeds its
  share of the rows (build_index). The cheap checks (flags, faiss installed) come before the model."""
  import jax
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval.encoder import Encoder
  if not (data_dir and dataset):
    raise ValueError("build needs --data_dir and --dataset")
  _check_backend(backend, compact, faiss_index)
  if store_tokens not in TOKEN_DTYPES:
    raise ValueError(f"--store_tokens must be one of {TOKEN_DTYPES[1:]}, got {store_tokens!r}")
  if backend == "faiss":
    faiss_backend.require_faiss(f"--backend=faiss (index {os.path.abspath(path)})")
    faiss_backend.build_params(faiss_index, 1 << 20, **(faiss_params or {}))  # unknown / bad parameters
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
  encoder = Encoder.load(export, batch_size=batch_size, mesh=mesh)
  source = prepare.load_split(data_dir, dataset, split)
  return build_index(encoder, source, path, side=side, compact=compact, batch_size=batch_size,
                     overwrite=overwrite, metadata={"export": os.path.abspath(export), "data_dir": data_dir,
                                                    "dataset": dataset, "split": split,
                                                    "local_devices": len(devices)},
                     backend=backend, faiss_index=faiss_index, faiss_params=faiss_params,
                     store_tokens=store_tokens)
