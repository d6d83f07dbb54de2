"""faiss as the index's search backend on CPUs: exact (flat), IVF and HNSW over inner products.

Why its own module: faiss is an optional extra (`pip install .[faiss]`, faiss-cpu), so nothing else in
the package imports it; retrieval/index.py calls this module only for an index built with
`--backend=faiss`, and the JAX search (retrieval/search.py) stays the path on accelerators. Every score is
an inner product (METRIC_INNER_PRODUCT): on the index's L2-normalised rows that is the cosine similarity,
the same score as the JAX search, so the backends answer the same question.

Public API (used by retrieval/index.py and by the retrieval-modes benchmark, benchmarks/retrieval_modes.py):

  KINDS = ("flat", "ivf", "hnsw")
  FaissMissingError(ImportError, ValueError)  faiss is not installed; the message names the fix
                                              (`pip install faiss-cpu` / `pip install .[faiss]`)
  require_faiss(what="the faiss backend") -> the faiss module, or FaissMissingError naming `what`
  available() -> bool                         faiss imports
  simd_level() -> str                         which SIMD code faiss runs: "generic", "AVX2", "AVX512",
                                              "AVX512_SPR", "NEON", "SVE", ... (faiss >= 1.13 wheels
                                              dispatch at run time: the dispatched level; older wheels:
                                              the swigfaiss_<level> module the loader imported)
  simd_info() -> dict                         {"level", "dynamic_dispatch", "module", "compile_options",
                                              "version"}: what a benchmark records beside its figures
  build_params(kind, num, **params) -> dict   the complete parameters `build` uses, defaults filled in:
                                              flat: {}; ivf: {"nlist", "nprobe", "seed"}; hnsw: {"M",
                                              "ef_construction", "ef_search"}
  build(embeddings float32 [N, D], kind, **params) -> faiss.Index
                                              params (all optional): ivf: nlist (default ~4 sqrt(N), at most
                                              N // 39 so each list trains on >= 39 points), nprobe (lists
                                              scanned per query, default min(nlist, 16)), seed (k-means,
                                              default 0); hnsw: M (links per node, 32), ef_construction
                                              (40), ef_search (candidate list per query, 64).
                                              The query-time parameters (nprobe, ef_search) are set on the
                                              returned index and saved with it.
  search(index, queries float32 [Q, D], k, *, nprobe=None, ef_search=None) -> retrieval.search.TopK
                                              scores float32 [Q, k] descending, indices int64 gallery rows
                                              (-1 with score -inf where fewer than k are found, as
                                              retrieval/search.py pads); nprobe / ef_search override the
                                              index's own for this call only
  save(index, path) / load(path) -> faiss.Index
                                              faiss.write_index / read_index (the index directory's atomic
                                              write and sha256 check are retrieval/index.py's job)
  describe(index) -> dict                     {"kind", "ntotal", "dim", + the parameters of `build_params`}
  set_num_threads(n)                          faiss's OpenMP threads (benchmarks: match the JAX side)

Ties: faiss does not promise the project's tie rule (equal scores by ascending row, retrieval/search.py);
rows with equal scores may come back in another order. Flat search is exact: the same top-k set as
`search.exact_topk` wherever the k-th and (k+1)-th scores differ by more than float32 rounding.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from vldeformer_jax.retrieval.search import TopK

KINDS = ("flat", "ivf", "hnsw")
INSTALL_HINT = "install faiss-cpu (pip install .[faiss], or pip install faiss-cpu)"

_DEFAULTS = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None, "seed": 0},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": 64},
}
_MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
_DEFAULT_NPROBE = 16


class FaissMissingError(ImportError, ValueError):
  """faiss is not installed. A ValueError too, so the launchers report it as one `error:` line (cli.py)."""


def require_faiss(what: str = "the faiss backend"):
  """The faiss module, or FaissMissingError saying that `what` needs it and how to install it."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FaissMissingError(f"{what} needs faiss, which is not installed ({e}): {INSTALL_HINT}") from e
  return faiss


def available() -> bool:
  try:
    require_faiss()
  except FaissMissingError:
    return False
  return True


def simd_level() -> str:
  """The SIMD code faiss runs on this CPU ("generic", "AVX2", "AVX512", "AVX512_SPR", ...)."""
  return simd_info()["level"]


def simd_info() -> dict:
  """What a benchmark names beside a faiss figure: a wheel that fell back to its generic build (no SIMD)
  makes any speed ratio against it meaningless."""
  faiss = require_faiss("simd_info")
  loaded = sorted(m.split(".")[-1] for m in sys.modules if m.startswith("faiss.swigfaiss"))
  module = loaded[-1] if loaded else "swigfaiss"
  config = getattr(faiss, "SIMDConfig", None)
  dynamic = bool(config is not None and hasattr(config, "has_dynamic_dispatch") and config.has_dynamic_dispatch())
  if dynamic:
    level = str(config.get_level_name())
    level = "generic" if level.upper() in ("NONE", "SIMDLEVEL_NONE", "") else level
  else:  # one build per level; the loader imported the best one the CPU supports
    suffix = module[len("swigfaiss"):].lstrip("_")
    level = suffix.upper() if suffix else "generic"
  return {"level": level, "dynamic_dispatch": dynamic, "module": module,
          "compile_options": str(faiss.get_compile_options()).strip(), "version": faiss.__version__}


