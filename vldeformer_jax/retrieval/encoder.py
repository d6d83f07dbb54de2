"""The public encoder: load an export, embed captions and images, score pairs with early interaction.

This is what evaluation, indexing, the demo and a notebook use, so it hides everything about JAX that a
caller need not know: each forward is jitted once, inputs are cut into fixed-size batches (the last one
padded with masked rows and trimmed afterwards) so there is one compile per input shape whatever N is, and
results come back as float32 numpy. With a `mesh`, each batch is sharded over the mesh's data axis so every
device works; the results are the same as unsharded.

  enc = Encoder.load("exports/vinvl")
  t = enc.embed_texts(["a dog on a couch"])                       # [1, D], L2-normalised
  v = enc.embed_images([regions], ["dog couch pillow"])          # [1, D]
  s = enc.match_scores([regions], ["dog couch pillow"], ["a dog on a couch"])  # early-interaction score
  w, wm = enc.text_token_states(["a dog on a couch"])             # [1, L_t, H] unit word states, mask [1, L_t]
  r, rm = enc.image_token_states([regions], ["dog couch pillow"])  # [1, L_g + R, H] tags + regions, mask
  # -> retrieval/late_interaction.py: mrsw_scores(w, wm, r, rm)
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vldeformer_jax.io import export as export_lib
from vldeformer_jax.model import inputs
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import late_interaction

DEFAULT_BATCH_SIZE = 64


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class Encoder:
  """A VLDeformer model with its parameters and tokenizer, in eval mode (no dropout)."""

  def __init__(self, model_config: ModelConfig, params, tokenizer=None, *, mesh: jax.sharding.Mesh | None = None,
               data_axis: str = "data", batch_size: int = DEFAULT_BATCH_SIZE, fingerprint: str | None = None,
               progress: bool = True):
    """`params`: the tree of `init_params` (numpy or jax arrays). `tokenizer`: from `inputs.load_tokenizer`
    (default: the bundled bert-base-uncased vocabulary). `mesh`: shard batches over its `data_axis`
    (params replicated). `batch_size`: rows per forward, rounded up to a multiple of the data axis.
    `progress`: tqdm bars in embed_texts / embed_images / match_scores when the input spans several
    batches (the lower-level *_inputs methods never show one: their callers loop with their own)."""
    self.model_config = model_config
    self.model = VLDeformer(model_config)
    self.tokenizer = tokenizer if tokenizer is not None else inputs.load_tokenizer()
    self.mesh = mesh
    self.progress = progress
    self.match_head_error: str | None = None  # set by `load` when the export's match head was never trained
    if mesh is not None:
      if data_axis not in mesh.axis_names:
        raise ValueError(f"Encoder: mesh axes {mesh.axis_names} have no data axis {data_axis!r}")
      self._n_shards = mesh.shape[data_axis]
      self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
    else:
      self._n_shards = 1
      self._batch_sharding = None
    self.set_params(params, fingerprint)
    self.batch_size = self._round_batch(batch_size)
    model = self.model

    def embed(params, batch):
      return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], batch.get("img_feats"), method=VLDeformer.embed)

    def match(params, text, image):
      packed = inputs.pack_pairs(text, image)
      logits = model.apply({"params": params}, packed["input_ids"], packed["token_type_ids"],
                           packed["attention_mask"], packed["img_feats"], method=VLDeformer.match_logits)
      return jax.nn.softmax(logits, axis=-1)[:, 1]

    def match_margin(params, text, image):
      packed = inputs.pack_pairs(text, image)
      logits = model.apply({"params": params}, packed["input_ids"], packed["token_type_ids"],
                           packed["attention_mask"], packed["img_feats"], method=VLDeformer.match_logits)
      return logits[:, 1] - logits[:, 0]

    def token_states(params, batch):  # the last layer's sequence output, each position L2-normalised
      h, _ = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                         batch.get("img_feats"), method=VLDeformer.encode)
      h = h.astype(jnp.float32)
      return h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), 1e-24))

    # One jitted function per forward; jax caches one executable per (structure, shape) of the batch.
    self._embed = jax.jit(embed)
    self._token_states = jax.jit(token_states)
    self._match = jax.jit(match)
    self._match_margin = jax.jit(match_margin)

  @classmethod
  def load(cls, path: str, dtype: str | None = None, *, allow_untrained_head: bool = False,
           **kwargs) -> "Encoder":
    """Loads an export directory. `dtype` ("float32" | "bfloat16") overrides the compute dtype of the
    export's model config; the parameters stay float32. An export whose early-interaction match head was
    never trained (export.json `untrained`) embeds as usual but refuses to score pairs
    (`UntrainedHeadError`) unless `allow_untrained_head`."""
    ex = export_lib.read_export(path)
    config = ex.model_config if dtype is None else ex.model_config.replace(dtype=jnp.dtype(dtype).name)
    encoder = cls(config, ex.params, inputs.load_tokenizer(ex.vocab_file), fingerprint=ex.fingerprint, **kwargs)
    if not allow_untrained_head:
      encoder.match_head_error = export_lib.match_head_error(
          os.path.abspath(path), ex.metadata, flag=f"{export_lib.ALLOW_UNTRAINED_FLAG} (Python: "
          "Encoder.load(..., allow_untrained_head=True))")
    return encoder

  def _require_match_head(self) -> None:
    if self.match_head_error:
      raise export_lib.UntrainedHeadError(self.match_head_error)

  def set_params(self, params, fingerprint: str | None = None) -> None:
    """Swaps in new weights of the same model (e.g. during training) and keeps the compiled forwards."""
    if self.mesh is not None:
      params = jax.device_put(params, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    else:
      params = jax.device_put(params)
    self.params = params
    self._fingerprint = fingerprint

  @property
  def fingerprint(self) -> str:
    """sha256 of the parameters (export_fingerprint); from export.json when loaded from an export."""
    if self._fingerprint is None:
      self._fingerprint = export_lib.export_fingerprint(self.params)
    return self._fingerprint

  @property
  def embed_dim(self) -> int:
    return self.model_config.embed_dim

  # ------------------------------------------------------------------------------------ batching

  def _round_batch(self, batch_size: int) -> int:
    if batch_size < 1:
      raise ValueError(f"Encoder: batch_size must be positive, got {batch_size}")
    return int(math.ceil(batch_size / self._n_shards) * self._n_shards)

  def _put(self, batch: Mapping[str, np.ndarray]):
    if self._batch_sharding is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, self._batch_sharding) for k, v in batch.items()}

  def _batched(self, fn: Callable, arrays: Sequence[Mapping[str, np.ndarray]], batch_size: int | None,
               out_tail: tuple[int, ...]) -> np.ndarray:
    """fn(params, *dicts) over fixed-size row chunks of `arrays`; the last chunk is padded with all-masked
    zero rows (dropped from the result)."""
    n = len(next(iter(arrays[0].values())))
    for a in arrays:
      for k, v in a.items():
        if len(v) != n:
          raise ValueError(f"Encoder: input {k!r} has {len(v)} rows, expected {n}")
    bs = self._round_batch(batch_size or self.batch_size)
    outs, pending = [], None

    def fetch(result, rows):  # gathers a multi-host mesh too
      outs.append(export_lib.host_array(result).astype(np.float32)[:rows])

    for start in range(0, n, bs):  # no bar here: callers of the *_inputs methods loop with their own
      chunk = []
      for a in arrays:
        part = {}
        for k, v in a.items():
          v = np.asarray(v[start:start + bs])
          if len(v) < bs:
            v = np.concatenate([v, np.zeros((bs - len(v),) + v.shape[1:], v.dtype)])
          part[k] = v
        chunk.append(self._put(part))
      # Dispatch this batch before waiting for the previous one: host preparation overlaps device work.
      result = fn(self.params, *chunk)
      if pending is not None:
        fetch(*pending)
      pending = (result, min(bs, n - start))
    if pending is not None:
      fetch(*pending)
    return np.concatenate(outs) if outs else np.zeros((0,) + out_tail, np.float32)

  # ------------------------------------------------------------------------------------ decomposed

  def pooled(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, batch_size=None) -> np.ndarray:
    """The raw pooled embedding (before L2 normalisation), float32 [B, D], eval mode.

    Text branch: ids/types/mask [B, L]. Image branch: tag ids/types [B, L_t], mask [B, L_t + R],
    img_feats [B, R, F]."""
    batch = {"input_ids": np.asarray(input_ids, np.int32), "token_type_ids": np.asarray(token_type_ids, np.int32),
             "attention_mask": np.asarray(attention_mask, np.int32)}
    if img_feats is not None:
      batch["img_feats"] = np.asarray(img_feats, np.float32)
    return self._batched(self._embed, [batch], batch_size, (self.embed_dim,))

  def embed_text_inputs(self, text: Mapping[str, np.ndarray], *, batch_size=None) -> np.ndarray:
    """L2-normalised caption embeddings [N, D] from `inputs.text_inputs` arrays."""
    return l2_normalize(self.pooled(text["input_ids"], text["token_type_ids"], text["attention_mask"],
                                    batch_size=batch_size))

  def embed_image_inputs(self, image: Mapping[str, np.ndarray], *, batch_size=None) -> np.ndarray:
    """L2-normalised image embeddings [N, D] from `inputs.image_inputs` arrays."""
    return l2_normalize(self.pooled(image["input_ids"], image["token_type_ids"], image["attention_mask"],
                                    image["img_feats"], batch_size=batch_size))

  def _chunks(self, n: int, batch_size: int | None, desc: str):
    bs = self._round_batch(batch_size or self.batch_size)
    return tqdm(range(0, n, bs), desc=desc, disable=not self.progress or n <= bs, unit="batch"), bs

  def embed_texts(self, captions: Sequence[str], *, batch_size=None) -> np.ndarray:
    """Captions (str or bytes) -> L2-normalised float32 [N, D], tokenised per docs/method.md §3.1."""
    cfg = self.model_config
    it, bs = self._chunks(len(captions), batch_size, "embed_texts")
    outs = [self.embed_text_inputs(inputs.text_inputs(self.tokenizer, captions[s:s + bs], cfg.max_text_len),
                                   batch_size=bs) for s in it]
    return np.concatenate(outs) if outs else np.zeros((0, self.embed_dim), np.float32)

  def image_inputs(self, region_features: Sequence[np.ndarray], tags: Sequence[str]) -> dict[str, np.ndarray]:
    cfg = self.model_config
    return inputs.image_inputs(self.tokenizer, region_features, tags, cfg.tag_len, cfg.max_regions,
                               cfg.img_feature_dim)

  def embed_images(self, region_features: Sequence[np.ndarray], tags: Sequence[str], *,
                   batch_size=None) -> np.ndarray:
    """Images (region features [n_i, F] each, and their tag strings) -> L2-normalised float32 [N, D]."""
    if len(region_features) != len(tags):
      raise ValueError(f"embed_images: {len(region_features)} region feature arrays but {len(tags)} tag strings")
    it, bs = self._chunks(len(tags), batch_size, "embed_images")
    outs = [self.embed_image_inputs(self.image_inputs(region_features[s:s + bs], tags[s:s + bs]), batch_size=bs)
            for s in it]
    return np.concatenate(outs) if outs else np.zeros((0, self.embed_dim), np.float32)

  # ------------------------------------------------------------------------------ token states

  def text_token_states_inputs(self, text: Mapping[str, np.ndarray], *,
                               batch_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Word states of captions for late interaction (retrieval/late_interaction.py), from
    `inputs.text_inputs` arrays: (states float32 [N, L_t, H], mask int32 [N, L_t]).

    States: the last layer's sequence output of the text-only (decomposed) forward, every position
    L2-normalised, in the hidden space H (no mean pooling, no tanh, no projection). The mask marks the
    caption's wordpieces: [CLS], [SEP] and padding are 0 (`late_interaction.content_mask`). Positions stay
    where the tokenizer put them."""
    states = self._batched(self._token_states, [{k: np.asarray(text[k], np.int32) for k in inputs.TEXT_KEYS}],
                           batch_size, (self.model_config.max_text_len, self.model_config.hidden_size))
    return states, np.asarray(late_interaction.content_mask(text["attention_mask"], np.shape(text["input_ids"])[1]))

  def image_token_states_inputs(self, image: Mapping[str, np.ndarray], *,
                                batch_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Token states of images for late interaction, from `inputs.image_inputs` arrays: (states float32
    [N, L_g + R, H], mask int32 [N, L_g + R]): the tag tokens then the regions, as the image-only
    (decomposed) forward lays them out. States as `text_token_states_inputs`; the mask marks the tag
    wordpieces and the real regions: the tags' [CLS] and [SEP], padded tags and padded regions are 0."""
    batch = {k: np.asarray(image[k], np.float32 if k == "img_feats" else np.int32) for k in inputs.IMAGE_KEYS}
    width = batch["attention_mask"].shape[1]
    states = self._batched(self._token_states, [batch], batch_size, (width, self.model_config.hidden_size))
    return states, np.asarray(late_interaction.content_mask(batch["attention_mask"], batch["input_ids"].shape[1]))

  def text_token_states(self, captions: Sequence[str], *, batch_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Captions (str or bytes) -> `text_token_states_inputs` (states [N, L_t, H], mask [N, L_t])."""
    cfg = self.model_config
    it, bs = self._chunks(len(captions), batch_size, "text_token_states")
    outs = [self.text_token_states_inputs(inputs.text_inputs(self.tokenizer, captions[s:s + bs], cfg.max_text_len),
                                          batch_size=bs) for s in it]
    if not outs:
      return (np.zeros((0, cfg.max_text_len, cfg.hidden_size), np.float32), np.zeros((0, cfg.max_text_len), np.int32))
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

  def image_token_states(self, region_features: Sequence[np.ndarray], tags: Sequence[str], *,
                         batch_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Images (region features [n_i, F] each, tag strings) -> `image_token_states_inputs` (states
    [N, L_g + R, H], mask [N, L_g + R])."""
    if len(region_features) != len(tags):
      raise ValueError(f"image_token_states: {len(region_features)} region feature arrays but {len(tags)} tag "
                       "strings")
    cfg = self.model_config
    it, bs = self._chunks(len(tags), batch_size, "image_token_states")
    outs = [self.image_token_states_inputs(self.image_inputs(region_features[s:s + bs], tags[s:s + bs]),
                                           batch_size=bs) for s in it]
    if not outs:
      width = cfg.tag_len + cfg.max_regions
      return np.zeros((0, width, cfg.hidden_size), np.float32), np.zeros((0, width), np.int32)
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

  # ------------------------------------------------------------------------------ early interaction

  def match_scores_inputs(self, text: Mapping[str, np.ndarray], image: Mapping[str, np.ndarray], *,
                          batch_size=None) -> np.ndarray:
    """softmax(classifier(pooler(h_CLS)))[:, 1] for pairs (text row i, image row i), float32 [N].

    `text` / `image`: `inputs.text_inputs` / `inputs.image_inputs` arrays; packed on device into
    `[CLS] caption [SEP] tags [SEP]` + regions by `inputs.pack_pairs`."""
    self._require_match_head()
    text = {k: np.asarray(text[k], np.int32) for k in inputs.TEXT_KEYS}
    image = {k: np.asarray(image[k], np.float32 if k == "img_feats" else np.int32) for k in inputs.IMAGE_KEYS}
    return self._batched(self._match, [text, image], batch_size, ())

  def match_logit_margin_inputs(self, text: Mapping[str, np.ndarray], image: Mapping[str, np.ndarray], *,
                                batch_size=None) -> np.ndarray:
    """logit[1] - logit[0] of the early-interaction head for pairs (text row i, image row i), float32 [N].

    Orders pairs exactly as `match_scores_inputs` (softmax[1] = sigmoid(margin)) but never saturates into
    ties at 1.0 in float32, so rankings use it (`retrieval.evaluate`)."""
    self._require_match_head()
    text = {k: np.asarray(text[k], np.int32) for k in inputs.TEXT_KEYS}
    image = {k: np.asarray(image[k], np.float32 if k == "img_feats" else np.int32) for k in inputs.IMAGE_KEYS}
    return self._batched(self._match_margin, [text, image], batch_size, ())

  def match_scores(self, region_features: Sequence[np.ndarray], tags: Sequence[str], captions: Sequence[str], *,
                   batch_size=None) -> np.ndarray:
    """Early-interaction score of each (image i, caption i) pair, float32 [N]."""
    if not len(region_features) == len(tags) == len(captions):
      raise ValueError(f"match_scores: {len(region_features)} images, {len(tags)} tag strings and "
                       f"{len(captions)} captions; pairs need equal counts")
    cfg = self.model_config
    it, bs = self._chunks(len(captions), batch_size, "match_scores")
    outs = [self.match_scores_inputs(
        inputs.text_inputs(self.tokenizer, captions[s:s + bs], cfg.max_text_len),
        self.image_inputs(region_features[s:s + bs], tags[s:s + bs]), batch_size=bs) for s in it]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)
