r"""Converts a PyTorch/safetensors BERT checkpoint (VinVL/Oscar, VLDeformer, plain HF BERT) into an export.

  python launch/convert_checkpoint.py --checkpoint=vinvl/coco_ir/base/checkpoint-1340000 --output=exports/vinvl

The checkpoint directory holds config.json (model sizes), vocab.txt and the weights (*.safetensors,
pytorch_model.bin or model.cpkt). Every tensor is checked against the model; any missing, unexpected or
mismatched key is named and the tool exits non-zero without writing anything.
"""
import sys

from absl import app
from absl import flags

from vldeformer_jax import cli
from vldeformer_jax.io import convert

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Source checkpoint directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Export directory to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export.")
_ALLOW_MISSING = flags.DEFINE_multi_string(
    "allow_missing", [], "Regex of Flax parameter paths that may be absent and are freshly initialised "
    "(the heads, and the region embedding of a text-only BERT, are allowed already).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the freshly initialised parameters.")
_MAX_TEXT_LEN = flags.DEFINE_integer("max_text_len", None, "Override the caption/tag token length (35).")
_MAX_TAG_LEN = flags.DEFINE_integer("max_tag_len", None, "Override the tag token length (0: max_text_len).")
_MAX_REGIONS = flags.DEFINE_integer("max_regions", None, "Override the number of regions (70).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = {k: flag.value for k, flag in (("max_text_len", _MAX_TEXT_LEN), ("max_tag_len", _MAX_TAG_LEN),
                                             ("max_regions", _MAX_REGIONS)) if flag.value is not None}
  try:
    report = convert.convert_checkpoint(
        _CHECKPOINT.value, _OUTPUT.value, overwrite=_OVERWRITE.value, allow_missing=_ALLOW_MISSING.value,
        seed=_SEED.value, config_overrides=overrides)
  except (convert.ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f"convert_checkpoint: error: {e}", file=sys.stderr)
    sys.exit(1)
  for line in report.lines():
    print(line)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
