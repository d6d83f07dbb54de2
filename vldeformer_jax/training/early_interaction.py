"""Stage 1: train the VL transformer with early interaction (image-text matching + masked language model).

VLDeformer decomposes a one-stream VL transformer that already learned cross-modal knowledge by reading
caption, tags and regions together (docs/method.md §2.2, §6.2). Where no VinVL weights are at hand, this is
the objective that teaches it: VinVL's retrieval head (binary matching on `[CLS] caption [SEP] tags [SEP]`
+ regions, docs/method.md §2.2) plus BERT's masked-language model on the caption and tag tokens of the positives.

Pairs are built on device from the decomposed pieces of a training batch (ARCHITECTURE.md "Training
batch") with `inputs.pack_pairs`, so any caption can be paired with any image of the global batch without
tokenising again:
- positives: (caption_i, image_i);
- batch negatives: (caption_i, image_j) and (caption_j, image_i), j != i, drawn at random, or the hardest
  j by the decomposed embedding similarity (`hard_embed`, 2B cheap single-modality passes) or by the
  current model's match score among a few random candidates (`hard_match`), always under stop_gradient;
- the pipeline's composed bi-modal hard negatives (`neg_text_*`, `neg_image_*`, docs/method.md §5) when present:
  (caption_i, composed image_ik) and (composed caption_ik, image_i).

MLM runs on its own forward of the masked positives (`mlm_pass='separate'`, as ALBEF) or on the matching
forward itself, every pair masked (`'shared'`, as VinVL: one pass fewer per step).

Optionally (`itc_weight` > 0) an ALBEF-style image-text contrastive term on the single-modality [CLS]
pooler outputs (or the model's decomposed embedding), whose embeddings `hard_embed` then reuses; the match
score stays the ITM head on the joint input.

Everything here is traceable: call it inside `jax.jit` on process-local or global (sharded) arrays.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from vldeformer_jax.model.inputs import IMAGE_KEYS, TEXT_KEYS, pack_pairs
from vldeformer_jax.training import moc
from vldeformer_jax.training.early_interaction_losses import balanced_match_loss, match_loss, mlm_loss
from vldeformer_jax.training.losses import contrastive_loss
from vldeformer_jax.model.vldeformer import VLDeformer

Array = jax.Array

NEGATIVE_MODES = ("random", "hard_embed", "hard_match")

# `config.early_interaction` fields and their defaults (bert-base-uncased special ids).
DEFAULTS = {
    "negatives": "random",      # how batch negatives are drawn: one of NEGATIVE_MODES
    "num_negatives": 1,         # batch negatives per positive, in each direction (image and caption)
    "hard_candidates": 8,       # random candidates scored per positive by `hard_match`
    "hard_fraction": 1.0,       # hard modes: each negative is the hard one with this probability, else random
    "composed_negatives": True,  # use the pipeline's neg_text_* / neg_image_* when the batch has them
    "balanced": True,           # ITM: positives and negatives weigh half each (else the plain mean over pairs,
                                # whose 1:4 label prior is a plateau a model trained from scratch sits on)
    "rank_weight": 0.0,         # > 0: add a listwise ranking term on the same match logits: each caption's
                                # image against its batch-negative images, each image's caption against its
                                # negative captions (softmax over the margins): what retrieval ranks by
    "itc_weight": 0.0,          # > 0: add an image-text contrastive term on the decomposed embeddings (ALBEF)
    "itc_temperature": 0.05,    # its temperature (both directions)
    "itc_pooling": "cls",       # ITC embedding: 'cls' (the pooler output the ITM head reads, as ALBEF) | 'model'
    "mlm_probability": 0.15,
    "mlm_pass": "separate",     # 'separate': MLM on its own forward of the unmasked-ITM positives (ALBEF);
                                # 'shared': one forward of masked pairs serves ITM and MLM (VinVL; a pass fewer)
    "max_predictions": 10,      # masked positions per packed sequence (fixed, so shapes are static)
    "mask_token_id": 103,
    "cls_token_id": 101,
    "sep_token_id": 102,
    "pad_token_id": 0,
    **moc.DEFAULTS,             # masked object classification (training/moc.py): moc_weight 0 = off
}


def options(config) -> dict[str, Any]:
  """`config.early_interaction` over DEFAULTS; unknown fields are an error naming the field."""
  given = dict(config.get("early_interaction", {}) or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.early_interaction: unknown fields {unknown}; known: {sorted(DEFAULTS)}")
  opts = {**DEFAULTS, **given}
  if opts["itc_pooling"] not in ("cls", "model"):
    raise ValueError(f"config.early_interaction.itc_pooling must be 'cls' or 'model', got {opts['itc_pooling']!r}")
  if not 0.0 <= float(opts["hard_fraction"]) <= 1.0:
    raise ValueError(f"config.early_interaction.hard_fraction must be in [0, 1], got {opts['hard_fraction']!r}")
  if opts["mlm_pass"] not in ("separate", "shared"):
    raise ValueError(f"config.early_interaction.mlm_pass must be 'separate' or 'shared', got {opts['mlm_pass']!r}")
  if not 0.0 < float(opts["moc_probability"]) <= 1.0 or float(opts["moc_weight"]) < 0:
    raise ValueError(f"config.early_interaction: moc_probability must be in (0, 1] and moc_weight >= 0, got "
                     f"{opts['moc_probability']!r} and {opts['moc_weight']!r}")
  if opts["negatives"] not in NEGATIVE_MODES:
    raise ValueError(f"config.early_interaction.negatives must be one of {NEGATIVE_MODES}, "
                     f"got {opts['negatives']!r}")
  return opts


def split_batch(batch: Mapping[str, Array], prefix: str = "") -> tuple[dict, dict]:
  """The caption and image pieces of a training batch: (`{prefix}text_*`, `{prefix}image_*`)."""
  try:
    text = {k: batch[f"{prefix}text_{k}"] for k in TEXT_KEYS}
    image = {k: batch[f"{prefix}image_{k}"] for k in IMAGE_KEYS}
  except KeyError as e:
    raise KeyError(f"training batch has no key {e.args[0]!r} (keys: {sorted(batch)})") from None
  return text, image


def take_rows(d: Mapping[str, Array], idx: Array) -> dict:
  return {k: jnp.take(v, idx, axis=0) for k, v in d.items()}


def concat_rows(ds) -> dict:
  return {k: jnp.concatenate([d[k] for d in ds], axis=0) for k in ds[0]}


def flatten_k(d: Mapping[str, Array]) -> dict:
  """[B, K, ...] -> [B*K, ...] (row i*K + k is negative k of positive i)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in d.items()}


