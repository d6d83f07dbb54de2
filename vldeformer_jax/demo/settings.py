"""The demo's two training stages on the synthetic demo world (`data.demo_world`).

`stage2_config` (the decomposition) and `stage1_config` (the early-interaction model it decomposes) share
one small encoder: 4 layers, 128 wide (BERT-base shapes scaled down), 22 caption / 8 tag tokens, 6 regions,
on the demo data prepared into tfds in `runs/demo/data` on first use. `configs/demo.py` and
`configs/demo_stage1.py` return these, so `launch/train.py` runs either stage alone; `demo.job.run_demo`
runs both and the ablations, stage 1 on a generated pre-training corpus (`config.data.corpus_size`) and
every decomposition on the prepared downstream set.

Stage 1 trains a one-stream cross-encoder on `[CLS] caption [SEP] tags [SEP]` + regions (docs/method.md
§2.2, §4.5): each positive pair matched against one random other image and one random other caption of the
global batch (class-balanced binary cross entropy, VinVL's retrieval head), the same match logits also
ranked (each positive against its two negatives, softmax over the margins), masked-language modelling of
the positives' caption and tag tokens, and an ALBEF-style image-text contrastive term on the
single-modality [CLS] pooler outputs.

Why the extra terms: from random weights the joint [CLS] state is nearly input-independent, and whether a
caption matches an image is an interaction of the two, which the matching head cannot see until attention
has learned to compare them: ITM + MLM alone stayed at ln 2 for hundreds of steps. Contrasting the pooler
outputs teaches [CLS] to carry the content of each modality, and ranking the same logits (`rank_weight`)
starts ITM sooner and trains a better ranker in the same steps. VinVL needs none of this: it starts from
BERT weights. What each run of the demo measures is in its report (docs/demo/report.md), not here.
"""
from __future__ import annotations

import ml_collections

from vldeformer_jax.training.defaults import base_config


def stage2_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Stage 2: `arg` '' (plain in-batch InfoNCE) or 'negatives' (one composed hard negative per pair)."""
  c = base_config()
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
  c.data.generate = "vldeformer_demo"  # generated under this name on first use
  # The demo's lengths, from its generator: captions <= 21 wordpieces with [CLS]/[SEP], tags <= 8, regions <= 6.
  # Padding to the paper's 35/35/70 (docs/method.md §3.2) would make most of every sequence padding (and of every step's time).
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


def stage1_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Stage 1: `arg` '' (random batch negatives) or 'hard' (hardest of 4 candidates by match score)."""
  c = stage2_config()  # same model, data and lengths as stage 2
  c.objective = "early_interaction"
  c.init_export = ""
  c.model.hidden_dropout_prob = 0.0  # dropout adds about a sixth to a CPU step; 4 epochs do not overfit
  c.model.attention_probs_dropout_prob = 0.0
  c.train.global_batch_size = 16  # x 3 packed pairs (1 positive, 2 batch negatives) + MLM
  c.train.num_steps = 900
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.train.checkpoint_every = 250
  c.train.eval_every = -1  # decomposed retrieval says nothing about a cross-encoder; launch/demo.py evaluates
  c.loss.mlm_weight = 1.0
  c.early_interaction.negatives = "hard_match" if arg == "hard" else "random"
  c.early_interaction.num_negatives = 1
  c.early_interaction.hard_candidates = 4
  c.early_interaction.hard_fraction = 1.0
  c.early_interaction.composed_negatives = False
  c.early_interaction.rank_weight = 2.0  # see the module docstring; 0 gives the binary ITM alone
  c.early_interaction.itc_weight = 1.0  # see the module docstring; 0 gives plain ITM + MLM
  c.early_interaction.itc_temperature = 0.05
  c.early_interaction.itc_pooling = "cls"
  c.early_interaction.mlm_probability = 0.15
  c.early_interaction.max_predictions = 4  # 15% of <= 25 candidate tokens: 1-4 predictions
  c.early_interaction.mlm_pass = "separate"
  return c
