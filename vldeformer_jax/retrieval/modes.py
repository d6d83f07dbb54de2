"""Retrieval modes side by side on one split: recall@1/5/10 (both directions), queries per second, bytes per
gallery item. Shared by `benchmarks/retrieval_modes.py` and (if the lead wires it in) the demo report.

Why one function: every mode must be measured on the same embeddings, the same queries and the same
recall definition, or the table compares nothing. Recall here is the full-protocol recall of
retrieval/metrics.py computed from top-10 lists: t2i, a caption's image in the top K images; i2t, any of
an image's captions in the top K captions. `avg` is the mean of the two directions.

Modes (each gives top-10 lists for both directions):
- `float`: exact inner-product search of the float32 embeddings (`search.search_codes`);
- `int8`: per-vector int8 codes scanned directly (`search.quantize_int8`), no re-score;
- `sign`: the D sign bits (`search.pack_signs`), Hamming scan, no re-score;
- `sign+rescore` / `simhash+rescore` / `distilled+rescore`: B-bit codes of a code head
  (retrieval/binary_codes.py), Hamming shortlist of `shortlist` rows, float re-score of those rows;
- `cross_rerank@k`: the float top-k re-scored by the early-interaction cross-encoder, and
  `late_rerank@k`: by late interaction (TERAN's MrSw on token states), both through retrieval/rerank.py;
- `faiss_ivf` / `faiss_hnsw`: retrieval/faiss_backend.py with its default parameters, when faiss imports.
Queries per second: the queries of both directions divided by the seconds of search (plus re-scoring /
re-ranking) after a warm-up call; encoding the queries is excluded (it is the same for every mode). Bytes
per item: what the mode keeps per gallery row (float re-scoring modes also keep the float rows, which
may stay on disk: listed as `+ float on disk`).
"""
from __future__ import annotations

import importlib
import time
from typing import Callable

import numpy as np

from vldeformer_jax.retrieval import binary_codes, search

KS = (1, 5, 10)


def recall_from_topk(t2i_top: np.ndarray, i2t_top: np.ndarray, txt2img: np.ndarray) -> dict:
  """{t2i, i2t: {R@1, R@5, R@10}, avg: {...}} in percent, from top-10 lists (gallery rows, -1 = none)."""
  txt2img = np.asarray(txt2img)
  out = {"t2i": {}, "i2t": {}}
  for k in KS:
    out["t2i"][f"R@{k}"] = 100.0 * float(np.mean(np.any(t2i_top[:, :k] == txt2img[:, None], axis=1)))
    owner = np.where(i2t_top[:, :k] >= 0, txt2img[np.maximum(i2t_top[:, :k], 0)], -1)
    out["i2t"][f"R@{k}"] = 100.0 * float(np.mean(np.any(owner == np.arange(len(i2t_top))[:, None], axis=1)))
  out["avg"] = {key: (out["t2i"][key] + out["i2t"][key]) / 2 for key in out["t2i"]}
  return out


def _timed(fn: Callable[[], tuple[np.ndarray, np.ndarray]], repeats: int) -> tuple[tuple, float]:
  """(result, median seconds) of fn after one warm-up call (compilation excluded)."""
  result = fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t)
  return result, float(np.median(times))


def _row(name: str, top: tuple[np.ndarray, np.ndarray], seconds: float, num_queries: int, txt2img,
         bytes_per_item, **extra) -> dict:
  return {"mode": name, **recall_from_topk(top[0], top[1], txt2img), "seconds": seconds,
          "queries_per_s": num_queries / seconds if seconds > 0 else float("inf"),
          "bytes_per_item": bytes_per_item, **extra}


def code_rows(img: np.ndarray, txt: np.ndarray, txt2img: np.ndarray, heads: dict[str, binary_codes.CodeHead],
              shortlist: int, k: int = 10, repeats: int = 1) -> list[dict]:
  """For each named head: its codes alone (Hamming top-k) and with a float re-score of a Hamming
  shortlist of `shortlist` rows (both directions: captions query images, images query captions)."""
  rows = []
  nq = len(txt) + len(img)
  d = img.shape[1]
  for name, head in heads.items():
    ic, tc = head.encode(img, "image"), head.encode(txt, "text")

    def codes_only():
      return (binary_codes.hamming_topk(tc, ic, k, head.bits).indices,
              binary_codes.hamming_topk(ic, tc, k, head.bits).indices)

    def rescored():
      return (binary_codes.shortlist_rescore(txt, tc, img, ic, head.bits, shortlist, k).indices,
              binary_codes.shortlist_rescore(img, ic, txt, tc, head.bits, shortlist, k).indices)

    top, sec = _timed(codes_only, repeats)
    rows.append(_row(name, top, sec, nq, txt2img, head.bytes_per_code, bits=head.bits))
    top, sec = _timed(rescored, repeats)
    rows.append(_row(f"{name}+rescore", top, sec, nq, txt2img, f"{head.bytes_per_code} + {4 * d} float on disk",
                     bits=head.bits, shortlist=shortlist))
  return rows


