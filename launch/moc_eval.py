"""Masked-region accuracy of a stage-1 export (masked object classification, docs/method.md §4.8).

  python launch/moc_eval.py --export=runs/demo/stage1_moc/export --data_dir=runs/demo/data \
      --dataset=vldeformer_demo --split=test --output=runs/demo/stage1_moc/moc_eval.json

Every real region with a detector class is masked alone (features zeroed, its class's tag tokens [MASK]ed)
with the image's own caption, another image's caption (the negative control) and an empty caption; prints
the accuracy of the class predicted at its slot against chance (1 / classes, the majority-class rate) and
writes the JSON atomically (vldeformer_jax/training/moc.py `evaluate_moc`). The dataset must have been
prepared with per-region classes.
"""

from absl import app
from absl import flags
from absl import logging

from vldeformer_jax import cli
from vldeformer_jax.io import files as fileio
from vldeformer_jax.training import moc

_EXPORT = flags.DEFINE_string("export", None, "Stage-1 export directory.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir of the prepared dataset.",
                                required=True)
_DATASET = flags.DEFINE_string("dataset", "vldeformer_demo", "Dataset name.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to measure on.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "The first N images only (0: all).")
_MASK_TAGS = flags.DEFINE_bool("mask_tags", True, "Also [MASK] the masked region's class in the tags (as trained).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  result = moc.evaluate_moc(_EXPORT.value, _DATA_DIR.value, _DATASET.value, _SPLIT.value,
                            max_images=_MAX_IMAGES.value, mask_tags=_MASK_TAGS.value)
  print(f"{result['num_masked_regions']} masked regions of {result['num_images']} images, "
        f"{result['num_classes']} classes: chance {result['chance_uniform']:.2f}%, "
        f"majority class {result['chance_majority']:.2f}%")
  for cond in moc.CONDITIONS:
    r = result[cond]
    print(f"{cond:>18}: {r['accuracy_among_classes']:6.2f}% among the classes, "
          f"{r['accuracy_full_vocabulary']:6.2f}% over the vocabulary; the caption names the class for "
          f"{r['class_named_in_caption']:.1f}% of the regions")
  if _OUTPUT.value:
    fileio.write_json_atomic(_OUTPUT.value, result)


if __name__ == "__main__":
  cli.run(main)
