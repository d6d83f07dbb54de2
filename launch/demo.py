"""The whole paper in one command: `vldeformer_jax.demo.job.run_demo(workdir)`.

  time python launch/demo.py --workdir=runs/demo

Prepares the downstream data, pre-trains the stage-1 early-interaction VL transformer on a generated
corpus, decomposes it on the small downstream train split (stage 2, bi-modal hard negatives), runs the
ablations (no hard negatives; from plain BERT weights; from random weights; equal steps and batch), compares
the cross-encoder and the decomposed model on disjoint folds with a 95% interval, times both, and writes
report.md, report.json and PNG plots in the workdir. A second run reuses every finished stage. Training
fields can be overridden, e.g. `--stage2_config.train.learning_rate=1e-4`; sizes and steps are the
`DemoPlan`'s (vldeformer_jax/demo/job.py).
"""
import os

from absl import app
from absl import flags
from absl import logging

from vldeformer_jax import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the whole demo (data, runs, results, report).")
_STAGE1 = cli.define_config_file(
    "stage1_config", os.path.join(_ROOT, "configs", "demo_stage1.py"), "Stage-1 (early interaction) config.")
_STAGE2 = cli.define_config_file(
    "stage2_config", os.path.join(_ROOT, "configs", "demo.py") + ":negatives", "Stage-2 (decomposition) config.")
_FOLDS = flags.DEFINE_integer("folds", None, "Cross-encoder comparison: this many disjoint folds of test images.")
_FOLD_IMAGES = flags.DEFINE_integer("fold_images", None, "Images per fold (every pair scored by the cross-encoder).")
_ABLATIONS = flags.DEFINE_list("ablations", None, "Ablations to run (default: all; '' for none).")
_BERT_STEPS = flags.DEFINE_integer("bert_num_steps", None, "Steps of the plain-BERT (MiniLM) ablation.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import logging as py_logging
  py_logging.getLogger("vldeformer_jax").setLevel(py_logging.INFO)
  from vldeformer_jax.demo import job as demo

  plan = demo.DemoPlan()
  if _FOLDS.value is not None:
    plan.folds = _FOLDS.value
  if _FOLD_IMAGES.value is not None:
    plan.fold_images = _FOLD_IMAGES.value
  if _ABLATIONS.value is not None:
    plan.ablations = tuple(a for a in _ABLATIONS.value if a)
  if _BERT_STEPS.value is not None:
    plan.bert_num_steps = _BERT_STEPS.value
  demo.run_demo(_WORKDIR.value, _STAGE1.value, _STAGE2.value, plan)  # config errors: one line each (cli)


if __name__ == "__main__":
  cli.run(main)
