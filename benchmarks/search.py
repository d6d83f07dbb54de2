"""Table 3: exact top-10 gallery search, this project's JAX search against faiss-cpu and numpy.

The same L2-normalised float32 gallery [N, 768] and 1000 queries go to
- `vldeformer_jax.retrieval.index.exact_topk` (the index's exact search: chunked matmul, a two-stage
  exact top-k per chunk and a running merge, jitted, bounded memory);
- faiss-cpu `IndexFlatIP` (BLAS matmul + heap selection);
- numpy: the gallery in blocks of 65,536 rows, `queries @ block.T` and `np.argpartition`, merged.
Times are interleaved medians; the index build (faiss `add`) is not timed. Agreement: for each query the
set of 10 returned rows should equal faiss's; near-ties at rank 10 may swap under float32
rounding: up to 1 row in 1000 may differ (reported; ties are not checked individually), and the sorted
scores must match to 1e-4.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common


def gallery(n: int, dim: int, seed: int) -> np.ndarray:
  """Random L2-normalised float32 rows, in a 64-byte aligned buffer: how an index's memory-mapped
  embeddings.npy lies in memory (the .npy header pads the data to 64 bytes), which JAX's CPU client then
  reads in place. faiss gets its own copy from `add`, which is not timed either."""
  buf = np.empty(n * dim * 4 + 64, np.uint8)
  start = -buf.ctypes.data % 64
  x = buf[start:start + n * dim * 4].view(np.float32).reshape(n, dim)
  np.random.default_rng(seed).standard_normal((n, dim), np.float32, out=x)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def numpy_topk(queries: np.ndarray, gal: np.ndarray, k: int, block: int = 65536):
  best_v = np.full((len(queries), k), -np.inf, np.float32)
  best_i = np.full((len(queries), k), -1, np.int64)
  for start in range(0, len(gal), block):
    s = queries @ gal[start:start + block].T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    v = np.take_along_axis(s, part, axis=1)
    cand_v = np.concatenate([best_v, v], axis=1)
    cand_i = np.concatenate([best_i, part + start], axis=1)
    order = np.argsort(-cand_v, axis=1, kind="stable")[:, :k]
    best_v, best_i = np.take_along_axis(cand_v, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
  return best_v, best_i


def agreement(ref_v, ref_i, v, i, tol: float = 1e-4) -> dict:
  """Rows whose top-k index set differs from the reference, and how many of those are float ties."""
  same = np.array([set(a) == set(b) for a, b in zip(ref_i, i)])
  score_err = float(np.max(np.abs(np.sort(ref_v, axis=1) - np.sort(v, axis=1))))
  return {"rows": len(ref_i), "rows_differing": int((~same).sum()), "max_score_abs_diff": score_err,
          "ok": bool(score_err < tol and (~same).sum() <= max(1, len(ref_i) // 1000))}


def faiss_build() -> str:
  """Which SIMD code faiss runs and its compile options (`faiss_backend.simd_info`): a generic build makes any
  ratio against faiss meaningless."""
  from vldeformer_jax.retrieval import faiss_backend
  info = faiss_backend.simd_info()
  return f"{info['level']} (compile options: {info['compile_options']})"


def run(sizes=(100_000, 1_000_000), num_queries: int = 1000, k: int = 10, dim: int = 768, repeats: int = 3,
        numpy_max: int = 1_000_000) -> list[dict]:
  import faiss
  import jax
  from vldeformer_jax.retrieval import index as index_lib

  rows = []
  queries = gallery(num_queries, dim, seed=1)
  for n in sizes:
    gal = gallery(n, dim, seed=2)
    flat = faiss.IndexFlatIP(dim)
    flat.add(gal)
    res = {}

    def run_jax():
      res["jax"] = index_lib.exact_topk(queries, gal, k)

    def run_faiss():
      res["faiss"] = flat.search(queries, k)

    def run_numpy():
      res["numpy"] = numpy_topk(queries, gal, k)

    fns = {"jax": run_jax, "faiss": run_faiss}
    if n <= numpy_max:
      fns["numpy"] = run_numpy
    # Warm-up: compile the JAX search for this gallery's segment shapes (full blocks, the rest, the padded
    # tail; see search.search_codes): one block plus the remainder has the same ones. faiss and numpy need
    # none.
    block = 1 << 18
    index_lib.exact_topk(queries, gal[:n if n <= block else block + n % block], k)
    times = common.interleaved(fns, repeats, warmup=0)
    fv, fi = res["faiss"]
    row = {"gallery": n, "queries": num_queries, "k": k, "dim": dim,
           "faiss_threads": faiss.omp_get_max_threads(), "jax_devices": jax.device_count(),
           "faiss_build": faiss_build()}
    for name in fns:
      row[f"{name}_seconds"] = common.summary(times[name])
    row["jax_vs_faiss"] = row["jax_seconds"]["median"] / row["faiss_seconds"]["median"]
    row["agree_jax_faiss"] = agreement(fv, fi, res["jax"].scores, res["jax"].indices)
    if "numpy" in res:
      row["agree_numpy_faiss"] = agreement(fv, fi, *res["numpy"])
    rows.append(row)

  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="100000,1000000")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  common.emit({"rows": run(tuple(int(s) for s in a.sizes.split(",")), a.queries, repeats=a.repeats)})


if __name__ == "__main__":
  main()
