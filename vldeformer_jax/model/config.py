"""The model's sizes and switches, as one frozen dataclass that round-trips through JSON.

Sizes always come from a checkpoint's `config.json` (HF/Oscar field names) when converting, and from the
export's `model_config.json` afterwards; nothing about BERT-base is hard-coded in the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

POOLINGS = ("mean", "masked_mean", "cls")
DTYPES = ("float32", "bfloat16")
# Rematerialisation of the encoder layers in the backward pass (model/vldeformer.py, docs/method.md §4.6):
# `none`; `full` (keep each layer's input only, recompute the rest); `dots` (keep every matmul output,
# attention scores included); `dots_no_batch` (keep the weight matmuls' outputs, recompute attention).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Oscar/VinVL `BertImgModel` sizes plus the VLDeformer pooling and input lengths."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  # Regions: Linear(img_feature_dim -> hidden) -> LayerNorm(img_layer_norm_eps) -> dropout (docs/method.md §1.2).
  img_feature_dim: int = 2054
  use_img_layernorm: bool = True
  img_layer_norm_eps: float = 1e-12
  # Early-interaction head: softmax(classifier(pooler(h_CLS)))[1] is the match score (docs/method.md §2.2).
  num_labels: int = 2
  # Decomposed embedding (docs/method.md §2.1): pooling over the output sequence, then dropout, then tanh.
  pooling: str = "mean"
  projection_dim: int = 0  # 0: no projection head (the released model); >0: a Linear after tanh.
  # Input lengths (docs/method.md §3.2): caption tokens, tag tokens, regions.
  max_text_len: int = 35
  max_tag_len: int = 0  # 0: max_text_len, as in docs/method.md §3.2; shorter where tags are short (the demo: 8)
  max_regions: int = 70
  # Compute dtype; parameters always stay float32.
  dtype: str = "float32"
  # Training memory only: what the backward pass keeps of each encoder layer (REMAT_POLICIES). Results and
  # parameter names do not depend on it.
  remat: str = "none"

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"model config field 'pooling' must be one of {POOLINGS}, got {self.pooling!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model config field 'dtype' must be one of {DTYPES}, got {self.dtype!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model config field 'remat' must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"model config: hidden_size {self.hidden_size} is not divisible by "
          f"num_attention_heads {self.num_attention_heads}")
    if self.max_text_len > self.max_position_embeddings:
      raise ValueError(
          f"model config: max_text_len {self.max_text_len} exceeds max_position_embeddings "
          f"{self.max_position_embeddings}")

  @property
  def tag_len(self) -> int:
    """Tag tokens of the image input: `max_tag_len`, or `max_text_len` when that is 0."""
    return self.max_tag_len or self.max_text_len

  @property
  def packed_len(self) -> int:
    """Token positions of `[CLS] caption [SEP] tags [SEP]` as `inputs.pack_pairs` builds it."""
    return self.max_text_len + self.tag_len - 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def embed_dim(self) -> int:
    return self.projection_dim or self.hidden_size

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, strict: bool = False, source: str = "config") -> "ModelConfig":
    """Builds a config from a dict; unknown keys are an error when `strict`, else ignored.

    Accepts the HF/Oscar `config.json` spelling: `hidden_act` must be gelu (the erf form), and
    `img_layer_norm_eps` defaults to `layer_norm_eps` when absent.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if strict and unknown:
      raise ValueError(f"{source}: unknown model config keys {unknown}")
    act = d.get("hidden_act", "gelu")
    if act not in ("gelu",):
      raise ValueError(f"{source}: hidden_act {act!r} is not supported (only the exact erf 'gelu' of BERT)")
    kwargs = {k: v for k, v in d.items() if k in names}
    if "img_layer_norm_eps" not in d and "layer_norm_eps" in d:
      kwargs["img_layer_norm_eps"] = d["layer_norm_eps"]
    if "use_img_layernorm" in kwargs:
      kwargs["use_img_layernorm"] = bool(kwargs["use_img_layernorm"])
    try:
      return cls(**kwargs)
    except TypeError as e:
      raise ValueError(f"{source}: {e}") from e

  @classmethod
  def from_json(cls, path: str | os.PathLike, **kwargs) -> "ModelConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    return cls.from_dict(d, source=str(path), **kwargs)

  def to_json(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2, sort_keys=True)
