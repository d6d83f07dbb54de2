"""Table 1b: the pieces of the training step, each against its alternatives, at BERT-base size.

Why: the step's speed is decided by a few choices (how the optimiser update is fused, how the word-
embedding gradient is formed, which attention path runs with dropout, how dropout masks are drawn, how GELU
is spelled, whose matmuls run the dense layers);
this measures each choice in isolation, interleaved in one process, so the choices in `model.py` /
`optim.py` rest on numbers from this machine rather than folklore.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from benchmarks import common


def optimizer_group(cfg):
  """The AdamW update (+ global-norm clipping) over the full parameter tree: optax (jitted, donated) vs
  torch.optim.AdamW (foreach, and fused)."""
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  from vldeformer_jax.training.defaults import base_config
  from vldeformer_jax.training import optim
  from vldeformer_jax.model.vldeformer import init_params

  # Zeros of the parameter tree's shapes: the update's cost does not depend on the values, and
  # jax.eval_shape needs no compilation of the random initialiser.
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  trainable = {"model": params, "log_temperature": jnp.zeros(())}
  tx, _ = optim.make_optimizer(base_config().train, total_steps=1000)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), trainable)
  hold = {"p": trainable, "o": tx.init(trainable)}

  def update(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  update = jax.jit(update, donate_argnums=(0, 1))

  def run_optax():
    hold["p"], hold["o"] = update(hold["p"], hold["o"], grads)
    jax.block_until_ready(hold["p"])

  n = sum(x.size for x in jax.tree.leaves(params))
  shapes = [x.shape for x in jax.tree.leaves(params)]

  def torch_fn(fused: bool):
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in ps:
      p.grad = torch.full(p.shape, 1e-3)
    opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.05, foreach=not fused, fused=fused or None)

    def run():
      torch.nn.utils.clip_grad_norm_(ps, 1.0)
      opt.step()
    return run

  return {"name": f"AdamW + clip, {n / 1e6:.0f}M parameters",
          "variants": {"optax (optim.py, jitted, donated)": run_optax, "torch AdamW foreach": torch_fn(False),
                       "torch AdamW fused": torch_fn(True)}}


def embedding_grad_group(cfg, tokens: int):
  """Gradient of the word-embedding table from `tokens` looked-up rows: XLA's scatter-add (what jnp.take's
  transpose gives) vs a one-hot matmul, vs PyTorch's dense embedding backward."""
  import jax
  import jax.numpy as jnp
  import torch
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, tokens), jnp.int32)
  table = jnp.asarray(rng.standard_normal((cfg.vocab_size, cfg.hidden_size), np.float32) * 0.02)
  cot = jnp.asarray(rng.standard_normal((tokens, cfg.hidden_size), np.float32))

  # ids and cotangent are arguments: closed over, they are constants and XLA folds the whole gradient at compile time.
  take = jax.jit(jax.grad(lambda e, ids, cot: jnp.sum(jnp.take(e, ids, axis=0) * cot)))
  onehot = jax.jit(jax.grad(
      lambda e, ids, cot: jnp.sum((jax.nn.one_hot(ids, cfg.vocab_size, dtype=e.dtype) @ e) * cot)))
  te = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
  tids = torch.from_numpy(np.asarray(ids)).long()
  tcot = torch.from_numpy(np.asarray(cot))

  def run_torch():
    te.weight.grad = None
    (te(tids) * tcot).sum().backward()

  return {"name": f"word-embedding gradient, {tokens} tokens into [{cfg.vocab_size}, {cfg.hidden_size}]",
          "variants": {"jnp.take -> scatter-add (model.py)": lambda: take(table, ids, cot).block_until_ready(),
                       "one-hot matmul": lambda: onehot(table, ids, cot).block_until_ready(),
                       "torch nn.Embedding backward": run_torch}}


