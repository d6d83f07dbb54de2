"""Builds a persistent embedding index of a dataset split, or answers queries from one.

  python launch/index.py build --export=EXPORT --data_dir=D --dataset=vldeformer_demo --split=test \
      --side=images --index=runs/demo/index_images [--compact=int8|binary]
  python launch/index.py query --index=runs/demo/index_images --export=EXPORT --text="a red car left of a dog"
  python launch/index.py query --index=runs/demo/index_captions --export=EXPORT --image_id=123 \
      --data_dir=D --dataset=vldeformer_demo --split=test
  python launch/index.py build ... --backend=faiss --faiss_index=ivf [--nlist=1024 --nprobe=32]
  python launch/index.py build ... --backend=faiss --faiss_index=hnsw [--M=32 --ef_search=128]
  python launch/index.py build ... --coordinator_address=host0:1234 --num_processes=N --process_id=i
  python launch/index.py build ... --store_tokens=int8   # + each row's token states, for late re-ranking
  python launch/index.py query ... --text="..." --rerank_top_k=50 --rerank_score=late|cross|mixed \
      [--rerank_export=STAGE1_EXPORT --rerank_weight=0.3]

`build` embeds the gallery once (vldeformer_jax.retrieval.index_build.run_build); `query` embeds only the
query and searches the stored embeddings (vldeformer_jax.retrieval.index_query.run_query). An index built by
another export, or a corrupt or stale one, is refused with a message saying what to do; so is an empty text.
A text mostly outside the vocabulary ([UNK]) or longer than the caption length is answered with a `warning:`
line saying what was lost.

`--backend=faiss` (CPU; `pip install .[faiss]`) stores a faiss flat / IVF / HNSW structure beside the
embeddings and `query` searches it (`--nprobe` / `--ef_search` override the stored query parameters;
`--exact` runs the JAX scan). `build` run by N processes (jax.distributed, as training: one per host, the
index on a filesystem they share) embeds each process's share of the gallery into the one index.
"""
import sys

from absl import app
from absl import flags

from vldeformer_jax import cli

_EXPORT = flags.DEFINE_string("export", None, "Export directory.")
_INDEX = flags.DEFINE_string("index", None, "Index directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir (build; query by --image_id).")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset name.")
_SPLIT = flags.DEFINE_string("split", "test", "Split.")
_SIDE = flags.DEFINE_enum("side", "images", ["images", "captions"], "What the index holds (build).")
_COMPACT = flags.DEFINE_enum("compact", None, ["int8", "binary"], "Also store compact codes (build).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing index (build).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoder batch size.")
_TEXT = flags.DEFINE_string("text", None, "Text query (query).")
_IMAGE_ID = flags.DEFINE_integer("image_id", None, "Image query: an image id of --dataset/--split (query).")
_K = flags.DEFINE_integer("k", 10, "Number of results (query).")
_BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "faiss"], "Search backend stored in the index (build).")
_FAISS_INDEX = flags.DEFINE_enum("faiss_index", "flat", ["flat", "ivf", "hnsw"], "faiss structure (build).")
_NLIST = flags.DEFINE_integer("nlist", None, "IVF lists (build; default ~4 sqrt(N)).")
_NPROBE = flags.DEFINE_integer("nprobe", None, "IVF lists scanned per query (build: stored; query: override).")
_M = flags.DEFINE_integer("M", None, "HNSW links per node (build; default 32).")
_EF_CONSTRUCTION = flags.DEFINE_integer("ef_construction", None, "HNSW build candidate list (build; 40).")
_EF_SEARCH = flags.DEFINE_integer("ef_search", None, "HNSW query candidate list (build: stored; query: override).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host build).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host build).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host build).")
_TOKENS = flags.DEFINE_enum("store_tokens", None, ["bfloat16", "int8"], "Also store token states (build).")
_RERANK = flags.DEFINE_integer("rerank_top_k", 0, "Re-score the first stage's top-K (query).")
_RERANK_SCORE = flags.DEFINE_enum("rerank_score", "cross", ["cross", "decomposed", "mixed", "late", "late_normalized"],
                                  "Re-rank score (query; retrieval/index_rerank.py).")