def build_params(kind: str, num: int, **params) -> dict:
  """`build`'s parameters for a gallery of `num` rows with the defaults filled in (what meta.json records)."""
  if kind not in KINDS:
    raise ValueError(f"faiss index kind must be one of {KINDS}, got {kind!r}")
  unknown = sorted(set(params) - set(_DEFAULTS[kind]))
  if unknown:
    raise ValueError(f"faiss {kind} index: unknown parameter(s) {unknown}; it takes {sorted(_DEFAULTS[kind])}")
  out = dict(_DEFAULTS[kind])
  out.update({k: v for k, v in params.items() if v is not None})
  if kind == "ivf":
    most = max(1, num // _MIN_POINTS_PER_LIST)
    if out["nlist"] is None:
      out["nlist"] = max(1, min(int(round(4 * math.sqrt(max(num, 1)))), most))
    if out["nprobe"] is None:
      out["nprobe"] = min(out["nlist"], _DEFAULT_NPROBE)
    if not 1 <= out["nlist"] <= max(num, 1):
      raise ValueError(f"faiss ivf index: nlist {out['nlist']} must be in [1, {num}] (the gallery's rows)")
    if out["nprobe"] < 1:
      raise ValueError(f"faiss ivf index: nprobe must be >= 1, got {out['nprobe']}")
    out["nprobe"] = min(out["nprobe"], out["nlist"])
  if kind == "hnsw":
    for key in ("M", "ef_construction", "ef_search"):
      if int(out[key]) < 1:
        raise ValueError(f"faiss hnsw index: {key} must be >= 1, got {out[key]}")
  return {k: int(v) for k, v in out.items()}


def _as_rows(x, what: str) -> np.ndarray:
  x = np.ascontiguousarray(np.asarray(x, np.float32))
  if x.ndim != 2:
    raise ValueError(f"faiss: {what} must be [rows, dim], got shape {x.shape}")
  return x


def build(embeddings, kind: str, **params):
  """A faiss inner-product index over `embeddings` [N, D] (rows get ids 0..N-1, their positions)."""
  faiss = require_faiss(f"a faiss {kind} index")
  x = _as_rows(embeddings, "embeddings")
  n, d = x.shape
  p = build_params(kind, n, **params)
  if kind == "flat":
    index = faiss.IndexFlatIP(d)
  elif kind == "ivf":
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = p["seed"]
    index.train(x)
    index.nprobe = p["nprobe"]
  else:
    index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = p["ef_construction"]
    index.hnsw.efSearch = p["ef_search"]
  if n:
    index.add(x)
  return index


def _kind_of(index) -> str:
  faiss = require_faiss()
  ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
  if ivf is not None:
    return "ivf"
  if isinstance(index, faiss.IndexHNSW) or hasattr(index, "hnsw"):
    return "hnsw"
  return "flat"


def describe(index) -> dict:
  """{"kind", "ntotal", "dim"} plus the index's parameters (nlist/nprobe or M/ef_search)."""
  faiss = require_faiss()
  kind = _kind_of(index)
  out: dict[str, Any] = {"kind": kind, "ntotal": int(index.ntotal), "dim": int(index.d)}
  if kind == "ivf":
    ivf = faiss.extract_index_ivf(index)
    out.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
  elif kind == "hnsw":
    out.update(M=int(index.hnsw.nb_neighbors(1)), ef_construction=int(index.hnsw.efConstruction),
               ef_search=int(index.hnsw.efSearch))
  return out


def search(index, queries, k: int, *, nprobe: int | None = None, ef_search: int | None = None) -> TopK:
  """Top-k rows by inner product; nprobe (ivf) / ef_search (hnsw) override the index's own for this call."""
  faiss = require_faiss()
  q = _as_rows(queries, "queries")
  if q.shape[1] != index.d:
    raise ValueError(f"faiss: queries have dim {q.shape[1]}, the index has {index.d}")
  if k < 1:
    raise ValueError(f"faiss: k must be >= 1, got {k}")
  kind = _kind_of(index)
  params = None
  if kind == "ivf" and nprobe is not None:
    params = faiss.SearchParametersIVF(nprobe=int(nprobe))
  elif kind == "hnsw" and ef_search is not None:
    params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
  scores, labels = index.search(q, int(k), params=params) if params is not None else index.search(q, int(k))
  labels = np.asarray(labels, np.int64)
  scores = np.where(labels >= 0, np.asarray(scores, np.float32), -np.inf).astype(np.float32)
  return TopK(scores, labels)


def save(index, path: str) -> None:
  require_faiss().write_index(index, str(path))


def load(path: str):
  return require_faiss(f"the faiss index {path}").read_index(str(path))


def set_num_threads(n: int) -> None:
  require_faiss().omp_set_num_threads(int(n))
