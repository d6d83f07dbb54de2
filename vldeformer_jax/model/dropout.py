"""Inverted dropout that decides each element with 16 random bits instead of a 32-bit uniform.

Why not `flax.linen.Dropout`: it draws one float32 uniform per element, and under JAX's partitionable
threefry every element then costs one threefry hash. At BERT-base size a training step draws ~35M mask
elements, and on XLA's CPU backend those hashes were a tenth of the step (BENCHMARKS.md table 1b). Here one
32-bit word decides two elements, so half the hashes are drawn (docs/method.md §6.3).

The element is kept when its 16 bits are below `keep_threshold(rate)` = round((1 - rate) * 2^16), so the keep
probability is that count / 2^16, within 2^-17 of 1 - rate, and kept values are scaled by its exact inverse:
the expectation of the output equals the input. The bits are drawn in the input's shape (last axis halved),
so a batch-sharded input keeps its sharding, and with the partitionable threefry the masks do not depend on how
many devices hold the batch.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BITS = 16


def keep_threshold(rate: float) -> int:
  """The count of 16-bit values (out of 2^16) that keep an element at dropout `rate`."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  return max(1, round((1.0 - rate) * 2**BITS))


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean mask of `shape`, True where an element is kept; P(True) = keep_threshold(rate) / 2^16."""
  last = shape[-1] if shape else 1
  words = jax.random.bits(key, tuple(shape[:-1]) + ((last + 1) // 2,), jnp.uint32)
  halves = lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last/2), 2]
  halves = halves.reshape(tuple(shape[:-1]) + (-1,))[..., :last].reshape(shape)
  return halves < keep_threshold(rate)


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout(rate)(x, deterministic)`; draws from the 'dropout' rng collection."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    scale = 2**BITS / keep_threshold(self.rate)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
