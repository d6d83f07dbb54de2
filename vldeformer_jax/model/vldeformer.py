"""The Oscar/VinVL `BertImgModel` in Flax, with its two forwards: decomposed and early-interaction.

Why linen: the parameter tree is a plain nested dict whose paths are the PyTorch state-dict keys with
`.` -> `/` (`bert/encoder/layer/3/attention/self/query/kernel`), so checkpoint conversion is a rename
table, orbax saves it as it is, and sharding rules match on those same paths. HF's v4 Flax BERT used
the same names, which keeps converted trees familiar.

One set of weights serves every use (docs/method.md §2):
- `VLDeformer.embed`: one modality alone (a caption, or tags + regions) -> pooled embedding. This is the
  decomposed encoder: call it once for texts and once for images.
- `VLDeformer.match_logits`: caption + tags + regions together -> 2-way logits of the VinVL retrieval head;
  softmax(...)[..., 1] is the early-interaction match score.
- `VLDeformer.mlm_logits`: the masked-language-model head (tied to the word embeddings), for stage 1.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.model.dropout import Dropout

Array = jax.Array

# The additive key mask of BERT/Oscar (docs/method.md §1.1): -10000, not -inf, so fully padded rows stay finite and
# match the PyTorch reference exactly.
MASK_VALUE = -10000.0


def gelu(x: Array) -> Array:
  """BERT's GELU as its code writes it, x/2 (1 + erf(x / sqrt 2)) (docs/method.md §1.1): the same float32 formula
  as the PyTorch reference, and on XLA's CPU backend about 3x faster, forward + backward, than flax's erfc form
  `nn.gelu(x, approximate=False)` (BENCHMARKS.md table 1b)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def compute_dtype(config: ModelConfig):
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def _dense(config: ModelConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=compute_dtype(config),
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name)


def _layer_norm(config: ModelConfig, name: str, eps: float | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps if eps is None else eps,
      dtype=compute_dtype(config),
      param_dtype=jnp.float32,
      name=name)


class BertEmbeddings(nn.Module):
  """Word + position (0..L-1) + token-type embeddings, LayerNorm, dropout."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    cfg = self.config

    def embed(num, name):
      return nn.Embed(num, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                      embedding_init=nn.initializers.normal(cfg.initializer_range), name=name)

    positions = jnp.arange(input_ids.shape[-1])[None, :]
    h = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
         + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    h = _layer_norm(cfg, "LayerNorm")(h)
    return Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head attention with an additive key mask; the fused XLA kernel when there is no dropout."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, bias, deterministic: bool):
    cfg = self.config
    shape = h.shape[:-1] + (cfg.num_attention_heads, cfg.head_dim)
    q = _dense(cfg, cfg.hidden_size, "query")(h).reshape(shape)
    k = _dense(cfg, cfg.hidden_size, "key")(h).reshape(shape)
    v = _dense(cfg, cfg.hidden_size, "value")(h).reshape(shape)
    bias = bias.astype(q.dtype)
    dropout = cfg.attention_probs_dropout_prob
    if deterministic or dropout == 0.0:
      ctx = jax.nn.dot_product_attention(q, k, v, bias=bias)
    else:
      # jax.nn.dot_product_attention has no dropout on the probabilities: spell it out in training.
      logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(cfg.head_dim) + bias
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      probs = Dropout(dropout)(probs, deterministic=False)
      ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    return ctx.reshape(h.shape[:-1] + (cfg.hidden_size,))


class BertResidualOutput(nn.Module):
  """Dense -> dropout -> add residual -> LayerNorm: the post-LN tail of both BERT sub-blocks."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    x = _dense(self.config, self.config.hidden_size, "dense")(x)
    x = Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
    return _layer_norm(self.config, "LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h, bias, deterministic: bool):
    ctx = BertSelfAttention(self.config, name="self")(h, bias, deterministic)
    return BertResidualOutput(self.config, name="output")(ctx, h, deterministic)


class BertIntermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    return gelu(_dense(self.config, self.config.intermediate_size, "dense")(h))


class BertLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h, bias, deterministic: bool):
    h = BertAttention(self.config, name="attention")(h, bias, deterministic)
    inner = BertIntermediate(self.config, name="intermediate")(h)
    return BertResidualOutput(self.config, name="output")(inner, h, deterministic)