def _optional(module: str):
  """A sibling module that another piece of work provides, or None while it does not exist / import."""
  try:
    return importlib.import_module(f"vldeformer_jax.retrieval.{module}")
  except ImportError:
    return None


def split_rows(img: np.ndarray, txt: np.ndarray, txt2img: np.ndarray, *,
               heads: dict[str, binary_codes.CodeHead] | None = None, shortlist: int = 50,
               encoder=None, gallery=None, cross_encoder=None, rerank_k: int = 10, cross: bool = True,
               late: bool = True,
               faiss: bool = True, repeats: int = 1, notes: list | None = None) -> list[dict]:
  """The rows of the table for one split's L2-normalised embeddings img [N_img, D], txt [N_txt, D].

  `heads`: named code heads (e.g. {"simhash-64": ..., "distilled-64": ...}); `encoder` (the decomposed
  model) + `gallery` (retrieval.gallery.Gallery of the same split): needed for the re-rankers;
  `cross_encoder`: the export whose match head re-ranks (default `encoder`; the demo's is stage 1). `notes` collects why a mode
  was left out (a module not there yet, no encoder).
  """
  notes = notes if notes is not None else []
  txt2img = np.asarray(txt2img)
  img = np.ascontiguousarray(img, np.float32)
  txt = np.ascontiguousarray(txt, np.float32)
  nq, d = len(txt) + len(img), img.shape[1]
  k = 10
  rows = []

  def float_search():
    return (search.search_codes(txt, img, k).indices, search.search_codes(img, txt, k).indices)

  top_float, sec = _timed(float_search, repeats)
  rows.append(_row("float", top_float, sec, nq, txt2img, 4 * d))

  (ic8, is8), (tc8, ts8) = search.quantize_int8(img), search.quantize_int8(txt)

  def int8_search():
    return (search.search_codes(txt, ic8, k, kind="int8", scales=is8).indices,
            search.search_codes(img, tc8, k, kind="int8", scales=ts8).indices)

  top, sec = _timed(int8_search, repeats)
  rows.append(_row("int8", top, sec, nq, txt2img, d + 4))

  ib, tb = search.pack_signs(img), search.pack_signs(txt)

  def sign_search():
    return (binary_codes.hamming_topk(search.pack_signs(txt), ib, k, d).indices,
            binary_codes.hamming_topk(search.pack_signs(img), tb, k, d).indices)

  top, sec = _timed(sign_search, repeats)
  rows.append(_row("sign", top, sec, nq, txt2img, binary_codes.code_bytes(d), bits=d))
  if heads:
    rows.extend(code_rows(img, txt, txt2img, heads, shortlist, k, repeats))

  if encoder is not None and gallery is not None and rerank_k:
    rr = _optional("rerank")
    if rr is None:
      notes.append("re-rank rows: vldeformer_jax/retrieval/rerank.py not importable (pending)")
    else:
      rows.extend(rerank_rows(rr, encoder, gallery, img, txt, txt2img, rerank_k, rows[0]["seconds"], nq,
                              cross=cross, late=late, cross_encoder=cross_encoder, notes=notes))
  elif cross or late:
    notes.append("re-rank rows: no encoder / gallery given")
  if faiss:
    fb = _optional("faiss_backend")
    if fb is None or not fb.available():
      notes.append("faiss_ivf / faiss_hnsw: retrieval/faiss_backend.py or faiss itself not importable")
    else:
      rows.extend(faiss_rows(fb, img, txt, txt2img, repeats, notes))
  return rows