def random_others(rng: Array, n: int, k: int) -> Array:
  """[n, k] indices j != i (row i), uniform over the other n - 1 rows."""
  offsets = jax.random.randint(rng, (n, k), 1, max(n, 2))
  return (jnp.arange(n)[:, None] + offsets) % n


def _same_item(batch, n: int) -> Array:
  """[n, n] True where two rows show the same image (the diagonal; equal `image_id` when present)."""
  same = jnp.eye(n, dtype=bool)
  if "image_id" in batch:
    ids = batch["image_id"]
    same = same | (ids[:, None] == ids[None, :])
  return same


def hard_by_embedding(model, params, text, image, same, k: int, embeddings=None) -> tuple[Array, Array]:
  """Hardest k images per caption and k captions per image by decomposed cosine similarity
  (`embeddings`: the (text, image) embeddings when the caller already has them, e.g. from the ITC term)."""
  if embeddings is None:
    t = model.apply({"params": params}, *[text[x] for x in TEXT_KEYS], method=VLDeformer.embed)
    v = model.apply({"params": params}, *[image[x] for x in IMAGE_KEYS], method=VLDeformer.embed)
  else:
    t, v = embeddings
  t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  sim = jax.lax.stop_gradient(jnp.where(same, -jnp.inf, t @ v.T))  # [text, image]
  _, img_for_text = jax.lax.top_k(sim, k)
  _, text_for_img = jax.lax.top_k(sim.T, k)
  return img_for_text, text_for_img


def match_score_logit(model, params, pairs) -> Array:
  """log-odds of the match class (softmax(logits)[1] is monotone in it), deterministic."""
  logits = model.apply({"params": params}, *[pairs[x] for x in IMAGE_KEYS], method=VLDeformer.match_logits)
  return logits[:, 1] - logits[:, 0]


