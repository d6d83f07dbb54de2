"""Builds a persistent embedding index of a dataset split, or answers queries from one.

  python launch/index.py build --export=EXPORT --data_dir=D --dataset=vldeformer_demo --split=test \
      --side=images --index=runs/demo/index_images [--compact=int8|binary]
  python launch/index.py query --index=runs/demo/index_images --export=EXPORT --text="a red car left of a dog"
  python launch/index.py query --index=runs/demo/index_captions --export=EXPORT --image_id=123 \
      --data_dir=D --dataset=vldeformer_demo --split=test

`build` embeds the gallery once (vldeformer_jax.retrieval.index.build_index); `query` embeds only the query
and searches the stored embeddings (`run_query`). An index built by another export, or a corrupt or stale
one, is refused with a message saying what to do; so is an empty text. A text mostly outside the vocabulary
([UNK]) or longer than the caption length is answered with a `warning:` line saying what was lost.
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
_EXACT = flags.DEFINE_bool("exact", False, "Scan the float embeddings even when the index is compact (query).")
flags.mark_flags_as_required(["export", "index"])


def main(argv):
  if len(argv) != 2 or argv[1] not in ("build", "query"):
    raise app.UsageError("usage: launch/index.py build|query --index=... --export=... (see the docstring)")
  from vldeformer_jax.retrieval import index
  if argv[1] == "build":
    meta = index.run_build(_EXPORT.value, _DATA_DIR.value, _DATASET.value, _SPLIT.value, _INDEX.value,
                           side=_SIDE.value, compact=_COMPACT.value, batch_size=_BATCH.value,
                           overwrite=_OVERWRITE.value)
    print(f"wrote index {_INDEX.value}: {meta['num']} {meta['side']} x {meta['dim']} (compact: {meta['compact']})")
    return
  # Bad input (a foreign or corrupt index, an empty query, ...) is one `error:` line, exit 1 (vldeformer_jax.cli).
  for row in index.run_query(_INDEX.value, _EXPORT.value, text=_TEXT.value, image_id=_IMAGE_ID.value, k=_K.value,
                             data_dir=_DATA_DIR.value, dataset=_DATASET.value, split=_SPLIT.value,
                             exact=_EXACT.value, warn=lambda m: print(f"warning: {m}", file=sys.stderr)):
    print(f"{row['rank']:3d}  {row['score']:.4f}  image {row['image_id']}  {row['text']}")


if __name__ == "__main__":
  cli.run(main)
