"""The paper's setting on Flickr30K: as `vinvl_base_coco.py` (docs/method.md §6.1), on the Flickr30K dataset.

The reference README lists only the COCO command, so the Flickr run keeps the COCO hyper-parameters
(docs/method.md §8: the exact Flickr settings are not published); evaluation is the Flickr30K 1K test split.

  python launch/train.py --config=configs/vinvl_base_flickr.py --workdir=runs/flickr \
      --config.init_export=exports/vinvl_base --config.data.data_dir=data
"""
from vldeformer_jax.training.defaults import base_config, paper_setting


def get_config(arg=None):
  c = paper_setting(base_config(), arg)
  c.data.name = "vinvl_flickr"
  c.data.eval_split = "test"
  c.eval.protocol = "flickr1k"
  return c
