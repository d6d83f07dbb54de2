"""Re-ranking depth and score: recall against re-scoring time for a few k (retrieval/rerank.py).

  python -m benchmarks.rerank_depth --export=/work/demo_ref/stage2/export \
      --rerank_export=/work/demo_ref/stage1/export --data_dir=/work/demo_ref/data --dataset=vldeformer_demo \
      --output=benchmarks/rerank_depth.json

The decomposed export ranks the whole split once (its embedding time is reported apart); then, for each
depth k, each query's top-k in both directions is re-scored by every score: `decomposed` (the first stage,
no work), `cross` (the cross-encoder export's logit margin: k forward passes per query), `mixed` at a few
weights (the same margins, no extra work), `late` and `late_normalized` (MrSw on the decomposed export's
token states; the gallery's token states are encoded once, as an index stores them, and reported apart).
Latency is the re-scoring time per query (N_img + N_txt queries), compile excluded (a warm-up on a small
subset compiles every shape first). One process, one machine: a shared machine's load moves the times,
not the recalls. Writes the JSON and a markdown table beside it (.md). Not a table of benchmarks/run.py:
it needs trained exports, which a fresh checkout does not have.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from vldeformer_jax.data import prepare
from vldeformer_jax.io.files import write_json_atomic, write_text_atomic
from vldeformer_jax.retrieval import metrics
from vldeformer_jax.retrieval import rerank
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.retrieval.evaluate import similarity
from vldeformer_jax.retrieval.gallery import embed_gallery, load_gallery

RECALLS = [(d, f"R@{k}") for d in ("i2t", "t2i") for k in metrics.RECALL_KS]


def _row(name, k, m, seconds, queries, extra=None) -> dict:
  out = {"score": name, "k": k, **{f"{d} {r}": float(m[d][r]) for d, r in RECALLS}, "rsum": float(m["rsum"]),
         "rerank_s": seconds, "ms_per_query": 1e3 * seconds / queries}
  out.update(extra or {})
  return out


def run(export, rerank_export, data_dir, dataset, split, ks, weights, max_images, batch_size, progress) -> dict:
  enc = Encoder.load(export, batch_size=batch_size, progress=False)
  cross = Encoder.load(rerank_export, batch_size=batch_size, progress=False)
  gallery = load_gallery(prepare.load_split(data_dir, dataset, split), max_images)
  queries = gallery.num_images + len(gallery.captions)
  img, txt, timing = embed_gallery(enc, gallery, batch_size, progress=progress)
  sim = similarity(img, txt)
  # Warm-up: compile the cross-encoder's widths and the MrSw chunk shape outside the clock.
  warm = load_gallery(gallery.source, min(64, gallery.num_images))  # the first images and their captions
  wsim = sim[:warm.num_images, :len(warm.captions)]
  rerank.rerank(enc, warm, wsim, 5, score="cross", cross_encoder=cross, batch_size=batch_size, progress=False)
  for score in ("late", "late_normalized"):
    rerank.rerank(enc, warm, wsim, 5, score=score, batch_size=batch_size, progress=False)
  t = time.perf_counter()
  tokens = rerank.gallery_token_states(enc, gallery, batch_size, progress=progress)
  token_s = time.perf_counter() - t
  rows = [_row("none (decomposed only)", 0, metrics.retrieval_metrics(sim, gallery.txt2img), 0.0, queries)]
  for k in ks:
    top_t, top_i = rerank.top_k_rows(sim, k), rerank.top_k_rows(sim.T, k)
    cos_i2t, cos_t2i = np.take_along_axis(sim, top_t, 1), np.take_along_axis(sim.T, top_i, 1)

    def ranked(new_i2t, new_t2i):
      return metrics.retrieval_metrics(rerank.rerank_matrix(sim, top_t, new_i2t), gallery.txt2img,
                                       rerank.rerank_matrix(sim.T, top_i, new_t2i).T)

    rows.append(_row("decomposed", k, ranked(cos_i2t, cos_t2i), 0.0, queries))
    t = time.perf_counter()
    m_i2t, m_t2i = rerank.cross_scores(cross, gallery, top_t, top_i, batch_size, progress)
    cross_s = time.perf_counter() - t
    rows.append(_row("cross", k, ranked(m_i2t, m_t2i), cross_s, queries))
    for w in weights:
      rows.append(_row(f"mixed w={w:g}", k, ranked(rerank.mixed_scores(cos_i2t, m_i2t, w),
                                                   rerank.mixed_scores(cos_t2i, m_t2i, w)), cross_s, queries))
    for score in ("late", "late_normalized"):
      s_i2t, s_t2i, info = rerank.rerank(enc, gallery, sim, k, score=score, token_states=tokens, progress=False)
      rows.append(_row(score, k, metrics.retrieval_metrics(s_i2t, gallery.txt2img, s_t2i), info["timing"]["score_s"], queries))
  return {"export": os.path.abspath(export), "rerank_export": os.path.abspath(rerank_export), "dataset": dataset,
          "split": split, "num_images": gallery.num_images, "num_captions": len(gallery.captions),
          "queries": queries, "embed_s": timing, "token_states_s": token_s,
          "token_states_ms_per_item": 1e3 * token_s / queries, "rows": rows}


def markdown(r: dict) -> str:
  lines = [f"Re-ranking on {r['dataset']}/{r['split']} ({r['num_images']} images, {r['num_captions']} captions; "
           f"{r['queries']} queries in both directions). Decomposed: `{r['export']}`; cross-encoder: "
           f"`{r['rerank_export']}`. ms/query: re-scoring only, compile excluded; late interaction also needs "
           f"every item's token states ({r['token_states_ms_per_item']:.3f} ms per item here, stored by an "
           f"index for the gallery side).", "",
           "| score | k | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | ms/query |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in r["rows"]:
    vals = " | ".join(f"{row[f'{d} {m}']:.2f}" for d, m in RECALLS)
    lines.append(f"| {row['score']} | {row['k'] or '-'} | {vals} | {row['rsum']:.2f} | {row['ms_per_query']:.3f} |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--export", required=True)
  p.add_argument("--rerank_export", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--dataset", default="vldeformer_demo")
  p.add_argument("--split", default="test")
  p.add_argument("--ks", default="5,10,20")
  p.add_argument("--weights", default="0.25,0.5,0.75")
  p.add_argument("--max_images", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--output", default="benchmarks/rerank_depth.json")
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args()
  r = run(a.export, a.rerank_export, a.data_dir, a.dataset, a.split, [int(k) for k in a.ks.split(",")],
          [float(w) for w in a.weights.split(",")], a.max_images, a.batch_size, not a.no_progress)
  r["command"] = "python -m benchmarks.rerank_depth " + " ".join(
      f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(a).items() if v not in (None, False))
  write_json_atomic(a.output, r)
  table = markdown(r)
  write_text_atomic(os.path.splitext(a.output)[0] + ".md", table)
  print(table)


if __name__ == "__main__":
  main()
