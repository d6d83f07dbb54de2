"""Evaluates an export on a prepared dataset split: `vldeformer_jax.retrieval.evaluate.run_evaluation`.

  python launch/evaluate.py --export=runs/demo/export --data_dir=runs/demo/data --dataset=vldeformer_demo \
      --split=test --protocol=all --rerank_top_k=10 --cross_encoder --cross_max_images=100 \
      --output=runs/demo/eval.json
  python launch/evaluate.py --export=runs/demo/stage2/export --rerank_export=runs/demo/stage1/export \
      --data_dir=runs/demo/data --dataset=vldeformer_demo --rerank_top_k=10 --rerank_score=mixed --rerank_weight=0.3

Prints a table (i2t / t2i R@1/5/10, medr, rsum, mAP@R) and writes the JSON atomically. Protocols: full,
coco5k, flickr1k (every image of the split), coco1k (mean of 5 folds of 1000 images, plus the `test_1k`
key-file split when the dataset has it), all. Batches are sharded over every local device.

  python launch/evaluate.py --export=runs/demo/export --suite=configs/suite_demo.json --output=runs/demo/suite.json

--suite: datasets tagged scene | object, one protocol, instance and label metrics (retrieval/suite.py); one
JSON (--output) and a table (.txt). The --rerank_* flags override the file's; one dataset's flags (--data_dir,
--protocol, ...) are refused; a re-rank depth below the largest K reported exits 2 before loading anything.
"""
import sys

from absl import app
from absl import flags

from vldeformer_jax import cli
from vldeformer_jax.retrieval.metrics import PROTOCOLS
from vldeformer_jax.retrieval.rerank import RERANK_SCORES

_EXPORT = flags.DEFINE_string("export", None, "Export directory (launch/convert_checkpoint.py or training).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir: evaluate its --checkpoint instead of --export.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "With --workdir: best | latest | a step number; "
                                  "exported once to <workdir>/exports/<which>-<step>.")
_ALLOW_UNTRAINED = flags.DEFINE_bool("allow_untrained_head", False, "Score pairs (re-ranking, cross-encoder, "
                                     "timing) even with a match head the export says was never trained.")
_SUITE = flags.DEFINE_string("suite", None, "A suite file (JSON/YAML): evaluate every dataset it lists instead "
                             "of --data_dir/--dataset (retrieval/suite.py).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tensorflow-datasets data_dir of the prepared dataset.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset name (as given to launch/prepare_data.py).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_PROTOCOL = flags.DEFINE_enum("protocol", "full", list(PROTOCOLS),
                              "Evaluation protocol.")
_RERANK = flags.DEFINE_integer("rerank_top_k", 0, "Re-score each query's top-K (by --rerank_score).")
_RERANK_SCORE = flags.DEFINE_enum("rerank_score", "cross", list(RERANK_SCORES),
                                  "Re-rank score: cross-encoder margin, decomposed cosine, their weighted mix, "
                                  "or late interaction (MrSw) on token states (retrieval/rerank.py).")
_RERANK_WEIGHT = flags.DEFINE_float("rerank_weight", 0.5, "--rerank_score=mixed: the cosine's share w in "
                                    "w * c * cosine + (1 - w) * margin (c matches their spreads).")
_RERANK_EXPORT = flags.DEFINE_string("rerank_export", None, "Cross-encoder export for --rerank_score=cross|mixed "
                                     "(default: --export itself), e.g. the stage-1 export.")
_CROSS = flags.DEFINE_bool("cross_encoder", False, "Also evaluate the early-interaction model on every pair.")
_CROSS_MAX = flags.DEFINE_integer("cross_max_images", None,
                                  "Cross-encoder on the first N images only (the decomposed model is then "
                                  "also reported on the same subset).")
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Evaluate the first N images only.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoder batch size (rounded up to the device count).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the export's compute dtype.")
_TIMING = flags.DEFINE_integer("timing_pairs", 0, "Also time decomposed vs early-interaction retrieval, the "
                               "latter on this many sampled pairs, extrapolated (retrieval/timing.py).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON results.")
_NOT_WITH_SUITE = ("data_dir", "dataset", "split", "protocol", "max_images", "cross_encoder", "cross_max_images",
                   "timing_pairs")
flags.register_multi_flags_validator(["export", "workdir"], lambda f: (f["export"] is None) != (f["workdir"] is None),
                                     "give exactly one of --export and --workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vldeformer_jax.io.export import UntrainedHeadError
  from vldeformer_jax.retrieval import evaluate
  from vldeformer_jax.retrieval import suite
  from vldeformer_jax.training import checkpoint_export
  if _SUITE.value is None and not (_DATA_DIR.value and _DATASET.value):
    raise app.UsageError("give --data_dir and --dataset, or --suite")
  try:
    if _SUITE.value:  # the suite file names the data and the protocol; the re-rank flags override it
      cli.refuse_flags(_NOT_WITH_SUITE, "not with --suite (the suite file sets them)")
      rerank = {n: flags.FLAGS[n].value for n in ("rerank_top_k", "rerank_score", "rerank_weight")
                if flags.FLAGS[n].present}
      suite.check_rerank_depth(suite.load_suite(_SUITE.value, rerank)["rerank_top_k"])  # before loading
      export = _EXPORT.value or checkpoint_export.export_checkpoint(_WORKDIR.value, _CHECKPOINT.value)
      suite.run_suite(export, _SUITE.value, output=_OUTPUT.value, batch_size=_BATCH.value, dtype=_DTYPE.value,
                      allow_untrained_head=_ALLOW_UNTRAINED.value, rerank_export=_RERANK_EXPORT.value, **rerank)
      return
    export = _EXPORT.value or checkpoint_export.export_checkpoint(_WORKDIR.value, _CHECKPOINT.value)
    evaluate.run_evaluation(export, _DATA_DIR.value, _DATASET.value, _SPLIT.value,
                            protocol=_PROTOCOL.value, rerank_top_k=_RERANK.value, cross_encoder=_CROSS.value,
                            output=_OUTPUT.value, batch_size=_BATCH.value, max_images=_MAX_IMAGES.value,
                            cross_max_images=_CROSS_MAX.value, dtype=_DTYPE.value,
                            timing_pairs=_TIMING.value, allow_untrained_head=_ALLOW_UNTRAINED.value,
                            rerank_score=_RERANK_SCORE.value, rerank_weight=_RERANK_WEIGHT.value,
                            rerank_export=_RERANK_EXPORT.value)
  except (UntrainedHeadError, suite.RerankDepthError) as e:  # a refusal, not a failure: a flag this export or
    # this suite cannot serve
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
