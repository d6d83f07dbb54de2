"""The whole paper in one command: `vldeformer_jax.demo.job.run_demo(workdir)`.

  time python launch/demo.py --workdir=runs/demo

Makes the demo data, trains the stage-1 early-interaction VL transformer, decomposes it (stage 2, bi-modal
hard negatives), runs the ablations (no hard negatives; from plain BERT weights; from random weights),
evaluates and times both models, and writes report.md, report.json and PNG plots in the workdir. A second
run reuses every stage whose export or results already exist. Any training field can be overridden, e.g.
`--stage1_config.train.num_steps=300 --stage2_config.train.num_steps=200`.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the whole demo (data, runs, results, report).")
_STAGE1 = config_flags.DEFINE_config_file(
    "stage1_config", os.path.join(_ROOT, "configs", "demo_stage1.py"), "Stage-1 (early interaction) config.")
_STAGE2 = config_flags.DEFINE_config_file(
    "stage2_config", os.path.join(_ROOT, "configs", "demo.py") + ":negatives", "Stage-2 (decomposition) config.")
_CROSS_MAX = flags.DEFINE_integer("cross_max_images", None, "Cross-encoder subset: the first N test images.")
_ABLATIONS = flags.DEFINE_list("ablations", None, "Ablations to run (default: all; '' for none).")
_BERT_STEPS = flags.DEFINE_integer("bert_num_steps", None, "Steps of the plain-BERT (MiniLM) ablation.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import logging as py_logging
  py_logging.getLogger("vldeformer_jax").setLevel(py_logging.INFO)
  from vldeformer_jax.training import config_checks as config_validation
  from vldeformer_jax.demo import job as demo

  plan = demo.DemoPlan()
  if _CROSS_MAX.value is not None:
    plan.cross_max_images = _CROSS_MAX.value
  if _ABLATIONS.value is not None:
    plan.ablations = tuple(a for a in _ABLATIONS.value if a)
  if _BERT_STEPS.value is not None:
    plan.bert_num_steps = _BERT_STEPS.value
  try:
    demo.run_demo(_WORKDIR.value, _STAGE1.value, _STAGE2.value, plan)
  except config_validation.ConfigError as e:
    for line in e.errors:
      print(f"config error: {line}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
