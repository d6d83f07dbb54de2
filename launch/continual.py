"""Continual retrieval on the object-centric demo world: `vldeformer_jax.training.continual.run_continual`.

  python launch/continual.py --config=configs/demo.py --workdir=runs/continual --config.train.num_steps=100

The demo's classes are split into --groups (default 2) tasks, each an object-centric demo dataset of those
classes (prepared into <workdir>/data); the tasks are fine-tuned in order, every task is evaluated after
each (text-to-image R@1 against the index), once with the index policy `keep` and once with `reindex`.
Prints the R matrices, average accuracy and forgetting; writes <workdir>/continual.json.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vldeformer_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the tasks' runs, the indexes and continual.json.")
_GROUPS = flags.DEFINE_integer("groups", 2, "Number of tasks: the demo's classes in this many equal groups.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 600, "Training images per task.")
_NUM_TEST = flags.DEFINE_integer("num_test", 200, "Test images per task.")
_SEED = flags.DEFINE_integer("seed", 0, "World seed of the task datasets.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _GROUPS.value < 1:
    raise app.UsageError(f"--groups must be >= 1, got {_GROUPS.value}")
  logging.set_verbosity(logging.WARNING)
  import os

  from vldeformer_jax.data import demo_world, object_demo
  from vldeformer_jax.training import continual
  data = os.path.join(os.path.abspath(_WORKDIR.value), "data")
  classes = list(demo_world.CLASSES)
  tasks = []
  for t in range(_GROUPS.value):
    group = classes[t::_GROUPS.value]
    name = object_demo.prepare_object_demo(data, _SEED.value, num_train=_NUM_TRAIN.value,
                                           num_test=_NUM_TEST.value, name=f"continual_task{t}", classes=group)
    tasks.append({"name": name, "data_dir": data, "classes": group})
  result = continual.run_continual(_CONFIG.value, _WORKDIR.value, tasks)
  print(continual.format_continual(result))


if __name__ == "__main__":
  cli.run(main)
