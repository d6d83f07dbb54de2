"""Retrieval evaluation during training: R@1/5/10 of the decomposed model on the held-out split."""
from __future__ import annotations

import logging

import jax

from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import evaluate as evaluate_lib
from vldeformer_jax.retrieval import gallery as gallery_lib
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.training.setup import Data

log = logging.getLogger(__name__)


class Evaluator:
  """Retrieval R@1/5/10 on the held-out split with the current parameters (eval mode).

  The gallery is read and tokenised once, and one Encoder (its jitted forwards) is kept for the whole run,
  so an evaluation costs the encoder passes only, not a recompile.
  """

  def __init__(self, config, data: Data, model_config: ModelConfig, vocab_file: str, mesh):
    self.config, self.data, self.model_config, self.vocab_file, self.mesh = (
        config, data, model_config, vocab_file, mesh)
    self._encoder = self._gallery = None

  def run(self, params, step: int) -> dict | None:
    if self.data.eval is None:
      return None
    if self._encoder is None:
      self._encoder = Encoder(self.model_config, params, inputs.load_tokenizer(self.vocab_file), mesh=self.mesh,
                              batch_size=self.config.eval.batch_size, fingerprint=f"train step {step}")
      self._gallery = gallery_lib.load_gallery(self.data.eval, self.config.eval.max_images or None, None)
    else:
      # Same model, new weights: reuse the compiled forwards (a new Encoder would recompile them).
      self._encoder.set_params(params, fingerprint=f"train step {step}")
    results = evaluate_lib.evaluate(self._encoder, self._gallery, protocol=self.config.eval.protocol,
                                    batch_size=self.config.eval.batch_size, mesh=self.mesh,
                                    progress=jax.process_index() == 0)
    log.info("eval at step %d: %s", step, self.flat(results))
    return results

  @staticmethod
  def flat(results: dict) -> dict[str, float]:
    out = {}
    for direction in ("i2t", "t2i"):
      for k, v in (results.get(direction) or {}).items():
        if isinstance(v, (int, float)):
          out[f"{direction}_{k}"] = float(v)
    if isinstance(results.get("rsum"), (int, float)):
      out["rsum"] = float(results["rsum"])
    return out

  def score(self, results: dict) -> float:
    name = self.config.eval.best_metric
    flat = self.flat(results)
    if name not in flat:
      raise KeyError(f"config.eval.best_metric {name!r} is not in the evaluation results {sorted(flat)}")
    return flat[name]
