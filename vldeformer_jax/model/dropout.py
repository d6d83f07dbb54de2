"""Inverted dropout that decides each element with 16 random bits instead of a 32-bit uniform.

Why not `flax.linen.Dropout`: it draws one float32 uniform per element, and under JAX's partitionable
threefry every element then costs one threefry hash (whose second output word `jax.random.bits` folds away).
At BERT-base size a training step draws ~35M mask elements, and on XLA's CPU backend those hashes were a
tenth of the step (BENCHMARKS.md table 1b). Here one threefry-2x32 hash gives two 32-bit words, and each word
decides two elements: a quarter of the hashes (docs/method.md §6.3).

The element is kept when its 16 bits are below `keep_threshold(rate)` = round((1 - rate) * 2^16), so the keep
probability is that count / 2^16, within 2^-17 of 1 - rate, and kept values are scaled by its exact inverse:
the expectation of the output equals the input. The hash's counter is the element's position in the input's
shape (last axis quartered), so a batch-sharded input keeps its sharding and the masks do not depend on how
many devices hold the batch.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax

BITS = 16
DECISIONS_PER_HASH = 4  # two 32-bit words per threefry-2x32 hash, two 16-bit decisions per word


def keep_threshold(rate: float) -> int:
  """The count of 16-bit values (out of 2^16) that keep an element at dropout `rate`."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  return max(1, round((1.0 - rate) * 2**BITS))


def _threefry_keypair(key: jax.Array) -> jax.Array:
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  if data.shape != (2,):
    raise ValueError(f"dropout draws its masks with threefry-2x32 and needs a 2-word key; got key data of shape "
                     f"{data.shape} (a non-threefry jax_default_prng_impl?)")
  return data.astype(jnp.uint32)


def _position_counter(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major position of each element of `shape`: the hash counter, built from iotas so that it
  partitions with its array."""
  if math.prod(shape) >= 2**32:
    raise ValueError(f"dropout mask of {math.prod(shape) * DECISIONS_PER_HASH} elements is over the 2^34 that one "
                     "key can draw; split the input or its key")
  counter = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    counter = counter + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return counter


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean mask of `shape`, True where an element is kept; P(True) = keep_threshold(rate) / 2^16."""
  out_shape = tuple(shape)
  shape = out_shape or (1,)
  last = shape[-1]
  hash_shape = shape[:-1] + (-(-last // DECISIONS_PER_HASH),)
  counter = _position_counter(hash_shape)
  words = jex_random.threefry_2x32(_threefry_keypair(key), jnp.stack([jnp.zeros_like(counter), counter]))
  halves = lax.bitcast_convert_type(jnp.moveaxis(words, 0, -1), jnp.uint16)  # [..., ceil(last/4), 2, 2]
  halves = halves.reshape(shape[:-1] + (-1,))[..., :last]
  return (halves < keep_threshold(rate)).reshape(out_shape)


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