def attention_group(cfg, batch: int, length: int):
  """Self-attention forward + backward on the image branch's shape: the training path (einsum, softmax,
  dropout on the probabilities) vs the same without dropout vs jax.nn.dot_product_attention (no dropout
  support)."""
  import jax
  import jax.numpy as jnp
  from vldeformer_jax.model.dropout import Dropout
  rng = np.random.default_rng(0)
  shape = (batch, length, cfg.num_attention_heads, cfg.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
  bias = jnp.zeros((batch, 1, 1, length), jnp.float32)
  key = jax.random.key(0)
  scale = 1 / math.sqrt(cfg.head_dim)

  def einsum_attn(q, k, v, bias, key, dropout):
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) * scale + bias
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout:  # the model's dropout (model/dropout.py) at rate 0.1
      probs = Dropout(0.1).apply({}, probs, deterministic=False, rngs={"dropout": key})
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)

  def grad_of(f):  # bias and key are arguments: as closed-over constants XLA would fold the mask and the bias
    return jax.jit(jax.grad(lambda q, k, v, bias, key: jnp.sum(f(q, k, v, bias, key) ** 2), argnums=(0, 1, 2)))

  fns = {"einsum + dropout (training path)": grad_of(lambda *a: einsum_attn(*a, dropout=True)),
         "einsum, no dropout": grad_of(lambda *a: einsum_attn(*a, dropout=False)),
         "jax.nn.dot_product_attention, no dropout": grad_of(
             lambda q, k, v, bias, key: jax.nn.dot_product_attention(q, k, v, bias=bias))}
  return {"name": f"attention fwd+bwd x {cfg.num_hidden_layers} layers, [{batch}, {length}, "
                  f"{cfg.num_attention_heads}x{cfg.head_dim}]",
          "variants": {n: (lambda f=f: [jax.block_until_ready(f(q, k, v, bias, key))
                                        for _ in range(cfg.num_hidden_layers)])
                       for n, f in fns.items()}}


def dropout_group(cfg, batch: int):
  """Dropout over one step's mask elements (hidden states and attention probabilities of both branches, every
  layer): the model's 16-bit decisions, four per threefry hash (model/dropout.py) vs flax's float32 uniform
  per element, with JAX's default key and with the 'rbg' key implementation (XLA's RngBitGenerator)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from vldeformer_jax.model.dropout import Dropout
  L, T = cfg.max_text_len, cfg.max_text_len + cfg.max_regions
  per_layer = sum(2 * batch * n * cfg.hidden_size + batch * cfg.num_attention_heads * n * n for n in (L, T))
  count = per_layer * cfg.num_hidden_layers
  x = jnp.ones((count // cfg.hidden_size, cfg.hidden_size), jnp.float32)

  def masks(module, impl):
    key = jax.random.key(0, impl=impl)
    f = jax.jit(lambda k, x: module.apply({}, x, deterministic=False, rngs={"dropout": k}).sum())
    return lambda: f(key, x).block_until_ready()

  rate = cfg.hidden_dropout_prob
  return {"name": f"dropout of one step ({x.size / 1e6:.0f}M elements)",
          "variants": {"model/dropout.py: 16 bits per element, 4 per hash": masks(Dropout(rate), "threefry2x32"),
                       "flax nn.Dropout: float32 uniform": masks(nn.Dropout(rate), "threefry2x32"),
                       "flax nn.Dropout, rbg key": masks(nn.Dropout(rate), "rbg")}}


def gelu_group(cfg, batch: int):
  """The FFN's exact GELU, forward + backward, on both branches' [rows, intermediate] activations of every
  layer: the model's x/2 (1 + erf(x / sqrt 2)) (BERT's own formula) vs flax's erfc form vs PyTorch's
  F.gelu, float32."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  from vldeformer_jax.model.vldeformer import gelu
  rows = batch * (2 * cfg.max_text_len + cfg.max_regions)
  x = np.random.default_rng(0).standard_normal((rows, cfg.intermediate_size)).astype(np.float32) * 2

  def jax_variant(f):
    step = jax.jit(jax.value_and_grad(lambda v: jnp.sum(f(v) * v)))
    xj = jnp.asarray(x)
    return lambda: [jax.block_until_ready(step(xj)) for _ in range(cfg.num_hidden_layers)]

  xt = torch.from_numpy(x)

  def run_torch():
    for _ in range(cfg.num_hidden_layers):
      v = xt.clone().requires_grad_(True)
      (torch.nn.functional.gelu(v) * v).sum().backward()

  return {"name": f"GELU fwd+bwd x {cfg.num_hidden_layers} layers, [{rows}, {cfg.intermediate_size}]",
          "variants": {"model: x/2 (1 + erf(x/sqrt 2))": jax_variant(gelu),
                       "flax nn.gelu(approximate=False): erfc form": jax_variant(
                           lambda v: nn.gelu(v, approximate=False)),
                       "torch F.gelu (eager)": run_torch}}


