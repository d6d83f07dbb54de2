"""Cross-modal retrieval: metrics and protocols, evaluation, exact/compact search, a persistent index,
and the decomposed-vs-early-interaction speed comparison.

  encoder.py    Encoder.load(export): embed_texts / embed_images / match_scores (the public inference API)
  gallery.py    a split as a gallery: ids and captions in record order, embedded once
  metrics.py    ranks, R@K, medr, rsum, mAP@R from one similarity matrix; COCO 5K / 1K / Flickr 1K
  evaluate.py   evaluate(encoder, split) / evaluate_cross_encoder / re-ranking; run_evaluation (CLI)
  rerank.py     retrieve, then re-rank the top-k by cross / decomposed / mixed / late (MrSw) scores
  late_interaction.py  TERAN's MrSw score on token states; shortlist re-scorer; bf16 / int8 storage
  label_metrics.py  label-based mAP@all / @K / @R (relevant = shares a label)
  suite.py      one model over several datasets tagged scene / object: one JSON + one table
  search.py     exact_topk / search_codes: chunked, blocked, device-sharded top-k in JAX; int8 / 1-bit codes
  index.py      the embedding index's format: write atomically (with the export fingerprint), load + verify,
                search, add_items
  index_build.py  embed a split into an index, by one process or by every process of a jax.distributed job
  index_query.py  answer one text / image query from an index (warnings, optional re-ranking)
  faiss_backend.py  faiss (optional extra) flat / IVF / HNSW as the index's CPU search; simd_level()
  index_rerank.py   re-rank one index query's top-K: late (stored token states), cross, mixed, decomposed
  timing.py     compare(...): full retrieval time of both models, at COCO-5K size, against gallery size

Submodules are imported on use (`from vldeformer_jax.retrieval import evaluate`), so importing the
package stays cheap.
"""
