"""The decomposition objective (stage 2): each modality embedded on its own, then the contrastive loss.

The one encoder embeds the caption branch and the image branch (and the composed hard negatives,
flattened [B*K, ...] then [B, K, D]) with dropout, then the loss scores every caption against every image
of the global batch plus the composed negatives (docs/method.md §4.1, §5.3): `losses.sharded_contrastive_loss`
(embeddings all-gathered) or, for `loss.name = sigmoid`, `sigmoid.sharded_sigmoid_loss` (caption blocks
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
from vldeformer_jax.retrieval import late_interaction
from vldeformer_jax.training import grad_cache
from vldeformer_jax.training import losses
from vldeformer_jax.training import topic
from vldeformer_jax.training.late_interaction_term import sharded_late_interaction_loss
from vldeformer_jax.training.sigmoid_loss import sharded_sigmoid_loss
from vldeformer_jax.training.text_text_term import sharded_text_text_loss

# (batch key prefix, embedding name, has regions), in the order of the step key's split.
BRANCHES = (("text_", "text", False), ("image_", "image", True), ("neg_text_", "neg_text", False),
            ("neg_image_", "neg_image", True))


BITEXT_KEY = 4  # the bitext's dropout key: fold_in(step key, 4), apart from the branches' split
TOPIC_KEY = 5  # the topic words' dropout key (docs/method.md §4.10)


def branch_keys(rng) -> dict[str, jax.Array]:
  """The dropout key of each branch for the step key `rng`."""
  return {name: key for (_, name, _), key in zip(BRANCHES, jax.random.split(rng, len(BRANCHES)))}


def embed_rows(model: VLDeformer, params, ids, tt, mask, feats, keys, with_states: bool = False):
  """`VLDeformer.embed` of each row on its own with its own dropout key: [N, ...] inputs, keys [N] -> [N, D];
  `with_states`: `VLDeformer.embed_with_states`, ([N, D], the sequence output [N, L, H]) of the same pass."""
  method = VLDeformer.embed_with_states if with_states else VLDeformer.embed

  def one(ids, tt, mask, feats, key):
    feats = None if feats is None else feats[None]
    out = model.apply({"params": params}, ids[None], tt[None], mask[None], feats, deterministic=False,
                      method=method, rngs={"dropout": key})
    return jax.tree.map(lambda x: x[0], out)
  return jax.vmap(one)(ids, tt, mask, feats, keys)


def embed(model: VLDeformer, params, batch, prefix: str, rng, with_images: bool, rows=None,
          with_states: bool = False):
  """The embeddings of one branch: [B, D], or [B, K, D] for composed negatives ([B, K, ...] inputs).

  `rows`: the global indices of the batch's rows (default 0..B-1); row r's dropout key is
  `fold_in(rng, r)` ([B, K]: `fold_in(rng, r * K + k)`). `with_states` ([B, ...] inputs only): also the
  sequence output [B, L, H] of the same pass, for the late-interaction term.
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
  if with_states:
    return embed_rows(model, params, ids, tt, mask, feats, keys, with_states=True)
  emb = embed_rows(model, params, ids, tt, mask, feats, keys)
  return emb.reshape(lead + emb.shape[-1:])


def embed_all(model: VLDeformer, params, batch, keys: dict[str, jax.Array], rows=None,
              with_states: bool = False) -> dict[str, jax.Array]:
  """Every branch the batch carries: {"text", "image"[, "neg_text", "neg_image"]} -> embeddings.
  `with_states`: also `text_states` / `image_states` (the sequence outputs) and `text_token_mask` /
  `image_token_mask` (`late_interaction.content_mask`: words, tags and regions; no CLS, SEP, padding)."""
  out = {}
  for prefix, name, with_images in BRANCHES:
    if f"{prefix}input_ids" not in batch:
      continue
    if with_states and name in ("text", "image"):
      out[name], out[f"{name}_states"] = embed(model, params, batch, prefix, keys[name], with_images, rows,
                                               with_states=True)
      out[f"{name}_token_mask"] = late_interaction.content_mask(batch[f"{prefix}attention_mask"],
                                                                batch[f"{prefix}input_ids"].shape[-1])
    else:
      out[name] = embed(model, params, batch, prefix, keys[name], with_images, rows)
  return out


def late_weight(config) -> float:
  """`loss.late_interaction_weight` (0 when a config predates it)."""
  return float(config.loss.get("late_interaction_weight", 0.0))