def hard_by_match_score(model, params, text, image, same, k: int, candidates: int, rng) -> tuple[Array, Array]:
  """The k highest-scoring of `candidates` random others per row, by the current cross-encoder."""
  n = text["input_ids"].shape[0]
  c = max(candidates, k)
  r_img, r_txt = jax.random.split(rng)

  def pick(cand, rows_are_text):
    flat = cand.reshape(-1)
    anchor = jnp.repeat(jnp.arange(n), c)
    if rows_are_text:
      pairs = pack_pairs(take_rows(text, anchor), take_rows(image, flat))
    else:
      pairs = pack_pairs(take_rows(text, flat), take_rows(image, anchor))
    s = match_score_logit(model, params, pairs).reshape(n, c)
    s = jnp.where(same[jnp.arange(n)[:, None], cand], -jnp.inf, s)
    _, top = jax.lax.top_k(jax.lax.stop_gradient(s), k)
    return jnp.take_along_axis(cand, top, axis=1)

  return pick(random_others(r_img, n, c), True), pick(random_others(r_txt, n, c), False)


def mask_tokens(rng: Array, pairs: Mapping[str, Array], opts: Mapping[str, Any], vocab_size: int):
  """BERT masking of the real non-special tokens of packed pairs.

  Selects round(p * n) of each row's n candidate tokens (at least 1, at most `max_predictions`), then
  80% -> [MASK], 10% -> a random token, 10% unchanged. Returns (masked input_ids [B, L], positions [B, P],
  labels [B, P], weights [B, P] float32: 1 on real predictions, 0 on padding slots).
  """
  ids = pairs["input_ids"]
  n_rows, length = ids.shape
  tok_mask = pairs["attention_mask"][:, :length] > 0
  special = ((ids == opts["cls_token_id"]) | (ids == opts["sep_token_id"]) | (ids == opts["pad_token_id"]))
  cand = tok_mask & ~special
  n_cand = jnp.sum(cand, axis=1)
  p = min(int(opts["max_predictions"]), length)
  n_pred = jnp.minimum(p, jnp.maximum(1, jnp.round(n_cand * opts["mlm_probability"]).astype(jnp.int32)))
  r_pick, r_rule, r_tok = jax.random.split(rng, 3)
  scores = jnp.where(cand, jax.random.uniform(r_pick, ids.shape), -1.0)
  top_scores, positions = jax.lax.top_k(scores, p)
  weights = ((jnp.arange(p)[None, :] < n_pred[:, None]) & (top_scores >= 0)).astype(jnp.float32)
  labels = jnp.take_along_axis(ids, positions, axis=1)
  u = jax.random.uniform(r_rule, positions.shape)
  random_ids = jax.random.randint(r_tok, positions.shape, 0, vocab_size)
  new = jnp.where(u < 0.8, opts["mask_token_id"], jnp.where(u < 0.9, random_ids, labels))
  new = jnp.where(weights > 0, new, labels).astype(ids.dtype)
  masked = ids.at[jnp.arange(n_rows)[:, None], positions].set(new)
  return masked, positions, labels, weights


def build_match_pairs(model, params, batch, rng, opts, embeddings=None) -> tuple[dict, Array]:
  """Packed early-interaction pairs of a batch and their labels (1 = match): positives first."""
  text, image = split_batch(batch)
  n = text["input_ids"].shape[0]
  k = int(opts["num_negatives"])
  same = _same_item(batch, n)
  r_img, r_txt = jax.random.split(rng)
  img_for_text, text_for_img = random_others(r_img, n, k), random_others(r_txt, n, k)
  if opts["negatives"] != "random" and n >= 2:
    if opts["negatives"] == "hard_embed":
      hard = hard_by_embedding(model, params, text, image, same, k, embeddings)
    else:
      hard = hard_by_match_score(model, params, text, image, same, k, int(opts["hard_candidates"]), rng)
    fraction = float(opts["hard_fraction"])
    if fraction >= 1.0:
      img_for_text, text_for_img = hard
    else:
      take_hard = jax.random.bernoulli(jax.random.fold_in(rng, 1), fraction, (2, n, k))
      img_for_text = jnp.where(take_hard[0], hard[0], img_for_text)
      text_for_img = jnp.where(take_hard[1], hard[1], text_for_img)
  img_for_text = jax.lax.stop_gradient(img_for_text)
  text_for_img = jax.lax.stop_gradient(text_for_img)
  anchors = jnp.repeat(jnp.arange(n), k)
  texts = [text, take_rows(text, anchors), take_rows(text, text_for_img.reshape(-1))]
  images = [image, take_rows(image, img_for_text.reshape(-1)), take_rows(image, anchors)]
  if opts["composed_negatives"] and "neg_text_input_ids" in batch and "neg_image_input_ids" in batch:
    neg_text, neg_image = (flatten_k(d) for d in split_batch(batch, prefix="neg_"))
    kc = batch["neg_text_input_ids"].shape[1]
    rep = jnp.repeat(jnp.arange(n), kc)
    texts += [take_rows(text, rep), neg_text]
    images += [neg_image, take_rows(image, rep)]
  pairs = pack_pairs(concat_rows(texts), concat_rows(images))
  n_pairs = pairs["input_ids"].shape[0]
  labels = (jnp.arange(n_pairs) < n).astype(jnp.int32)
  return pairs, labels


