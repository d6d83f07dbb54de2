"""Table 1: one decomposed training step, this project's jitted JAX step against PyTorch eager.

The JAX side is `vldeformer_jax.training.loop`'s real step (`make_train_step` + `jit_train_step`: both branches
with dropout, the gathered InfoNCE of `losses`, clipping + AdamW of `optim`, the state donated), on a
one-device mesh. The PyTorch side is `benchmarks.torch_reference`. Both see the same batch; their times
are interleaved in one process and compared as a median ratio.

FLOPs are counted analytically (matmuls only: the dense layers, QK^T and PV of attention, the region
projection; the backward pass counts twice the forward except the region projection, whose input needs no
gradient); XLA's own count (`compiled.cost_analysis()`) is reported beside it.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, img_feature_dim=2054, max_text_len=35, max_regions=70)


def make_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch in the ARCHITECTURE.md layout, with realistic padding (captions 10-35 tokens, tags
  15-35, regions 30-70)."""
  rng = np.random.default_rng(seed)
  L, R = cfg.max_text_len, cfg.max_regions

  def tokens(lo, tt):
    lens = rng.integers(lo, L + 1, batch_size)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    ids = rng.integers(1000, cfg.vocab_size, (batch_size, L)).astype(np.int32) * mask
    ids[:, 0] = 101
    ids[np.arange(batch_size), lens - 1] = 102
    return ids, mask * tt, mask

  t_ids, t_tt, t_mask = tokens(10, 0)
  i_ids, i_tt, i_mask = tokens(15, 1)
  n_reg = rng.integers(min(30, R), R + 1, batch_size)
  r_mask = (np.arange(R)[None] < n_reg[:, None]).astype(np.int32)
  feats = rng.random((batch_size, R, cfg.img_feature_dim), dtype=np.float32) * r_mask[..., None].astype(np.float32)
  return {"text_input_ids": t_ids, "text_token_type_ids": t_tt, "text_attention_mask": t_mask,
          "image_input_ids": i_ids, "image_token_type_ids": i_tt,
          "image_attention_mask": np.concatenate([i_mask, r_mask], axis=1), "image_img_feats": feats}


def analytic_flops(cfg, batch_size: int) -> dict[str, float]:
  """Matmul FLOPs of one forward and of one training step (forward + backward) of both branches."""
  H, I, F = cfg.hidden_size, cfg.intermediate_size, cfg.img_feature_dim
  B, L, R = batch_size, cfg.max_text_len, cfg.max_regions

  def encoder(n):  # one branch of n positions
    per_layer = 2 * B * n * (4 * H * H + 2 * H * I) + 2 * (2 * B * n * n * H)
    return cfg.num_hidden_layers * per_layer

  body = encoder(L) + encoder(L + R)
  regions = 2 * B * R * F * H
  return {"forward": body + regions, "train_step": 3 * body + 2 * regions}


