"""VinVL files -> a tensorflow-datasets dataset in array_record format, streamed in bounded memory.

Records (ARCHITECTURE.md): `{"image_id": int64, "features": float32 [n, F], "tags": text, "captions":
sequence of text}`; splits `train` and `test` (images in `test_img_keys.tsv` order when that file exists,
else captions-file order) and `test_1k` when `test_img_keys_1k.tsv` exists, in its order.

Why tfds's `SequentialWriter` and not a `GeneratorBasedBuilder`: the builder's writer sends every example
through tfds's shuffler, which buffers up to 1 GB in memory and then spills the whole split to temporary
bucket files (a second full copy on disk, 25 GB for COCO) before it writes the shards. `SequentialWriter`
appends each serialised example to an array_record shard in the order given, which is exactly what we need
(the key order is kept, memory does not grow with the data). The result is an ordinary prepared tfds
dataset (`dataset_info.json`, `features.json`, shards) that `tfds.data_source(name, data_dir=...)` and
`tfds.builder(name, data_dir=...)` read without TensorFlow.

Everything is written to a hidden temporary directory beside the final `<data_dir>/<name>/<version>` and
renamed at the end: a failure leaves nothing behind, and a dataset that exists is complete.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import uuid
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info as dataset_info_lib
from tensorflow_datasets.core import sequential_writer
from tqdm import tqdm

from vldeformer_jax.io import files as fileio
from vldeformer_jax.data import storage
from vldeformer_jax.data import vinvl

log = logging.getLogger(__name__)

VERSION = "1.0.0"
METADATA_FILE = "metadata.json"  # tfds.core.MetadataDict's file name
KEY_FILES = {"test": "test_img_keys.tsv", "test_1k": "test_img_keys_1k.tsv"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_WRITE_BATCH = 64  # examples per SequentialWriter call (each call rewrites dataset_info.json)


def record_features(feature_dim: int, feature_dtype: str = "float32") -> tfds.features.FeaturesDict:
  """The record spec; region features are stored as raw bytes (fast to decode) of `feature_dtype`
  (float32: exact; float16 / bfloat16: half the bytes, see data/storage.py)."""
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Scalar(np.int64),
      "features": tfds.features.Tensor(shape=(None, feature_dim), dtype=storage.feature_dtype(feature_dtype),
                                       encoding=tfds.features.Encoding.BYTES),
      "tags": tfds.features.Text(),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      # The detector class of each region (predictions.tsv), for masked object classification
      # (docs/method.md §4.8); [] where the classes do not line up with the regions. Datasets prepared
      # before this field have no such key: MOC refuses them with one line (data/region_classes.py).
      "region_classes": tfds.features.Sequence(tfds.features.Text()),
  })


@dataclasses.dataclass
class SplitPlan:
  """One output split: which images, in which order, with which captions."""
  name: str
  image_ids: list[int]
  captions: dict[int, list[str]]
  captions_file: str
  order_file: str  # the file that fixed the order (a key file or the captions file)


def plan_splits(captions_dir: str, splits: Sequence[str] = ("train", "test")) -> list[SplitPlan]:
  """Reads the captions and key files of `splits`; `test_1k` is added when its key file exists."""
  plans = []
  for split in splits:
    path = vinvl.captions_path(captions_dir, split)
    if path is None:
      raise FileNotFoundError(f"split {split!r}: neither {split}_captions.pt nor {split}_captions.json "
                              f"in {captions_dir}")
    captions = vinvl.load_captions(path)
    log.info("%s: %d images, %d captions", path, len(captions), sum(map(len, captions.values())))
    for out_name in [split] + (["test_1k"] if split == "test" else []):
      key_file = os.path.join(captions_dir, KEY_FILES[out_name]) if out_name in KEY_FILES else None
      if key_file and os.path.isfile(key_file):
        keyed = vinvl.load_image_keys(key_file, with_lines=True)
        for line, image_id in keyed:
          if image_id not in captions:
            raise vinvl.VinvlFormatError(f"{key_file} line {line}: image {image_id} has no captions in {path}")
        plans.append(SplitPlan(out_name, [i for _, i in keyed], captions, path, key_file))
      elif out_name == split:
        plans.append(SplitPlan(out_name, list(captions), captions, path, path))
  return plans


def dataset_dir(data_dir: str, name: str, version: str = VERSION) -> str:
  return os.path.join(data_dir, name, version)


def read_metadata(data_dir: str, name: str, version: str = VERSION) -> dict | None:
  """The metadata a prepared dataset was written with (feature dim, sizes, sources), or None if absent."""
  root = dataset_dir(data_dir, name, version)
  if not os.path.isfile(os.path.join(root, "dataset_info.json")):
    return None
  if not os.path.isfile(os.path.join(root, METADATA_FILE)):
    return {}  # prepared by something else
  with open(os.path.join(root, METADATA_FILE), encoding="utf-8") as f:
    return json.load(f)


def _info_path(data_dir: str, name: str) -> str | None:
  """`<data_dir>/<name>/<version>/dataset_info.json` (this code's version first), or None."""
  root = os.path.join(data_dir, name)
  versions = sorted(os.listdir(root)) if os.path.isdir(root) else []
  for v in [VERSION] + [v for v in versions if v != VERSION]:
    path = os.path.join(root, v, "dataset_info.json")
    if os.path.isfile(path):
      return path
  return None


def prepared_datasets(data_dir: str) -> list[str]:
  """The names of the prepared datasets under `data_dir` (each a `<name>/<version>/dataset_info.json`)."""
  if not os.path.isdir(data_dir):
    return []
  return sorted(n for n in os.listdir(data_dir) if not n.startswith(".") and _info_path(data_dir, n))


def dataset_splits(data_dir: str, name: str) -> dict[str, int] | None:
  """{split: number of records} of a prepared dataset, or None when it is not prepared under `data_dir`."""
  path = _info_path(data_dir, name)
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  return {s["name"]: int(sum(int(n) for n in s.get("shardLengths", []))) for s in info.get("splits", [])}


def missing_dataset(data_dir: str, name: str) -> str | None:
  """None when `name` is prepared under `data_dir`; else one line saying so, with what `data_dir` holds."""
  if _info_path(data_dir, name):
    return None
  data_dir = os.path.abspath(data_dir)
  if not os.path.isdir(data_dir):
    return f"dataset {name!r} not found in {data_dir} (the directory does not exist); prepare it with " \
           "launch/prepare_data.py"
  held = prepared_datasets(data_dir)
  close = difflib.get_close_matches(name, held, n=1)
  holds = f"it holds: {', '.join(held)}" if held else "it holds no prepared dataset"
  return (f"dataset {name!r} not found in {data_dir} ({holds}" + (f"; did you mean {close[0]!r}?" if close else "")
          + "); prepare it with launch/prepare_data.py")


def check_split(data_dir: str, name: str, split: str) -> None:
  """Raises FileNotFoundError (one line: what the data_dir or the dataset holds) unless the split exists.
  Only local directories are checked; other filesystems are left to tfds."""
  if "://" in str(data_dir):
    return
  missing = missing_dataset(data_dir, name)
  if missing:
    raise FileNotFoundError(missing)
  splits = dataset_splits(data_dir, name) or {}
  for part in str(split).split("+"):  # tfds split syntax: 'train+test', 'test[:100]'
    if part.split("[")[0].strip() not in splits:
      raise FileNotFoundError(f"dataset {name!r} in {os.path.abspath(data_dir)} has no split {split!r} "
                              f"(it has: {', '.join(sorted(splits))})")


def load_split(data_dir: str, name: str, split: str):
  """The random-access source of one split: `len(src)`, `src[i]` -> record dict (text as bytes). A missing
  dataset or split raises FileNotFoundError naming what `data_dir` holds (not tfds' catalogue)."""
  check_split(data_dir, name, split)
  return tfds.data_source(name, data_dir=data_dir, split=split)


def _check_name(name: str) -> None:
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*), as tfds requires")
  try:
    cls = tfds.builder_cls(name)
  except Exception:  # DatasetNotFoundError: the name is free
    return
  raise ValueError(f"dataset name {name!r} is a registered tfds dataset ({cls.__module__}); "
                   f"tfds.builder would load that instead: choose another name")


