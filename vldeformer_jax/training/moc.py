"""Masked object classification (MOC, Unicoder-VL; docs/method.md §4.8): a stage-1 term, and its measurement.

About `moc_probability` of the REAL regions of each positive pair (those with a detector class; padding
never) get their features zeroed, and the model's output at each masked region slot predicts that region's
detector class, as Unicoder-VL pre-trains its one-stream transformer. The head is the MLM head (tied to the
word embeddings) and a class is the word id of its name (data/region_classes.py): no new parameters.

Why the detector tags of a masked region are masked too (`moc_mask_tags`, default on): our joint input
also carries the detector tags (`[CLS] caption [SEP] tags [SEP]` + regions), and the tags name every
region's class. With them visible, the masked class is simply the tag no visible region explains, and MOC
is solved without the caption or the masked region's context. Masking the tag tokens of the masked
classes (their word ids, with [MASK]) leaves the caption, the other tags and the other regions as
evidence, which is what Unicoder-VL's MOC (no tags in its input) asks the model to use.

The loss is the cross entropy averaged over the masked slots of the batch only (0 when none is masked).
It runs on its own forward of the positives, captions unmasked (one pass of B rows per step).

`evaluate_moc` measures it on a prepared split: each real region of each image masked alone (with its
tags), once with the image's own caption, once with another image's caption (the negative control) and
once with an empty caption; accuracies against chance (1 / number of classes) and the majority-class rate.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vldeformer_jax.data import region_classes as region_classes_lib
from vldeformer_jax.model import inputs
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training.early_interaction_losses import mlm_loss

log = logging.getLogger(__name__)
Array = jax.Array

# `config.early_interaction` fields of this term and their defaults (merged into early_interaction.DEFAULTS).
DEFAULTS = {
    "moc_weight": 0.0,          # > 0: add masked object classification (Unicoder-VL) to stage 1
    "moc_probability": 0.15,    # each real, labelled region of a positive is masked with this probability
    "moc_max_predictions": 20,  # masked regions scored per row at most (static shapes; extra ones unscored)
    "moc_mask_tags": True,      # also [MASK] the tag tokens of the masked regions' classes (module docstring)
}


def wants_region_labels(config) -> bool:
  """Whether the batches need `image_region_labels`: stage 1 with masked object classification on."""
  moc_weight = float((config.get("early_interaction", {}) or {}).get("moc_weight", 0.0))
  return config.get("objective") == "early_interaction" and moc_weight > 0


def region_part(pairs: Mapping[str, Array]) -> Array:
  """The region half of a packed attention mask: [B, R]."""
  return pairs["attention_mask"][:, pairs["input_ids"].shape[1]:]


def choose_masked_regions(rng: Array, region_mask: Array, labels: Array, probability: float) -> Array:
  """bool [B, R]: each region that is real (mask 1) and labelled (label != 0) masked with `probability`."""
  eligible = (region_mask > 0) & (labels != region_classes_lib.NO_LABEL)
  return eligible & jax.random.bernoulli(rng, probability, labels.shape)


def mask_pairs(pairs: Mapping[str, Array], masked: Array, labels: Array, *, mask_tags: bool,
               mask_token_id: int) -> dict:
  """Packed pairs with the `masked` regions' features set to exactly 0 and, with `mask_tags`, every tag
  token (token type 1) whose id is the class word of a masked region replaced by [MASK]."""
  feats = jnp.where(masked[..., None], 0.0, pairs["img_feats"])  # a weak-typed 0: the features' dtype
  ids = pairs["input_ids"]
  if mask_tags:
    is_tag = (pairs["token_type_ids"] == 1) & (pairs["attention_mask"][:, :ids.shape[1]] > 0)
    hit = jnp.any((ids[:, :, None] == labels[:, None, :]) & masked[:, None, :], axis=-1)
    ids = jnp.where(is_tag & hit, jnp.asarray(mask_token_id, ids.dtype), ids)
  return dict(pairs, input_ids=ids, img_feats=feats)


def region_logits(model: VLDeformer, params, pairs: Mapping[str, Array], slots: Array, *,
                  deterministic: bool, rng: Array | None = None) -> Array:
  """MLM-head logits [B, P, V] at region slots [B, P] (0-based region indices) of packed pairs."""

  def fn(m: VLDeformer):
    h, _ = m.encode(pairs["input_ids"], pairs["token_type_ids"], pairs["attention_mask"], pairs["img_feats"],
                    deterministic=deterministic)
    regions = h[:, pairs["input_ids"].shape[1]:]
    return m.mlm_logits(jnp.take_along_axis(regions, slots[..., None], axis=1))

  return model.apply({"params": params}, method=fn, rngs=None if deterministic else {"dropout": rng})


def moc_term(model: VLDeformer, params, positives: Mapping[str, Array], labels: Array, rng: Array,
             opts: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """(loss, metrics) of MOC on packed positive pairs and their region labels [B, R] (`image_region_labels`).

  The masked regions' slots (at most `moc_max_predictions` per row, picked at random among them) are
  scored; the loss is the cross entropy averaged over those slots (`mlm_loss`: weight 0 elsewhere).
  """
  r_mask, r_pick, r_drop = jax.random.split(rng, 3)
  masked = choose_masked_regions(r_mask, region_part(positives), labels, float(opts["moc_probability"]))
  masked_in = mask_pairs(positives, masked, labels, mask_tags=bool(opts["moc_mask_tags"]),
                         mask_token_id=int(opts["mask_token_id"]))
  p = min(int(opts["moc_max_predictions"]), labels.shape[1])
  scores = jnp.where(masked, jax.random.uniform(r_pick, masked.shape), -1.0)
  top, slots = jax.lax.top_k(scores, p)
  weights = (top >= 0).astype(jnp.float32)
  logits = region_logits(model, params, masked_in, slots, deterministic=False, rng=r_drop)
  loss, m = mlm_loss(logits, jnp.take_along_axis(labels, slots, axis=1), weights)
  return loss, {"moc_loss": loss, "moc_accuracy": m["mlm_accuracy"], "moc_masked": jnp.sum(weights)}


# ------------------------------------------------------------------------------------------------------
# The measurement: masked-region accuracy on a prepared split, with its controls.

CONDITIONS = ("own_caption", "shuffled_caption", "empty_caption")


def _one_region_rows(labels: np.ndarray, region_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image row, region slot) of every real labelled region: each becomes one row masking it alone."""
  rows, slots = np.nonzero((region_mask > 0) & (labels != region_classes_lib.NO_LABEL))
  return rows, slots


