"""The decomposition objective (stage 2): each modality embedded on its own, then the gathered InfoNCE.

The one encoder embeds the caption branch and the image branch (and the composed hard negatives,
flattened [B*K, ...] then [B, K, D]) with dropout, then `losses.sharded_contrastive_loss` scores every
caption against every image of the global batch plus the composed negatives (docs/method.md §4.1, §5.3):
embeddings all-gathered, the gradient the exact full-batch one.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training import losses


def embed(model: VLDeformer, params, batch, prefix: str, rng, with_images: bool):
  ids, tt, mask = (batch[f"{prefix}input_ids"], batch[f"{prefix}token_type_ids"],
                   batch[f"{prefix}attention_mask"])
  feats = batch[f"{prefix}img_feats"] if with_images else None
  lead = ids.shape[:-1]
  if len(lead) == 2:  # composed negatives [B, K, ...] -> [B*K, ...] (rows stay on their device)
    ids, tt, mask = (x.reshape((-1,) + x.shape[2:]) for x in (ids, tt, mask))
    feats = None if feats is None else feats.reshape((-1,) + feats.shape[2:])
  emb = model.apply({"params": params}, ids, tt, mask, feats, deterministic=False,
                    method=VLDeformer.embed, rngs={"dropout": rng})
  return emb.reshape(lead + emb.shape[-1:])


def make_loss_fn(model: VLDeformer, config, mesh) -> Callable:
  """(trainable, batch, rng) -> (loss, metrics): the contrastive objective of spec 4.1 / 11.5-11.7."""
  lc = config.loss
  contrastive = losses.sharded_contrastive_loss(
      mesh, name=lc.name, beta=lc.beta, tau_plus=lc.tau_plus, margin=lc.margin, chunk_size=lc.chunk_size)

  def loss_fn(trainable, batch, rng):
    params = trainable["model"]
    r_text, r_image, r_neg_text, r_neg_image = jax.random.split(rng, 4)
    text = embed(model, params, batch, "text_", r_text, with_images=False)
    image = embed(model, params, batch, "image_", r_image, with_images=True)
    neg_text = neg_image = None
    if "neg_text_input_ids" in batch:
      neg_text = embed(model, params, batch, "neg_text_", r_neg_text, with_images=False)
      neg_image = embed(model, params, batch, "neg_image_", r_neg_image, with_images=True)
    log_t = trainable["log_temperature"]
    if not lc.learnable_temperature:
      log_t = jax.lax.stop_gradient(log_t)
    temperature = jnp.exp(log_t)
    loss, metrics = contrastive(text, image, neg_text, neg_image, (temperature, temperature))
    return loss, dict(metrics, loss=loss)

  return loss_fn
