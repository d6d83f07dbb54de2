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