# `ModelConfig.remat` -> the jax.checkpoint policy of each encoder layer (None: save nothing but the input).
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BertLayerCollection(nn.Module):
  """The encoder layers `layer/0`, `layer/1`, ...; with `config.remat` each one is wrapped in `nn.remat`,
  which keeps the module (and so the parameter) names and recomputes the layer in the backward pass."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, bias, deterministic: bool):
    layer = BertLayer
    if self.config.remat != "none":  # argnum 3 is `deterministic` (0 is the module)
      layer = nn.remat(BertLayer, static_argnums=(3,), policy=_REMAT_POLICIES[self.config.remat])
    for i in range(self.config.num_hidden_layers):
      h = layer(self.config, name=str(i))(h, bias, deterministic)
    return h


class BertEncoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h, bias, deterministic: bool):
    return BertLayerCollection(self.config, name="layer")(h, bias, deterministic)


class BertImgModel(nn.Module):
  """Oscar/VinVL BertImgModel (docs/method.md §1.1): tokens first, then regions, one post-LN BERT encoder.

  `attention_mask` covers the tokens then the regions: [B, L_tokens + L_regions]. Regions get no position
  or token-type embedding; they go through Linear -> LayerNorm -> dropout and are appended after the
  tokens. Returns (sequence output [B, L, H], pooler output tanh(Dense(h_CLS)) [B, H]).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    cfg = self.config
    dtype = compute_dtype(cfg)
    parts = []
    if input_ids is not None:
      parts.append(BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic))
    if img_feats is not None:
      # A non-zero bias init (PyTorch's Linear has one too): with a zero bias, zero-padded regions reach
      # the LayerNorm (eps 1e-12) as a constant vector and a random-init model's gradients explode.
      init = nn.initializers.normal(cfg.initializer_range)
      e = nn.Dense(cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, bias_init=init,
                   name="img_embedding")(img_feats.astype(dtype))
      if cfg.use_img_layernorm:
        e = _layer_norm(cfg, "LayerNorm", eps=cfg.img_layer_norm_eps)(e)
      parts.append(Dropout(cfg.hidden_dropout_prob)(e, deterministic=deterministic))
    h = jnp.concatenate([p.astype(dtype) for p in parts], axis=1) if len(parts) > 1 else parts[0].astype(dtype)
    if attention_mask.shape != h.shape[:2]:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, but the input sequence has shape "
                       f"{h.shape[:2]} (tokens then regions)")
    bias = (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * MASK_VALUE
    h = BertEncoder(cfg, name="encoder")(h, bias, deterministic)
    return h, BertPooler(cfg, name="pooler")(h)


class BertPooler(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h[:, 0]))


class MlmTransform(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, h):
    h = _dense(self.config, self.config.hidden_size, "dense")(h)
    return _layer_norm(self.config, "LayerNorm")(gelu(h))


class MlmPredictions(nn.Module):
  """BERT's `cls.predictions`: transform (Dense, GELU, LayerNorm), then the tied word-embedding decoder."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, word_embeddings: Array):
    h = MlmTransform(self.config, name="transform")(h)
    bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), jnp.float32)
    logits = jnp.einsum("...h,vh->...v", h, word_embeddings.astype(h.dtype))
    return logits.astype(jnp.float32) + bias


class MlmHeads(nn.Module):
  """`cls/predictions/...` in the PyTorch key layout."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h, word_embeddings):
    return MlmPredictions(self.config, name="predictions")(h, word_embeddings)