def _jax_step(cfg, batch_np, temperature: float):
  """The real train.py step on a one-device mesh: (jitted step, state, batch, rng)."""
  import jax
  import jax.numpy as jnp
  from vldeformer_jax.training.defaults import base_config
  from vldeformer_jax.training import optim
  from vldeformer_jax import parallel
  from vldeformer_jax.training import state as state_lib
  from vldeformer_jax.training import step as step_lib
  from vldeformer_jax.model.vldeformer import VLDeformer, init_params

  config = base_config()
  for k, v in cfg.to_dict().items():
    config.model[k] = v
  config.train.global_batch_size = len(batch_np["text_input_ids"])
  config.loss.temperature = temperature
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model = VLDeformer(cfg)
  tx, schedule = optim.make_optimizer(config.train, total_steps=1000)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  state = state_lib.create_state(params, jnp.log(temperature), tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  step = step_lib.jit_train_step(step_lib.make_train_step(model, config, mesh, tx, schedule), shardings, mesh)
  batch = parallel.global_batch(batch_np, mesh)
  return step, state, batch, jax.random.key(1)


def run(batch_size: int = 8, repeats: int = 5, size: dict | None = None, temperature: float = 0.005,
        peak_repeats: int = 5, warmup: int = 2) -> dict:
  import jax
  import torch
  from benchmarks import peaks, torch_reference
  from vldeformer_jax.model.config import ModelConfig

  cfg = ModelConfig(**(size or BERT_BASE))
  batch = make_batch(cfg, batch_size)
  out = {"config": {k: getattr(cfg, k) for k in BERT_BASE}, "batch_size": batch_size}
  out["jax_fp32_peak"] = peaks.jax_matmul(4096, "float32", peak_repeats)

  step, state, jbatch, rng = _jax_step(cfg, batch, temperature)
  compiled = step.lower(state, jbatch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()
  if mem is not None:
    out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
  holder = {"state": state}

  def jax_step():  # the executable compiled above: calling `step` would compile it again
    holder["state"], metrics = compiled(holder["state"], jbatch, rng)
    jax.block_until_ready(metrics)
    return metrics

  torch.manual_seed(0)
  tmodel = torch_reference.TorchVLDeformer(cfg)
  topt = torch_reference.make_optimizer(tmodel)
  torch_step = torch_reference.make_step(tmodel, topt, batch, temperature)
  times = common.interleaved({"jax": jax_step, "torch": torch_step}, repeats, warmup=warmup)
  out["jax_step"] = common.summary(times["jax"])
  out["torch_step"] = common.summary(times["torch"])
  out["ratio"] = out["jax_step"]["median"] / out["torch_step"]["median"]
  out["ratios"] = [a / b for a, b in zip(times["jax"], times["torch"])]
  flops = analytic_flops(cfg, batch_size)
  out["analytic_flops"] = flops
  out["jax_gflops"] = flops["train_step"] / out["jax_step"]["median"] / 1e9
  out["torch_gflops"] = flops["train_step"] / out["torch_step"]["median"] / 1e9
  out["fraction_of_jax_fp32_peak"] = out["jax_gflops"] / out["jax_fp32_peak"]["gflops"]
  out["dense_matmuls"] = _dense_matmul_ceiling(cfg, batch_size, repeats, out["jax_fp32_peak"]["gflops"])
  out["torch_threads"] = torch.get_num_threads()
  out["peak_rss_gib"] = common.peak_rss_bytes() / 2**30
  return out


def _dense_matmul_ceiling(cfg, batch_size: int, repeats: int, peak_gflops: float) -> dict:
  """The step's dense-layer matmuls alone (both branches, forward + both backward products, XLA vs PyTorch at
  the same shapes): the fraction of the peak XLA's matmuls reach at the step's shapes is a ceiling on the
  step's own fraction, and their ratio to PyTorch's is the matmuls' share of the step ratio."""
  from benchmarks import train_ablations
  group = train_ablations.dense_matmuls(
      cfg, [batch_size * cfg.max_text_len, batch_size * (cfg.max_text_len + cfg.max_regions)])
  times = common.interleaved(group["variants"], repeats, warmup=1)
  xla, torch_ = (common.summary(times[k]) for k in ("XLA (jitted)", "torch eager"))
  gflops = group["flops"] / 1e9
  return {"gflop": gflops, "xla": xla, "torch": torch_, "xla_gflops": gflops / xla["median"],
          "torch_gflops": gflops / torch_["median"], "xla_fraction_of_peak": gflops / xla["median"] / peak_gflops,
          "ratio": xla["median"] / torch_["median"]}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--tiny", action="store_true", help="hidden 128, 2 layers: a smoke test of the harness")
  p.add_argument("--layers", type=int, default=0,
                 help="BERT-base widths with this many layers (run.py --quick: 1); 0 = all 12")
  a = p.parse_args()
  size = None
  if a.tiny:
    size = dict(BERT_BASE, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
  elif a.layers:
    size = dict(BERT_BASE, num_hidden_layers=a.layers)
  common.emit(run(a.batch_size, a.repeats, size, peak_repeats=min(a.repeats, 5), warmup=a.warmup))


if __name__ == "__main__":
  main()
