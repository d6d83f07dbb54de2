"""Late interaction (docs/method.md §7.5): an optional term beside the decomposition loss.

A max-violation hinge on TERAN's MrSw score (retrieval/late_interaction.py) between each caption's word
states and each image's token states, over the gathered batch; decompose.py adds it with weight
`loss.late_interaction_weight`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from vldeformer_jax.parallel import BATCH_AXES
from vldeformer_jax.retrieval import late_interaction
from vldeformer_jax.training.losses import AxisName

Array = jax.Array


def late_interaction_loss(word_states: Array, word_mask: Array, token_states: Array, token_mask: Array, *,
                          margin: float = 0.2, normalize: bool = True,
                          axis_name: AxisName = None) -> tuple[Array, dict[str, Array]]:
  """Max-violation hinge (VSE++, as TERAN trains) on TERAN's MrSw score over the gathered batch.

  word_states [b, W, H] / word_mask [b, W]: each local caption's word states and real words; token_states
  [b, T, H] / token_mask [b, T]: each local image's tags + regions (`late_interaction.content_mask`). Row r
  of both is a positive pair. Every local caption is scored against every image of the global batch and
  every local image against every global caption (`lax.all_gather`, differentiable as in
  `contrastive_loss`, so the sharded loss and gradient are the single-device ones); per query
  relu(margin - S(pos) + max over negatives S), mean over queries per direction, summed. `normalize`: the
  length-normalised score (in [-1, 1], so `margin` means what it means for cosines). Composed negatives
  are not scored here. Memory: b x G x W x T similarities per device."""
  def gather(x):
    return x if axis_name is None else lax.all_gather(x, axis_name, axis=0, tiled=True)

  def mean(x):
    x = jnp.mean(x)
    return x if axis_name is None else lax.pmean(x, axis_name)

  b = word_states.shape[0]
  t2i = late_interaction.mrsw_scores(word_states, word_mask, gather(token_states), gather(token_mask),
                                     normalize=normalize)  # [b, G]: local captions vs all images
  i2t = late_interaction.mrsw_scores(gather(word_states), gather(word_mask), token_states, token_mask,
                                     normalize=normalize).T  # [b, G]: local images vs all captions
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * b
  labels = offset + jnp.arange(b)

  def hinge(s):
    pos = jnp.take_along_axis(s, labels[:, None], axis=1)[:, 0]
    neg = jnp.max(jnp.where(jnp.arange(s.shape[1])[None, :] == labels[:, None], -jnp.inf, s), axis=1)
    return jax.nn.relu(margin - pos + neg), pos

  t2i_rows, pos = hinge(t2i)
  i2t_rows, _ = hinge(i2t)
  loss = mean(t2i_rows) + mean(i2t_rows)
  return loss, {"late_loss": loss, "late_pos_score": mean(lax.stop_gradient(pos))}


def sharded_late_interaction_loss(mesh: Mesh, **loss_kwargs) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`late_interaction_loss` over globally batch-sharded arrays (split over `BATCH_AXES`), for the jitted
  train step: `fn(word_states, word_mask, token_states, token_mask) -> (loss, metrics)`, replicated."""
  batch = P(BATCH_AXES)

  def fn(word_states, word_mask, token_states, token_mask):
    def local(w, wm, t, tm):
      return late_interaction_loss(w, wm, t, tm, axis_name=BATCH_AXES, **loss_kwargs)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch,) * 4, out_specs=P(), check_vma=True)(
        word_states, word_mask, token_states, token_mask)

  return fn
