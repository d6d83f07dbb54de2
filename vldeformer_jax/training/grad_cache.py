"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): the exact gradient of a loss over a whole pool of embeddings, with the encoder's activations held
for one micro-batch at a time (docs/method.md §4.6).

A contrastive loss couples every row of the global batch, so splitting the batch into separately
differentiated pools (gradient accumulation) changes the objective. Its gradient factors instead:
dL/dθ = Σ_rows (d e_r / dθ)ᵀ · dL/d e_r, and dL/d e_r needs only the embeddings, not the encoder's
activations. So, inside one jitted step:

1. embed the batch micro-batch by micro-batch (`lax.scan`), keeping only the embeddings;
2. the loss and its gradient with respect to all the embeddings (and the loss's own parameters, e.g. the
   temperature), over the whole pool: the loss is exactly the full-batch one;
3. embed each micro-batch again and pull its rows' embedding gradients back into the parameters (one VJP
   per micro-batch, accumulated in a `lax.scan`).

The result is the full-batch gradient, not an approximation, provided the encoder is row-wise (row r's
embedding depends only on row r and the parameters) and the two passes draw the same dropout masks:
`embed_fn` gets the global row indices of its rows and must derive its randomness from them (the
decomposition objective keys each row's dropout by its row, training/decompose.py).

Micro-batch i holds global rows {j * n + i} (n micro-batches), so each device keeps exactly its own rows:
with the batch split over S devices and G = M * n, a [G, ...] array reshaped to [M, n, ...] is split the
same way along M, and indexing its (unsplit) second axis is local. Memory: the batch, the embeddings of
the whole pool and their gradients, the gradient accumulator, and one micro-batch's activations.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from vldeformer_jax import parallel


def _micro(tree: Any, i: jax.Array, num_micro: int) -> Any:
  """Rows {j * num_micro + i} of every leaf (leading axis G -> G / num_micro)."""
  def take(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
  return jax.tree.map(take, tree)


def _unstack(tree: Any) -> Any:
  """Stacked micro-batch outputs [n, M, ...] -> rows in global order [M * n, ...] (inverse of `_micro`)."""
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((y.shape[0] * y.shape[1],) + y.shape[2:]), tree)


def value_and_grad(embed_fn: Callable, loss_fn: Callable, micro_batch_size: int, mesh,
                   param_shardings: Any = None) -> Callable:
  """The exact `(loss, aux), (d params, d loss_params)` of `loss_fn(embed_fn(params, inputs, rows),
  loss_params)`, with `embed_fn` run `micro_batch_size` rows per device at a time.

  Args:
    embed_fn: `(params, inputs, rows) -> embeddings`, a pytree of arrays with leading axis len(rows); row r
      of the result may depend only on row r of `inputs`, on `rows[r]` (its global index, e.g. for dropout
      keys) and on `params`.
    loss_fn: `(embeddings, loss_params) -> (loss, aux)` over the whole (global) pool.
    micro_batch_size: rows per device per micro-batch.
    mesh: the batch is split over its `parallel.BATCH_AXES`.
    param_shardings: NamedShardings of `params` for the gradient accumulator (default: left to XLA).

  Returns `fn(params, loss_params, inputs)`, to be called inside a jitted step, where `inputs` is a pytree
  of global batch-sharded arrays [G, ...] with G divisible by `micro_batch_size` x the batch shards.
  """
  shards = parallel.num_batch_shards(mesh)
  batch = NamedSharding(mesh, P(parallel.BATCH_AXES))

  def constrain(tree, sharding):
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, sharding), tree)

  def fn(params, loss_params, inputs):
    g = jax.tree.leaves(inputs)[0].shape[0]
    micro = micro_batch_size * shards
    if g % micro:
      raise ValueError(f"gradient caching: the global batch of {g} rows is not divisible by micro_batch_size "
                       f"{micro_batch_size} x {shards} batch shards")
    n = g // micro
    rows = jnp.arange(g, dtype=jnp.int32)

    def piece(i):
      return constrain(_micro((inputs, rows), i, n), batch)

    # 1. Embeddings of the whole pool, one micro-batch at a time; no activation outlives its micro-batch.
    def forward(_, i):
      return None, embed_fn(params, *piece(i))
    _, stacked = lax.scan(forward, None, jnp.arange(n))
    embeddings = constrain(_unstack(stacked), batch)

    # 2. The loss over the whole pool and its gradient w.r.t. every embedding (and the loss's parameters).
    (loss, aux), (d_embeddings, d_loss_params) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        embeddings, loss_params)

    # 3. Each micro-batch again (same rows, so the same dropout masks): its VJP with its rows' cotangents.
    def backward(acc, i):
      _, vjp = jax.vjp(lambda p: embed_fn(p, *piece(i)), params)
      (d_params,) = vjp(constrain(_micro(d_embeddings, i, n), batch))
      acc = jax.tree.map(jnp.add, acc, d_params)
      return (acc if param_shardings is None else constrain_each(acc)), None

    def constrain_each(tree):
      return jax.tree.map(lax.with_sharding_constraint, tree, param_shardings)

    zeros = jax.tree.map(jnp.zeros_like, params)
    if param_shardings is not None:
      zeros = constrain_each(zeros)
    d_params, _ = lax.scan(backward, zeros, jnp.arange(n))
    return (loss, aux), (d_params, d_loss_params)

  return fn