_RERANK_WEIGHT = flags.DEFINE_float("rerank_weight", 0.5, "--rerank_score=mixed: the cosine's share (query).")
_RERANK_EXPORT = flags.DEFINE_string("rerank_export", None, "Cross-encoder export for cross / mixed (query).")
_ALLOW_UNTRAINED = flags.DEFINE_bool("allow_untrained_head", False, "Re-rank with a never-trained match head.")
_EXACT = flags.DEFINE_bool("exact", False, "JAX scan of the float rows even for a compact or faiss index (query).")
flags.mark_flags_as_required(["export", "index"])
# A flag of the other command is refused rather than ignored (--nprobe / --ef_search belong to both).
_ONLY = {"build": ("side", "compact", "overwrite", "backend", "faiss_index", "nlist", "M", "ef_construction",
                   "coordinator_address", "num_processes", "process_id", "store_tokens"),
         "query": ("text", "image_id", "k", "rerank_top_k", "rerank_score", "rerank_weight", "rerank_export",
                   "allow_untrained_head", "exact")}


def main(argv):
  if len(argv) != 2 or argv[1] not in ("build", "query"):
    raise app.UsageError("usage: launch/index.py build|query --index=... --export=... (see the docstring)")
  cli.refuse_flags(_ONLY["query" if argv[1] == "build" else "build"],
                   f"not a `{argv[1]}` option (see launch/index.py's docstring)")
  from vldeformer_jax.retrieval import index_build, index_query
  if argv[1] == "build":
    from vldeformer_jax import parallel
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    params = {k: f.value for k, f in (("nlist", _NLIST), ("nprobe", _NPROBE), ("M", _M),
                                      ("ef_construction", _EF_CONSTRUCTION), ("ef_search", _EF_SEARCH))
              if f.value is not None}
    if params and _BACKEND.value != "faiss":
      raise app.UsageError(f"--{', --'.join(params)}: faiss options; add --backend=faiss --faiss_index=...")
    meta = index_build.run_build(_EXPORT.value, _DATA_DIR.value, _DATASET.value, _SPLIT.value, _INDEX.value,
                                 side=_SIDE.value, compact=_COMPACT.value, batch_size=_BATCH.value,
                                 overwrite=_OVERWRITE.value, backend=_BACKEND.value,
                                 faiss_index=_FAISS_INDEX.value if _BACKEND.value == "faiss" else None,
                                 faiss_params=params, store_tokens=_TOKENS.value)
    backend = meta["backend"] + (f" {meta['faiss']['index']}" if meta["backend"] == "faiss" else "")
    print(f"wrote index {_INDEX.value}: {meta['num']} {meta['side']} x {meta['dim']} (compact: {meta['compact']}, "
          f"backend: {backend})")
    return
  # Bad input (a foreign or corrupt index, an empty query, ...) is one `error:` line, exit 1 (vldeformer_jax.cli).
  for row in index_query.run_query(_INDEX.value, _EXPORT.value, text=_TEXT.value, image_id=_IMAGE_ID.value,
                                   k=_K.value, data_dir=_DATA_DIR.value, dataset=_DATASET.value, split=_SPLIT.value,
                                   exact=_EXACT.value, nprobe=_NPROBE.value, ef_search=_EF_SEARCH.value,
                                   warn=lambda m: print(f"warning: {m}", file=sys.stderr),
                                   rerank_top_k=_RERANK.value, rerank_score=_RERANK_SCORE.value,
                                   rerank_weight=_RERANK_WEIGHT.value, rerank_export=_RERANK_EXPORT.value,
                                   allow_untrained_head=_ALLOW_UNTRAINED.value):
    new = "" if row.get("rerank_score") is None else f"  ({_RERANK_SCORE.value} {row['rerank_score']:.4f})"
    print(f"{row['rank']:3d}  {row['score']:.4f}{new}  image {row['image_id']}  {row['text']}")


if __name__ == "__main__":
  cli.run(main)