def ranking_loss(logits: Array, n: int, k: int) -> Array:
  """Listwise ranking on match logits in `build_match_pairs` order (n positives, then n*k (caption i,
  image j) and n*k (caption j, image i) batch negatives): the mean over both directions of
  -log softmax of the positive's margin (logit[1] - logit[0]) among its 1 + k candidates."""
  margin = logits[:, 1] - logits[:, 0]
  pos = margin[:n, None]
  other_images = margin[n:n + n * k].reshape(n, k)
  other_captions = margin[n + n * k:n + 2 * n * k].reshape(n, k)

  def nll(negatives):
    return jnp.mean(jax.nn.logsumexp(jnp.concatenate([pos, negatives], axis=1), axis=1) - pos[:, 0])

  return 0.5 * (nll(other_images) + nll(other_captions))


def _itc_term(model: VLDeformer, params, batch, rng: Array, opts) -> tuple[Array, dict, tuple[Array, Array]]:
  """ALBEF / Oscar+-style auxiliary: the single-modality passes of stage 2 with in-batch InfoNCE.

  It shapes the token and region representations the joint input is built from; the match score stays
  the ITM head. With `itc_pooling='cls'` the contrasted vector is the [CLS] pooler output: from random
  init h_CLS is nearly input-independent (uniform attention averages everything away; its std over a batch
  is ~1% of the other positions'), so the ITM head has no signal to learn from; contrasting the pooler
  output makes [CLS] attend to and carry the content. Returns (loss, metrics, (text, image) embeddings).
  """
  text, image = split_batch(batch)
  r_t, r_v = jax.random.split(rng)
  method = VLDeformer.embed if opts["itc_pooling"] == "model" else (lambda m, *a, **kw: m.encode(*a, **kw)[1])
  t = model.apply({"params": params}, *[text[x] for x in TEXT_KEYS], deterministic=False,
                  method=method, rngs={"dropout": r_t})
  v = model.apply({"params": params}, *[image[x] for x in IMAGE_KEYS], deterministic=False,
                  method=method, rngs={"dropout": r_v})
  tau = float(opts["itc_temperature"])
  itc, m = contrastive_loss(t, v, temperature_t2i=tau, temperature_i2t=tau)
  return itc, {"itc_loss": itc, "itc_t2i_accuracy": m["t2i_accuracy"], "itc_i2t_accuracy": m["i2t_accuracy"]}, (t, v)


def _itm_term(logits: Array, labels: Array, balanced: bool) -> tuple[Array, dict[str, Array]]:
  """Image-text matching cross entropy (class-balanced or plain) and the mean match probabilities."""
  itm_loss, m = (balanced_match_loss if balanced else match_loss)(logits, labels)
  is_pos = labels == 1
  prob = jax.nn.softmax(logits, axis=-1)[:, 1]
  return itm_loss, {
      "itm_loss": itm_loss,
      "itm_accuracy": m["match_accuracy"],
      "match_prob_pos": jnp.sum(jnp.where(is_pos, prob, 0.0)) / jnp.maximum(jnp.sum(is_pos), 1),
      "match_prob_neg": jnp.sum(jnp.where(is_pos, 0.0, prob)) / jnp.maximum(jnp.sum(~is_pos), 1),
  }


def _joint_forward(model: VLDeformer, params, pairs, rng: Array, mlm_positions: Array | None, n: int):
  """Match logits of every packed pair; with `mlm_positions` (the shared MLM pass) also the MLM logits at
  those positions of the first `n` rows (the positives), from the same forward."""

  def fn(m: VLDeformer):
    h, pooled = m.encode(*[pairs[x] for x in IMAGE_KEYS], deterministic=False)
    logits = m.match_head(pooled, deterministic=False)
    if mlm_positions is None:
      return logits, None
    return logits, m.mlm_logits(jnp.take_along_axis(h[:n], mlm_positions[..., None], axis=1))

  return model.apply({"params": params}, method=fn, rngs={"dropout": rng})


