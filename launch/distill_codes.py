"""Distils a binary code head from an export's embeddings of a split (docs/method.md §7.6).

  python launch/distill_codes.py --export=runs/demo/stage2/export --data_dir=runs/demo/data \
      --dataset=vldeformer_demo --split=train --bits=128 --steps=1500 --output=runs/demo/codes_128.npz

The head (a linear map D -> B and a sign, trained so code similarities reproduce the model's own cosine
similarities; `--cross_export` with `--cross_weight` > 0 adds the cross-encoder's match margins on sampled
pairs) is written to --output with the export's fingerprint: `retrieval.binary_codes.load_code_head_for_export`
refuses it for any other export. Logic: `vldeformer_jax.training.code_distillation.run_distillation`.
"""
from absl import app
from absl import flags

from vldeformer_jax import cli

_EXPORT = flags.DEFINE_string("export", None, "Export directory (the decomposed model: teacher and embedder).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset name.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to distil on (never the test split you report on).")
_BITS = flags.DEFINE_integer("bits", 128, "Code length in bits (any positive number; 8 per stored byte).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps (256 images per step).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the code head (.npz).")
_SHARED = flags.DEFINE_bool("shared", True, "One projection for both modalities (+ a bias each); else two.")
_RELAX = flags.DEFINE_enum("relaxation", "ste", ["ste", "tanh"], "Straight-through sign or annealed tanh.")
_CROSS = flags.DEFINE_string("cross_export", None, "Cross-encoder export (trained match head) as a second teacher.")
_CROSS_W = flags.DEFINE_float("cross_weight", 0.0, "Weight of the cross-encoder term.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoder batch size.")
flags.mark_flags_as_required(["export", "data_dir", "dataset", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _BITS.value < 1 or _STEPS.value < 0:
    raise app.UsageError(f"--bits must be >= 1 and --steps >= 0, got {_BITS.value} and {_STEPS.value}")
  from vldeformer_jax.training.code_distillation import run_distillation
  s = run_distillation(_EXPORT.value, _DATA_DIR.value, _DATASET.value, _SPLIT.value, _OUTPUT.value,
                       bits=_BITS.value, steps=_STEPS.value, shared=_SHARED.value, relaxation=_RELAX.value,
                       cross_export=_CROSS.value, cross_weight=_CROSS_W.value, batch_size=_BATCH.value)
  print(f"wrote {s['output']}: {s['bits']}-bit code head for export {s['export_fingerprint'][:16]}...; "
        f"distillation loss with sign codes {s['sign_loss_before']:.3f} (start) -> {s['sign_loss_after']:.3f}")


if __name__ == "__main__":
  cli.run(main)
