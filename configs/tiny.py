"""A training run of a few seconds, for tests and smoke checks: a 2-layer, 32-wide encoder on a tiny demo
dataset, `tiny_demo`, that the run generates into `<workdir>/data` (or `data.data_dir`) on first use.
Another `--config.data.name` needs `--config.data.generate=''` (a prepared dataset) or the same name there.

  python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny

`arg` picks the objective: `configs/tiny.py:early_interaction` trains stage 1 instead of the decomposition.
"""
from vldeformer_jax.training.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.objective = arg or "decompose"
  c.seed = 0
  c.model.hidden_size = 32
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.intermediate_size = 64
  c.model.max_position_embeddings = 64
  c.data.name = "tiny_demo"
  c.data.generate = "tiny_demo"  # the demo generator writes this dataset (and only this name) on first use
  c.data.generate_num_train = 64
  c.data.generate_num_test = 16
  c.data.max_text_len = 16
  c.data.max_regions = 8
  c.train.global_batch_size = 16
  c.train.num_steps = 12
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.eval_every = 0
  c.train.max_to_keep = 2
  c.loss.temperature = 0.05
  c.eval.batch_size = 16
  if c.objective == "early_interaction":
    c.early_interaction.max_predictions = 4
  return c
