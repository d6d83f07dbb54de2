"""What every benchmark table shares: timing with medians, the machine description, child processes.

Why: the machines are shared and noisy, so every figure is a median over repeats, and two implementations
are compared as a ratio measured in the same process, interleaved (A, B, A, B, ...) so that a burst of load
from elsewhere hits both. Memory figures come from a fresh child process per configuration (the peak RSS
of a process never goes down), which is also how each table keeps its own XLA flags and its own heap.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from vldeformer_jax.io import files as fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Wall-clock seconds of `fn()` (which must block until its result is ready) over `repeats` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Times each of `fns` `repeats` times, alternating between them, after `warmup` calls of each.

  The order rotates every round, so no function always runs right after the same other one: a call that
  follows another library's (whose worker threads may still hold the cores) measured ~8% slower on these
  2-core machines, and a fixed order would charge that to one side of a ratio."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t)
  return times


def summary(times: Sequence[float]) -> dict[str, float]:
  """Median, min, max and count of a list of seconds."""
  return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far (Linux: ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
  """This process's current resident set size, from /proc/self/statm."""
  with open("/proc/self/statm") as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE")


def run_child(module: str, args: Sequence[str] = (), env: dict[str, str] | None = None,
              timeout: float | None = None) -> dict[str, Any]:
  """Runs `python -m benchmarks.<module> --json <args>` in a fresh process; returns the JSON it prints
  on its last stdout line. A failing child raises with its stderr tail, naming the module and arguments."""
  cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
    raise RuntimeError(f"benchmark child `{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{tail}")
  lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
  if not lines:
    raise RuntimeError(f"benchmark child `{' '.join(cmd[1:])}` printed no JSON result; stdout tail:\n"
                       f"{proc.stdout[-2000:]}")
  return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
  """The child side of `run_child`: one JSON line on stdout."""
  sys.stdout.flush()
  print(json.dumps(result, default=float), flush=True)


def write_json_atomic(path: str, obj: Any) -> None:
  """The raw results as JSON, written atomically (any number-like value, e.g. a numpy or JAX scalar, as a
  float)."""
  fileio.write_text_atomic(path, json.dumps(obj, indent=1, default=float))


def machine() -> dict[str, Any]:
  """CPU model, cores, memory, OS, Python and library versions, and the environment knobs that matter."""
  info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu"] = line.split(":", 1)[1].strip()
          break
    with open("/proc/cpuinfo") as f:
      flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    info["simd"] = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                            if x in flags)
  except OSError:
    info["cpu"] = platform.processor()
  info["cores"] = os.cpu_count()
  try:
    with open("/proc/meminfo") as f:
      kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    info["memory_gib"] = round(kib / 2**20, 1)
  except (OSError, StopIteration):
    pass
  try:
    info["load_average"] = os.getloadavg()
  except OSError:
    pass
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "faiss"):
    try:
      mod = __import__(name)
      versions[name] = getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - a missing optional library is reported, not fatal
      versions[name] = "not installed"
  info["versions"] = versions
  info["env"] = {k: os.environ[k] for k in ("XLA_FLAGS", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS")
                 if k in os.environ}
  return info
