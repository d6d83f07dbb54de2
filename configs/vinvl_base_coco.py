"""The paper's setting on COCO (docs/method.md §6.1): decompose VinVL-base with the global InfoNCE.

Global batch 1800 (6 x 300 in the reference), AdamW lr 7.5e-6, warm-up 200 steps then half cosine,
weight decay 0.05 (not on biases and LayerNorm scales), global-norm clip 1.0, bfloat16 compute with float32
parameters, 35 caption tokens / 35 tag tokens / 70 regions, temperature 0.005 in both directions,
dropout 0.1, seed 88, 200 epochs over the training images, and the paper's bi-modal hard negatives (one
composed caption and one composed image per pair, docs/method.md §5). Evaluation and checkpoints every 400
steps; the best checkpoint by i2t R@1 (what the reference logs).

On the demo world the hard negatives added 0.7 average-recall points on its 64-image comparison subset
and 0.2 on the full 1000-image test split (docs/demo/report.md); the paper credits them with keeping the
backbone's accuracy.

The user provides the VinVL weights converted to an export and the prepared dataset:

  python launch/convert_checkpoint.py --checkpoint=vinvl/coco_ir/base/checkpoint-1340000 --output=exports/vinvl_base
  python launch/prepare_data.py --captions_dir=DIR --features_dir=DIR --name=vinvl_coco --data_dir=data
  python launch/train.py --config=configs/vinvl_base_coco.py --workdir=runs/coco \
      --config.init_export=exports/vinvl_base --config.data.data_dir=data

`arg` (optional, comma-separated): `no_negatives` turns the hard negatives off (plain in-batch InfoNCE, what
the authors' released training script runs); other items set the init export and the data_dir, in order.
"""
from vldeformer_jax.training.defaults import base_config, paper_setting


def get_config(arg=None):
  c = paper_setting(base_config(), arg)
  c.data.name = "vinvl_coco"
  c.data.eval_split = "test_1k"
  c.eval.protocol = "coco1k"
  return c
