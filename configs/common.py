"""The base training config: every field with its default (`vldeformer_jax.training.defaults`).

  python launch/train.py --config=configs/common.py --workdir=runs/x --config.data.name=... --config.data.data_dir=...
"""
from vldeformer_jax.training.defaults import base_config


def get_config(arg=None):
  del arg
  return base_config()
