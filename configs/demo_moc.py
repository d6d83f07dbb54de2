"""Stage 1 on the demo with masked object classification (Unicoder-VL; docs/method.md §4.8) added.

  python launch/train.py --config=configs/demo_moc.py --workdir=runs/demo/stage1_moc \
      --config.data.data_dir=runs/demo/data
  python launch/moc_eval.py --export=runs/demo/stage1_moc/export --data_dir=runs/demo/data \
      --output=runs/demo/stage1_moc/moc_eval.json

The demo's stage-1 settings (`vldeformer_jax.demo.settings.stage1_config`) on the demo job's pre-training
corpus (11,200 generated images, 700 steps of 16), plus MOC: ~15% of each positive's real regions zeroed
(and their classes' tag tokens masked), the class predicted at the region's output through the MLM head,
weight `arg` (default 1.0). The data_dir must hold a demo dataset prepared with per-region classes
(launch/make_demo_data.py with this code); its test split is what launch/moc_eval.py measures on.
"""
from vldeformer_jax.demo import settings


def get_config(arg=None):
  c = settings.stage1_config()
  c.data.corpus_size = 11_200  # as demo.job.DemoPlan: stage 1 reads a generated corpus of the same world
  c.data.corpus_seed = 1
  c.data.generate_num_train = 1000  # the downstream set of the demo job (its test split is measured on)
  c.data.generate_num_test = 1000
  c.train.num_steps = 700
  c.early_interaction.moc_weight = float(arg) if arg else 1.0
  c.early_interaction.moc_probability = 0.15
  c.early_interaction.moc_max_predictions = 6  # = data.max_regions: no masked region goes unscored
  c.early_interaction.moc_mask_tags = True
  return c