def _shard_size(features: vinvl.VinvlFeatures, shard_bytes: int) -> int:
  """Examples per shard, from the average row size of features.tsv (base64 is 4/3 of the floats)."""
  rows = max(1, len(features.features))
  per_image = os.path.getsize(features.features.path) * 3 / 4 / rows
  return max(1, int(shard_bytes // max(per_image, 1)))


def _check_every_image_has_features(plans, source, captions_dir: str) -> int:
  """Refuses (naming the split, file and first images) any captioned image without features; returns the
  region feature size F, read from the first image (it fixes F for the whole run when inferred)."""
  for plan in plans:
    missing = source.missing(plan.image_ids)
    if missing:
      raise vinvl.VinvlFormatError(
          f"{len(missing)} image(s) of split {plan.name!r} have captions in {plan.captions_file} but no "
          f"features: not in {source.imageid2idx_path}; first: image {missing[0]}"
          + (f" (also {missing[1:6]})" if len(missing) > 1 else ""))
  first = next((p.image_ids[0] for p in plans if p.image_ids), None)
  if first is None:
    raise ValueError(f"no images in splits {[p.name for p in plans]} of {captions_dir}")
  return int(source.region_features(first).shape[1])


def _dataset_info(name: str, tmp: str, plans, feature_dim: int, captions_dir: str, features_dir: str,
                  description: str | None, extra_metadata: dict | None,
                  feature_dtype: str = "float32") -> tfds.core.DatasetInfo:
  """The tfds DatasetInfo of the prepared dataset, with the provenance of every split in its metadata."""
  metadata = {
      "feature_dim": int(feature_dim),
      "splits": {p.name: {"num_images": len(p.image_ids),
                          "num_captions": int(sum(len(p.captions[i]) for i in p.image_ids)),
                          "captions_file": os.path.abspath(p.captions_file),
                          "order_file": os.path.abspath(p.order_file)} for p in plans},
      "features_dir": os.path.abspath(features_dir),
      "writer": "vldeformer_jax.data.prepare",
      **(extra_metadata or {}),
  }
  return tfds.core.DatasetInfo(
      builder=dataset_info_lib.DatasetIdentity(
          name=name, version=tfds.core.Version(VERSION), data_dir=tmp, module_name=__name__),
      description=description or f"VinVL region features, detector tags and captions from "
                                 f"{os.path.abspath(features_dir)} and {os.path.abspath(captions_dir)}.",
      features=record_features(feature_dim, feature_dtype),
      disable_shuffling=True,  # keep the key-file / captions-file order
      metadata=tfds.core.MetadataDict(metadata),
  )


def _write_splits(info, plans, source, name: str, shard_bytes: int) -> None:
  """Streams every split's records into array_record shards, `_WRITE_BATCH` images at a time."""
  writer = sequential_writer.SequentialWriter(info, max_examples_per_shard=_shard_size(source, shard_bytes),
                                              file_format="array_record")
  writer.initialize_splits([p.name for p in plans])
  stored_dtype = info.features["features"].np_dtype
  for plan in plans:
    batch = []
    for image_id in tqdm(plan.image_ids, desc=f"{name}/{plan.name}", unit="img", mininterval=2.0):
      features = source.region_features(image_id)
      batch.append({"image_id": image_id, "features": features.astype(stored_dtype, copy=False),
                    "tags": source.tags(image_id), "captions": plan.captions[image_id],
                    "region_classes": source.region_classes(image_id, len(features))})
      if len(batch) >= _WRITE_BATCH:
        writer.add_examples({plan.name: batch})
        batch = []
    if batch:
      writer.add_examples({plan.name: batch})
    writer.close_splits([plan.name])
    log.info("split %s: %d images written", plan.name, len(plan.image_ids))


def prepare_vinvl(captions_dir: str, features_dir: str, name: str, data_dir: str, *,
                  splits: Sequence[str] = ("train", "test"), feature_dim: int | None = None,
                  overwrite: bool = False, shard_bytes: int = 256 << 20, description: str | None = None,
                  extra_metadata: dict | None = None, feature_dtype: str = "float32",
                  compression: str = "none") -> str:
  """Converts the VinVL layout (docs/method.md §3.3) into `<data_dir>/<name>/<VERSION>`; returns that path.

  Reads one features row at a time through the `.lineidx` offsets and appends each example to the
  current shard, so memory does not grow with the number of images. Every image of every split is
  checked to have features before anything is written. Raises `VinvlFormatError` (file, line, image id)
  on malformed input, `FileExistsError` when the dataset exists and not `overwrite`. `feature_dtype`
  (float32 | float16 | bfloat16) and `compression` (none | default) are the storage layout of
  data/storage.py, recorded in metadata.json.
  """
  _check_name(name)
  extra_metadata = {**storage.metadata(feature_dtype, compression), **(extra_metadata or {})}
  final = dataset_dir(data_dir, name)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
  plans = plan_splits(captions_dir, splits)
  source = vinvl.VinvlFeatures(features_dir, feature_dim)
  name_dir = os.path.join(data_dir, name)
  created_name_dir = not os.path.isdir(name_dir)
  tmp = os.path.join(name_dir, f".incomplete-{VERSION}-{uuid.uuid4().hex[:8]}")
  try:
    feature_dim = _check_every_image_has_features(plans, source, captions_dir)
    os.makedirs(tmp)
    info = _dataset_info(name, tmp, plans, feature_dim, captions_dir, features_dir, description, extra_metadata,
                         feature_dtype)
    with storage.array_record_options(compression):
      _write_splits(info, plans, source, name, shard_bytes)
    fileio.replace_dir(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if created_name_dir and os.path.isdir(name_dir) and not os.listdir(name_dir):
      os.rmdir(name_dir)
    raise
  finally:
    source.close()
  log.info("wrote %s (feature dim %d; %s)", final, feature_dim,
           ", ".join(f"{p.name}: {len(p.image_ids)}" for p in plans))
  return final
