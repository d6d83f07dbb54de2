r"""Converts VinVL-format retrieval data (docs/method.md §3.3) into a tensorflow-datasets array_record dataset.

  python launch/prepare_data.py --captions_dir=coco_ir --features_dir=coco_ir/features \
      --name=coco_vinvl --data_dir=~/tensorflow_datasets

reads `{train,test}_captions.pt|json`, `test_img_keys*.tsv` from --captions_dir and `features.tsv`,
`imageid2idx.json`, `predictions.tsv` (+ `.lineidx`) from --features_dir, and writes
`<data_dir>/<name>/1.0.0` with splits train, test and (when its key file exists) test_1k. Read it with
`vldeformer_jax.data.prepare.load_split(data_dir, name, split)` or `tfds.data_source(name, data_dir=...)`.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from vldeformer_jax import cli
from vldeformer_jax.data import prepare
from vldeformer_jax.data import vinvl

FLAGS = flags.FLAGS
flags.DEFINE_string("captions_dir", None, "Directory with {split}_captions.pt|json and test_img_keys*.tsv.")
flags.DEFINE_string("features_dir", None, "Directory with features.tsv, imageid2idx.json, predictions.tsv.")
flags.DEFINE_string("name", None, "Dataset name (snake_case).")
flags.DEFINE_string("data_dir", None, "tfds data dir to write <name>/<version> into.")
flags.DEFINE_list("splits", ["train", "test"], "Caption splits to convert (test_1k follows test).")
flags.DEFINE_integer("feature_dim", None, "Region feature size F (default: read from the data).")
flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name and version.")
flags.DEFINE_integer("shard_mb", 256, "Approximate size of one array_record shard, in MiB.")
flags.DEFINE_enum("feature_dtype", "float32", ["float32", "float16", "bfloat16"],
                  "Stored region-feature dtype (half-width types halve the reads; batches stay float32).")
flags.DEFINE_enum("compression", "none", ["none", "default"],
                  "array_record compression: none reads 4x faster; default is tfds's (data/storage.py).")
flags.mark_flags_as_required(["captions_dir", "features_dir", "name", "data_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    path = prepare.prepare_vinvl(FLAGS.captions_dir, FLAGS.features_dir, FLAGS.name, FLAGS.data_dir,
                                 splits=FLAGS.splits, feature_dim=FLAGS.feature_dim,
                                 overwrite=FLAGS.overwrite, shard_bytes=FLAGS.shard_mb << 20,
                                 feature_dtype=FLAGS.feature_dtype, compression=FLAGS.compression)
  except (vinvl.VinvlFormatError, FileNotFoundError, FileExistsError, ValueError) as e:
    # Bad input, not a bug: the message names the file, line and image id; no dataset was written.
    print(f"prepare_data: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(path)


if __name__ == "__main__":
  cli.run(main)
