"""Dense matmul peaks of this machine, measured in the same run as the tables that are judged against them.

Why: a model's achieved FLOP/s means little without the ceiling of the same library on the same cores at
the same moment; the shared machine's load changes from hour to hour. The GFLOP/s of a peak is that of the
fastest of its runs: other processes only ever slow a matmul down, and a median peak under a burst of load is
a low ceiling that makes any fraction of it look better than it is. 4096 x 4096 x 4096 matmuls, float32
and bfloat16, for JAX (XLA:CPU) and PyTorch (oneDNN / MKL). On CPUs without native bf16 (no AVX512-BF16
or AMX), PyTorch's bf16 matmul falls back to a scalar path that needs minutes at 4096; it is then
measured at the largest size that takes about a second and the size is reported.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common


def jax_matmul(n: int, dtype: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
  b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
  f = jax.jit(lambda x, y: x @ y)
  times = common.timeit(lambda: f(a, b).block_until_ready(), repeats)
  s = common.summary(times)
  return {"n": n, "dtype": dtype, "seconds": s, "gflops": 2 * n**3 / s["min"] / 1e9}


def torch_matmul(n: int, dtype: str, repeats: int, budget_s: float = 1.5) -> dict:
  import torch
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  size = 512 if dtype == "bfloat16" else n
  while True:  # grow up to n while one product stays well inside the budget (slow only without bf16 units)
    a = torch.randn(size, size).to(dt)
    b = torch.randn(size, size).to(dt)
    t = time.perf_counter()
    a @ b
    if size >= n or (time.perf_counter() - t) * 8 > budget_s:
      break
    size *= 2
  times = common.timeit(lambda: a @ b, repeats)
  s = common.summary(times)
  return {"n": size, "dtype": dtype, "seconds": s, "gflops": 2 * size**3 / s["min"] / 1e9,
          "threads": torch.get_num_threads()}


def matmul_peaks(n: int = 4096, repeats: int = 5) -> dict:
  """All four peaks: {jax,torch}_{float32,bfloat16} -> {n, dtype, seconds, gflops}."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[f"jax_{dtype}"] = jax_matmul(n, dtype, repeats)
  for dtype in ("float32", "bfloat16"):
    out[f"torch_{dtype}"] = torch_matmul(n, dtype, repeats)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  common.emit(matmul_peaks(a.n, a.repeats))


if __name__ == "__main__":
  main()
