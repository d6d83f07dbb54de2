"""Table 5: the largest contrastive pool (global batch) whose BERT-base train step fits a memory budget on one
device, with and without gradient caching (`train.micro_batch_size`) and rematerialisation (`model.remat`),
and what each costs in step time.

Memory is XLA's own plan of the compiled train step (`compiled.memory_analysis()`): arguments (the train
state and the batch) + outputs - donated aliases + temporaries, i.e. the device memory the step needs; no
step is run, so the search over batch sizes costs compiles only. The step is the real one
(`training/step.py`: both branches with dropout, the gathered InfoNCE chunked by 256 rows, AdamW +
clipping, the state donated) on BERT-base in the VinVL shape (35 caption tokens; 35 tag tokens + 70
regions of 2054-d), float32, no composed negatives.

The footprint is affine in the batch size for a fixed program (activations, or with gradient caching the
batch, the pool's embeddings and their gradients, grow by row; the state and one micro-batch's
activations do not), so for each variant two compiles (`probes`) give the line, the largest batch under
each budget follows from it, and that batch is compiled to check it fits (refitting through it when it
does not). Budgets whose batch is not compiled (`--verify` leaves them out) are marked as predictions.

XLA's CPU pipeline expands the optimisation barriers that keep a rematerialised forward pass apart from
the original before it runs CSE, which merges the two again: on CPU, `jax.checkpoint` then saves nothing.
Both children here run with `--xla_disable_hlo_passes=cse_barrier_expander`, as a CPU training run with
`model.remat` should (GPU and TPU keep the barriers). Step times are medians of interleaved runs at a batch
that fits every variant, as ratios to the plain step, at BERT-base widths with `--timing_layers` layers
(memory always with all 12).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common
from benchmarks.train_step import BERT_BASE, make_batch

GIB = 2**30
CPU_REMAT_FLAGS = "--xla_disable_hlo_passes=cse_barrier_expander"
# Cheaper CPU code generation for the memory compiles: buffer assignment (the plan) runs on the HLO and
# does not depend on it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VARIANTS = ("plain", "remat", "grad_cache", "grad_cache_remat")
AIM_BELOW = 0.005


def _step(cfg, batch_size: int, variant: str, micro: int, chunk: int = 256):
  """(jitted step, abstract state, rng) of `training/step.py` on one device for `variant`."""
  import jax
  from vldeformer_jax import parallel
  from vldeformer_jax.model.vldeformer import VLDeformer
  from vldeformer_jax.training import optim, state as state_lib, step as step_lib
  from vldeformer_jax.training.defaults import base_config

  cfg = cfg.replace(remat="full" if variant.endswith("remat") else "none")
  config = base_config()
  for k, v in cfg.to_dict().items():
    config.model[k] = v
  config.train.global_batch_size = batch_size
  config.train.micro_batch_size = micro if variant.startswith("grad_cache") else 0
  config.loss.chunk_size = chunk
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx, schedule = optim.make_optimizer(config.train, total_steps=1000)
  abstract = state_lib.abstract_state(cfg, tx, mesh, float(np.log(config.loss.temperature)))
  step = step_lib.jit_train_step(step_lib.make_train_step(VLDeformer(cfg), config, mesh, tx, schedule),
                                 jax.tree.map(lambda x: x.sharding, abstract), mesh)
  return step, abstract, mesh, jax.random.key(1), tx


def footprint(cfg, batch_size: int, variant: str, micro: int) -> dict:
  """XLA's memory plan of the compiled step at `batch_size` (compiled, never run)."""
  import jax
  from vldeformer_jax import parallel

  step, abstract, mesh, rng, _ = _step(cfg, batch_size, variant, micro)
  sharding = parallel.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in make_batch(cfg, 1).items()}
  batch = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sharding) for k, v in batch.items()}
  t0 = time.perf_counter()
  mem = step.lower(abstract, batch, rng).compile(compiler_options=FAST_COMPILE).memory_analysis()
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return {"batch": batch_size, "bytes": int(total), "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes), "compile_s": time.perf_counter() - t0}


def search(cfg, variant: str, budgets_gib, probes, micro: int, verify: int) -> dict:
  """Largest batch (a multiple of the granularity) per budget: the line through two compiled probes, its
  prediction compiled for the first `verify` budgets (refit through it, at most twice, when over)."""
  gran = micro if variant.startswith("grad_cache") else 1
  points = [footprint(cfg, b, variant, micro) for b in probes]
  out = {"variant": variant, "granularity": gran, "probes": points, "budgets": []}
  for i, budget in enumerate(budgets_gib):
    limit = budget * GIB
    pts = sorted(points, key=lambda p: p["batch"])[-2:]
    row = {"budget_gib": budget}
    for _ in range(3):
      (b0, m0), (b1, m1) = [(p["batch"], p["bytes"]) for p in pts]
      slope = (m1 - m0) / (b1 - b0)
      # Aim 0.5% under the line: the plan grows slightly faster than affine at large batches.
      best = int(((limit * (1 - AIM_BELOW) - m0) / slope + b0) // gran * gran)
      row.update(batch=best, bytes_per_row=slope, predicted_bytes=m0 + slope * (best - b0), compiled=False)
      if i >= verify or best < gran:
        break
      check = footprint(cfg, best, variant, micro)
      points.append(check)
      row.update(compiled=True, bytes=check["bytes"], compile_s=check["compile_s"])
      if check["bytes"] <= limit:
        break
      pts = sorted(points, key=lambda p: abs(p["batch"] - best))[:2]  # refit through the miss and its neighbour
    out["budgets"].append(row)
  return out


def memory(budgets_gib, micro: int, verify: int, layers: int) -> dict:
  from vldeformer_jax.model.config import ModelConfig
  cfg = ModelConfig(**dict(BERT_BASE, num_hidden_layers=layers))
  # Probes far apart, near where the budgets' answers fall (12 layers: ~70, ~500 and ~25K rows at 16 GiB).
  probes = {"plain": (16, 64), "remat": (64, 384), "grad_cache": (64 * micro, 1024 * micro),
            "grad_cache_remat": (64 * micro, 1024 * micro)}
  return {"layers": layers, "micro_batch_size": micro,
          "variants": [search(cfg, v, budgets_gib, probes[v], micro, verify) for v in VARIANTS]}


def timing(batch_size: int, micro: int, layers: int, repeats: int) -> dict:
  """Median step time of each variant at `batch_size` (real arrays, full compilation), interleaved."""
  import jax
  from vldeformer_jax import parallel
  from vldeformer_jax.model.config import ModelConfig
  from vldeformer_jax.model.vldeformer import init_params
  from vldeformer_jax.training import state as state_lib

  cfg = ModelConfig(**dict(BERT_BASE, num_hidden_layers=layers))
  batch_np = make_batch(cfg, batch_size)
  params = jax.device_get(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)))
  fns, compile_s = {}, {}
  for variant in VARIANTS:
    step, abstract, mesh, rng, tx = _step(cfg, batch_size, variant, micro)
    holder = {"state": state_lib.put_sharded(state_lib.create_state(params, np.log(0.005), tx),
                                             jax.tree.map(lambda x: x.sharding, abstract))}
    batch = parallel.global_batch(batch_np, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(holder["state"], batch, rng).compile()
    compile_s[variant] = time.perf_counter() - t0

    def run(compiled=compiled, holder=holder, batch=batch, rng=rng):
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      jax.block_until_ready(metrics)
      return float(metrics["loss"])
    fns[variant] = run
  losses = {v: fn() for v, fn in fns.items()}  # the first step of each: the same loss (same masks)
  times = common.interleaved(fns, repeats, warmup=0)
  med = {v: common.summary(t) for v, t in times.items()}
  return {"layers": layers, "batch_size": batch_size, "micro_batch_size": micro, "seconds": med,
          "ratio": {v: med[v]["median"] / med["plain"]["median"] for v in VARIANTS},
          "first_step_loss": losses, "compile_s": compile_s}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", choices=("memory", "timing"), default=None)
  p.add_argument("--budgets", default="16,80", help="GiB, comma-separated")
  p.add_argument("--verify", type=int, default=1, help="compile the predicted batch of the first N budgets")
  p.add_argument("--micro", type=int, default=16, help="gradient caching: rows per micro-batch")
  p.add_argument("--layers", type=int, default=12, help="memory: BERT-base widths with this many layers")
  p.add_argument("--timing_layers", type=int, default=4)
  p.add_argument("--timing_batch", type=int, default=16)
  p.add_argument("--timing_micro", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="1 layer, 16 GiB predicted only, 1 timing repeat")
  a = p.parse_args()
  budgets = [float(x) for x in a.budgets.split(",")]
  if a.quick:  # a smoke test of the harness: 1 layer, one budget predicted from the probes, 1 timing repeat
    a.layers, a.timing_layers, a.repeats, a.verify, a.timing_batch, budgets = 1, 1, 1, 0, 8, budgets[:1]
  if a.child == "memory":
    common.emit(memory(budgets, a.micro, a.verify, a.layers))
  elif a.child == "timing":
    common.emit(timing(a.timing_batch, a.timing_micro, a.timing_layers, a.repeats))
  else:
    env = {"XLA_FLAGS": CPU_REMAT_FLAGS}
    shared = ["--budgets", ",".join(str(b) for b in budgets), "--verify", str(a.verify), "--micro", str(a.micro),
              "--layers", str(a.layers), "--timing_layers", str(a.timing_layers), "--timing_batch",
              str(a.timing_batch), "--timing_micro", str(a.timing_micro), "--repeats", str(a.repeats)]
    t0 = time.perf_counter()
    mem = common.run_child("pool_memory", ["--child", "memory", *shared], env=env)
    mem["wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tim = common.run_child("pool_memory", ["--child", "timing", *shared], env=env)
    tim["wall_s"] = time.perf_counter() - t0
    common.emit({"memory": mem, "timing": tim, "quick": a.quick, "xla_flags": CPU_REMAT_FLAGS})


if __name__ == "__main__":
  main()