def _mlm_forward(model: VLDeformer, params, rows, masked_ids: Array, positions: Array, rng: Array) -> Array:
  """MLM logits [n, P, V] at `positions` of the pairs `rows` with `masked_ids` (the separate MLM pass)."""

  def fn(m: VLDeformer):
    h, _ = m.encode(masked_ids, rows["token_type_ids"], rows["attention_mask"], rows["img_feats"],
                    deterministic=False)
    return m.mlm_logits(jnp.take_along_axis(h, positions[..., None], axis=1))

  return model.apply({"params": params}, method=fn, rngs={"dropout": rng})


def early_interaction_loss(model: VLDeformer, params, batch: Mapping[str, Array], rng: Array,
                           config) -> tuple[Array, dict[str, Array]]:
  """ITM cross entropy + `itc_weight` * ITC + `rank_weight` * ranking + `config.loss.mlm_weight` * MLM
  cross entropy (docs/method.md §4.5) + `moc_weight` * masked object classification (§4.8, training/moc.py),
  and scalar metrics.

  `model` is a `VLDeformer`, `params` its parameter tree, `batch` a training batch (ARCHITECTURE.md),
  `rng` a PRNG key (negatives, masking, dropout), `config` the training ConfigDict: reads
  `config.early_interaction` (see DEFAULTS) and `config.loss.mlm_weight` (default 1.0).
  """
  opts = options(config)
  mlm_weight = float(config.get("loss", {}).get("mlm_weight", 1.0))
  itc_weight, rank_weight = float(opts["itc_weight"]), float(opts["rank_weight"])
  r_neg, r_drop_itm, r_mask, r_drop_mlm, r_drop_itc = jax.random.split(rng, 5)
  metrics, embeddings = {}, None
  if itc_weight > 0:
    _, itc_metrics, embeddings = _itc_term(model, params, batch, r_drop_itc, opts)
    metrics.update(itc_metrics)
  pairs, labels = build_match_pairs(model, params, batch, r_neg, opts, embeddings)
  n = batch["text_input_ids"].shape[0]
  moc_weight = float(opts["moc_weight"])
  if moc_weight > 0:  # on the positives (the first n pairs), before any MLM masking
    if "image_region_labels" not in batch:
      raise KeyError("config.early_interaction.moc_weight > 0 needs `image_region_labels` in the batch "
                     "(the pipeline's region_labels=True; training/setup.py sets it from the config)")
    moc_loss, moc_metrics = moc.moc_term(model, params, {k: v[:n] for k, v in pairs.items()},
                                         batch["image_region_labels"], jax.random.fold_in(r_mask, 7), opts)
    metrics.update(moc_metrics)

  # MLM targets, set here only. The shared pass masks every packed row alike (so [MASK] tokens do not tell
  # positives from negatives) and scores the positives, whose caption and tags describe the regions beside
  # them; the separate pass masks the positives and runs them once more.
  shared_mlm = mlm_weight > 0 and opts["mlm_pass"] == "shared"
  if mlm_weight > 0:
    mlm_rows = pairs if shared_mlm else {k: v[:n] for k, v in pairs.items()}
    masked, positions, mlm_labels, weights = mask_tokens(r_mask, mlm_rows, opts, model.config.vocab_size)
    positions, mlm_labels, weights = positions[:n], mlm_labels[:n], weights[:n]
    if shared_mlm:
      pairs = dict(pairs, input_ids=masked)

  logits, mlm_logits = _joint_forward(model, params, pairs, r_drop_itm, positions if shared_mlm else None, n)
  loss, itm_metrics = _itm_term(logits, labels, opts["balanced"])
  metrics.update(itm_metrics)
  if itc_weight > 0:
    loss = loss + itc_weight * metrics["itc_loss"]
  if rank_weight > 0:
    metrics["rank_loss"] = ranking_loss(logits, n, int(opts["num_negatives"]))
    loss = loss + rank_weight * metrics["rank_loss"]
  if mlm_weight > 0:
    if not shared_mlm:
      mlm_logits = _mlm_forward(model, params, mlm_rows, masked, positions, r_drop_mlm)
    mlm, mlm_metrics = mlm_loss(mlm_logits, mlm_labels, weights)
    metrics.update(mlm_metrics)
    loss = loss + mlm_weight * mlm
  if moc_weight > 0:
    loss = loss + moc_weight * moc_loss
  metrics["loss"] = loss
  return loss, metrics


def make_loss_fn(model: VLDeformer, config) -> Callable:
  """(trainable, batch, rng) -> (loss, metrics): `early_interaction_loss` on the trainable tree."""

  def loss_fn(trainable, batch, rng):
    return early_interaction_loss(model, trainable["model"], batch, rng, config)

  return loss_fn
