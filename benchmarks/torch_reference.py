"""The PyTorch eager reference of the decomposed training step, written from transformers' BERT modules.

Why in the benchmark and not in the package: it is the yardstick the JAX step is judged against (table 1),
built the way a PyTorch user would build VLDeformer today: `BertEmbeddings` + `BertEncoder` with eager
attention, `nn.Linear` + `nn.LayerNorm` for the regions (docs/method.md §1.1), the unmasked mean -> dropout -> tanh
pooling of both branches (docs/method.md §2.1), InfoNCE summed over both directions at temperature 0.005 (docs/method.md §4.1)
and `torch.optim.AdamW` (its default foreach implementation) with global-norm clipping at 1.0 and weight
decay 0.05 off biases and LayerNorm weights (docs/method.md §6.1).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder


def bert_config(cfg) -> BertConfig:
  """A transformers BertConfig (eager attention) from a `ModelConfig`."""
  c = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                 num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                 intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                 type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps,
                 hidden_dropout_prob=cfg.hidden_dropout_prob,
                 attention_probs_dropout_prob=cfg.attention_probs_dropout_prob, hidden_act="gelu")
  c._attn_implementation = "eager"
  return c


class TorchVLDeformer(nn.Module):
  """Oscar/VinVL BertImgModel (no pooler: the decomposed embedding does not use it) + VLDeformer pooling."""

  def __init__(self, cfg):
    super().__init__()
    bc = bert_config(cfg)
    self.embeddings = BertEmbeddings(bc)
    self.encoder = BertEncoder(bc)
    self.img_embedding = nn.Linear(cfg.img_feature_dim, cfg.hidden_size)
    self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.img_layer_norm_eps)
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def embed(self, input_ids, token_type_ids, attention_mask, img_feats=None):
    h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    if img_feats is not None:
      h = torch.cat([h, self.dropout(self.LayerNorm(self.img_embedding(img_feats)))], dim=1)
    bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    h = self.encoder(h, attention_mask=bias)[0]
    return torch.tanh(self.dropout(h.mean(dim=1)))


def info_nce(text, image, temperature: float = 0.005):
  t = nn.functional.normalize(text, dim=1)
  v = nn.functional.normalize(image, dim=1)
  sim = t @ v.T
  labels = torch.arange(len(t))
  return (nn.functional.cross_entropy(sim / temperature, labels)
          + nn.functional.cross_entropy(sim.T / temperature, labels))


def make_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if name.endswith("bias") or "LayerNorm.weight" in name else decay).append(p)
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-8)


def make_step(model: TorchVLDeformer, opt, batch: dict, temperature: float = 0.005, max_grad_norm: float = 1.0):
  """A closure running one eager training step on torch tensors built from the numpy `batch`."""
  b = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v) for k, v in batch.items()}
  model.train()

  def step():
    text = model.embed(b["text_input_ids"], b["text_token_type_ids"], b["text_attention_mask"])
    image = model.embed(b["image_input_ids"], b["image_token_type_ids"], b["image_attention_mask"],
                        b["image_img_feats"])
    loss = info_nce(text, image, temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return float(loss)

  return step


def make_forward(model: TorchVLDeformer, batch: dict):
  """A closure running the two eval-mode branches under no_grad (the encoder's inference cost)."""
  b = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v) for k, v in batch.items()}

  def forward():
    model.eval()
    with torch.no_grad():
      model.embed(b["text_input_ids"], b["text_token_type_ids"], b["text_attention_mask"])
      model.embed(b["image_input_ids"], b["image_token_type_ids"], b["image_attention_mask"],
                  b["image_img_feats"])
    model.train()

  return forward
