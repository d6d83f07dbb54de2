"""Table 8: retrieval modes side by side: recall, queries per second, bytes per gallery item.

Two parts, one JSON:
- `demo`: the demo's test split (1000 images x 5 captions) with the demo's decomposed export (stage 2) and
  cross-encoder (stage 1), every mode of `vldeformer_jax.retrieval.modes.split_rows`: recall@1/5/10 in
  both directions against the ground-truth pairs. Code heads are distilled on the TRAIN split's
  embeddings (training/code_distillation.py) and compared with the data-independent codes of the same
  length (`binary_codes.sign_baseline_head`: the D sign bits when B = D, SimHash otherwise) at the same
  Hamming shortlist sizes, re-scored with the float embeddings (`codes`). Skipped, with the reason, when
  the demo workdir has no exports (run `bash scripts/demo.sh` first, or pass --demo_workdir).
- `large`: N x 768 synthetic clustered data (default 1M: 1000 Gaussian clusters, L2-normalised; 1000
  queries drawn from the same clusters) for speed and memory; recall@10 is against exact float search
  (there are no ground-truth pairs). The float gallery is one memory-mapped .npy in a temporary directory
  (never a second in-memory copy); codes are held in memory; faiss IVF (nlist 512, nprobe 16) keeps its
  own copy of the rows (what IVF-Flat is); HNSW is built on the first 100K rows only (its build at 1M
  takes longer than this table's budget on 2 cores), and says so. Each 1M-row mode is one timed call,
  compilation included (about a second).

  python -m benchmarks.retrieval_modes [--quick] [--demo_workdir runs/demo] > last line: JSON
"""
from __future__ import annotations

import argparse
import os
import sys
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common


def _heads(train, bits_list, steps, seed=0):
  from vldeformer_jax.retrieval import binary_codes
  from vldeformer_jax.training import code_distillation as cd
  heads, summaries = {}, {}
  dim = train[0].shape[1]
  for bits in bits_list:
    base = binary_codes.sign_baseline_head(dim, bits, seed)
    heads[f"{base.meta['kind']}-{bits}"] = base
    head, s = cd.distill(*train, cd.DistillConfig(bits=bits, steps=steps, seed=seed), progress=False)
    heads[f"distilled-{bits}"] = head
    summaries[bits] = {k: s[k] for k in ("sign_loss_before", "sign_loss_after", "train_loss_last")}
  return heads, summaries


def demo_part(workdir: str, bits_list, steps: int, shortlists, table_bits, rerank_k: int,
              max_images: int | None, repeats: int) -> dict:
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval import binary_codes, modes
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.retrieval.gallery import embed_gallery, load_gallery

  export, cross_export = os.path.join(workdir, "stage2", "export"), os.path.join(workdir, "stage1", "export")
  data_dir = os.path.join(workdir, "data")
  if not os.path.isdir(export):
    return {"skipped": f"no demo export at {export} (run `bash scripts/demo.sh` or pass --demo_workdir)"}
  encoder = Encoder.load(export, progress=False)
  cross = Encoder.load(cross_export, progress=False) if os.path.isdir(cross_export) else None
  emb = {}
  for split in ("train", "test"):
    g = load_gallery(prepare.load_split(data_dir, "vldeformer_demo", split), max_images)
    img, txt, _ = embed_gallery(encoder, g, progress=False)
    emb[split] = (img, txt, g.txt2img, g)
  t = time.perf_counter()
  heads, summaries = _heads(emb["train"][:3], bits_list, steps)
  distill_s = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as tmp:  # the saved head round trip, as a user would load it
    path = os.path.join(tmp, "codes.npz")
    name = f"distilled-{bits_list[0]}"
    binary_codes.save_code_head(path, heads[name], encoder.fingerprint)
    heads[name] = binary_codes.load_code_head_for_export(path, export)
  img, txt, t2i, gallery = emb["test"]
  notes = []
  main = {n: h for n, h in heads.items() if h.bits in table_bits}
  rows = modes.split_rows(img, txt, t2i, heads=main, shortlist=shortlists[-1], encoder=encoder, gallery=gallery,
                          cross_encoder=cross, rerank_k=rerank_k, repeats=repeats, notes=notes)
  codes = []
  for s in shortlists:
    codes.extend({**r, "shortlist": s} for r in modes.code_rows(img, txt, t2i, heads, s, repeats=repeats))
  return {"export": export, "cross_export": cross_export if cross else None, "num_images": len(img),
          "num_captions": len(txt), "dim": int(img.shape[1]), "bits": list(bits_list), "steps": steps,
          "shortlists": list(shortlists), "rerank_k": rerank_k, "distill_seconds": distill_s,
          "distill": summaries, "rows": rows, "codes": codes, "notes": notes,
          "table": modes.markdown(rows)}


