"""The checks of a training config that need the opened dataset and the final model config.

Why separate from config_checks.py: those run on the config alone, before anything is opened; these run
once the data is open (still before compiling) and catch what would otherwise fail at the first batch or
the first evaluation, after minutes of compiling and training: region features of another width, records
without captions, a split too small for the batch or for the coco1k protocol, missing region classes.
"""
from __future__ import annotations

import numpy as np

from vldeformer_jax.data import prepare
from vldeformer_jax.training import config_checks

# Images per fold of the coco1k protocol (retrieval/metrics.py: fold_slices' default).
COCO1K_FOLD = 1000
RECORD_FIELDS = ("image_id", "features", "tags", "captions")
SAMPLED_RECORDS = 8  # records read per split (evenly spaced) to check their fields; a record is cheap


def _sample(source) -> list[int]:
  n = len(source)
  return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, SAMPLED_RECORDS))}) if n else []


def _record_errors(source, field: str, what: str, feature_dim: int | None) -> list[str]:
  """The fields, captions and region features of sampled records of one split."""
  for i in _sample(source):
    record = source[i]
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
      return [f"{field}: record {i} of {what} lacks {', '.join(missing)} (has: {', '.join(sorted(record))}); "
              "prepare the dataset with launch/prepare_data.py"]
    if len(record["captions"]) == 0:
      return [f"{field}: record {i} (image_id {int(record['image_id'])}) of {what} has no captions"]
    shape = np.asarray(record["features"]).shape
    if len(shape) != 2 or (feature_dim is not None and shape[1] != feature_dim):
      return [f"{field}: record {i} (image_id {int(record['image_id'])}) of {what} has region features of shape "
              f"{shape}, expected [n, {feature_dim}]"]
  return []


def _caption_count_errors(config, data) -> list[str]:
  """From the dataset's metadata (prepare.py writes it): a split with fewer captions than images."""
  d = config.data
  try:
    meta = prepare.read_metadata(data.data_dir, d.name) or {}
  except (OSError, ValueError):
    return []
  errors, checked = [], [("config.data.eval_split", d.eval_split)]
  if not config_checks.trains_elsewhere(config):
    checked.insert(0, ("config.data.train_split", d.train_split))
  for field, split in checked:
    info = (meta.get("splits") or {}).get(split) or {}
    if info and info.get("num_captions", 1) < info.get("num_images", 0):
      errors.append(f"{field}: split {split!r} of dataset {d.name!r} has {info['num_captions']} captions for "
                    f"{info['num_images']} images: some images have none")
  return errors


def _eval_errors_against_data(config, data) -> list[str]:
  if data.eval is None:
    return []
  d, e = config.data, config.eval
  n = len(data.eval)
  evaluated = min(n, int(e.max_images)) if e.max_images else n
  what = f"split {d.eval_split!r} of dataset {d.name!r}"
  if evaluated == 0:
    return [f"config.data.eval_split: {what} is empty"]
  errors = []
  if e.protocol == "coco1k" and evaluated < COCO1K_FOLD:
    held = f"{n} images" + (f", {evaluated} with config.eval.max_images" if evaluated < n else "")
    errors.append(f"config.eval.protocol: 'coco1k' averages folds of {COCO1K_FOLD} images, but {what} has {held}; "
                  "use 'full' (or 'all': coco1k is added when there are enough images)")
  return errors + _record_errors(data.eval, "config.data.eval_split", what, data.feature_dim)


def _region_class_errors(config, data) -> list[str]:
  """Masked object classification needs per-region detector classes, which older datasets lack."""
  from vldeformer_jax.training import moc
  if not moc.wants_region_labels(config) or not len(data.train):
    return []
  record = data.train[0]
  if "region_classes" in record:
    return []
  return [f"config.early_interaction.moc_weight: masked object classification needs per-region detector classes, "
          f"but split {config.data.train_split!r} of dataset {config.data.name!r} has none (prepared before they "
          f"were stored): prepare it again (launch/prepare_data.py --overwrite) or set moc_weight=0"]


def check_against_data(config, model_config, data) -> None:
  """The checks that need the opened dataset and the final model config (still before compiling): what
  would otherwise fail at the first evaluation or the first batch, after minutes of compiling and training."""
  errors = []
  if data.feature_dim != model_config.img_feature_dim:
    errors.append(f"config.model.img_feature_dim: the model takes {model_config.img_feature_dim}-d regions, but "
                  f"dataset {config.data.name!r} has {data.feature_dim}-d region features")
  g = config.train.global_batch_size
  if len(data.train) < g:
    errors.append(f"config.train.global_batch_size: {g} exceeds the {len(data.train)} images of split "
                  f"{config.data.train_split!r}")
  errors += config_checks.length_errors(model_config.max_text_len, model_config.tag_len,
                                        model_config.max_position_embeddings, config.objective, "the model")
  errors += _record_errors(data.train, "config.data.train_split",
                           f"split {config.data.train_split!r} of dataset {config.data.name!r}", data.feature_dim)
  errors += _caption_count_errors(config, data)
  errors += _eval_errors_against_data(config, data)
  errors += _region_class_errors(config, data)
  if errors:
    raise config_checks.ConfigError(errors)