def evaluate_moc(export_path: str, data_dir: str, name: str, split: str = "test", *, max_images: int = 0,
                 batch_size: int = 256, seed: int = 0, mask_tags: bool = True) -> dict[str, Any]:
  """Masked-region accuracy of a stage-1 export on `split`, per condition (CONDITIONS), with chance rates.

  Each image is paired with its first caption (`own_caption`), with the first caption of another image
  (`shuffled_caption`: a fixed random derangement, `seed`) and with an empty caption; every real region
  with a detector class is masked alone (features zeroed, and its class's tag tokens with `mask_tags`),
  and the argmax of the MLM head at its slot is compared with its class word, over the whole vocabulary
  and among the class words of the split (the accuracy chance refers to)."""
  from vldeformer_jax.data import prepare  # tfds: imported by the measurement only, not by the loss
  from vldeformer_jax.io import export as export_lib
  ex = export_lib.read_export(export_path)
  cfg = ex.model_config
  tok = inputs.load_tokenizer(ex.vocab_file)
  words = region_classes_lib.ClassWords(tok)
  source = prepare.load_split(data_dir, name, split)
  n = len(source) if not max_images else min(max_images, len(source))
  records = [source[i] for i in range(n)]
  classes = [region_classes_lib.record_region_classes(r, i) for i, r in enumerate(records)]
  feats = [np.asarray(r["features"], np.float32) for r in records]
  image = inputs.image_inputs(tok, feats, [region_classes_lib.as_str(r["tags"]) for r in records], cfg.tag_len,
                              cfg.max_regions, cfg.img_feature_dim)
  labels = words.label_ids(classes, cfg.max_regions)
  first = [region_classes_lib.as_str(r["captions"][0]) for r in records]
  order = np.random.default_rng(seed).permutation(n)
  other = np.empty(n, np.int64)
  other[order] = np.roll(order, -1)  # image order[k] takes the caption of image order[k + 1]
  captions = {"own_caption": first, "shuffled_caption": [first[j] for j in other], "empty_caption": [""] * n}
  rows, slots = _one_region_rows(labels, image["attention_mask"][:, cfg.tag_len:])
  targets = labels[rows, slots]
  class_ids = np.unique(targets)
  model = VLDeformer(cfg)
  mask_id = tok.mask_token_id
  params = jax.device_put(ex.params)

  class_ids_dev = jnp.asarray(class_ids)

  @jax.jit
  def predict(params, text, img, lab, slot):
    pairs = inputs.pack_pairs(text, img)
    masked = jax.nn.one_hot(slot, lab.shape[1], dtype=jnp.int32) > 0
    pairs = mask_pairs(pairs, masked, lab, mask_tags=mask_tags, mask_token_id=mask_id)
    logits = region_logits(model, params, pairs, slot[:, None], deterministic=True)[:, 0]
    return jnp.argmax(logits, -1), class_ids_dev[jnp.argmax(logits[:, class_ids_dev], -1)]

  result = {"export": export_path, "dataset": name, "split": split, "num_images": n,
            "num_masked_regions": int(len(rows)), "num_classes": int(len(class_ids)), "mask_tags": mask_tags}
  counts = collections.Counter(targets.tolist())
  result["chance_uniform"] = 100.0 / len(class_ids)
  result["chance_majority"] = 100.0 * max(counts.values()) / len(targets)
  for cond in CONDITIONS:
    text = inputs.text_inputs(tok, captions[cond], cfg.max_text_len)
    # Whether the caption names the masked region's class (its last word): what a caption-reading model can use.
    named = np.array([classes[i][s].split()[-1] in captions[cond][i].split() for i, s in zip(rows, slots)])
    hits = np.zeros(len(rows), bool)
    full_hits = 0
    for s in tqdm(range(0, len(rows), batch_size), desc=f"MOC {cond}", unit="batch", mininterval=5.0):
      r, sl = rows[s:s + batch_size], slots[s:s + batch_size]
      pad = batch_size - len(r)  # one compiled shape: pad the last chunk with its first row
      r_p, sl_p = np.concatenate([r, np.repeat(r[:1], pad)]), np.concatenate([sl, np.repeat(sl[:1], pad)])
      full, restricted = predict(params, {k: v[r_p] for k, v in text.items()}, {k: v[r_p] for k, v in image.items()},
                                 labels[r_p], sl_p.astype(np.int32))
      t = targets[s:s + batch_size]
      full_hits += int(np.sum(np.asarray(full)[:len(r)] == t))
      hits[s:s + batch_size] = np.asarray(restricted)[:len(r)] == t
    result[cond] = {"accuracy_among_classes": 100.0 * hits.mean(),
                    "accuracy_full_vocabulary": 100.0 * full_hits / len(rows),
                    "class_named_in_caption": 100.0 * named.mean(),
                    "accuracy_when_named": 100.0 * hits[named].mean() if named.any() else None,
                    "accuracy_when_not_named": 100.0 * hits[~named].mean() if (~named).any() else None}
    log.info("MOC %s: %.2f%% among %d classes (%.2f%% over the vocabulary)", cond,
             result[cond]["accuracy_among_classes"], len(class_ids), result[cond]["accuracy_full_vocabulary"])
  return result