def _clustered(path: str, n: int, dim: int, centres: np.ndarray, seed: int, noise: float,
               block: int = 65536) -> np.ndarray:
  """n rows around `centres`, L2-normalised, written block by block into a memory-mapped .npy."""
  x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
  rng = np.random.default_rng(seed)
  for a in range(0, n, block):
    m = min(block, n - a)
    rows = centres[rng.integers(0, len(centres), m)] + noise * rng.standard_normal((m, dim), np.float32)
    x[a:a + m] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  x.flush()
  del x
  return np.load(path, mmap_mode="r")


def large_part(n: int, dim: int, num_queries: int, bits: int, steps: int, shortlist: int, hnsw_max: int,
               repeats: int) -> dict:
  from vldeformer_jax.retrieval import binary_codes, faiss_backend, search
  from vldeformer_jax.training import code_distillation as cd

  k = 10
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((1000, dim)).astype(np.float32) / np.sqrt(dim)
  noise = 0.6 / np.sqrt(dim)
  tmp = tempfile.mkdtemp(prefix="modes_", dir=os.environ.get("TMPDIR"))
  rows, notes = [], []
  try:
    gal = _clustered(os.path.join(tmp, "gallery.npy"), n, dim, centres, 1, noise)
    queries = np.asarray(_clustered(os.path.join(tmp, "queries.npy"), num_queries, dim, centres, 2, noise))
    sample = np.asarray(gal[:min(n, 20000)])

    def timed(fn):
      """One call, timed; at this size compiling (about a second) is a small part of it and a warm-up
      call would double the table's run time (each search compiles for its own gallery shape)."""
      t = time.perf_counter()
      out = fn()
      return out, time.perf_counter() - t

    def log(msg):
      print(f"[modes large {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    exact, sec = timed(lambda: search.search_codes(queries, gal, k).indices)

    def add(name, top, seconds, size, **extra):
      rows.append({"mode": name, "recall@10_vs_exact": search.recall_vs_exact(top, exact), "seconds": seconds,
                   "queries_per_s": num_queries / seconds, "bytes_per_item": size,
                   "gallery_bytes": size * n if isinstance(size, int) else None, **extra})

    add("float", exact, sec, 4 * dim)
    log(f"float {sec:.1f} s")
    codes8, scales = np.empty((n, dim), np.int8), np.empty((n,), np.float32)
    for a in range(0, n, 65536):  # by blocks: quantize_int8 of the whole gallery makes full-size temporaries
      codes8[a:a + 65536], scales[a:a + 65536] = search.quantize_int8(gal[a:a + 65536])
    top, sec = timed(lambda: search.search_codes(queries, codes8, k, kind="int8", scales=scales).indices)
    add("int8", top, sec, dim + 4)
    log(f"int8 {sec:.1f} s")
    del codes8, scales
    signs = np.concatenate([search.pack_signs(gal[a:a + 65536]) for a in range(0, n, 65536)])
    qs = search.pack_signs(queries)
    top, sec = timed(lambda: binary_codes.hamming_topk(qs, signs, k, dim).indices)
    add("sign", top, sec, dim // 8, bits=dim)
    log(f"sign {sec:.1f} s")
    del signs
    t = time.perf_counter()
    dist, summary = cd.distill(sample, sample, np.arange(len(sample)), cd.DistillConfig(bits=bits, steps=steps),
                               progress=False)
    distill_s = time.perf_counter() - t
    for name, head in ((f"simhash-{bits}", binary_codes.sign_baseline_head(dim, bits)), (f"distilled-{bits}", dist)):
      gc, qc = head.encode(gal, "image"), head.encode(queries, "image")
      top, sec = timed(lambda: binary_codes.hamming_topk(qc, gc, k, bits).indices)
      add(name, top, sec, head.bytes_per_code, bits=bits)
      top, sec = timed(lambda: binary_codes.shortlist_rescore(queries, qc, gal, gc, bits, shortlist, k).indices)
      add(f"{name}+rescore", top, sec, head.bytes_per_code, bits=bits, shortlist=shortlist,
          note="+ float rows on disk, read for the shortlist only")
      log(f"{name}+rescore {sec:.1f} s")
    faiss_info = None
    if faiss_backend.available():
      faiss_info = faiss_backend.simd_info()
      # IVF: nlist 512 (faiss trains k-means on 256 points per list: 131K rows here; the backend's default
      # of ~4 sqrt(N) = 4000 lists trains on all 1M rows, over 15 minutes on 2 cores), nprobe 16.
      for kind, rows_used, params in (("ivf", n, {"nlist": min(512, max(1, n // 39)), "nprobe": 16}),
                                      ("hnsw", min(n, hnsw_max), {})):
        t = time.perf_counter()
        index = faiss_backend.build(gal[:rows_used], kind, **params)
        build_s = time.perf_counter() - t
        ex = exact if rows_used == n else search.search_codes(queries, gal[:rows_used], k).indices
        top, sec = timed(lambda: faiss_backend.search(index, queries, k).indices)
        p = faiss_backend.describe(index)
        size = 4 * dim + 8 if kind == "ivf" else 4 * dim + 8 * int(p.get("M", 32))
        rows.append({"mode": f"faiss_{kind}", "recall@10_vs_exact": search.recall_vs_exact(top, ex),
                     "seconds": sec, "queries_per_s": num_queries / sec, "bytes_per_item": f"~{size}",
                     "gallery_bytes": size * rows_used, "gallery_rows": rows_used, "build_seconds": build_s,
                     "params": {key: v for key, v in p.items() if key not in ("kind", "ntotal", "dim")}})
        log(f"faiss {kind}: build {build_s:.1f} s, search {sec:.1f} s")
        del index
    else:
      notes.append("faiss not installed: no faiss rows")
    return {"n": n, "dim": dim, "queries": num_queries, "clusters": len(centres), "noise": noise, "bits": bits,
            "shortlist": shortlist, "distill_steps": steps, "distill_sample": len(sample),
            "distill_seconds": distill_s, "distill": {k2: summary[k2] for k2 in ("sign_loss_before", "sign_loss_after")},
            "faiss": faiss_info, "rows": rows, "notes": notes, "peak_rss_bytes": common.peak_rss_bytes()}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--demo_workdir", default=os.path.join(common.REPO, "runs", "demo"))
  p.add_argument("--n", type=int, default=None)
  p.add_argument("--repeats", type=int, default=None)
  a = p.parse_args()
  q = a.quick
  repeats = a.repeats or (1 if q else 2)
  out = {"quick": q}
  t = time.perf_counter()
  try:
    out["demo"] = demo_part(a.demo_workdir, (64,) if q else (32, 64, 128, 256), 200 if q else 1500,
                            (20, 50), (64,) if q else (64, 128), 10, 200 if q else None, repeats)
  except Exception as e:  # noqa: BLE001 - one failing part is reported, the other still runs
    out["demo"] = {"error": f"{type(e).__name__}: {e}"}
  out["demo_seconds"] = time.perf_counter() - t
  t = time.perf_counter()
  out["large"] = large_part(a.n or (50_000 if q else 1_000_000), 768, 200 if q else 1000, 256,
                            200 if q else 1000, 100, 20_000 if q else 100_000, 1)
  out["large_seconds"] = time.perf_counter() - t
  common.emit(out)


if __name__ == "__main__":
  main()
