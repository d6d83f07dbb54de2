"""The accelerator path: what one GPU / TPU does with this project's code (`python -m benchmarks.accelerator`).

  python -m benchmarks.accelerator --output accelerator.json                 # on a GPU/TPU host: full sizes
  python benchmarks/run.py --tables accelerator --output /tmp/acc/BENCHMARKS.md   # the same, as a table
  python -m benchmarks.accelerator --tiny --demo none --output /tmp/a.json   # CPU smoke test (tests do this)

Measures, on `jax.devices()[0]`:
- the BERT-base VinVL-shape decomposed train step (`training/step.py`, the real jitted step) in the
  model's bfloat16 compute dtype: median time, analytic FLOPs (benchmarks/train_step.py) and MFU against
  the chip's stated dense bf16 peak (`PEAKS`, by `device_kind`; a chip not in the table is measured: the
  best bf16 matmul of a few sizes, and the result says which);
- encoder throughput (`Encoder.embed_images` / `embed_texts`, bfloat16), images and captions per second;
- exact top-10 gallery search at 1M x 768 (`retrieval/index.py` `exact_topk`, 1000 queries);
- the demo end to end (`launch/demo.py` in a fresh workdir, `--demo quick|full`): its wall time.
Why a separate script: the CPU tables compare against PyTorch / faiss on 2 cores; here the question is
whether the chip is kept busy, so everything is stated against the chip's peak.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

# Dense bfloat16 peak TFLOP/s as the vendors state it (no sparsity), matched against `device_kind`
# (lower-case substring, first match wins).
PEAKS = (("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("tpu v5p", 459.0), ("tpu v5 lite", 197.0),
         ("tpu v5e", 197.0), ("tpu v4", 275.0))
TINY = dict(vocab_size=1200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            img_feature_dim=16, max_text_len=16, max_regions=8)  # the CPU smoke test's model
DEMO_QUICK = ["--ablations=", "--folds=1", "--fold_images=50", "--stage1_config.train.num_steps=20",
              "--stage2_config.train.num_steps=20"]


def stated_peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((tflops for name, tflops in PEAKS if name in kind), None)


def measured_peak(sizes=(1024, 2048, 4096), repeats: int = 3) -> dict:
  from benchmarks import peaks
  best = max((peaks.jax_matmul(n, "bfloat16", repeats) for n in sizes), key=lambda r: r["gflops"])
  return {"tflops": best["gflops"] / 1e3, "source": f"measured: bf16 matmul {best['n']}^3"}


def train_step(batch_size: int, repeats: int, size: dict, peak_tflops: float) -> dict:
  import jax
  from benchmarks import train_step as ts
  from vldeformer_jax.model.config import ModelConfig

  cfg = ModelConfig(**size, dtype="bfloat16")
  step, state, batch, rng = ts._jax_step(cfg, ts.make_batch(cfg, batch_size), temperature=0.05)
  compiled = step.lower(state, batch, rng).compile()
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  times = common.summary(common.timeit(run, repeats, warmup=1))
  flops = ts.analytic_flops(cfg, batch_size)["train_step"]
  achieved = flops / times["median"] / 1e12
  return {"batch_size": batch_size, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
          "seconds": times, "analytic_tflop": flops / 1e12, "achieved_tflops": achieved,
          "pairs_per_s": batch_size / times["median"], "mfu": achieved / peak_tflops}


def search(n: int, queries: int, repeats: int) -> dict:
  import jax
  from benchmarks.search import gallery
  from vldeformer_jax.retrieval import index as index_lib
  del jax
  # The gallery stays in host memory, as an index's memory-mapped embeddings.npy does: each search streams
  # its blocks to the device (search.search_codes), so the figure includes the transfers.
  q, gal = gallery(queries, 768, seed=1), gallery(n, 768, seed=2)
  result = index_lib.exact_topk(q, gal, 10)  # compile
  times = common.summary(common.timeit(lambda: index_lib.exact_topk(q, gal, 10), repeats, warmup=0))
  check = np.argsort(-(q[:4] @ gal.T), axis=1)[:, :10]  # exactness spot check on 4 queries
  same = all(set(a) == set(b) for a, b in zip(check, np.asarray(result.indices)[:4]))
  return {"gallery": n, "queries": queries, "seconds": times, "queries_per_s": queries / times["median"],
          "spot_check_exact": bool(same)}


def demo(mode: str, timeout: float) -> dict:
  if mode == "none":
    return {"mode": "none"}
  workdir = tempfile.mkdtemp(prefix="accelerator-demo-")
  cmd = [sys.executable, os.path.join(common.REPO, "launch", "demo.py"), f"--workdir={workdir}"]
  cmd += DEMO_QUICK if mode == "quick" else []
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, timeout=timeout)
  out = {"mode": mode, "command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t,
         "returncode": proc.returncode, "workdir": workdir}
  if proc.returncode:
    out["stderr_tail"] = proc.stderr[-2000:]
  return out


def run(tiny: bool, demo_mode: str, repeats: int, batch_size: int, search_size: int, encoder_n: int,
        demo_timeout: float = 3600.0) -> dict:
  import jax
  from benchmarks import encoder_throughput, train_step as ts

  device = jax.devices()[0]
  out = {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
         "tiny": tiny}
  peak = stated_peak(device.device_kind)
  out["peak"] = ({"tflops": peak, "source": "stated dense bf16 peak"} if peak is not None
                 else measured_peak((256, 512) if tiny else (1024, 2048, 4096, 8192)))
  size = TINY if tiny else ts.BERT_BASE
  out["train_step"] = train_step(batch_size, repeats, size, out["peak"]["tflops"])
  out["encoder"] = encoder_throughput.measure("demo" if tiny else "bert_base", "bfloat16", encoder_n, encoder_n,
                                              min(encoder_n, 256), repeats)
  out["search"] = search(search_size, 100 if tiny else 1000, repeats)
  out["demo"] = demo(demo_mode, demo_timeout)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of the harness")
  p.add_argument("--demo", default="quick", choices=("none", "quick", "full"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=0, help="train-step batch (default 256; --tiny 4)")
  p.add_argument("--search_size", type=int, default=0, help="gallery rows (default 1M; --tiny 2000)")
  p.add_argument("--encoder_n", type=int, default=0, help="images and captions embedded (default 4096)")
  p.add_argument("--output", default="", help="also write the JSON here (atomically)")
  a = p.parse_args()
  result = run(a.tiny, a.demo, a.repeats, a.batch_size or (4 if a.tiny else 256),
               a.search_size or (2000 if a.tiny else 1_000_000), a.encoder_n or (8 if a.tiny else 4096))
  result["machine"] = common.machine()
  if a.output:
    common.write_json_atomic(a.output, result)
  common.emit(result)


if __name__ == "__main__":
  main()
