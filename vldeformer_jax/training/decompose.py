"""The decomposition objective (stage 2): each modality embedded on its own, then the contrastive loss.

The one encoder embeds the caption branch and the image branch (and the composed hard negatives,
flattened [B*K, ...] then [B, K, D]) with dropout, then the loss scores every caption against every image
of the global batch plus the composed negatives (docs/method.md §4.1, §5.3): `losses.sharded_contrastive_loss`
(embeddings all-gathered) or, for `loss.name = sigmoid`, `losses.sharded_sigmoid_loss` (caption blocks
rotating around the devices); either way the gradient is the exact full-batch one.

Dropout is keyed by row: row r of a branch draws its masks from `fold_in(branch key, r)` (composed
negative k of row r from `fold_in(branch key, r * K + k)`), the encoder running on each row alone
(`jax.vmap`). A row's embedding therefore depends on its own inputs, the step's key and its global row
index only: not on the device count, and not on which other rows are embedded with it. That is what lets
gradient caching (`train.micro_batch_size`, training/grad_cache.py) embed the batch in micro-batches,
twice, and still get the single-pass step's loss and gradient.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vldeformer_jax import parallel
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training import grad_cache
from vldeformer_jax.training import losses

# (batch key prefix, embedding name, has regions), in the order of the step key's split.
BRANCHES = (("text_", "text", False), ("image_", "image", True), ("neg_text_", "neg_text", False),
            ("neg_image_", "neg_image", True))


def branch_keys(rng) -> dict[str, jax.Array]:
  """The dropout key of each branch for the step key `rng`."""
  return {name: key for (_, name, _), key in zip(BRANCHES, jax.random.split(rng, len(BRANCHES)))}


def embed_rows(model: VLDeformer, params, ids, tt, mask, feats, keys):
  """`VLDeformer.embed` of each row on its own with its own dropout key: [N, ...] inputs, keys [N] -> [N, D]."""
  def one(ids, tt, mask, feats, key):
    feats = None if feats is None else feats[None]
    return model.apply({"params": params}, ids[None], tt[None], mask[None], feats, deterministic=False,
                       method=VLDeformer.embed, rngs={"dropout": key})[0]
  return jax.vmap(one)(ids, tt, mask, feats, keys)


def embed(model: VLDeformer, params, batch, prefix: str, rng, with_images: bool, rows=None):
  """The embeddings of one branch: [B, D], or [B, K, D] for composed negatives ([B, K, ...] inputs).

  `rows`: the global indices of the batch's rows (default 0..B-1); row r's dropout key is
  `fold_in(rng, r)` ([B, K]: `fold_in(rng, r * K + k)`).
  """
  ids, tt, mask = (batch[f"{prefix}input_ids"], batch[f"{prefix}token_type_ids"],
                   batch[f"{prefix}attention_mask"])
  feats = batch[f"{prefix}img_feats"] if with_images else None
  lead = ids.shape[:-1]
  rows = jnp.arange(lead[0], dtype=jnp.int32) if rows is None else rows
  if len(lead) == 2:  # composed negatives [B, K, ...] -> [B*K, ...] (rows stay on their device)
    k = lead[1]
    rows = (rows[:, None] * k + jnp.arange(k, dtype=jnp.int32)[None, :]).reshape(-1)
    ids, tt, mask = (x.reshape((-1,) + x.shape[2:]) for x in (ids, tt, mask))
    feats = None if feats is None else feats.reshape((-1,) + feats.shape[2:])
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
  emb = embed_rows(model, params, ids, tt, mask, feats, keys)
  return emb.reshape(lead + emb.shape[-1:])


def embed_all(model: VLDeformer, params, batch, keys: dict[str, jax.Array], rows=None) -> dict[str, jax.Array]:
  """Every branch the batch carries: {"text", "image"[, "neg_text", "neg_image"]} -> embeddings."""
  out = {}
  for prefix, name, with_images in BRANCHES:
    if f"{prefix}input_ids" in batch:
      out[name] = embed(model, params, batch, prefix, keys[name], with_images, rows)
  return out


def make_objective(config, mesh) -> Callable:
  """`(embeddings, loss_params) -> (loss, metrics)`: the configured loss over the global pool.

  `loss_params` are the trainable entries beside the model: `log_temperature` (its gradient stopped unless
  `loss.learnable_temperature`) and, for the sigmoid loss, `logit_bias`.
  """
  lc = config.loss
  if lc.name == "sigmoid":
    sigmoid = losses.sharded_sigmoid_loss(mesh)
  else:
    contrastive = losses.sharded_contrastive_loss(
        mesh, name=lc.name, beta=lc.beta, tau_plus=lc.tau_plus, margin=lc.margin, chunk_size=lc.chunk_size)

  def objective(embeddings, loss_params):
    log_t = loss_params["log_temperature"]
    if not lc.learnable_temperature:
      log_t = jax.lax.stop_gradient(log_t)
    temperature = jnp.exp(log_t)
    args = (embeddings["text"], embeddings["image"], embeddings.get("neg_text"), embeddings.get("neg_image"))
    if lc.name == "sigmoid":
      loss, metrics = sigmoid(*args, temperature, loss_params["logit_bias"])
    else:
      loss, metrics = contrastive(*args, (temperature, temperature))
    return loss, dict(metrics, loss=loss)

  return objective


def _split(trainable):
  return trainable["model"], {k: v for k, v in trainable.items() if k != "model"}


def make_loss_fn(model: VLDeformer, config, mesh) -> Callable:
  """(trainable, batch, rng) -> (loss, metrics): the contrastive objective of docs/method.md §4, one pass."""
  objective = make_objective(config, mesh)

  def loss_fn(trainable, batch, rng):
    params, loss_params = _split(trainable)
    return objective(embed_all(model, params, batch, branch_keys(rng)), loss_params)

  return loss_fn


def make_cached_value_and_grad(model: VLDeformer, config, mesh, micro_batch_size: int) -> Callable:
  """(trainable, batch, rng) -> ((loss, metrics), grads): `jax.value_and_grad(make_loss_fn(...))` computed
  by gradient caching (training/grad_cache.py), `micro_batch_size` rows per device embedded at a time.
  Equal to the one-pass step up to float32 rounding: same loss, same dropout masks, same gradient."""
  objective = make_objective(config, mesh)

  def value_and_grad(trainable, batch, rng):
    params, loss_params = _split(trainable)
    keys = branch_keys(rng)
    shardings = parallel.param_shardings(params, mesh)

    def embed_fn(p, inputs, rows):
      return embed_all(model, p, inputs, keys, rows)

    fn = grad_cache.value_and_grad(embed_fn, objective, micro_batch_size, mesh, shardings)
    (loss, metrics), (d_params, d_loss_params) = fn(params, loss_params, batch)
    return (loss, metrics), {"model": d_params, **d_loss_params}

  return value_and_grad
