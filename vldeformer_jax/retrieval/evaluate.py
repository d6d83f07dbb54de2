"""Cross-modal retrieval evaluation of an Encoder on a dataset split: decomposed, cross-encoder, re-ranked.

Decomposed (the VLDeformer way, docs/method.md §7): every image and every caption is encoded once (batched by the
Encoder, sharded over all devices with a mesh, the padded last batch dropped), L2-normalised, and one
[N_img, N_txt] similarity matrix gives every rank. The early-interaction (cross-encoder) baseline scores
every (image, caption) pair with the same weights (`Encoder.match_logit_margin_inputs`), N_img x N_txt
forward passes: `max_images` restricts both to the same first-N-images subset when that is too slow.
Re-ranking re-scores each query's top-K from the decomposed similarity: by default with the cross-encoder,
or by the decomposed cosine, a weighted mix of the two, or late interaction (retrieval/rerank.py).

All of them produce the same JSON (retrieval/metrics.py), so the demo can put them side by side:
  {"i2t": {"R@1", "R@5", "R@10", "medr", "meanr"}, "t2i": {...}, "rsum", "mAP@R": {"i2t", "t2i"},
   "num_images", "num_captions", "protocol", "model", "timing": {...}, ["reranked": {...}]}
`timing` counts forward passes only (one warm-up batch compiles each shape outside the clock; reading and
tokenising excluded), except `similarity_s` and `wall_s` (everything). retrieval/timing.py is the careful
speed comparison.

Records are the dataset contract of ARCHITECTURE.md (`image_id`, `features` [n, F], `tags`, `captions`),
from `data.prepare.load_split` or any sequence of such dicts; text may be bytes or str.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vldeformer_jax import parallel
from vldeformer_jax.data import prepare
from vldeformer_jax.io.export import UntrainedHeadError
from vldeformer_jax.io.files import write_json_atomic
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval import metrics
from vldeformer_jax.retrieval import rerank as rerank_lib
from vldeformer_jax.retrieval import timing as timing_lib
from vldeformer_jax.retrieval.pairs import score_pairs, trimmed_length
from vldeformer_jax.retrieval.gallery import Gallery, embed_gallery, load_gallery, with_mesh
from vldeformer_jax.retrieval.metrics import PROTOCOLS

@jax.jit
def _sim(img, txt):
  return jnp.dot(img, txt.T, precision=jax.lax.Precision.HIGHEST)


def similarity(image_emb: np.ndarray, text_emb: np.ndarray, mesh=None) -> np.ndarray:
  """One [N_img, N_txt] product; with a mesh the image rows are split over its devices."""
  img, txt = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  if mesh is not None:
    ndev = mesh.devices.size
    pad = -len(img) % ndev
    x = jax.device_put(np.pad(img, ((0, pad), (0, 0))),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names))))
    return np.asarray(_sim(x, jnp.asarray(txt)))[:len(img)]
  return np.asarray(_sim(jnp.asarray(img), jnp.asarray(txt)))


def _protocol_results(sim, txt2img, protocol, fold_size, sim_t2i=None) -> dict:
  if protocol != "all":
    return metrics.protocol_metrics(sim, txt2img, protocol, fold_size, sim_t2i)
  out = metrics.protocol_metrics(sim, txt2img, "full", fold_size, sim_t2i)
  out["protocols"] = {}
  if sim.shape[0] >= fold_size:
    out["protocols"]["coco1k"] = metrics.protocol_metrics(sim, txt2img, "coco1k", fold_size, sim_t2i)
  else:  # said, not dropped silently: in the JSON and as a line of the table
    out["skipped_protocols"] = {"coco1k": f"needs folds of {fold_size} images; {sim.shape[0]} evaluated"}
  out["protocol"] = "all"
  return out


def rerank(encoder, gallery: Gallery, sim: np.ndarray, top_k: int, batch_size: int | None = None,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
  """(i2t matrix, t2i matrix, pairs scored): each image's top-K captions and each caption's top-K images
  re-scored with `encoder`'s early-interaction head; entries outside the shortlists keep their order below it.
  The other re-rank scores: `retrieval.rerank.rerank`."""
  sim_i2t, sim_t2i, info = rerank_lib.rerank(encoder, gallery, sim, top_k, score="cross", batch_size=batch_size,
                                             progress=progress)
  return sim_i2t, sim_t2i, info["pairs_scored"]


def _as_source(source_or_records, max_images, image_ids) -> Gallery:
  if isinstance(source_or_records, Gallery):
    return source_or_records
  return load_gallery(source_or_records, max_images, image_ids)


def evaluate(encoder, source_or_records, protocol: str = "full", batch_size: int | None = None, mesh=None,
             rerank_top_k: int = 0, *, max_images: int | None = None, image_ids: Sequence[int] | None = None,
             fold_size: int = 1000, progress: bool = True, return_embeddings: bool = False,
             rerank_score: str = "cross", rerank_weight: float = 0.5, cross_encoder=None) -> dict:
  """Decomposed retrieval metrics of `encoder` on a split (see the module docstring for the JSON).

  protocol: `full` | `coco5k` | `flickr1k` (every image), `coco1k` (mean over folds of `fold_size`
  consecutive images), `all` (full + `protocols.coco1k`). `rerank_top_k` > 0 adds `reranked`: the same
  metrics after re-scoring each query's top-K by `rerank_score` (retrieval/rerank.py: `cross` the
  early-interaction head of `cross_encoder`, default `encoder`; `decomposed`; `mixed` with `rerank_weight`;
  `late` / `late_normalized`). `image_ids`: evaluate only these images (a key file such as
  test_img_keys_1k.tsv), in that order.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  if rerank_score not in rerank_lib.RERANK_SCORES:
    raise ValueError(f"unknown re-rank score {rerank_score!r}; expected one of {rerank_lib.RERANK_SCORES}")
  encoder = with_mesh(encoder, mesh)
  gallery = _as_source(source_or_records, max_images, image_ids)
  t0 = time.perf_counter()
  img, txt, timing = embed_gallery(encoder, gallery, batch_size, progress=progress)
  t = time.perf_counter()
  sim = similarity(img, txt, mesh)
  timing["similarity_s"] = time.perf_counter() - t
  t = time.perf_counter()
  out = _protocol_results(sim, gallery.txt2img, protocol, fold_size)
  timing["metrics_s"] = time.perf_counter() - t
  timing["wall_s"] = time.perf_counter() - t0  # everything: reading, tokenising, compiling
  out.update(model="decomposed", export_fingerprint=encoder.fingerprint, timing=timing)
  if rerank_top_k:
    t = time.perf_counter()
    cross = None if cross_encoder is None else with_mesh(cross_encoder, mesh)
    sim_i2t, sim_t2i, info = rerank_lib.rerank(encoder, gallery, sim, rerank_top_k, score=rerank_score,
                                               weight=rerank_weight, cross_encoder=cross, batch_size=batch_size,
                                               progress=progress)
    rr = _protocol_results(sim_i2t, gallery.txt2img, protocol, fold_size, sim_t2i=sim_t2i)
    rr.update(rerank_top_k=int(rerank_top_k), rerank_score=rerank_score, seconds=time.perf_counter() - t, **info)
    out["reranked"] = rr
  if return_embeddings:
    out["_embeddings"] = (img, txt, gallery)
  return out