def dense_matmuls(cfg, row_counts: list[int]) -> dict:
  """The dense layers (query, key, value, attention output, FFN in and out) of branches of `row_counts` token
  rows, forward + both backward products, every layer: XLA's CPU matmul (jitted) vs PyTorch's (eager) at the
  same float32 shapes. {"flops", "variants": {name: callable}}."""
  import jax
  import jax.numpy as jnp
  import torch
  H, I = cfg.hidden_size, cfg.intermediate_size
  shapes = [(H, H)] * 4 + [(H, I), (I, H)]  # query, key, value, attention output; FFN in and out
  rng = np.random.default_rng(0)
  triples = [(rng.standard_normal((rows, k), np.float32), rng.standard_normal((k, n), np.float32) * 0.02,
              rng.standard_normal((rows, n), np.float32)) for rows in row_counts for k, n in shapes]

  @jax.jit
  def layer(triples):  # y = x w, dx = g w^T, dw = x^T g
    return [(x @ w, g @ w.T, x.T @ g) for x, w, g in triples]

  j = [tuple(jnp.asarray(a) for a in t) for t in triples]
  t = [tuple(torch.from_numpy(a) for a in t) for t in triples]

  def run_torch():
    for _ in range(cfg.num_hidden_layers):
      [(x @ w, g @ w.T, x.T @ g) for x, w, g in t]

  flops = 3 * 2 * sum(row_counts) * sum(k * n for k, n in shapes) * cfg.num_hidden_layers
  return {"flops": flops,
          "variants": {"XLA (jitted)": lambda: [jax.block_until_ready(layer(j)) for _ in range(cfg.num_hidden_layers)],
                       "torch eager": run_torch}}


def matmul_group(cfg, batch: int):
  """The image branch's dense matmuls (`dense_matmuls`). Why: the matmuls are most of the step's FLOPs, so
  their throughput bounds the step's ratio to PyTorch (table 1)."""
  rows = batch * (cfg.max_text_len + cfg.max_regions)
  group = dense_matmuls(cfg, [rows])
  return {"name": f"dense matmuls fwd+bwd x {cfg.num_hidden_layers} layers, {rows} rows "
                  f"({group['flops'] / 1e9:.0f} GFLOP)", "variants": group["variants"]}


def run(repeats: int = 5, quick: bool = False) -> dict:
  """`quick`: BERT-base widths with 1 layer instead of 12 (a smoke test: the optimiser, attention and
  dropout and matmul groups scale with the layer count, the embedding group not at all)."""
  from tqdm import tqdm
  from vldeformer_jax.model.config import ModelConfig
  cfg = ModelConfig(num_hidden_layers=1) if quick else ModelConfig()
  batch = 8
  builders = [lambda: optimizer_group(cfg),
              lambda: embedding_grad_group(cfg, batch * 2 * cfg.max_text_len),
              lambda: attention_group(cfg, batch, cfg.max_text_len + cfg.max_regions),
              lambda: dropout_group(cfg, batch),
              lambda: gelu_group(cfg, batch),
              lambda: matmul_group(cfg, batch)]
  groups = []
  for build in tqdm(builders, desc="ablations", unit="group"):
    g = build()
    times = common.interleaved(g["variants"], repeats, warmup=1)
    groups.append({"name": g["name"], "variants": [{"name": n, "seconds": common.summary(t)}
                                                   for n, t in times.items()]})
    del g
  return {"groups": groups}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  a = p.parse_args()
  common.emit(run(a.repeats, a.quick))


if __name__ == "__main__":
  main()
