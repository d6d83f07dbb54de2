"""Stage 2 on the demo dataset: decompose a small VL transformer with the contrastive objective.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo/decompose_random
  python launch/train.py --config=configs/demo.py:negatives --workdir=runs/demo/decompose \
      --config.init_export=runs/demo/stage1/export

`arg`: '' (plain in-batch InfoNCE) or 'negatives' (one composed hard negative per pair, docs/method.md §5).
The settings and what they measured: `vldeformer_jax.demo.settings`.
"""
from vldeformer_jax.demo import settings


def get_config(arg=None):
  return settings.stage2_config(arg)
