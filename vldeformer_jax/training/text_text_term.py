"""MURAL's text-text task (docs/method.md §4.9): an optional term beside the decomposition loss.

The gathered InfoNCE of training/losses.py over caption-translation pairs instead of caption-image pairs;
decompose.py adds it with the bitext weight (data/bitext.py supplies the pairs).
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh

from vldeformer_jax.training.losses import sharded_contrastive_loss

Array = jax.Array


def sharded_text_text_loss(mesh: Mesh, chunk_size: int = 0) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """MURAL's text-text task (docs/method.md §4.9): `fn(a_emb, b_emb, temperature)` -> (loss, metrics), a
  symmetric in-batch InfoNCE over caption-translation pairs (row r of `a_emb` and `b_emb`, [Bt, D]
  batch-sharded), every side gathered over the devices as the image-text loss is: `contrastive_loss`
  with captions in place of images. Metrics are prefixed `tt_` (`tt_loss`, `tt_a2b_accuracy`, ...)."""
  contrastive = sharded_contrastive_loss(mesh, name="infonce", chunk_size=chunk_size)
  names = {"loss": "tt_loss", "t2i_loss": "tt_a2b_loss", "i2t_loss": "tt_b2a_loss",
           "t2i_accuracy": "tt_a2b_accuracy", "i2t_accuracy": "tt_b2a_accuracy", "pos_sim": "tt_pos_sim",
           "neg_sim": "tt_neg_sim"}

  def fn(a_emb, b_emb, temperature):
    loss, metrics = contrastive(a_emb, b_emb, None, None, temperature)
    return loss, {names[k]: v for k, v in metrics.items() if k in names}

  return fn
