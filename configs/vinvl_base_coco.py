"""The paper's setting on COCO (spec 5.1 / 11.8): decompose VinVL-base with the global InfoNCE.

Global batch 1800 (6 x 300 in the reference), AdamW lr 7.5e-6, warm-up 200 steps then half cosine,
weight decay 0.05 (not on biases and LayerNorm scales), global-norm clip 1.0, bfloat16 compute with float32
parameters, 35 caption tokens / 35 tag tokens / 70 regions, temperature 0.005 in both directions,
dropout 0.1, seed 88, 200 epochs over the training images. Evaluation and checkpoints every 400 steps;
the best checkpoint by i2t R@1 (what the reference logs).

The user provides the VinVL weights converted to an export and the prepared dataset:

  python launch/convert_checkpoint.py --checkpoint=vinvl/coco_ir/base/checkpoint-1340000 --output=exports/vinvl_base
  python launch/prepare_data.py --captions_dir=DIR --features_dir=DIR --name=vinvl_coco --data_dir=data
  python launch/train.py --config=configs/vinvl_base_coco.py --workdir=runs/coco \
      --config.init_export=exports/vinvl_base --config.data.data_dir=data

`arg` (optional): '<export>,<data_dir>' sets both paths at once.
"""
from configs import common


def get_config(arg=None):
  c = common.get_config()
  c.objective = "decompose"
  c.seed = 88
  c.init_export = ""  # required: a converted VinVL export
  c.model.dtype = "bfloat16"
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.model.pooling = "mean"
  c.data.data_dir = ""  # required: where launch/prepare_data.py wrote the dataset
  c.data.name = "vinvl_coco"
  c.data.train_split = "train"
  c.data.eval_split = "test_1k"
  c.data.max_text_len = 35
  c.data.max_regions = 70
  c.data.num_captions_per_image = 5
  c.data.worker_count = 4
  c.train.global_batch_size = 1800
  c.train.num_epochs = 200
  c.train.num_steps = 0
  c.train.learning_rate = 7.5e-6
  c.train.warmup_steps = 200
  c.train.weight_decay = 0.05
  c.train.max_grad_norm = 1.0
  c.train.log_every = 20
  c.train.checkpoint_every = 400
  c.train.eval_every = 400
  c.train.max_to_keep = 3
  c.loss.name = "infonce"
  c.loss.temperature = 0.005
  c.eval.protocol = "coco1k"
  c.eval.batch_size = 400
  c.eval.best_metric = "i2t_R@1"
  if arg:
    export, _, data_dir = arg.partition(",")
    c.init_export, c.data.data_dir = export, data_dir
  return c
