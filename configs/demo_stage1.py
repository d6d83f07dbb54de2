"""Stage 1 on the demo dataset: train the VL transformer with early interaction (ITM + MLM + ITC).

The model that `configs/demo.py` (stage 2) then decomposes: the same sizes (4 layers, 128 wide, 24 caption
/ 24 tag tokens, 10 regions), trained as a one-stream cross-encoder on `[CLS] caption [SEP] tags [SEP]` +
regions (spec 11.4a). Each positive pair is matched against one random other image and one random other
caption of the global batch (class-balanced binary cross entropy, VinVL's retrieval head), plus
masked-language modelling of the positives' caption and tag tokens, plus an ALBEF-style image-text
contrastive term on the single-modality [CLS] pooler outputs. `launch/demo.py` runs it as the first stage
of the whole demo:

  python launch/train.py --config=configs/demo_stage1.py --workdir=runs/demo/stage1

Why the contrastive term (issue 6): from random weights the joint [CLS] state is nearly input-independent,
and whether a caption matches an image is an interaction of the two, which the matching head cannot see
until attention has learned to compare them. ITM + MLM alone sat at ln 2 for 400 steps (lr 1e-3 or 2e-3;
with tied query/key initialisation too). Contrasting the pooler outputs first teaches [CLS] to carry the
content of each modality; ITM then leaves ln 2 after ~200 steps and keeps improving (in one run: ITM loss
0.52 at step 400; the cross-encoder's average recall on the first 64 test images 73.6 at step 500).
VinVL does not need this: it starts from BERT weights. The composed bi-modal hard negatives stay off here.

`arg`: '' (random batch negatives) or 'hard' (the hardest of 4 random candidates by the current model's
match score, spec: vldeformer_jax/early_interaction.py).
"""
from configs import demo


def get_config(arg=None):
  c = demo.get_config()  # same model, data and lengths as stage 2
  c.objective = "early_interaction"
  c.init_export = ""
  c.model.hidden_dropout_prob = 0.0  # threefry dropout masks double a CPU step; 4 epochs do not overfit
  c.model.attention_probs_dropout_prob = 0.0
  c.train.global_batch_size = 24  # x 3 packed pairs (1 positive, 2 batch negatives) + MLM
  c.train.num_steps = 1000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.train.checkpoint_every = 250
  c.train.eval_every = -1  # decomposed retrieval says nothing about a cross-encoder; launch/demo.py evaluates
  c.loss.mlm_weight = 1.0
  c.early_interaction.negatives = "hard_match" if arg == "hard" else "random"
  c.early_interaction.num_negatives = 1
  c.early_interaction.hard_candidates = 4
  c.early_interaction.composed_negatives = False
  c.early_interaction.itc_weight = 1.0  # see the module docstring; 0 gives plain ITM + MLM
  c.early_interaction.itc_temperature = 0.05
  c.early_interaction.itc_pooling = "cls"
  c.early_interaction.mlm_probability = 0.15
  c.early_interaction.max_predictions = 8
  return c
