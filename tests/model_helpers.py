"""Helpers shared by the tests: random model parameters without compiling init."""
import jax
import numpy as np

from vldeformer_jax.model.vldeformer import init_params


def tiny_params(cfg, seed):
  """Random parameters of the right shapes without compiling init (jax.eval_shape + numpy): fast."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.PRNGKey(0))

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(x.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(x.shape, np.float32)
    return (0.2 * rng.normal(size=x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def tiny_text_model(text_len: int, regions: int, feature_dim: int):
  """A 1-layer, 32-wide ModelConfig without dropout, for wiring tests of the decomposition objective."""
  from vldeformer_jax.model.config import ModelConfig
  return ModelConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, img_feature_dim=feature_dim,
                     max_text_len=text_len, max_regions=regions, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def random_text_rows(rs: np.random.RandomState, rows: int, text_len: int) -> dict[str, np.ndarray]:
  """`rows` full-length token rows [CLS] random ids [SEP] of the tiny model's vocabulary (ids 110-199)."""
  ids = rs.randint(110, 200, size=(rows, text_len)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


# ------------------------------------------------------------------------------------------------------
# Rule F32 sizes of the model (tests/tolerances.py): chain lengths and logit magnitudes.


def embed_depth(cfg) -> int:
  """n of `VLDeformer.embed` and the L2 normalisation for a ModelConfig, over the longer branch (text, or
  tags + regions)."""
  from tolerances import transformer_depth
  seq = max(cfg.max_text_len, cfg.tag_len + cfg.max_regions)
  return transformer_depth(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                           heads=cfg.num_attention_heads, seq_len=seq, pooling_len=seq)


def match_depth(cfg) -> int:
  """n of the early-interaction logits: the forward over a packed pair, the pooler (dense, tanh), the
  classifier (dense)."""
  from tolerances import ELEMENTARY, transformer_depth
  seq = cfg.max_text_len + cfg.tag_len + cfg.max_regions
  return (transformer_depth(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                            heads=cfg.num_attention_heads, seq_len=seq)
          + (cfg.hidden_size + 2 + ELEMENTARY) + (cfg.hidden_size + 1))


def logit_bounds(params) -> tuple[float, float]:
  """Upper bounds on |match logit| and |MLM logit| from the parameters: the pooler output is a tanh
  (|.| <= 1); a LayerNorm output component is at most sqrt(H) |scale| + |bias|."""
  cls = params["classifier"]
  itm = float(np.max(np.abs(np.asarray(cls["kernel"])).sum(0) + np.abs(np.asarray(cls["bias"]))))
  head = params["cls"]["predictions"]
  ln = head["transform"]["LayerNorm"]
  emb = np.abs(np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"]))
  h_max = np.sqrt(emb.shape[1]) * np.abs(np.asarray(ln["scale"])) + np.abs(np.asarray(ln["bias"]))
  mlm = float(np.max(emb @ h_max + np.abs(np.asarray(head["bias"]))))
  return itm, mlm
