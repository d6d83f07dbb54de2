"""Table 4: gallery embedding throughput of the public `Encoder`, images/s and captions/s.

What a user runs to index a gallery: `Encoder.embed_images(region_features, tags)` and
`Encoder.embed_texts(captions)`, which tokenise, pad, batch (fixed batch size, one compile) and run the
jitted decomposed forward. Sizes: BERT-base in the VinVL shape (35 tokens, 70 regions of 2054-d) and the
demo model of `configs/demo.py`; compute in float32 and in bfloat16 (parameters stay float32). Random
weights: throughput does not depend on their values. Compilation is excluded (one warm-up call).
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common

WORDS = ("a man woman dog cat riding sitting on the of with red blue small large table street grass "
         "holding next to white black two people standing near building car tree water").split()


def _corpus(n: int, cfg, seed: int = 0):
  rng = np.random.default_rng(seed)
  captions = [" ".join(rng.choice(WORDS, rng.integers(8, 16))) for _ in range(n)]
  tags = [" ".join(rng.choice(WORDS, rng.integers(10, 30))) for _ in range(n)]
  regions = [rng.random((int(rng.integers(cfg.max_regions // 2, cfg.max_regions + 1)), cfg.img_feature_dim),
                        dtype=np.float32) for _ in range(n)]
  return captions, tags, regions


def model_config(size: str, layers: int = 0):
  """`bert_base` (with `layers` > 0: BERT-base widths, that many layers) or the demo model."""
  from vldeformer_jax.model.config import ModelConfig
  if size == "bert_base":
    return ModelConfig(num_hidden_layers=layers) if layers else ModelConfig()
  from vldeformer_jax.demo import settings
  from vldeformer_jax.training import setup as train_setup
  return train_setup.model_config_from(settings.stage2_config())[0]  # config.model with the data's lengths


_PARAMS = {}  # (size, layers) -> parameters: float32 whatever the compute dtype, so shared by both rows


def measure(size: str, dtype: str, num_images: int, num_captions: int, batch_size: int, repeats: int,
            layers: int = 0) -> dict:
  import jax
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.model.vldeformer import init_params

  cfg = model_config(size, layers).replace(dtype=dtype)
  if (size, layers) not in _PARAMS:
    _PARAMS[size, layers] = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  params = _PARAMS[size, layers]
  enc = Encoder(cfg, params, batch_size=batch_size)
  captions, tags, regions = _corpus(max(num_images, num_captions), cfg)
  captions, tags, regions = captions[:num_captions], tags[:num_images], regions[:num_images]
  enc.embed_images(regions[:batch_size], tags[:batch_size])  # compiles the one batch shape of each branch
  enc.embed_texts(captions[:batch_size])
  times = common.interleaved({
      "images": lambda: enc.embed_images(regions, tags),
      "captions": lambda: enc.embed_texts(captions),
  }, repeats, warmup=0)
  im, cap = common.summary(times["images"]), common.summary(times["captions"])
  return {"size": size, "dtype": dtype, "batch_size": batch_size, "num_images": num_images,
          "num_captions": num_captions, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
          "images_seconds": im, "captions_seconds": cap,
          "images_per_s": num_images / im["median"], "captions_per_s": num_captions / cap["median"]}


def run(quick: bool = False, repeats: int = 3) -> list[dict]:
  from tqdm import tqdm
  # Quick (a smoke test): BERT-base widths with 2 layers, one batch (XLA's CPU bfloat16 runs BERT-base at
  # about 1.5 images/s, and the warm-up call embeds as much again), and a smaller demo gallery.
  plan = []
  for dtype in ("float32", "bfloat16"):
    if quick:
      plan.append(("bert_base", dtype, 8, 8, 8, 2))
    else:
      plan.append(("bert_base", dtype, 64, 128, 32, 0))
  for dtype in ("float32", "bfloat16"):
    plan.append(("demo", dtype, 128, 256, 128, 0) if quick else ("demo", dtype, 1024, 2048, 256, 0))
  # Each configuration in a fresh process (its own heap and XLA state); quick runs them all in this one,
  # saving a process start and the library imports per configuration.
  rows = []
  for size, dtype, ni, nc, bs, layers in tqdm(plan, desc="encoder throughput", unit="config"):
    if quick:
      rows.append(measure(size, dtype, ni, nc, bs, repeats, layers))
      continue
    rows.append(common.run_child("encoder_throughput", [
        "--child", "--size", size, "--dtype", dtype, "--images", str(ni), "--captions", str(nc),
        "--batch_size", str(bs), "--repeats", str(repeats), "--layers", str(layers)]))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--child", action="store_true")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--size", default="demo", choices=("bert_base", "demo"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--captions", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--layers", type=int, default=0, help="bert_base only: this many layers (0: all 12)")
  a = p.parse_args()
  if a.child:
    common.emit(measure(a.size, a.dtype, a.images, a.captions, a.batch_size, a.repeats, a.layers))
  else:
    common.emit({"rows": run(a.quick, a.repeats)})


if __name__ == "__main__":
  main()
