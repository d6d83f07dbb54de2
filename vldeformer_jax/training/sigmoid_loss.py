"""The sigmoid loss (docs/method.md §4.7, SigLIP, Zhai et al. 2023), with caption blocks rotating around the devices.

Every caption-image pair is an independent binary term -log sigmoid(z (s / temperature + bias)), z = 1 on
the diagonal and -1 elsewhere, composed negatives as extra negative pairs, summed and divided by the global
batch size. `sigmoid_loss` computes it block by block as the caption blocks rotate around the batch axes
(`lax.ppermute`): no device ever holds the gathered pool, in the forward or the backward pass (its gradient
is a custom VJP that rotates the blocks again, each block's gradient travelling with it back to its owner).
Input checks, inverse norms and the similarity metrics are the gathered contrastive loss's
(training/losses.py), so both report the same `pos_sim` / `neg_sim` / `hard_neg_sim`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from vldeformer_jax.parallel import BATCH_AXES
from vldeformer_jax.training.losses import (AxisName, _batch_sharded_embeddings, _check_inputs,
                                            _similarity_stats, inverse_norm)

Array = jax.Array

SIGMOID_BIAS_INIT = -10.0  # SigLIP's initial bias (with temperature 0.1): the loss starts near log 2 per pair


def _dot(a: Array, b: Array) -> Array:
  return jnp.einsum("nd,pd->np", a, b, precision=lax.Precision.HIGHEST)


def _sigmoid_block(t, nt, v, nv, scale, bias, diagonal: bool):
  """One caption block against the local images: (summed pair losses, logits of the in-batch pairs).

  `t` [n, D] captions and `nt` [n K, D] composed captions (or None) of the block, `v` [b, D] images and
  `nv` [b K, D] composed images (or None) of this device, all L2-normalised. Pairs: every caption with
  every image (positive on the diagonal when `diagonal`, the block's own rows), every caption with every
  composed image and every composed caption with every image (negatives). -log sigmoid(z x) is
  softplus(-z x).
  """
  x = scale * _dot(t, v) + bias
  if diagonal:
    z = jnp.where(jnp.eye(x.shape[0], x.shape[1], dtype=bool), -1.0, 1.0)
    total = jnp.sum(jax.nn.softplus(z * x))
  else:
    total = jnp.sum(jax.nn.softplus(x))
  extra = []
  if nv is not None:
    extra.append(scale * _dot(t, nv) + bias)      # [n, b K]: the block's captions vs composed images
  if nt is not None:
    extra.append(scale * _dot(nt, v) + bias)      # [n K, b]: the block's composed captions vs images
  for e in extra:
    total = total + jnp.sum(jax.nn.softplus(e))
  return total, x, extra


def _block_maxima(x, extra, nv, nt, diagonal: bool):
  """Per caption row the largest image logit, per image column the largest caption logit (positives
  excluded), composed columns / rows included: what the accuracies compare each positive against."""
  if diagonal:
    x = jnp.where(jnp.eye(x.shape[0], x.shape[1], dtype=bool), -jnp.inf, x)
  row_max, col_max = jnp.max(x, axis=1), jnp.max(x, axis=0)
  parts = list(extra)
  if nv is not None:
    row_max = jnp.maximum(row_max, jnp.max(parts.pop(0), axis=1))
  if nt is not None:
    col_max = jnp.maximum(col_max, jnp.max(parts.pop(0), axis=0))
  return row_max, col_max


def _rotate(tree, axis_name, shards: int):
  """Every device's blocks to the next device along the batch axes (device d -> d + 1)."""
  perm = [(i, (i + 1) % shards) for i in range(shards)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sigmoid_ring(axis_name, shards, t, nt, v, nv, scale, bias):
  """(this device's summed pair losses, (t2i correct, i2t correct, sum of positive logits)).

  Step 0 scores the device's own captions against its images (the diagonal holds the positives); then
  `shards - 1` times the caption blocks move one device on and are scored against the local images, so
  over the ring every caption meets every image of the global batch once. Only the local rows and one
  visiting block are ever held.
  """
  out, _ = _sigmoid_ring_fwd(axis_name, shards, t, nt, v, nv, scale, bias)
  return out


def _sigmoid_ring_fwd(axis_name, shards, t, nt, v, nv, scale, bias):
  sg = lax.stop_gradient
  total, x, extra = _sigmoid_block(t, nt, v, nv, scale, bias, diagonal=True)
  pos = jnp.diagonal(x)
  row_max, col_max = _block_maxima(sg(x), [sg(e) for e in extra], nv, nt, diagonal=True)
  # The visiting block carries its captions, their positives and their running maxima.
  carry = (t, nt, sg(pos), row_max, total, col_max)

  def visit(_, carry):
    t_b, nt_b, pos_b, row_max_b, total, col_max = carry
    t_b, nt_b, pos_b, row_max_b = _rotate((t_b, nt_b, pos_b, row_max_b), axis_name, shards)
    block_total, x, extra = _sigmoid_block(t_b, nt_b, v, nv, scale, bias, diagonal=False)
    r, c = _block_maxima(sg(x), [sg(e) for e in extra], nv, nt_b, diagonal=False)
    return t_b, nt_b, pos_b, jnp.maximum(row_max_b, r), total + block_total, jnp.maximum(col_max, c)

  if shards > 1:
    carry = lax.fori_loop(1, shards, visit, carry)
  _, _, pos_b, row_max_b, total, col_max = carry
  # Accuracy: the positive strictly above every other column of its query (ties count as wrong).
  t2i = jnp.sum((pos_b > row_max_b).astype(jnp.float32))  # the visiting block's captions, wherever they are
  i2t = jnp.sum((sg(pos) > col_max).astype(jnp.float32))  # this device's images
  out = (total, (t2i, i2t, jnp.sum(sg(pos))))
  return out, (t, nt, v, nv, scale, bias)


def _sigmoid_ring_bwd(axis_name, shards, res, cotangents):
  """Rotates the caption blocks again, recomputing each block's logits; each block's gradient travels with
  it and one last rotation brings it home. The images' gradients accumulate where the images live."""
  t, nt, v, nv, scale, bias = res
  g = cotangents[0]  # the metrics have no gradient

  def contributions(t_b, nt_b, diagonal):
    def block_total(t_b, nt_b, v, nv, scale, bias):
      return _sigmoid_block(t_b, nt_b, v, nv, scale, bias, diagonal)[0]
    _, vjp = jax.vjp(block_total, t_b, nt_b, v, nv, scale, bias)
    return vjp(g)

  def add(a, b):
    return jax.tree.map(jnp.add, a, b)

  d_t, d_nt, d_v, d_nv, d_scale, d_bias = contributions(t, nt, True)
  blocks, block_grads, local_grads = (t, nt), (d_t, d_nt), (d_v, d_nv, d_scale, d_bias)

  def visit(_, carry):
    blocks, block_grads, local_grads = carry
    blocks, block_grads = _rotate((blocks, block_grads), axis_name, shards)
    d_tb, d_ntb, *local = contributions(*blocks, False)
    return blocks, add(block_grads, (d_tb, d_ntb)), add(local_grads, tuple(local))

  if shards > 1:
    blocks, block_grads, local_grads = lax.fori_loop(1, shards, visit, (blocks, block_grads, local_grads))
    block_grads = _rotate(block_grads, axis_name, shards)  # each block's gradient back to its owner
  d_v, d_nv, d_scale, d_bias = local_grads
  return (*block_grads, d_v, d_nv, d_scale, d_bias)


_sigmoid_ring.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


def sigmoid_loss(text_emb: Array, image_emb: Array, neg_text_emb: Array | None = None,
                 neg_image_emb: Array | None = None, *, temperature: float | Array = 0.1,
                 bias: float | Array = SIGMOID_BIAS_INIT, axis_name: AxisName = None
                 ) -> tuple[Array, dict[str, Array]]:
  """The sigmoid loss (SigLIP) of local rows (inside shard_map, rows split over `axis_name`) or of a whole
  batch (`axis_name=None`).

  With cosines s and logits x = s / temperature + bias (both scalars, possibly traced and learnable):
  L = (1 / G) [sum over captions i, images j of softplus(-z_ij x_ij)  (z = +1 if i == j else -1)
             + sum over captions i, composed images (j, k) of softplus(x)
             + sum over composed captions (j, k), images i of softplus(x)],
  G the global batch size. Composed negatives are never paired with each other. The caption blocks rotate
  around the devices (`lax.ppermute`), so no device holds the gathered pool; the gradient is exact.

  Returns (loss, metrics): `loss`, `t2i_accuracy` / `i2t_accuracy` (the positive strictly above every other
  column of its query), `pos_logit` (mean positive logit), `pos_sim`, `neg_sim`, and with negatives
  `hard_neg_sim`, as for `contrastive_loss`.
  """
  b, dim = _check_inputs("infonce", 0.0, text_emb, image_emb, neg_text_emb, neg_image_emb)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
  t, v, nt, nv = f32(text_emb), f32(image_emb), f32(neg_text_emb), f32(neg_image_emb)
  t_inv, v_inv = inverse_norm(t), inverse_norm(v)
  nt_inv = None if nt is None else inverse_norm(nt)
  nv_inv = None if nv is None else inverse_norm(nv)
  t_n, v_n = t * t_inv[:, None], v * v_inv[:, None]
  nt_n = None if nt is None else (nt * nt_inv[..., None]).reshape(-1, dim)
  nv_n = None if nv is None else (nv * nv_inv[..., None]).reshape(-1, dim)
  scale = 1.0 / jnp.asarray(temperature, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  if axis_name is None:
    shards, psum = 1, (lambda x: x)
  else:
    shards = lax.axis_size(axis_name)
    psum = functools.partial(lax.psum, axis_name=axis_name)
    # The temperature and bias are the same on every device; each device's terms give them a gradient,
    # which the transpose of this cast sums.
    scale = lax.pcast(scale, axis_name, to="varying")
    bias = lax.pcast(bias, axis_name, to="varying")
  total, (t2i, i2t, pos_sum) = _sigmoid_ring(axis_name, shards, t_n, nt_n, v_n, nv_n, scale, bias)
  rows = b * shards
  loss = psum(total) / rows
  metrics = {"loss": loss, "t2i_accuracy": psum(t2i) / rows, "i2t_accuracy": psum(i2t) / rows,
             "pos_logit": psum(pos_sum) / rows}

  def mean(x):
    return psum(jnp.sum(x)) / x.size / shards

  image_sum = psum(jnp.sum(lax.stop_gradient(v_n), axis=0))
  metrics.update(_similarity_stats(t, v, nt, nv, (t_inv, v_inv, nt_inv, nv_inv), image_sum, rows, mean))
  return loss, metrics


def sharded_sigmoid_loss(mesh: Mesh) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`sigmoid_loss` over globally batch-sharded arrays, for use inside a jitted train step:
  `fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temperature, bias) -> (loss, metrics)`, the
  negatives possibly None, the result replicated, `jax.grad` through it the full-batch gradient."""
  batch = P(BATCH_AXES)

  def fn(text_emb, image_emb, neg_text_emb, neg_image_emb, temperature, bias):
    embs = _batch_sharded_embeddings("sharded_sigmoid_loss", mesh, text_emb, image_emb, neg_text_emb,
                                     neg_image_emb)
    scalars = (jnp.asarray(temperature, jnp.float32), jnp.asarray(bias, jnp.float32))

    def local(e, sc):
      return sigmoid_loss(e["text"], e["image"], e.get("neg_text"), e.get("neg_image"), temperature=sc[0],
                          bias=sc[1], axis_name=BATCH_AXES)

    return jax.shard_map(local, mesh=mesh, in_specs=({k: batch for k in embs}, (P(), P())), out_specs=P(),
                         check_vma=True)(embs, scalars)

  return fn
