"""model/dropout.py: the keep probability is exactly threshold / 2^16, kept values are scaled by its inverse
(so the expectation is the input), masks are independent of device count, and no dropout is a no-op."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import parallel
from vldeformer_jax.model import dropout


def _apply(x, rate, key, deterministic=False):
  return dropout.Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_is_the_threshold(rate):
  n = 1_000_003  # odd: the last 32-bit word decides one element only
  keep = np.asarray(dropout.keep_mask(jax.random.key(3), (n,), rate))
  p = dropout.keep_threshold(rate) / 2**16
  assert abs(p - (1 - rate)) <= 2**-17
  # The kept count is Binomial(n, p): 6 standard deviations is a bound a correct sampler breaks once in ~1e9.
  assert abs(keep.sum() - n * p) <= 6 * np.sqrt(n * p * (1 - p))


def test_kept_values_scaled_by_the_inverse_keep_probability():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 35, 33)), jnp.float32)
  y = np.asarray(_apply(x, 0.1, jax.random.key(0)))
  kept = y != 0
  scale = 2**16 / dropout.keep_threshold(0.1)
  np.testing.assert_array_equal(y[kept], np.asarray(x)[kept] * np.float32(scale))
  assert 0.85 < kept.mean() < 0.95
  # Different keys, different masks; the same key, the same mask.
  assert (np.asarray(_apply(x, 0.1, jax.random.key(1))) != 0).tolist() != kept.tolist()
  np.testing.assert_array_equal(np.asarray(_apply(x, 0.1, jax.random.key(0))), y)


def test_deterministic_and_zero_rate_return_the_input():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_apply(x, 0.1, jax.random.key(0), deterministic=True), x)
  np.testing.assert_array_equal(_apply(x, 0.0, jax.random.key(0)), x)
  with pytest.raises(ValueError, match="dropout rate"):
    dropout.keep_threshold(1.0)


def test_masks_do_not_depend_on_the_device_count():
  x = jnp.ones((8, 35, 64), jnp.float32)
  key = jax.random.key(5)
  one = np.asarray(jax.jit(lambda v: _apply(v, 0.1, key))(x))
  mesh = parallel.make_mesh(len(jax.devices()), 1, 1)
  sharded = jax.device_put(x, parallel.batch_sharding(mesh))
  many = jax.jit(lambda v: _apply(v, 0.1, key), out_shardings=parallel.batch_sharding(mesh))(sharded)
  np.testing.assert_array_equal(np.asarray(many), one)
