"""vldeformer_jax: VLDeformer in JAX/Flax.

A pretrained vision-language transformer with early interaction (VinVL/Oscar+) scores an image-caption
pair by reading both together. VLDeformer decomposes it with a contrastive objective into an encoder that
reads one modality at a time, so a gallery is embedded once and search is a matrix product.

    from vldeformer_jax import Encoder
    enc = Encoder.load("exports/my_model")
    t = enc.embed_texts(["a red car left of a dog"])
"""
from vldeformer_jax.model.config import ModelConfig


def __getattr__(name):
  # Lazy, so that `import vldeformer_jax` stays cheap and torch-free.
  if name == "Encoder":
    from vldeformer_jax.retrieval.encoder import Encoder
    return Encoder
  raise AttributeError(name)


__all__ = ["Encoder", "ModelConfig"]
