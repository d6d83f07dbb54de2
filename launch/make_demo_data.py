r"""Writes the synthetic demo dataset and prepares it as a tfds dataset (skipped when already complete).

  python launch/make_demo_data.py --data_dir=/tmp/vldeformer_data            # -> vldeformer_demo
  python launch/make_demo_data.py --vinvl_dir=/tmp/demo_vinvl                 # only the VinVL-format files

Read it with `vldeformer_jax.data.prepare.load_split(data_dir, "vldeformer_demo", split)`; splits train,
test and test_1k. See vldeformer_jax/data/demo.py for what the images and captions contain.
"""
from absl import app
from absl import flags
from absl import logging

from vldeformer_jax import cli
from vldeformer_jax.data import demo_world as demo

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "tfds data dir to prepare the demo dataset into.")
flags.DEFINE_string("vinvl_dir", None, "Instead: only write the VinVL-format files into this new directory.")
flags.DEFINE_string("name", demo.DEMO_NAME, "Dataset name.")
flags.DEFINE_integer("seed", 0, "Generator seed (the dataset is a deterministic function of it).")
flags.DEFINE_integer("num_train", demo.DEFAULT_NUM_TRAIN, "Training images.")
flags.DEFINE_integer("num_test", 1000, "Test images (test_1k holds 1000 of them).")
flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if bool(FLAGS.data_dir) == bool(FLAGS.vinvl_dir):
    raise app.UsageError("give exactly one of --data_dir and --vinvl_dir")
  if FLAGS.vinvl_dir:
    print(demo.write_demo_vinvl(FLAGS.vinvl_dir, FLAGS.seed, FLAGS.num_train, FLAGS.num_test))
  else:
    print(demo.prepare_demo(FLAGS.data_dir, FLAGS.seed, num_train=FLAGS.num_train, num_test=FLAGS.num_test,
                            name=FLAGS.name, overwrite=FLAGS.overwrite))


if __name__ == "__main__":
  cli.run(main)