class VLDeformer(nn.Module):
  """The shared VL transformer with its decomposed, early-interaction and MLM heads.

  Parameter tree: `bert/...` (the backbone), `classifier/...` (VinVL retrieval head, [H, num_labels]),
  `cls/predictions/...` (MLM head), and `projection/...` only when `projection_dim > 0`.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.bert = BertImgModel(cfg)
    self.embed_dropout = Dropout(cfg.hidden_dropout_prob)
    self.classifier_dropout = Dropout(cfg.hidden_dropout_prob)
    self.classifier = _dense(cfg, cfg.num_labels, "classifier")
    self.cls = MlmHeads(cfg)
    if cfg.projection_dim:
      self.projection = _dense(cfg, cfg.projection_dim, "projection")

  def __call__(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    """Runs every head once; used to initialise the whole tree."""
    emb = self.embed(input_ids, token_type_ids, attention_mask, img_feats, deterministic=deterministic)
    logits = self.match_logits(input_ids, token_type_ids, attention_mask, img_feats,
                               deterministic=deterministic)
    h, _ = self.bert(input_ids, token_type_ids, attention_mask, img_feats, deterministic=deterministic)
    return emb, logits, self.mlm_logits(h[:, :2])

  def encode(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    """The backbone forward of docs/method.md §1: (sequence output, pooler output)."""
    return self.bert(input_ids, token_type_ids, attention_mask, img_feats, deterministic=deterministic)

  def embed(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    """Decomposed single-modality embedding (docs/method.md §2.1), before L2 normalisation, float32 [B, D].

    `mean` (the released model): unmasked mean over every position, padding included; `masked_mean`:
    over the unmasked positions; `cls`: the BERT pooler output. Then dropout (training only), tanh
    (not for `cls`, which already ends in tanh), and the optional projection.
    """
    h, pooled_cls = self.bert(input_ids, token_type_ids, attention_mask, img_feats,
                              deterministic=deterministic)
    return self._pool(h, pooled_cls, attention_mask, deterministic)

  def embed_with_states(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    """`embed` and the last layer's sequence output [B, L, H] (float32) of the same forward, with the same
    dropout: the pooled embedding and the token states late interaction scores (training/decompose.py)."""
    h, pooled_cls = self.bert(input_ids, token_type_ids, attention_mask, img_feats,
                              deterministic=deterministic)
    return self._pool(h, pooled_cls, attention_mask, deterministic), h.astype(jnp.float32)

  def _pool(self, h, pooled_cls, attention_mask, deterministic):
    h = h.astype(jnp.float32)
    pooling = self.config.pooling
    if pooling == "mean":
      x = jnp.mean(h, axis=1)
    elif pooling == "masked_mean":
      m = attention_mask.astype(jnp.float32)[..., None]
      x = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    else:
      x = pooled_cls.astype(jnp.float32)
    x = self.embed_dropout(x, deterministic=deterministic)
    if pooling != "cls":
      x = jnp.tanh(x)
    if self.config.projection_dim:
      x = self.projection(x)
    return x.astype(jnp.float32)

  def match_logits(self, input_ids, token_type_ids, attention_mask, img_feats=None, *, deterministic=True):
    """Early-interaction logits [B, num_labels] from the pooler (VinVL retrieval head, docs/method.md §2.2)."""
    _, pooled_cls = self.bert(input_ids, token_type_ids, attention_mask, img_feats,
                              deterministic=deterministic)
    return self.match_head(pooled_cls, deterministic=deterministic)

  def match_head(self, pooled_cls, *, deterministic=True):
    """The retrieval head on a pooler output [B, H] (dropout, then the classifier): logits [B, num_labels]."""
    pooled_cls = self.classifier_dropout(pooled_cls, deterministic=deterministic)
    return self.classifier(pooled_cls).astype(jnp.float32)

  def mlm_logits(self, hidden):
    """Vocabulary logits for hidden states [..., H] (gather the masked positions first)."""
    word_embeddings = self.bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return self.cls(hidden, word_embeddings)


def init_params(config: ModelConfig, rng: Array) -> dict[str, Any]:
  """Random parameters for every head, from tiny dummy inputs (shapes do not depend on lengths)."""
  model = VLDeformer(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  mask = jnp.ones((1, 3), jnp.int32)
  feats = jnp.zeros((1, 1, config.img_feature_dim), jnp.float32)
  return model.init({"params": rng}, ids, ids, mask, feats)["params"]