def gallery_rows(encoder, gallery, *, heads=None, cross_encoder=None, notes: list | None = None,
                 **kwargs) -> list[dict]:
  """`split_rows` for a gallery (retrieval.gallery.Gallery) embedded here by the decomposed `encoder`: what
  the demo report would call with its stage-2 encoder, stage-1 `cross_encoder` and code heads distilled on
  the train split (training/code_distillation.distill)."""
  from vldeformer_jax.retrieval.gallery import embed_gallery
  img, txt, _ = embed_gallery(encoder, gallery, progress=False)
  return split_rows(img, txt, gallery.txt2img, heads=heads, encoder=encoder, gallery=gallery,
                    cross_encoder=cross_encoder, notes=notes, **kwargs)


def rerank_rows(rr, encoder, gallery, img, txt, txt2img, k: int, first_stage_s: float, nq: int, *,
                cross: bool, late: bool, cross_encoder=None, notes: list) -> list[dict]:
  """The float top-k re-ranked by the cross-encoder and by late interaction (retrieval/rerank.py).

  Seconds: the first stage's search plus the re-scoring of the shortlists (`score_s`); the query's own
  token states / forward are encoding (excluded, as for every mode), the gallery's token states are what
  an index stores."""
  rows, d = [], img.shape[1]
  sim = img @ txt.T
  scorer = cross_encoder or encoder
  wanted = []
  if cross:
    if getattr(scorer, "match_head_error", None):
      notes.append(f"cross_rerank@{k}: the match head is untrained ({scorer.match_head_error})")
    else:
      wanted.append(("cross", f"cross_rerank@{k}", f"{4 * d} + regions and tags"))
  token_states = None
  if late:
    token_states = rr.gallery_token_states(encoder, gallery, progress=False)
    t, h = token_states[1][0].shape[1:]
    wanted.append(("late", f"late_rerank@{k}", f"{4 * d} + {t * h * 4} token states (float32; "
                                               f"{t * h * 2} bf16, {t * (h + 4)} int8)"))
  for score, name, size in wanted:
    sim_i2t, sim_t2i, info = rr.rerank(encoder, gallery, sim, k, score=score, cross_encoder=cross_encoder,
                                       progress=False, token_states=token_states)
    top = (rr.top_k_rows(sim_t2i.T, 10), rr.top_k_rows(sim_i2t, 10))
    sec = first_stage_s + info["timing"]["score_s"]
    rows.append(_row(name, top, sec, nq, txt2img, size, pairs_scored=info["pairs_scored"]))
  return rows


def faiss_rows(fb, img, txt, txt2img, repeats, notes, kinds=("ivf", "hnsw")) -> list[dict]:
  """IVF and HNSW rows through retrieval/faiss_backend.py (`build`, `search`; default parameters).
  Bytes per item: IVF-Flat keeps the float row and an 8-byte id; HNSW the float row and its level-0
  links (2 M int32), upper levels ignored (about 1 / M of the rows)."""
  rows = []
  nq, k, d = len(txt) + len(img), 10, img.shape[1]
  for kind in kinds:
    try:
      gi, gt = fb.build(img, kind), fb.build(txt, kind)

      def run():
        return fb.search(gi, txt, k).indices, fb.search(gt, img, k).indices

      top, sec = _timed(run, repeats)
      p = fb.describe(gi)
      size = 4 * d + 8 if kind == "ivf" else 4 * d + 8 * int(p.get("M", 32))
      rows.append(_row(f"faiss_{kind}", top, sec, nq, txt2img, f"~{size}",
                       params={key: v for key, v in p.items() if key not in ("kind", "ntotal", "dim")}))
    except Exception as e:  # noqa: BLE001 - another module's failure is a note in the table, not a crash
      notes.append(f"faiss_{kind}: {type(e).__name__}: {e}")
  return rows


def markdown(rows: list[dict]) -> str:
  """One markdown table of `rows` (split_rows / code_rows)."""
  lines = ["| mode | t2i R@1 / R@5 / R@10 | i2t R@1 / R@5 / R@10 | avg R@10 | queries/s | bytes per item |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    t, i = r["t2i"], r["i2t"]
    lines.append(f"| {r['mode']} | {t['R@1']:.1f} / {t['R@5']:.1f} / {t['R@10']:.1f} | "
                 f"{i['R@1']:.1f} / {i['R@5']:.1f} / {i['R@10']:.1f} | {r['avg']['R@10']:.1f} | "
                 f"{r['queries_per_s']:,.0f} | {r['bytes_per_item']} |")
  return "\n".join(lines) + "\n"