def cross_encoder_scores(encoder, source_or_records, batch_size: int | None = None, *,
                         max_images: int | None = None, image_chunk: int = 16,
                         progress: bool = True) -> tuple[np.ndarray, Gallery, float]:
  """Early-interaction score of every (image, caption) pair: ([N_img, N_txt] float32, the gallery, the
  seconds spent in forward passes). The score is the logit margin logit[1] - logit[0]
  (`Encoder.match_logit_margin_inputs`): the same order as softmax[1], without float32 ties at 1.0.

  N_img x N_txt forward passes (`score_pairs`: grouped by caption length, `image_chunk` images at a time, so
  batches are full and carry little padding): use `max_images` to keep it to a feasible subset.
  """
  gallery = _as_source(source_or_records, max_images, None)
  text_all = gallery.text_inputs(encoder)
  n_img, n_txt = gallery.num_images, len(gallery.captions)
  scores = np.empty((n_img, n_txt), np.float32)
  seconds = 0.0  # forward passes only: compilation (a warm-up per caption width) and input reading excluded
  if n_img and n_txt:
    widths = trimmed_length(text_all["attention_mask"])
    first = np.array([int(np.flatnonzero(widths == w)[0]) for w in np.unique(widths)])
    score_pairs(encoder, text_all, gallery.image_inputs(encoder, [0]), first, np.zeros_like(first), batch_size)
  bar = tqdm(total=n_img * n_txt, desc="cross-encoder pairs", unit="pair", disable=not progress)
  for a in range(0, n_img, image_chunk):
    imgs = np.arange(a, min(a + image_chunk, n_img))
    img_x = gallery.image_inputs(encoder, imgs)
    image_rows = np.repeat(np.arange(len(imgs)), n_txt)
    text_rows = np.tile(np.arange(n_txt), len(imgs))
    t = time.perf_counter()
    scores[imgs] = score_pairs(encoder, text_all, img_x, text_rows, image_rows, batch_size).reshape(len(imgs), n_txt)
    seconds += time.perf_counter() - t
    bar.update(len(imgs) * n_txt)
  bar.close()
  return scores, gallery, seconds


