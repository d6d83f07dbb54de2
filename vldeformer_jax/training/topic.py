"""The topic target (Patel et al., ICMR 2019; docs/method.md §4.10), stage 2, optional.

The image branch predicts the topic distribution of its captions (data/topics.py: the normalised bag of
the class words they name). The head has no parameters: the predicted distribution is the softmax, over
the V topic words, of the cosine between the image's embedding and each word's text-branch embedding
(the word alone as a caption, `[CLS] word [SEP]`), divided by the image-text loss's temperature. So an
export trained with the term is an ordinary export (nothing to load beside the encoder), and the term
pulls an image towards the words of what its captions say it shows, in the retrieval space itself.

The loss is KL(target || predicted), averaged over the rows whose captions name at least one topic word,
added to the decomposition objective with weight `loss.topic_weight` (training/decompose.py).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from vldeformer_jax.data import negatives
from vldeformer_jax.data import topics as topics_lib


def topic_weight(config) -> float:
  """`loss.topic_weight` (0 when a config predates it)."""
  return float(config.loss.get("topic_weight", 0.0))


def wants_topics(config) -> bool:
  """Whether the pipeline must deliver the topic targets and words (a decomposition with the term on)."""
  return config.objective == "decompose" and topic_weight(config) > 0


def topic_targets(config, source, data_dir: str, names: str):
  """The pipeline's `topics=` option (`data.topics.TopicTargets`) when the term is on, else None. Its words:
  the training split's tag vocabulary (cached as `<data_dir>/<names>_<split>_tag_vocabulary.json`, shared
  with the hard negatives)."""
  if not wants_topics(config):
    return None
  cache = os.path.join(data_dir, f"{names}_{config.data.train_split}_tag_vocabulary.json")
  vocabulary = negatives.build_tag_vocabulary(source, cache_path=cache, progress=jax.process_index() == 0)
  return topics_lib.TopicTargets(vocabulary.words)


def topic_log_probs(image_emb, word_emb, temperature):
  """log softmax over the topic words of cos(image, word) / temperature: [B, D], [V, D] -> [B, V]."""
  img = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
  words = word_emb / jnp.linalg.norm(word_emb, axis=-1, keepdims=True)
  return jax.nn.log_softmax(img @ words.T / temperature, axis=-1)


def topic_loss(image_emb, word_emb, target, temperature) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean over rows with a target of KL(target || predicted), metrics). `target` [B, V] rows sum to 1 or
  are all zero (left out). Metrics: `topic_loss`, `topic_top1` (the predicted top word is one the captions
  name, among the rows with a target)."""
  log_q = topic_log_probs(image_emb, word_emb, temperature)
  t = target.astype(jnp.float32)
  safe_t = jnp.where(t > 0, t, 1.0)
  kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(safe_t) - log_q), 0.0), axis=-1)
  has = (jnp.sum(t, axis=-1) > 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(has), 1.0)
  loss = jnp.sum(kl * has) / count
  hit = jnp.take_along_axis(t, jnp.argmax(log_q, axis=-1)[:, None], axis=-1)[:, 0] > 0
  return loss, {"topic_loss": loss, "topic_top1": jnp.sum(hit * has) / count}


def word_inputs(batch) -> dict[str, jax.Array]:
  """The topic words' text inputs [V, L] from the batch's `topic_word_*` [B, V, L] (row 0; every row holds
  the same words)."""
  p = topics_lib.WORD_PREFIX
  return {f"{p}{k}": batch[f"{p}{k}"][0] for k in ("input_ids", "token_type_ids", "attention_mask")}
