"""model/dropout.py: the decisions are threefry-2x32's words at the element's position (the Random123 known answer),
the keep probability is exactly threshold / 2^16 and the four decisions of one hash are independent, kept values
are scaled by the inverse (so the expectation is the input), masks are independent of device count, and no
dropout is a no-op."""
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import parallel
from vldeformer_jax.model import dropout


def _apply(x, rate, key, deterministic=False):
  return dropout.Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_is_the_threshold(rate):
  n = 1_000_003  # not a multiple of 4: the last hash decides three elements only
  keep = np.asarray(dropout.keep_mask(jax.random.key(3), (n,), rate))
  p = dropout.keep_threshold(rate) / 2**16
  assert abs(p - (1 - rate)) <= 2**-17
  # The kept count is Binomial(n, p): 6 standard deviations is a bound a correct sampler breaks once in ~1e9.
  assert abs(keep.sum() - n * p) <= 6 * np.sqrt(n * p * (1 - p))


def test_decisions_are_the_threefry_words_in_position_order():
  # Random123's known answer: threefry-2x32 (20 rounds), key (0, 0), counter (0, 0) -> 0x6b200159, 0x99ba4efe.
  # jax.random.key(0) is that key; the first hash decides elements 0..3 with the words' 16-bit halves, low
  # half first: 0x0159, 0x6b20, 0x4efe, 0x99ba.
  assert jax.random.key_data(jax.random.key(0)).tolist() == [0, 0]
  halves = np.array([0x0159, 0x6b20, 0x4efe, 0x99ba])
  for rate in (0.5, 0.6, 0.7):
    expected = halves < dropout.keep_threshold(rate)
    np.testing.assert_array_equal(np.asarray(dropout.keep_mask(jax.random.key(0), (4,), rate)), expected)
  # Element i of a [3, 10] input is decided by hash (row * 3 + i // 4) (the last axis is padded to 12).
  key = jax.random.key(11)
  words = np.asarray(jex_random.threefry_2x32(jax.random.key_data(key), jnp.concatenate(
      [jnp.zeros(9, jnp.uint32), jnp.arange(9, dtype=jnp.uint32)])))
  per_hash = np.stack([words[:9] & 0xFFFF, words[:9] >> 16, words[9:] & 0xFFFF, words[9:] >> 16], axis=1)
  expected = (per_hash.reshape(3, 12) < dropout.keep_threshold(0.1))[:, :10]
  np.testing.assert_array_equal(np.asarray(dropout.keep_mask(key, (3, 10), 0.1)), expected)


def test_the_four_decisions_of_one_hash_are_independent():
  # At rate 0.5 the 16 patterns of a hash's four decisions are equally likely: Pearson's chi-square over
  # 250,000 hashes has 15 degrees of freedom (mean 15, sd 5.5); 70 is exceeded with probability ~1e-8.
  keep = np.asarray(dropout.keep_mask(jax.random.key(2), (250_000, 4), 0.5))
  patterns = np.bincount(keep @ np.array([1, 2, 4, 8]), minlength=16)
  expected = len(keep) / 16
  assert ((patterns - expected) ** 2 / expected).sum() < 70


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