def evaluate_cross_encoder(encoder, source_or_records, protocol: str = "full", batch_size: int | None = None,
                           mesh=None, *, max_images: int | None = None, fold_size: int = 1000,
                           progress: bool = True) -> dict:
  """The early-interaction baseline: every pair scored, ranked like the decomposed model (same JSON)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  encoder = with_mesh(encoder, mesh)
  scores, gallery, seconds = cross_encoder_scores(encoder, source_or_records, batch_size,
                                                  max_images=max_images, progress=progress)
  out = _protocol_results(scores, gallery.txt2img, protocol, fold_size)
  out.update(model="cross_encoder", export_fingerprint=encoder.fingerprint,
             timing={"score_pairs_s": seconds, "pairs": int(scores.size)})
  return out


# ------------------------------------------------------------------------------------------------------
# The launch/evaluate.py entry: load, evaluate under the protocols, print a table, write the JSON.


def format_table(results: dict[str, dict]) -> str:
  """A fixed-width table: one line per named result (and per re-ranked / per-protocol variant)."""
  head = f"{'':34s} {'i2t R@1':>8s} {'R@5':>6s} {'R@10':>6s} {'medr':>5s} {'t2i R@1':>8s} {'R@5':>6s} " \
         f"{'R@10':>6s} {'medr':>5s} {'rsum':>7s} {'mAP@R i2t':>10s} {'t2i':>6s}"
  lines = [head, "-" * len(head)]

  def row(name, m):
    i, t = m["i2t"], m["t2i"]
    lines.append(f"{name[:34]:34s} {i['R@1']:8.2f} {i['R@5']:6.2f} {i['R@10']:6.2f} {i['medr']:5.0f} "
                 f"{t['R@1']:8.2f} {t['R@5']:6.2f} {t['R@10']:6.2f} {t['medr']:5.0f} {m['rsum']:7.2f} "
                 f"{m['mAP@R']['i2t']:10.2f} {m['mAP@R']['t2i']:6.2f}")

  for name, m in results.items():
    if not isinstance(m, dict) or "i2t" not in m:
      continue
    row(f"{name} ({m['num_images']} img)", m)
    for p, pm in m.get("protocols", {}).items():
      row(f"  {name} {p}", pm)
    for p, why in m.get("skipped_protocols", {}).items():
      lines.append(f"  {name} {p}: skipped ({why})")
    if "reranked" in m:
      rr = m["reranked"]
      how = rr.get("rerank_score", "cross") + (f" w={rr['rerank_weight']:g}" if "rerank_weight" in rr else "")
      row(f"  {name} re-ranked top-{rr['rerank_top_k']} {how}", rr)
  return "\n".join(lines)


def load_reranker(encoder, rerank_top_k: int, rerank_score: str, rerank_export: str | None = None, *,
                  dtype: str | None = None, mesh=None, batch_size: int = 64, allow_untrained_head: bool = False):
  """The encoder whose match head scores the re-ranked pairs: None when nothing is re-ranked or the score
  needs no head (`decomposed`, `late`, ...), else `rerank_export` loaded (default: `encoder` itself). An
  unknown score, or a head that was never trained, is refused (ValueError, `UntrainedHeadError`) before any
  data is read."""
  if rerank_score not in rerank_lib.RERANK_SCORES:
    raise ValueError(f"unknown re-rank score {rerank_score!r}; expected one of {rerank_lib.RERANK_SCORES}")
  if not rerank_top_k or rerank_score not in rerank_lib.NEEDS_MATCH_HEAD:
    return None
  reranker = encoder if rerank_export is None else Encoder.load(
      rerank_export, dtype=dtype, mesh=mesh, batch_size=batch_size, allow_untrained_head=allow_untrained_head)
  if reranker.match_head_error:
    raise UntrainedHeadError(reranker.match_head_error)
  return reranker


def run_evaluation(export: str, data_dir: str, dataset: str, split: str = "test", *, protocol: str = "full",
                   rerank_top_k: int = 0, cross_encoder: bool = False, output: str | None = None,
                   batch_size: int = 64, max_images: int | None = None, cross_max_images: int | None = None,
                   use_mesh: bool = True, dtype: str | None = None, timing_pairs: int = 0,
                   allow_untrained_head: bool = False, rerank_score: str = "cross", rerank_weight: float = 0.5,
                   rerank_export: str | None = None) -> dict:
  """Evaluates an export on a prepared split; returns (and writes to `output`, atomically) the JSON
  `{"decomposed": ..., ["coco1k_keyfile": ...], ["cross_encoder": ...], "export", "dataset", "split"}`.

  With protocol coco1k / all and a `test_1k` split in the dataset, the single 1K key file of the
  reference code is evaluated too (`coco1k_keyfile`), reusing nothing but the weights. `timing_pairs` > 0
  adds `timing`: retrieval/timing.compare with that many sampled cross-encoder pairs. Re-ranking, the
  cross-encoder and the timing score pairs with the export's match head: an export whose head was never
  trained is refused (`UntrainedHeadError`) before anything is read, unless `allow_untrained_head`.
  `rerank_score` / `rerank_weight`: how the top-K is re-scored (retrieval/rerank.py); `rerank_export`: the
  cross-encoder that scores pairs for `cross` / `mixed` (default: `export` itself), e.g. the stage-1 export
  beside a stage-2 one.
  """
  import tensorflow_datasets as tfds  # noqa: F401  (the data layer needs it; fail early and clearly)

  mesh = parallel.make_mesh() if use_mesh and jax.device_count() > 1 else None
  encoder = Encoder.load(export, dtype=dtype, mesh=mesh, batch_size=batch_size,
                         allow_untrained_head=allow_untrained_head)
  reranker = load_reranker(encoder, rerank_top_k, rerank_score, rerank_export, dtype=dtype, mesh=mesh,
                           batch_size=batch_size, allow_untrained_head=allow_untrained_head)
  if (cross_encoder or timing_pairs) and encoder.match_head_error:
    raise UntrainedHeadError(encoder.match_head_error)
  rerank_kw = dict(rerank_top_k=rerank_top_k, rerank_score=rerank_score, rerank_weight=rerank_weight,
                   cross_encoder=reranker)
  source = prepare.load_split(data_dir, dataset, split)
  results: dict[str, Any] = {"export": export, "export_fingerprint": encoder.fingerprint, "dataset": dataset,
                             "split": split, "protocol": protocol}
  if rerank_top_k and rerank_export is not None:
    results["rerank_export"] = rerank_export
  results["decomposed"] = evaluate(encoder, source, protocol, batch_size, max_images=max_images, **rerank_kw)
  if protocol in ("coco1k", "all") and split == "test":
    try:
      key_source = prepare.load_split(data_dir, dataset, "test_1k")
    except Exception:  # no test_1k split in this dataset
      key_source = None
    if key_source is not None:
      results["coco1k_keyfile"] = evaluate(encoder, key_source, "full", batch_size, **rerank_kw)
  if cross_encoder:
    # Every pair is a forward pass: the cross-encoder may run on a subset; the decomposed model is then
    # evaluated on exactly that subset too, so the two are compared on the same images and captions.
    sub = cross_max_images or max_images
    results["cross_encoder"] = evaluate_cross_encoder(encoder, source, "full", batch_size, max_images=sub)
    if sub is not None and sub != max_images:
      results["decomposed_same_subset"] = evaluate(encoder, source, "full", batch_size, max_images=sub,
                                                   **rerank_kw)
  if timing_pairs:
    results["timing"] = timing_lib.compare(encoder, source, max_images=max_images, sample_pairs=timing_pairs,
                                       batch_size=batch_size)
  print(format_table({k: v for k, v in results.items() if isinstance(v, dict)}))
  if timing_pairs:
    t = results["timing"]
    print(f"full retrieval of the split: decomposed {t['split']['decomposed']['total_s']:.3f} s, early "
          f"interaction {t['split']['cross_encoder']['total_s']:.1f} s (extrapolated), "
          f"speedup {t['split']['speedup']:.0f}x; at {t['speedup_gallery']}: {t['speedup']:.0f}x")
  if output:
    write_json_atomic(output, results)
  return results
