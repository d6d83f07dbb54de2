"""A persistent embedding index: embed a gallery once, answer queries later without re-embedding it.

This is VLDeformer's "single modal indexing": images (or captions) are encoded offline by the decomposed
encoder and stored; a query is one encoder pass plus a search (retrieval/search.py: exact chunked top-k in
JAX, optionally compact int8 / 1-bit codes with the shortlist re-scored in float).

  INDEX/
    meta.json        {"format": "vldeformer_jax.index", "version": 1, "fingerprint": <export's>, "side",
                      "num", "dim", "compact", "dataset", "split", "data_dir", "files": {name: sha256}}
    embeddings.npy   float32 [N, D], L2-normalised (memory-mapped when searching)
    ids.npy          int64 [N]: the image_id of each row
    texts.json       what each row is: the tags (images) or the caption text (captions)
    codes.npy        int8 [N, D] (+ scales.npy float32 [N]) or uint8 [N, D/8]: only for a compact index
    entry_encoders.npy  int32 [N]: per entry, its encoder's position in meta["encoders"] (the fingerprints of
                     every export that encoded an entry); absent in older indexes (every entry: "fingerprint")
    faiss.index      backend "faiss" only: a faiss flat / ivf / hnsw inner-product structure over the rows
                     (retrieval/faiss_backend.py), meta["faiss"] = {"index", its parameters, "faiss_version",
                     "simd"}; queries search it on the CPU instead of the JAX scan (`--exact`: the JAX scan)
    tokens.npy       with --store_tokens only: token states [N, T, H] (bfloat16 bits as uint16, or int8 +
    token_mask.npy   token_scales.npy float32 [N, T]) and their mask uint8 [N, T], meta["tokens"] = {"dtype",
                     "width", "hidden"}: what late-interaction re-ranking reads (retrieval/index_rerank.py)

Backends: "jax" (the default; meta without "backend" reads as it) scans the float rows or the compact codes
with retrieval/search.py, on any device; "faiss" (CPU, the optional faiss-cpu extra) stores a faiss
structure built from the same rows, so the embeddings, ids, fingerprints and checks are those of any index.
An index that needs faiss is refused where faiss is not installed, naming the index and the install.

This module is the index's format and contract: meta.json and the files above, `write_index` (embeddings
already computed), `Index.load` (checks) and `Index.search`, `add_items`, the errors. Embedding a dataset split
into an index, by one process or by every process of a jax.distributed job, is retrieval/index_build.py
(`build_index`, `run_build`); answering a text or image query from an index (warnings, optional re-ranking
through retrieval/index_rerank.py) is retrieval/index_query.py (`query_index`, `run_query`).

Continual indexing (`add_items`): items encoded by the encoder of every entry are appended; items encoded by
another encoder are refused unless the policy is `keep` (old entries stay as they were encoded; the index's
"fingerprint", the encoder queries must come from, becomes the new one) or `reindex` (every old entry is
re-encoded with the new encoder).

The directory is written under a temporary sibling and renamed, so an index that exists is complete. On
load every file is checked against the sha256 in meta.json and its shape against `num`/`dim` (a corrupt
or partly replaced index is refused), and `check_fingerprint` refuses an index built by another export:
embeddings of different weights live in a different space and would give silently wrong answers.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import uuid
from typing import Sequence

import numpy as np

from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import faiss_backend
from vldeformer_jax.retrieval import late_interaction
from vldeformer_jax.retrieval import search
from vldeformer_jax.retrieval.search import TopK, exact_topk  # noqa: F401  (public: the exact search)

FORMAT = "vldeformer_jax.index"
VERSION = 1
META = "meta.json"
SIDES = ("images", "captions")
COMPACT = (None, "int8", "binary")
ADD_POLICIES = (None, "keep", "reindex")
ENTRY_ENCODERS = "entry_encoders.npy"
BACKENDS = ("jax", "faiss")
FAISS_FILE = "faiss.index"
TOKEN_DTYPES = (None, "bfloat16", "int8")  # stored token states (late interaction): none, bf16 bits, int8 + scale
TOKEN_FILES = ("tokens.npy", "token_mask.npy", "token_scales.npy")


def _bfloat16():
  """numpy's bfloat16 dtype (ml_dtypes, as JAX registers it): stored token states are its raw 16 bits."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16


