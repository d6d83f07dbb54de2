"""The paper's setting on Flickr30K (docs/method.md §6.1), evaluated on the Flickr30K 1K test split.

The reference README lists only the COCO command, so the Flickr run keeps the COCO hyper-parameters
(docs/method.md §8: the exact Flickr settings are not published). The authors' released Flickr checkpoint
was trained on COCO + Flickr30K together (81 steps per epoch at batch 1800, about 146K images):
`:two_datasets` does that, a mixture of both prepared training splits weighted by their sizes (the plain
concatenation); evaluation stays on Flickr30K.

  python launch/train.py --config=configs/vinvl_base_flickr.py --workdir=runs/flickr \\
      --config.init_export=exports/vinvl_base --config.data.data_dir=data
  python launch/train.py --config=configs/vinvl_base_flickr.py:two_datasets --workdir=runs/flickr_coco ...

`arg`: comma-separated; `two_datasets` (train on COCO + Flickr30K), `no_negatives` (bi-modal hard negatives
off), and optionally the init export and data_dir paths, in that order.
"""
from vldeformer_jax.training.defaults import base_config, paper_setting

# Training images of the two prepared datasets (Karpathy splits): the mixture weights of `two_datasets`.
COCO_TRAIN_IMAGES, FLICKR_TRAIN_IMAGES = 113_287, 29_000


def get_config(arg=None):
  items = [a for a in (arg or "").split(",") if a]
  c = paper_setting(base_config(), ",".join(a for a in items if a != "two_datasets"))
  c.data.name = "vinvl_flickr"
  c.data.eval_split = "test"
  c.eval.protocol = "flickr1k"
  if "two_datasets" in items:
    c.data.mixture = f"vinvl_coco:{COCO_TRAIN_IMAGES},vinvl_flickr:{FLICKR_TRAIN_IMAGES}"
  return c
