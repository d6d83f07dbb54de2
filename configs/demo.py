"""Stage 2 on the demo dataset: decompose a small VL transformer with the contrastive objective.

A 4-layer, 128-wide encoder (BERT-base shapes scaled down) on the synthetic demo data of
`vldeformer_jax.data.demo` (VinVL file layout, prepared into tfds in `runs/demo/data` on first use).
Minutes on 2 CPU cores. From random weights:

  python launch/train.py --config=configs/demo.py --workdir=runs/demo/decompose_random

From a stage-1 export (the paper's setting; `launch/demo.py` does this), with bi-modal hard negatives:

  python launch/train.py --config=configs/demo.py:negatives --workdir=runs/demo/decompose \
      --config.init_export=runs/demo/stage1/export

`arg`: '' (plain in-batch InfoNCE) or 'negatives' (one composed hard negative per pair, spec 11.6).
"""
from configs import common


def get_config(arg=None):
  c = common.get_config()
  c.objective = "decompose"
  c.seed = 0
  c.model.hidden_size = 128
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4
  c.model.intermediate_size = 512
  c.model.max_position_embeddings = 64
  c.model.hidden_dropout_prob = 0.1
  c.model.attention_probs_dropout_prob = 0.1
  c.data.data_dir = "runs/demo/data"
  c.data.name = "vldeformer_demo"
  c.data.generate = "demo"
  # The demo's lengths, from its generator: captions <= 21 wordpieces with [CLS]/[SEP], tags <= 8, regions <= 6.
  # Padding to spec 1.3's 35/35/70 would make most of every sequence padding (and of every step's time).
  c.data.max_text_len = 22
  c.data.max_tag_len = 8
  c.data.max_regions = 6
  c.data.negatives.num_per_pair = 1 if arg == "negatives" else 0
  c.train.global_batch_size = 64
  c.train.num_steps = 600
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.05
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.eval_every = 200
  c.loss.temperature = 0.05
  c.eval.batch_size = 128
  c.eval.best_metric = "rsum"
  return c
