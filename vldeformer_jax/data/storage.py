"""How a prepared dataset stores its records on disk: region-feature dtype and array_record compression.

Why this matters: at the VinVL shape a record is 70 x 2054 region features (575 KB as float32), and the
input pipeline reads one per pair, two with hard negatives (benchmarks/input_pipeline.py, BENCHMARKS.md
table 6). tfds writes array_record shards with the library's default compression, and random float
features barely compress (about 10%), so every read pays a decompression of the whole record: 4x the time
of reading it uncompressed. `compression="none"` (the default since this option exists) stores records
uncompressed; `"default"` is tfds's own choice (datasets prepared before read the same way either way: the
reader finds the compression in the file).

`feature_dtype` `float16` / `bfloat16` halves the bytes again; the pipeline and the gallery widen features
back to float32 (exactly: every float16 / bfloat16 value is a float32), so batches keep their float32
layout, with values rounded once at prepare time (BENCHMARKS.md reports the recall cost on the demo).
"""
from __future__ import annotations

import contextlib
import types

import ml_dtypes
import numpy as np

FEATURE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(ml_dtypes.bfloat16)}
COMPRESSIONS = {"none": "uncompressed", "default": ""}  # name -> array_record writer option


def feature_dtype(name: str) -> np.dtype:
  if name not in FEATURE_DTYPES:
    raise ValueError(f"feature_dtype {name!r} is not one of {', '.join(FEATURE_DTYPES)}")
  return FEATURE_DTYPES[name]


def check_compression(name: str) -> str:
  if name not in COMPRESSIONS:
    raise ValueError(f"compression {name!r} is not one of {', '.join(COMPRESSIONS)}")
  return name


@contextlib.contextmanager
def array_record_options(compression: str):
  """While active, tfds's `SequentialWriter` opens its array_record shards with `compression`.

  tfds hard-codes the writer options (`'group_size:1'`, the library's default compression) in
  `sequential_writer`; this swaps that module's `array_record_module` for one whose writer appends the
  compression option, and restores it on exit. Not thread-safe: prepare writes from one thread.
  """
  from tensorflow_datasets.core import sequential_writer
  option = COMPRESSIONS[check_compression(compression)]
  real = sequential_writer.array_record_module
  if not option:
    yield
    return

  def writer(path, options=""):
    return real.ArrayRecordWriter(path, ",".join(x for x in (options, option) if x))

  sequential_writer.array_record_module = types.SimpleNamespace(ArrayRecordWriter=writer)
  try:
    yield
  finally:
    sequential_writer.array_record_module = real


def metadata(feature_dtype_name: str, compression: str) -> dict:
  """What `metadata.json` records of the storage layout."""
  feature_dtype(feature_dtype_name)
  return {"feature_dtype": feature_dtype_name, "compression": check_compression(compression)}
