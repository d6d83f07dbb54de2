"""Data: VinVL files -> tensorflow-datasets (array_record), the demo dataset, and the input pipeline.

Kept light on purpose: importing `vldeformer_jax.data` loads nothing heavy (no tfds, no torch); import the
submodule you need (`vldeformer_jax.data.prepare`, `.demo_world`, `.pipeline`, `.negatives`).
"""
