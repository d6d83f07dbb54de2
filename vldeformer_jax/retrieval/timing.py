"""The speed comparison the paper is about: decomposed retrieval against early-interaction scoring.

Decomposed (VLDeformer): encode every image and every caption once, then one similarity product and a
top-k in each direction (retrieval/search.py). Early interaction (the VL transformer it decomposes): one
forward pass per (image, caption) pair, N_img x N_txt of them. The second is too slow to run in full, so it
is timed on a random sample of pairs and extrapolated linearly (every pair costs the same forward pass);
results say `"extrapolated": true` wherever a number is not a full measurement.

Both sides are timed from tokenised, padded inputs (tokenising and reading features is the same work for
both and is excluded), after a warm-up call that compiles each shape, on the same machine in one run.
For a COCO-5K-size gallery (5000 images x 25000 captions) the decomposed encode time is extrapolated from
the measured per-item rates and the search is measured for real on random embeddings of that size.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from vldeformer_jax.io import files as fileio
from vldeformer_jax.retrieval import search
from vldeformer_jax.retrieval.pairs import score_pairs
from vldeformer_jax.retrieval.gallery import Gallery, load_gallery

COCO5K = (5000, 25000)
COCO5K_NAME = "5000 images x 25000 captions"


def _batch_rows(x: dict, rows) -> dict:
  return {k: v[rows] for k, v in x.items()}


def time_search(image_emb: np.ndarray, text_emb: np.ndarray, k: int = 10, repeats: int = 1, mesh=None) -> float:
  """Seconds (median of `repeats`, after a warm-up) for the top-k of every image over the captions and of
  every caption over the images: the whole retrieval step once embeddings exist."""
  def run():
    search.exact_topk(image_emb, text_emb, min(k, len(text_emb)), mesh=mesh)
    search.exact_topk(text_emb, image_emb, min(k, len(image_emb)), mesh=mesh)
  run()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_decomposed(encoder, gallery: Gallery, batch_size: int | None = None, k: int = 10) -> dict:
  """Measures the full decomposed retrieval of a gallery: encode all images and captions, search."""
  bs = batch_size or encoder.batch_size  # a short warm-up slice is padded to the same batch shape
  img_x = gallery.image_inputs(encoder, range(gallery.num_images))
  txt_x = gallery.text_inputs(encoder)
  # Warm-up: compile the one batch shape of each branch.
  encoder.embed_image_inputs(_batch_rows(img_x, slice(0, bs)), batch_size=bs)
  encoder.embed_text_inputs(_batch_rows(txt_x, slice(0, bs)), batch_size=bs)
  t = time.perf_counter()
  img = encoder.embed_image_inputs(img_x, batch_size=bs)
  t_img = time.perf_counter() - t
  t = time.perf_counter()
  txt = encoder.embed_text_inputs(txt_x, batch_size=bs)
  t_txt = time.perf_counter() - t
  t_search = time_search(img, txt, k)
  n_img, n_txt = len(img), len(txt)
  return {"num_images": n_img, "num_captions": n_txt, "encode_images_s": t_img, "encode_captions_s": t_txt,
          "search_s": t_search, "total_s": t_img + t_txt + t_search, "per_image_s": t_img / n_img,
          "per_caption_s": t_txt / n_txt, "embed_dim": int(img.shape[1]), "batch_size": bs,
          "extrapolated": False}


def time_cross_encoder(encoder, gallery: Gallery, sample_pairs: int = 1024,
                       batch_size: int | None = None, seed: int = 0) -> dict:
  """Times the early-interaction score of a random sample of (image, caption) pairs; extrapolates to all
  N_img x N_txt pairs of the gallery."""
  bs = batch_size or encoder.batch_size
  n_img, n_txt = gallery.num_images, len(gallery.captions)
  sample_pairs = int(max(bs, min(sample_pairs, n_img * n_txt)))
  rng = np.random.default_rng(seed)
  pi = rng.integers(0, n_img, sample_pairs)
  pt = rng.integers(0, n_txt, sample_pairs)
  uniq, inv = np.unique(pi, return_inverse=True)
  img_x = gallery.image_inputs(encoder, uniq)
  txt_x = gallery.text_inputs(encoder)
  score_pairs(encoder, txt_x, img_x, pt, inv, batch_size=bs)  # compiles every caption width
  t = time.perf_counter()
  score_pairs(encoder, txt_x, img_x, pt, inv, batch_size=bs)
  measured = time.perf_counter() - t
  per_pair = measured / sample_pairs
  return {"num_images": n_img, "num_captions": n_txt, "sample_pairs": sample_pairs, "measured_s": measured,
          "per_pair_s": per_pair, "total_s": per_pair * n_img * n_txt, "batch_size": bs, "extrapolated": True}


def compare(encoder, source_or_gallery, *, max_images: int | None = None, sample_pairs: int = 1024,
            batch_size: int | None = None, gallery_sizes: Sequence[int] = (100, 300, 1000, 3000, 5000),
            captions_per_image: int = 5, k: int = 10, reference_size: tuple[int, int] = COCO5K,
            cross_encoder=None) -> dict:
  """Decomposed vs early-interaction retrieval time on a split, at COCO-5K size, and against gallery size.

  `encoder` is timed as the decomposed model, `cross_encoder` (default: the same encoder; the cost of a
  forward pass depends on the architecture, not the weights) as the early-interaction one.
  Returns {"split": {"decomposed", "cross_encoder", "speedup"}, "coco5k": {...}, "speedup" (COCO-5K size),
  "speedup_gallery": "5000 images x 25000 captions", "vs_gallery_size": [...]}. "speedup" is the
  early-interaction time divided by the decomposed time. `reference_size` (images, captions) replaces
  the COCO-5K size (tests use a small one; the key stays "coco5k").
  """
  gallery = (source_or_gallery if isinstance(source_or_gallery, Gallery)
             else load_gallery(source_or_gallery, max_images))
  dec = time_decomposed(encoder, gallery, batch_size, k)
  cross = time_cross_encoder(cross_encoder or encoder, gallery, sample_pairs, batch_size)
  out = {"split": {"decomposed": dec, "cross_encoder": cross, "speedup": cross["total_s"] / dec["total_s"]}}
  out.update(project(dec, cross, gallery_sizes=gallery_sizes, captions_per_image=captions_per_image, k=k,
                     reference_size=reference_size))
  return out


def project(dec: dict, cross: dict, *, gallery_sizes: Sequence[int] = (100, 300, 1000, 3000, 5000),
            captions_per_image: int = 5, k: int = 10, reference_size: tuple[int, int] = COCO5K) -> dict:
  """Both retrieval times at other gallery sizes from measured rates (`time_decomposed`'s per-item encode
  times, `time_cross_encoder`'s per-pair time); the search is measured at each size on random embeddings."""
  d = dec["embed_dim"]

  def at_size(n_img: int, n_txt: int, seed: int) -> dict:
    search_s = time_search(_random_unit(n_img, d, seed), _random_unit(n_txt, d, seed + 1), k)
    dec_s = dec["per_image_s"] * n_img + dec["per_caption_s"] * n_txt + search_s
    cross_s = cross["per_pair_s"] * n_img * n_txt
    return {"num_images": n_img, "num_captions": n_txt, "decomposed_s": dec_s, "decomposed_search_s": search_s,
            "cross_encoder_s": cross_s, "speedup": cross_s / dec_s,
            "decomposed_extrapolated": True, "cross_encoder_extrapolated": n_img * n_txt > cross["sample_pairs"]}

  coco = at_size(*reference_size, seed=0)
  name = f"{reference_size[0]} images x {reference_size[1]} captions"
  coco["gallery"] = name
  sizes = []
  for i, n in enumerate(gallery_sizes):
    sizes.append(coco if n == reference_size[0] and captions_per_image * n == reference_size[1]
                 else at_size(int(n), int(n * captions_per_image), seed=10 + i))
  return {
      "coco5k": coco,
      "speedup": coco["speedup"],
      "speedup_gallery": name,
      "vs_gallery_size": sizes,
      "note": ("decomposed: encode measured on the split (per-item rates extrapolated to other sizes), search "
               "measured at each size on random embeddings; cross-encoder: a random sample of pairs timed and "
               "extrapolated to N_img x N_txt pairs"),
  }


def plot_vs_gallery_size(result: dict, path: str) -> None:
  """A log-log PNG of retrieval time against gallery size for both models (written atomically)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["vs_gallery_size"]
  n = [r["num_images"] for r in rows]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.loglog(n, [r["cross_encoder_s"] for r in rows], "o-", label="early interaction (every pair)")
  ax.loglog(n, [r["decomposed_s"] for r in rows], "s-", label="decomposed (encode once + search)")
  extrapolated = [r for r in rows if r["cross_encoder_extrapolated"]]
  if extrapolated:
    ax.loglog([r["num_images"] for r in extrapolated], [r["cross_encoder_s"] for r in extrapolated], "o",
              mfc="none", ms=11, color="gray", label="extrapolated from the timed sample")
  ax.set_xlabel(f"gallery images (x{rows[0]['num_captions'] // max(1, rows[0]['num_images'])} captions)")
  ax.set_ylabel("full retrieval time (s)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"speedup at {result['speedup_gallery']}: {result['speedup']:.0f}x")
  fig.tight_layout()
  fileio.save_figure_atomic(fig, path)
