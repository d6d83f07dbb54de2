"""Table 2: memory and time of the contrastive loss + gradient against the global pool size.

Each configuration (pairs N, naive or chunked) runs in a fresh process (`--child`): random unnormalised
embeddings text/image [N, 768] and one composed hard negative of each side [N, 1, 768] (so each query
scores 2N columns), then `jax.value_and_grad` of `losses.contrastive_loss` w.r.t. all four, jitted.

Two memory figures:
- XLA's own plan for the compiled function (`compiled.memory_analysis()`): temporaries (`temp`), the
  loss's working memory beyond its inputs and outputs;
- measured: a sampling thread reads the process's current RSS (/proc/self/statm) every millisecond
  while the compiled function runs; `extra` = that peak minus the RSS just before the call (inputs
  already resident, executable compiled), and `extra_minus_outputs` subtracts the gradients the call
  returns (4 arrays the size of the inputs), i.e. the working memory comparable to XLA's `temp`.
The naive 64K case would need 64K x 128K x 4 bytes = 32 GiB of logits: it is compiled (for XLA's plan)
but never run.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from benchmarks import common

DIM = 768


class RssSampler:
  """Peak of the current RSS while active, sampled every `interval` seconds in a thread."""

  def __init__(self, interval: float = 0.001):
    self.interval = interval
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, common.current_rss_bytes())
      time.sleep(self.interval)

  def __enter__(self):
    self.peak = common.current_rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, common.current_rss_bytes())


def measure(pairs: int, chunk_size: int, repeats: int, execute: bool = True) -> dict:
  """Loss + gradient of `pairs` pairs (+1 hard negative each), in this process."""
  import jax
  import jax.numpy as jnp
  from vldeformer_jax.training import losses

  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((pairs, DIM), np.float32), rng.standard_normal((pairs, DIM), np.float32),
            rng.standard_normal((pairs, 1, DIM), np.float32), rng.standard_normal((pairs, 1, DIM), np.float32)]

  def loss(t, v, nt, nv):
    return losses.contrastive_loss(t, v, nt, nv, chunk_size=chunk_size)[0]

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  t0 = time.perf_counter()
  compiled = fn.lower(*shapes).compile()
  out = {"pairs": pairs, "pool": 2 * pairs, "chunk_size": chunk_size, "compile_s": time.perf_counter() - t0}
  mem = compiled.memory_analysis()
  out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
  out["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
  out["xla_output_bytes"] = int(mem.output_size_in_bytes)
  out["naive_logits_bytes"] = pairs * 2 * pairs * 4
  if not execute:
    out["executed"] = False
    return out
  dev = [jax.device_put(a) for a in arrays]
  jax.block_until_ready(dev)
  del arrays
  before = common.current_rss_bytes()
  with RssSampler() as sampler:
    t0 = time.perf_counter()
    value, grads = compiled(*dev)
    jax.block_until_ready((value, grads))
    first = time.perf_counter() - t0
  out["executed"] = True
  out["rss_before_bytes"] = before
  out["extra_bytes"] = sampler.peak - before
  out["output_bytes"] = int(sum(g.nbytes for g in grads))
  out["extra_minus_outputs_bytes"] = out["extra_bytes"] - out["output_bytes"]
  out["loss"] = float(value)
  out["grad_finite"] = bool(all(jnp.all(jnp.isfinite(g)) for g in grads))
  del value, grads
  # The measured call counts as the first repeat (it is warm: compiled ahead, inputs resident).
  times = [first] + common.timeit(lambda: jax.block_until_ready(compiled(*dev)), repeats - 1, warmup=0)
  out["seconds"] = common.summary(times)
  return out


def run(pool_sizes=(1024, 4096, 16384, 65536), chunk_size: int = 256, repeats: int = 3,
        max_run: int = 16384) -> list[dict]:
  """Every (pairs, naive | chunked) configuration, each in its own child process. Sizes above `max_run`
  pairs are compiled for XLA's memory plan but not run (64K pairs: ~100 TFLOP, hours on 2 cores); from
  16K pairs on, one timed call."""
  from tqdm import tqdm
  rows = []
  configs = [(n, c) for n in pool_sizes for c in (0, chunk_size)]
  for n, c in tqdm(configs, desc="contrastive memory", unit="config"):
    execute = n <= max_run
    reps = repeats if n < 16384 else 1
    args = ["--child", "--pairs", str(n), "--chunk_size", str(c), "--repeats", str(reps)]
    if not execute:
      args.append("--no_execute")
    rows.append(common.run_child("contrastive_memory", args))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", action="store_true")
  p.add_argument("--pairs", type=int, default=1024)
  p.add_argument("--chunk_size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no_execute", action="store_true")
  p.add_argument("--quick", action="store_true", help="1K and 64K (64K compiled only)")
  p.add_argument("--max_run", type=int, default=16384, help="larger pair counts are compiled, not run")
  a = p.parse_args()
  if a.child:
    common.emit(measure(a.pairs, a.chunk_size, a.repeats, execute=not a.no_execute))
  else:
    sizes = (1024, 65536) if a.quick else (1024, 4096, 16384, 65536)
    common.emit({"rows": run(sizes, repeats=a.repeats, chunk_size=a.chunk_size, max_run=a.max_run),
                 "chunk_size": a.chunk_size})


if __name__ == "__main__":
  main()
