r"""Writes the synthetic demo dataset and prepares it as a tfds dataset (skipped when already complete).

  python launch/make_demo_data.py --data_dir=/tmp/vldeformer_data            # -> vldeformer_demo
  python launch/make_demo_data.py --vinvl_dir=/tmp/demo_vinvl                 # only the VinVL-format files
  python launch/make_demo_data.py --data_dir=/tmp/vldeformer_data --variant=object   # -> vldeformer_demo_objects
  python launch/make_demo_data.py --data_dir=/tmp/vldeformer_data --num_train=1000 --bitext
      # also the Spanish bitext of the training captions and vldeformer_demo_es (data/bitext.py)
  python launch/make_demo_data.py --data_dir=/tmp/vldeformer_data --num_train=1000 --noisy_captions=0.2
      # -> vldeformer_demo_noisy20: 20% of the training captions are other images' (data/noisy_pairs.py)

Read it with `vldeformer_jax.data.prepare.load_split(data_dir, "vldeformer_demo", split)`; splits train,
test and test_1k. See vldeformer_jax/data/demo.py for what the images and captions contain.
"""
from absl import app
from absl import flags
from absl import logging

from vldeformer_jax import cli
from vldeformer_jax.data import bitext
from vldeformer_jax.data import demo_world as demo
from vldeformer_jax.data import object_demo

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "tfds data dir to prepare the demo dataset into.")
flags.DEFINE_string("vinvl_dir", None, "Instead: only write the VinVL-format files into this new directory.")
flags.DEFINE_enum("variant", "scene", ["scene", "object"], "scene: 2-5 objects and relations per image; object: "
                  "one object per image, captions about its colour and size (same world as seed's scene demo).")
flags.DEFINE_string("name", None, f"Dataset name (default {demo.DEMO_NAME}, or {object_demo.OBJECT_DEMO_NAME} for "
                    "--variant=object).")
flags.DEFINE_integer("seed", 0, "Generator seed (the dataset is a deterministic function of it).")
flags.DEFINE_integer("num_train", None, f"Training images (default {demo.DEFAULT_NUM_TRAIN}; object: 600).")
flags.DEFINE_integer("num_test", None, "Test images (default 1000, test_1k holds 1000 of them; object: 200).")
flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name.")
flags.DEFINE_bool("bitext", False, "Scene variant: also write the training captions' Spanish translations (a "
                  "bitext file) and <name>_es, the test split with Spanish captions (data/bitext.py).")
flags.DEFINE_float("noisy_captions", 0.0, "Scene variant: this fraction of the training captions replaced by "
                   "other images' captions (test split clean); default name <name>_noisy<percent>.")
flags.DEFINE_integer("noise_seed", 0, "Seed of the replaced captions' choice (--noisy_captions).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if bool(FLAGS.data_dir) == bool(FLAGS.vinvl_dir):
    raise app.UsageError("give exactly one of --data_dir and --vinvl_dir")
  obj = FLAGS.variant == "object"
  num_train = FLAGS.num_train or (600 if obj else demo.DEFAULT_NUM_TRAIN)
  num_test = FLAGS.num_test or (200 if obj else 1000)
  name = FLAGS.name or (object_demo.OBJECT_DEMO_NAME if obj else demo.DEMO_NAME)
  if obj and (FLAGS.noisy_captions or FLAGS.bitext):
    raise app.UsageError("--noisy_captions and --bitext apply to --variant=scene only")
  if FLAGS.vinvl_dir and (FLAGS.bitext or FLAGS.overwrite):
    raise app.UsageError("--bitext and --overwrite apply to --data_dir (a prepared dataset) only")
  noisy = {} if obj or not FLAGS.noisy_captions else {"noisy_captions": FLAGS.noisy_captions,
                                                       "noise_seed": FLAGS.noise_seed}
  if noisy and not FLAGS.name:
    name = f"{name}_noisy{round(100 * FLAGS.noisy_captions)}"
  if FLAGS.vinvl_dir:
    write = object_demo.write_object_demo_vinvl if obj else demo.write_demo_vinvl
    print(write(FLAGS.vinvl_dir, FLAGS.seed, num_train, num_test, **noisy))
  else:
    prep = object_demo.prepare_object_demo if obj else demo.prepare_demo
    print(prep(FLAGS.data_dir, FLAGS.seed, num_train=num_train, num_test=num_test, name=name,
               overwrite=FLAGS.overwrite, **noisy))
    if FLAGS.bitext and not obj:
      print(bitext.prepare_bitext_demo(FLAGS.data_dir, name, overwrite=FLAGS.overwrite))


if __name__ == "__main__":
  cli.run(main)
