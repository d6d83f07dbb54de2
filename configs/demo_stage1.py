"""Stage 1 on the demo dataset: train the VL transformer with early interaction (ITM + rank + MLM + ITC).

  python launch/train.py --config=configs/demo_stage1.py --workdir=runs/demo/stage1

`arg`: '' (random batch negatives) or 'hard' (the hardest of 4 random candidates by the current model's
match score). The settings and what they measured: `vldeformer_jax.demo.settings`.
"""
from vldeformer_jax.demo import settings


def get_config(arg=None):
  return settings.stage1_config(arg)