class BadIndexError(ValueError):
  """A missing, corrupt, stale or foreign index (the message says which file and what to do)."""


class EncoderMismatchError(BadIndexError):
  """Items encoded by another encoder than the index's entries, added without a `keep` / `reindex` policy."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def _check_backend(backend: str, compact: str | None, faiss_index: str | None) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"index backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "faiss":
    if compact is not None:
      raise ValueError(f"--compact={compact} is a JAX-backend option; a faiss index searches its own structure "
                       f"(--faiss_index={'|'.join(faiss_backend.KINDS)}): drop one of the two")
    if faiss_index not in faiss_backend.KINDS:
      raise ValueError(f"faiss index kind must be one of {faiss_backend.KINDS}, got {faiss_index!r}")


def _row_arrays(emb: np.ndarray, compact: str | None) -> dict[str, np.ndarray]:
  """The per-row arrays of a block of L2-normalised embeddings (row i of each depends on row i only, so
  blocks computed apart, e.g. by several processes, concatenate to the arrays of the whole)."""
  arrays = {"embeddings.npy": np.asarray(emb, np.float32)}
  if compact == "int8":
    arrays["codes.npy"], arrays["scales.npy"] = search.quantize_int8(emb)
  elif compact == "binary":
    arrays["codes.npy"] = search.pack_signs(emb)
  return arrays


def _token_arrays(states, mask, store_tokens: str) -> dict[str, np.ndarray]:
  """The stored form of token states [n, T, H] and their mask [n, T] (TOKEN_FILES)."""
  q = late_interaction.quantize_tokens(states, store_tokens)
  values = q["values"]
  out = {"tokens.npy": values.view(np.uint16) if store_tokens == "bfloat16" else values,
         "token_mask.npy": np.asarray(mask, np.uint8)}
  if "scales" in q:
    out["token_scales.npy"] = q["scales"]
  return out



def _temporary_sibling(path: str, overwrite: bool, token: str | None = None) -> str:
  """Checks the target and names the hidden temporary directory the index is written in."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"index already exists: {path} (pass overwrite=True / --overwrite to replace it)")
  parent, base = os.path.split(path)
  return os.path.join(parent, f".{base}.tmp-{token or uuid.uuid4().hex[:8]}")


def _finish(tmp: str, path: str, *, fingerprint: str, side: str, num: int, dim: int, compact: str | None,
            encoders: list[str], metadata: dict | None, backend: str, faiss_index: str | None,
            faiss_params: dict | None) -> dict:
  """Completes an index whose arrays and texts.json are in `tmp`: the faiss structure (from the stored
  embeddings), the sha256 of every file, meta.json, then the rename that makes it visible."""
  extra = {"backend": backend}
  if backend == "faiss":
    emb = np.load(os.path.join(tmp, "embeddings.npy"), mmap_mode="r")
    params = faiss_backend.build_params(faiss_index, num, **(faiss_params or {}))
    structure = faiss_backend.build(emb, faiss_index, **params)
    faiss_backend.save(structure, os.path.join(tmp, FAISS_FILE))
    info = faiss_backend.simd_info()
    extra["faiss"] = {"index": faiss_index, **params, "faiss_version": info["version"], "simd": info["level"]}
  files = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp)) if name != META}
  meta = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "side": side,
          "num": int(num), "dim": int(dim), "compact": compact, "files": files, "encoders": encoders,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
  meta.update({k: v for k, v in (metadata or {}).items() if k not in meta})
  fileio.write_json_atomic(os.path.join(tmp, META), meta)
  fileio.replace_dir(tmp, os.path.abspath(path))
  return meta