def text_text_weight(config) -> float:
  """`loss.text_text_weight` (0 when a config predates it)."""
  return float(config.loss.get("text_text_weight", 0.0))


def embed_bitext(model: VLDeformer, params, batch, rng) -> dict[str, jax.Array]:
  """Both sides of the bitext pairs (`bitext_a_*`, `bitext_b_*`, [Bt, L]) through the text branch in one
  pass over the 2 Bt rows (row r of side b keyed `fold_in(rng, Bt + r)`): {"bitext_a", "bitext_b"} [Bt, D]."""
  n = batch["bitext_a_input_ids"].shape[0]
  both = {f"bitext_{k}": jnp.concatenate([batch[f"bitext_a_{k}"], batch[f"bitext_b_{k}"]], axis=0)
          for k in ("input_ids", "token_type_ids", "attention_mask")}
  emb = embed(model, params, both, "bitext_", rng, False)
  return {"bitext_a": emb[:n], "bitext_b": emb[n:]}


def embed_topic_words(model: VLDeformer, params, batch, rng) -> dict[str, jax.Array]:
  """The topic words through the text branch ([V, D], row v keyed `fold_in(rng, v)`) and the batch's
  targets: {"topic_words", "topic_target"} (docs/method.md §4.10)."""
  return {"topic_words": embed(model, params, topic.word_inputs(batch), "topic_word_", rng, False),
          "topic_target": batch["image_topic_target"]}


def make_objective(config, mesh) -> Callable:
  """`(embeddings, loss_params) -> (loss, metrics)`: the configured loss over the global pool.

  `loss_params` are the trainable entries beside the model: `log_temperature` (its gradient stopped unless
  `loss.learnable_temperature`) and, for the sigmoid loss, `logit_bias`.
  """
  lc = config.loss
  if lc.name == "sigmoid":
    sigmoid = sharded_sigmoid_loss(mesh)
  else:
    contrastive = losses.sharded_contrastive_loss(
        mesh, name=lc.name, beta=lc.beta, tau_plus=lc.tau_plus, margin=lc.margin, chunk_size=lc.chunk_size)
  late_w = late_weight(config)
  late = sharded_late_interaction_loss(mesh, margin=lc.margin) if late_w > 0 else None
  tt_w = text_text_weight(config)
  text_text = sharded_text_text_loss(mesh, chunk_size=lc.chunk_size) if tt_w > 0 else None
  topic_w = topic.topic_weight(config)

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
    if late is not None:  # docs/method.md §7.5
      late_loss, late_metrics = late(embeddings["text_states"], embeddings["text_token_mask"],
                                     embeddings["image_states"], embeddings["image_token_mask"])
      metrics = dict(metrics, **late_metrics)
      loss = loss + late_w * late_loss
    if text_text is not None:  # docs/method.md §4.9: same temperature as the image-text loss
      tt_loss, tt_metrics = text_text(embeddings["bitext_a"], embeddings["bitext_b"], temperature)
      metrics = dict(metrics, **tt_metrics)
      loss = loss + tt_w * tt_loss
    if topic_w > 0:  # docs/method.md §4.10: same temperature as the image-text loss
      tp_loss, tp_metrics = topic.topic_loss(embeddings["image"], embeddings["topic_words"],
                                             embeddings["topic_target"], temperature)
      metrics = dict(metrics, **tp_metrics)
      loss = loss + topic_w * tp_loss
    return loss, dict(metrics, loss=loss)

  return objective


def _split(trainable):
  return trainable["model"], {k: v for k, v in trainable.items() if k != "model"}


def make_loss_fn(model: VLDeformer, config, mesh) -> Callable:
  """(trainable, batch, rng) -> (loss, metrics): the contrastive objective of docs/method.md §4, one pass."""
  objective = make_objective(config, mesh)

  def loss_fn(trainable, batch, rng):
    params, loss_params = _split(trainable)
    embeddings = embed_all(model, params, batch, branch_keys(rng), with_states=late_weight(config) > 0)
    if text_text_weight(config) > 0:
      embeddings.update(embed_bitext(model, params, batch, jax.random.fold_in(rng, BITEXT_KEY)))
    if topic.topic_weight(config) > 0:
      embeddings.update(embed_topic_words(model, params, batch, jax.random.fold_in(rng, TOPIC_KEY)))
    return objective(embeddings, loss_params)

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
