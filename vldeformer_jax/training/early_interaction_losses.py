"""The stage-1 (early interaction) cross-entropies: image-text matching (`match_loss`, class-balanced
`balanced_match_loss`) and the masked language model (`mlm_loss`, also the loss of masked object
classification, training/moc.py). Per-pair / per-position means on local arrays: no collectives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _take(x: Array, labels: Array) -> Array:
  return jnp.take_along_axis(x, labels[:, None], axis=1)[:, 0]


def match_loss(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Image-text matching: mean CE of logits [N, 2] against labels [N] (1 = matching pair)."""
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"match_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
                     "[N, C] and [N]")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  ce = jax.nn.logsumexp(logits, axis=-1) - _take(logits, labels)
  loss = jnp.mean(ce)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"match_loss": loss, "match_accuracy": accuracy}


def balanced_match_loss(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
  """Class-balanced image-text matching: the positives' mean CE and the negatives' mean CE, averaged.

  With one positive per K negatives a plain mean lets the head win by saying "no match" everywhere; here
  each class weighs one half whatever the counts (an empty class contributes 0).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  ce = jax.nn.logsumexp(logits, axis=-1) - _take(logits, labels)
  n_pos = jnp.sum(labels)
  w = jnp.where(labels == 1, 0.5 / jnp.maximum(n_pos, 1), 0.5 / jnp.maximum(labels.shape[0] - n_pos, 1))
  loss = jnp.sum(w * ce)
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"match_loss": loss, "match_accuracy": accuracy}


def mlm_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  """Masked LM: CE of logits [N, P, V] at the masked positions, weighted mean by weights [N, P].

  Labels at weight-0 positions are ignored (they may hold anything, e.g. -100). With no weight at all the
  loss and accuracy are 0.
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
    raise ValueError(f"mlm_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
                     f"{tuple(weights.shape)} must be [N, P, V], [N, P], [N, P]")
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  labels = jnp.where(weights > 0, labels, 0).astype(jnp.int32)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - label_logit
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  total = jnp.sum(weights)
  denom = jnp.where(total > 0, total, 1.0)
  loss = jnp.sum(ce * weights) / denom
  accuracy = jnp.sum(correct * weights) / denom
  return loss, {"mlm_loss": loss, "mlm_accuracy": accuracy}