def check_options(path: str, side: str, compact: str | None, backend: str, faiss_index: str | None) -> None:
  """The index options' checks, run before any work (a build checks them before loading a model)."""
  if side not in SIDES:
    raise ValueError(f"index side must be one of {SIDES}, got {side!r}")
  if compact not in COMPACT:
    raise ValueError(f"compact must be one of {COMPACT}, got {compact!r}")
  _check_backend(backend, compact, faiss_index)
  if backend == "faiss":
    faiss_backend.require_faiss(f"index {os.path.abspath(path)} (--backend=faiss)")


def write_index(path: str, embeddings: np.ndarray, ids: Sequence[int], texts: Sequence[str], *,
                fingerprint: str, side: str, compact: str | None = None, metadata: dict | None = None,
                overwrite: bool = False, entry_fingerprints: Sequence[str] | None = None,
                backend: str = "jax", faiss_index: str | None = None, faiss_params: dict | None = None) -> dict:
  """Writes an index directory atomically from embeddings already computed; returns its meta.json.

  `entry_fingerprints`: the encoder of each entry (default: `fingerprint` for all). `backend="faiss"`
  also stores a faiss structure (`faiss_index`: flat | ivf | hnsw, `faiss_params` as
  faiss_backend.build takes them) that queries search instead of the JAX scan."""
  check_options(path, side, compact, backend, faiss_index)
  emb = np.asarray(embeddings, np.float32)
  ids = np.asarray(ids, np.int64)
  if emb.ndim != 2 or len(ids) != len(emb) or len(texts) != len(emb):
    raise ValueError(f"index: embeddings {emb.shape}, {len(ids)} ids and {len(texts)} texts do not match")
  entry_fps = [fingerprint] * len(emb) if entry_fingerprints is None else [str(f) for f in entry_fingerprints]
  if len(entry_fps) != len(emb):
    raise ValueError(f"index: {len(entry_fps)} entry fingerprints for {len(emb)} embeddings")
  encoders = sorted(set(entry_fps) | {fingerprint})
  position = {f: i for i, f in enumerate(encoders)}
  tmp = _temporary_sibling(path, overwrite)
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  os.makedirs(tmp)
  try:
    arrays = {**_row_arrays(emb, compact), "ids.npy": ids,
              ENTRY_ENCODERS: np.array([position[f] for f in entry_fps], np.int32).reshape(len(emb))}
    for name, a in arrays.items():
      np.save(os.path.join(tmp, name), a)
    with open(os.path.join(tmp, "texts.json"), "w") as f:
      json.dump([str(t) for t in texts], f)
    return _finish(tmp, path, fingerprint=fingerprint, side=side, num=len(emb), dim=emb.shape[1],
                   compact=compact, encoders=encoders, metadata=metadata, backend=backend,
                   faiss_index=faiss_index, faiss_params=faiss_params)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@dataclasses.dataclass
class Index:
  """A loaded index. Arrays are memory-mapped: only searched chunks / re-scored rows are read."""
  path: str
  meta: dict
  embeddings: np.ndarray
  ids: np.ndarray
  texts: list[str]
  codes: np.ndarray | None = None
  scales: np.ndarray | None = None
  entry_encoders: np.ndarray | None = None  # int32 [N] into meta["encoders"]; None: all meta["fingerprint"]
  faiss: object | None = None  # the faiss structure of a `backend: faiss` index (faiss_backend)
  tokens: dict | None = None  # stored token states: {"values", ["scales"], "mask"} (memory-mapped)

  @classmethod
  def load(cls, path: str, *, verify: bool = True) -> "Index":
    """Reads and checks an index directory; `verify` re-hashes every file against meta.json."""
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
      raise BadIndexError(f"index not found: {path} (build it with `launch/index.py build`)")
    if not os.path.isfile(meta_path):
      raise BadIndexError(f"index {path}: missing {META}; not a complete vldeformer_jax index (rebuild it)")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except json.JSONDecodeError as e:
      raise BadIndexError(f"{meta_path}: not valid JSON (line {e.lineno}: {e.msg}); rebuild the index") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise BadIndexError(f"{meta_path}: field 'format' is not {FORMAT!r}; not a vldeformer_jax index")
    if meta.get("version") != VERSION:
      raise BadIndexError(f"{meta_path}: index version {meta.get('version')!r} is stale; this code reads "
                        f"version {VERSION}: rebuild the index")
    for key in ("fingerprint", "side", "num", "dim", "files"):
      if key not in meta:
        raise BadIndexError(f"{meta_path}: field {key!r} is missing; rebuild the index")
    backend = meta.get("backend", "jax")  # indexes written before backends existed are JAX ones
    if backend not in BACKENDS:
      raise BadIndexError(f"{meta_path}: unknown backend {backend!r} (this code reads {BACKENDS}); rebuild the index")
    if backend == "faiss" and not faiss_backend.available():
      raise BadIndexError(f"index {path} was built with --backend=faiss "
                          f"({meta.get('faiss', {}).get('index', '?')}), but faiss is not installed here: "
                          f"{faiss_backend.INSTALL_HINT}, or rebuild the index with --backend=jax")
    for name, digest in meta["files"].items():
      f = os.path.join(path, name)
      if not os.path.isfile(f):
        raise BadIndexError(f"index {path}: file {name} listed in {META} is missing; rebuild the index")
      if verify and _sha256(f) != digest:
        raise BadIndexError(f"index {path}: {name} does not match its sha256 in {META} (corrupt or modified "
                          f"after the build); rebuild the index")
    n, d = meta["num"], meta["dim"]

    def arr(name, shape):
      try:
        a = np.load(os.path.join(path, name), mmap_mode="r")
      except (ValueError, OSError) as e:
        raise BadIndexError(f"index {path}: cannot read {name}: {e}; rebuild the index") from e
      if shape is not None and tuple(a.shape) != shape:
        raise BadIndexError(f"index {path}: {name} has shape {tuple(a.shape)}, {META} says {shape}; "
                          "rebuild the index")
      return a

    texts = fileio.read_json(os.path.join(path, "texts.json"), what=f"index {path}: texts.json",
                             error=BadIndexError)
    if not isinstance(texts, list) or len(texts) != n:
      count = f"{len(texts)} entries" if isinstance(texts, list) else f"a {type(texts).__name__}, not a list"
      raise BadIndexError(f"index {path}: texts.json has {count}, {META} says {n} entries")
    codes = scales = None
    if meta.get("compact") == "int8":
      codes, scales = arr("codes.npy", (n, d)), arr("scales.npy", (n,))
    elif meta.get("compact") == "binary":
      codes = arr("codes.npy", (n, -(-d // 8)))
    entry_encoders = None
    if ENTRY_ENCODERS in meta["files"]:
      entry_encoders = np.asarray(arr(ENTRY_ENCODERS, (n,)))
      if n and (entry_encoders.min() < 0 or entry_encoders.max() >= len(meta.get("encoders", []))):
        raise BadIndexError(f"index {path}: {ENTRY_ENCODERS} points outside meta.json's encoders; rebuild it")
    structure = None
    if backend == "faiss":
      structure = _load_faiss(path, meta)
    tokens = None
    if meta.get("tokens"):
      spec = meta["tokens"]
      shape = (n, spec.get("width"), spec.get("hidden"))
      if spec.get("dtype") not in TOKEN_DTYPES[1:]:
        raise BadIndexError(f"{meta_path}: tokens dtype {spec.get('dtype')!r} is not one of {TOKEN_DTYPES[1:]}")
      values = arr("tokens.npy", shape)
      tokens = {"values": values.view(_bfloat16()) if spec["dtype"] == "bfloat16" else values,
                "mask": arr("token_mask.npy", shape[:2])}
      if spec["dtype"] == "int8":
        tokens["scales"] = arr("token_scales.npy", shape[:2])
    return cls(path, meta, arr("embeddings.npy", (n, d)), arr("ids.npy", (n,)), texts, codes, scales,
               entry_encoders, structure, tokens)

  @property
  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  @property
  def entry_fingerprints(self) -> list[str]:
    """The fingerprint of the encoder of each entry."""
    if self.entry_encoders is None:
      return [self.fingerprint] * len(self.ids)
    encoders = self.meta["encoders"]
    return [encoders[int(i)] for i in self.entry_encoders]

  def check_fingerprint(self, fingerprint: str, export: str = "the encoder") -> None:
    """Refuses to answer queries embedded by weights other than those that built the index."""
    if fingerprint != self.fingerprint:
      raise BadIndexError(
          f"index {self.path} was built by the export with fingerprint {self.fingerprint[:16]}..., but "
          f"{export} has fingerprint {fingerprint[:16]}...: its embeddings are in another space. Query with "
          f"the export that built the index, or rebuild the index with this one.")

  def token_rows(self, rows) -> tuple[dict, np.ndarray]:
    """The stored token states of these rows as late_interaction takes them ({"values", ["scales"]}, still
    bf16 / int8) and their mask [len(rows), T]; only those rows are read from disk."""
    if self.tokens is None:
      raise BadIndexError(f"index {self.path} stores no token states (late-interaction re-ranking needs them): "
                          "rebuild it with --store_tokens=bfloat16|int8")
    rows = np.asarray(rows, np.int64)
    stored = {k: np.asarray(v[rows]) for k, v in self.tokens.items() if k != "mask"}
    return stored, np.asarray(self.tokens["mask"][rows], np.int32)

  @property
  def backend(self) -> str:
    return self.meta.get("backend", "jax")

  def search(self, queries: np.ndarray, k: int = 10, *, rescore_factor: int = 10, mesh=None,
             chunk_size: int = search.DEFAULT_CHUNK, exact: bool | None = None, nprobe: int | None = None,
             ef_search: int | None = None) -> TopK:
    """Top-k rows for L2-normalised queries [Q, D]. A compact index scans its codes for a shortlist of
    k * rescore_factor rows, then re-scores those in float (`exact=True` scans the float rows instead).
    A faiss index searches its faiss structure on the CPU (`nprobe` / `ef_search` override the stored
    query parameters of ivf / hnsw; `exact=True` runs the JAX scan of the float rows instead)."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if self.faiss is not None and not exact:
      return faiss_backend.search(self.faiss, queries, k, nprobe=nprobe, ef_search=ef_search)
    kind = self.meta.get("compact")
    if kind is None or exact:
      return search.exact_topk(queries, self.embeddings, k, mesh=mesh, chunk_size=chunk_size)
    short = search.search_codes(queries, self.codes, min(self.meta["num"], k * rescore_factor), kind=kind,
                                scales=self.scales, dim=self.meta["dim"], mesh=mesh, chunk_size=chunk_size)
    return search.rescore(queries, self.embeddings, short.indices, k)


def _load_faiss(path: str, meta: dict):
  """The faiss structure of an index whose files passed their sha256 check, checked against meta.json."""
  if FAISS_FILE not in meta["files"]:
    raise BadIndexError(f"index {path}: backend faiss but {FAISS_FILE} is not listed in {META}; rebuild the index")
  try:
    structure = faiss_backend.load(os.path.join(path, FAISS_FILE))
  except RuntimeError as e:  # faiss reports an unreadable file as RuntimeError
    raise BadIndexError(f"index {path}: cannot read {FAISS_FILE}: {' '.join(str(e).split())[:200]}; "
                        "rebuild the index") from e
  got = faiss_backend.describe(structure)
  want = meta.get("faiss", {})
  if (got["ntotal"], got["dim"], got["kind"]) != (meta["num"], meta["dim"], want.get("index")):
    raise BadIndexError(f"index {path}: {FAISS_FILE} is a {got['kind']} index of {got['ntotal']} x {got['dim']}, "
                        f"{META} says {want.get('index')} of {meta['num']} x {meta['dim']}; rebuild the index")
  return structure


def add_items(path: str, embeddings: np.ndarray, ids: Sequence[int], texts: Sequence[str], *, fingerprint: str,
              policy: str | None = None, reencode=None) -> dict:
  """Appends items encoded by the encoder `fingerprint` to the index at `path` (rewritten atomically);
  returns the new meta.json.

  When an entry of the index was encoded by another encoder the add is refused (`EncoderMismatchError`)
  unless `policy` is `keep` (old entries stay as they were encoded, each with its own fingerprint) or
  `reindex` (`reencode(ids, texts) -> [N_old, D]` re-encodes every old entry with the new encoder).
  Either way the index's fingerprint (what queries must come from) becomes `fingerprint`.
  """
  if policy not in ADD_POLICIES:
    raise ValueError(f"add policy must be one of {ADD_POLICIES}, got {policy!r}")
  old = Index.load(path)
  if old.tokens is not None:
    raise ValueError(f"index {old.path} stores token states, which add_items does not extend: rebuild it with "
                     "--store_tokens, or build one without")
  emb = np.asarray(embeddings, np.float32)
  if emb.ndim != 2 or emb.shape[1] != old.meta["dim"]:
    raise ValueError(f"index {old.path}: new embeddings have shape {emb.shape}, the index dim is {old.meta['dim']}")
  old_fps = old.entry_fingerprints
  old_emb = np.asarray(old.embeddings, np.float32)
  foreign = sorted(set(old_fps) - {fingerprint})
  if foreign and policy is None:
    raise EncoderMismatchError(
        f"index {old.path} holds entries encoded by {', '.join(f[:12] + '...' for f in foreign)}; the new items "
        f"are encoded by {fingerprint[:12]}...: refused; add with policy 'keep' (old entries stay as encoded) "
        f"or 'reindex' (re-encode every entry with the new encoder)")
  if foreign and policy == "reindex":
    if reencode is None:
      raise ValueError("policy 'reindex' needs reencode(ids, texts) -> embeddings of the old entries")
    old_emb = np.asarray(reencode(np.asarray(old.ids), list(old.texts)), np.float32)
    if old_emb.shape != (len(old_fps), old.meta["dim"]):
      raise ValueError(f"reencode returned shape {old_emb.shape}, expected {(len(old_fps), old.meta['dim'])}")
    old_fps = [fingerprint] * len(old_fps)
  keep_meta = {k: v for k, v in old.meta.items()
               if k not in ("format", "version", "fingerprint", "side", "num", "dim", "compact", "files",
                            "created", "encoders", "policy", "backend", "faiss")}
  if foreign:
    keep_meta["policy"] = policy
  return write_index(old.path, np.concatenate([old_emb, emb]), np.concatenate([np.asarray(old.ids), ids]),
                     list(old.texts) + [str(t) for t in texts], fingerprint=fingerprint, side=old.meta["side"],
                     compact=old.meta.get("compact"), metadata=keep_meta, overwrite=True,
                     entry_fingerprints=old_fps + [fingerprint] * len(emb), **_backend_of(old.meta))


def _backend_of(meta: dict) -> dict:
  """write_index's backend arguments that rebuild an index like the one `meta` describes."""
  if meta.get("backend", "jax") != "faiss":
    return {}
  spec = meta.get("faiss", {})
  kind = spec.get("index")
  keep = {"ivf": ("nprobe", "seed"), "hnsw": ("M", "ef_construction", "ef_search")}.get(kind, ())
  return {"backend": "faiss", "faiss_index": kind, "faiss_params": {k: spec[k] for k in keep if k in spec}}
