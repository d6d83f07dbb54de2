"""Checks a training config before anything is compiled, with one line per problem naming the field.

Why up front: a mistyped loss name or a batch that does not split over the devices would otherwise
surface minutes later as a stack trace from inside XLA or orbax, after the data was opened and the model
compiled. `check` collects every problem at once, so a user fixes them in one go; `launch/train.py`
prints the lines and exits non-zero.
"""
from __future__ import annotations

import math
import os
import re

import jax

from vldeformer_jax.data import mixture
from vldeformer_jax.data import prepare
from vldeformer_jax.io import export as export_lib
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval.metrics import PROTOCOLS
from vldeformer_jax.training import early_interaction
from vldeformer_jax.training.losses import LOSS_NAMES

OBJECTIVES = ("decompose", "early_interaction")
BEST_METRICS = ("rsum", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10", "t2i_R@10")


class ConfigError(ValueError):
  """An invalid training config; `errors` holds one message per problem."""

  def __init__(self, errors: list[str]):
    self.errors = list(errors)
    super().__init__("invalid training config:\n" + "\n".join(f"  {e}" for e in self.errors))


def _mesh_errors(config, device_count: int) -> tuple[list[str], int | None]:
  """Errors of config.mesh, and the number of batch shards (data * fsdp) when the mesh is valid."""
  sizes = {k: int(config.mesh[k]) for k in ("data", "fsdp", "model")}
  bad = [k for k, v in sizes.items() if v == 0 or v < -1]
  if bad:
    return [f"config.mesh.{k}: {sizes[k]} is not a valid axis size (positive, or -1 for the remaining devices)"
            for k in bad], None
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    return [f"config.mesh: only one axis may be -1, got {', '.join(free)}"], None
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if device_count % known:
      return [f"config.mesh: the fixed axes {sizes} multiply to {known}, which does not divide the "
              f"{device_count} devices"], None
    sizes[free[0]] = device_count // known
  elif known != device_count:
    return [f"config.mesh: sizes {sizes} multiply to {known}, but there are {device_count} devices"], None
  return [], sizes["data"] * sizes["fsdp"]


def _model_error(message: str) -> str:
  """ModelConfig's messages, re-addressed to the config field: "config.model.<field>: ..." when known."""
  m = re.match(r"model config field '(\w+)' (.*)", message)
  if m:
    return f"config.model.{m.group(1)}: {m.group(2)}"
  for prefix in ("model config: ", "config.model: "):
    if message.startswith(prefix):
      message = message[len(prefix):]
  return f"config.model: {message}"


def _dataset_errors(config) -> list[str]:
  d = config.data
  if not d.name:
    return ["config.data.name: no dataset name given (the --name of launch/prepare_data.py)"]
  if d.generate and d.generate != d.name:
    return [f"config.data.generate: {d.generate!r} writes the demo dataset under that name, but config.data.name "
            f"is {d.name!r}; demo data is generated only for the dataset the config names: set both to the same "
            "name, or config.data.generate='' to use a prepared dataset"]
  if d.generate:
    return []  # written on first use
  if not d.data_dir:
    return ["config.data.data_dir: no data directory given (the --data_dir of launch/prepare_data.py)"]
  missing = prepare.missing_dataset(d.data_dir, d.name)
  if missing:
    return [f"config.data: {missing}"]
  splits = prepare.dataset_splits(d.data_dir, d.name) or {}
  wanted = [] if trains_elsewhere(config) else [("train_split", d.train_split)]
  if config.train.eval_every >= 0 and d.eval_split:
    wanted.append(("eval_split", d.eval_split))
  return [f"config.data.{field}: dataset {d.name!r} has no split {split!r} (it has: {', '.join(sorted(splits))})"
          for field, split in wanted if split not in splits]


def trains_elsewhere(config) -> bool:
  """True when the training images do not come from `data.name`'s train split (a mixture, a corpus)."""
  return bool(config.data.get("mixture") or config.data.get("corpus_size"))


def length_errors(text_len: int, tag_len: int, positions: int, objective: str, where: str) -> list[str]:
  """The input lengths against the model's position embeddings (`where` names whose they are)."""
  errors = []
  if text_len > positions:
    errors.append(f"config.data.max_text_len: {text_len} caption tokens, more than the {positions} position "
                  f"embeddings of {where}")
  if tag_len > positions:
    errors.append(f"config.data.max_tag_len: {tag_len} tag tokens, more than the {positions} position embeddings "
                  f"of {where}")
  if objective == "early_interaction" and text_len + tag_len - 1 > positions:
    errors.append(f"config.data: an early-interaction pair has max_text_len + max_tag_len - 1 = "
                  f"{text_len + tag_len - 1} token positions, more than the {positions} position embeddings of {where}")
  return errors


def _export_length_errors(config) -> list[str]:
  """With `init_export`: the config's input lengths against the export's position embeddings."""
  try:
    mc = ModelConfig.from_json(os.path.join(config.init_export, export_lib.CONFIG_FILE), strict=True)
  except (OSError, ValueError, TypeError):
    return []  # reported by the init_export check
  text = int(config.data.max_text_len)
  return length_errors(text, int(config.data.max_tag_len) or text, mc.max_position_embeddings, config.objective,
                       f"init_export {config.init_export}")


def _objective_errors(config) -> list[str]:
  lc, errors = config.loss, []
  if config.objective not in OBJECTIVES:
    errors.append(f"config.objective: unknown objective {config.objective!r}; expected one of {OBJECTIVES}")
  if lc.name not in LOSS_NAMES:
    errors.append(f"config.loss.name: unknown loss {lc.name!r}; expected one of {LOSS_NAMES}")
  if not lc.temperature > 0:
    errors.append(f"config.loss.temperature: must be positive, got {lc.temperature}")
  if lc.name == "hardness" and not 0.0 <= lc.tau_plus < 1.0:
    errors.append(f"config.loss.tau_plus: must be in [0, 1), got {lc.tau_plus}")
  if lc.chunk_size < 0:
    errors.append(f"config.loss.chunk_size: must be >= 0, got {lc.chunk_size}")
  if lc.name == "sigmoid" and lc.chunk_size > 0:
    errors.append(f"config.loss.chunk_size: {lc.chunk_size} has no effect on the sigmoid loss (it scores one "
                  "device's block at a time); use 0")
  if lc.name == "sigmoid" and not math.isfinite(float(lc.get("bias_init", 0.0))):
    errors.append(f"config.loss.bias_init: must be finite, got {lc.bias_init}")
  errors += _late_interaction_errors(config)
  if config.objective == "early_interaction":
    try:
      early_interaction.options(config)
    except ValueError as e:
      errors.append(str(e))
  elif len(config.get("early_interaction", {}) or {}):
    errors.append("config.early_interaction: set, but config.objective is not 'early_interaction'")
  return errors


def _late_interaction_errors(config) -> list[str]:
  """`loss.late_interaction_weight` (docs/method.md §7.5): a weight >= 0 of the decomposition objective, on
  its one-pass step (gradient caching re-embeds without the token states)."""
  w = config.loss.get("late_interaction_weight", 0.0)
  if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
    return [f"config.loss.late_interaction_weight: must be a finite number >= 0, got {w!r}"]
  if w > 0 and config.objective != "decompose":
    return [f"config.loss.late_interaction_weight: {w} is a term of objective 'decompose', not "
            f"{config.objective!r}; use 0"]
  if w > 0 and config.train.get("micro_batch_size", 0):
    return [f"config.loss.late_interaction_weight: {w} is not supported with gradient caching "
            f"(config.train.micro_batch_size={config.train.micro_batch_size}); use micro_batch_size=0"]
  return []


def _input_errors(config) -> list[str]:
  d, errors = config.data, []
  if config.init_export:
    try:
      export_lib.read_metadata(config.init_export)
    except (FileNotFoundError, ValueError) as e:
      errors.append(f"config.init_export: {e}")
    else:
      errors.extend(_export_length_errors(config))
  errors.extend(_dataset_errors(config))
  if d.max_text_len < 3:
    errors.append(f"config.data.max_text_len: {d.max_text_len} leaves no room for [CLS] text [SEP]")
  if d.max_tag_len != 0 and d.max_tag_len < 3:
    errors.append(f"config.data.max_tag_len: {d.max_tag_len} leaves no room for [CLS] tags [SEP] (0: max_text_len)")
  if d.max_regions < 1:
    errors.append(f"config.data.max_regions: must be >= 1, got {d.max_regions}")
  if d.negatives.num_per_pair < 0:
    errors.append(f"config.data.negatives.num_per_pair: must be >= 0, got {d.negatives.num_per_pair}")
  if not 0.0 < d.negatives.replace_ratio <= 1.0:
    errors.append(f"config.data.negatives.replace_ratio: must be in (0, 1], got {d.negatives.replace_ratio}")
  if d.num_captions_per_image < 1:
    errors.append(f"config.data.num_captions_per_image: must be >= 1, got {d.num_captions_per_image}")
  return errors


def _mixture_errors(config) -> list[str]:
  """`config.data.mixture`: parseable, and every dataset in it prepared under data_dir."""
  d = config.data
  if not d.get("mixture"):
    return []
  try:
    parts = mixture.parse_mixture(d.mixture)
  except ValueError as e:
    return [str(e)]
  if not d.data_dir:
    return []  # reported for the dataset itself
  return [f"config.data.mixture: dataset {name!r} not found in {os.path.abspath(d.data_dir)}; prepare it with "
          "launch/prepare_data.py" for name, _ in parts if not _prepared(d.data_dir, name)]


def _prepared(data_dir: str, name: str) -> bool:
  root = os.path.join(data_dir, name)
  return os.path.isdir(root) and any(os.path.isfile(os.path.join(root, v, "dataset_info.json"))
                                     for v in os.listdir(root))


def _model_errors(config) -> list[str]:
  d = config.data
  try:
    lengths = {k: int(d[k]) for k in ("max_text_len", "max_tag_len", "max_regions")}  # the model's, too
    mc = ModelConfig.from_dict({**dict(config.model), **lengths}, strict=True, source="config.model")
  except (ValueError, TypeError) as e:
    return [_model_error(str(e))]
  packs_pairs = config.objective == "early_interaction" and not config.init_export
  if packs_pairs and mc.packed_len > mc.max_position_embeddings:
    return [f"config.data: an early-interaction pair has max_text_len + max_tag_len - 1 = {mc.packed_len} "
            f"token positions, more than config.model.max_position_embeddings {mc.max_position_embeddings}"]
  return []


def _contrastive_pool_is_split(config) -> str | None:
  """Why gradient accumulation would change this config's objective, or None when it would not."""
  if config.objective == "decompose":
    return "the decomposition's contrastive pool would be each micro-batch, not the global batch"
  if config.objective == "early_interaction" and float(early_interaction.options(config)["itc_weight"]) > 0:
    return "the ITC term's in-batch pool would be each micro-batch, not the global batch"
  return None


def _batch_errors(config, device_count: int, process_count: int) -> list[str]:
  t = config.train
  errors, batch_shards = _mesh_errors(config, device_count)
  g, accum = int(t.global_batch_size), int(t.grad_accum_steps)
  if g < 1:
    return errors + [f"config.train.global_batch_size: must be positive, got {g}"]
  if accum < 1:
    return errors + [f"config.train.grad_accum_steps: must be >= 1, got {accum}"]
  if accum > 1 and config.objective in OBJECTIVES:
    try:
      why = _contrastive_pool_is_split(config)
    except ValueError:
      why = None  # the early_interaction options are reported by _objective_errors
    if why:
      instead = ("train.micro_batch_size (gradient caching keeps the whole pool)" if config.objective == "decompose"
                 else "1 and a global batch that fits")
      errors.append(f"config.train.grad_accum_steps: {accum} would change the objective: {why}; it is for "
                    f"non-contrastive objectives only; use {instead}")
  if g % process_count:
    errors.append(f"config.train.global_batch_size: {g} is not divisible by the {process_count} processes")
  if batch_shards and g % (batch_shards * accum):
    what = f"{batch_shards} batch shards (mesh data x fsdp)" + (f" x {accum} micro-batches" if accum > 1 else "")
    errors.append(f"config.train.global_batch_size: {g} is not divisible by the {what} = {batch_shards * accum}"
                  f" ({device_count} devices)")
  return errors + _micro_batch_errors(config, g, accum, batch_shards, device_count)


def _micro_batch_errors(config, g: int, accum: int, batch_shards: int | None, device_count: int) -> list[str]:
  """`train.micro_batch_size` (gradient caching, training/grad_cache.py)."""
  m = int(config.train.get("micro_batch_size", 0))
  if m == 0:
    return []
  if m < 0:
    return [f"config.train.micro_batch_size: must be >= 0 (0 = off), got {m}"]
  if config.objective != "decompose":
    return [f"config.train.micro_batch_size: {m}: gradient caching applies to objective 'decompose' only, not "
            f"{config.objective!r}"]
  if accum > 1:
    return [f"config.train.micro_batch_size: {m} and config.train.grad_accum_steps {accum}: gradient caching "
            "already splits the batch; set grad_accum_steps to 1"]
  if batch_shards and g % (batch_shards * m):
    return [f"config.train.micro_batch_size: {m} rows per device x {batch_shards} batch shards (mesh data x "
            f"fsdp) = {batch_shards * m} does not divide config.train.global_batch_size {g} ({device_count} "
            "devices)"]
  return []


def _schedule_errors(config) -> list[str]:
  t, errors = config.train, []
  if not t.learning_rate > 0:
    errors.append(f"config.train.learning_rate: must be positive, got {t.learning_rate}")
  for field in ("warmup_steps", "num_steps", "weight_decay", "max_grad_norm"):
    if t[field] < 0:
      errors.append(f"config.train.{field}: must be >= 0, got {t[field]}")
  if t.num_steps == 0 and not t.num_epochs > 0:
    errors.append(f"config.train.num_epochs: must be positive when train.num_steps is 0, got {t.num_epochs}")
  for field in ("log_every", "checkpoint_every", "max_to_keep"):
    if t[field] < 1:
      errors.append(f"config.train.{field}: must be >= 1, got {t[field]}")
  if t.eval_every < -1:
    errors.append(f"config.train.eval_every: must be -1 (never), 0 (at the end) or a step interval, got {t.eval_every}")
  return errors


def _text_text_errors(config, device_count: int) -> list[str]:
  """MURAL's text-text task (docs/method.md §4.9): a decomposition with a bitext file, one pass per step."""
  if float(config.loss.get("text_text_weight", 0.0)) <= 0:
    return []
  field, errors = "config.loss.text_text_weight", []
  if config.objective != "decompose":
    errors.append(f"{field}: applies to objective 'decompose' only, not {config.objective!r}")
  bitext = config.data.get("bitext", "")
  if not bitext or "://" not in bitext and not os.path.isfile(bitext):
    errors.append(f"{field}: needs config.data.bitext, a bitext file (data/bitext.py); got {bitext!r}")
  if int(config.train.get("micro_batch_size", 0)) > 0:
    errors.append(f"{field}: not with train.micro_batch_size (gradient caching embeds the image-text pool only)")
  n = int(config.data.get("bitext_batch_size", 0) or config.train.global_batch_size)
  _, shards = _mesh_errors(config, device_count)
  if n < 1 or (shards and n % shards):
    errors.append(f"config.data.bitext_batch_size: {n} pairs per step must be a positive multiple of the "
                  f"{shards} batch shards")
  return errors


def _topic_errors(config) -> list[str]:
  """The topic target (docs/method.md §4.10): a decomposition, one pass per step."""
  w = float(config.loss.get("topic_weight", 0.0))
  field, errors = "config.loss.topic_weight", []
  if w < 0:
    errors.append(f"{field}: must be >= 0, got {w}")
  if w <= 0:
    return errors
  if config.objective != "decompose":
    errors.append(f"{field}: applies to objective 'decompose' only, not {config.objective!r}")
  if int(config.train.get("micro_batch_size", 0)) > 0:
    errors.append(f"{field}: not with train.micro_batch_size (gradient caching embeds the image-text pool only)")
  return errors


def _eval_errors(config) -> list[str]:
  e, errors = config.eval, []
  if e.best_metric not in BEST_METRICS:
    errors.append(f"config.eval.best_metric: unknown metric {e.best_metric!r}; expected one of {BEST_METRICS}")
  if e.protocol not in PROTOCOLS:
    errors.append(f"config.eval.protocol: unknown protocol {e.protocol!r}; expected one of {PROTOCOLS}")
  if e.batch_size < 1:
    errors.append(f"config.eval.batch_size: must be >= 1, got {e.batch_size}")
  return errors


def validate(config, *, workdir: str | None = None, device_count: int | None = None,
             process_count: int | None = None) -> list[str]:
  """Every problem of `config` as one line each; empty when the config is valid. Compiles nothing."""
  device_count = jax.device_count() if device_count is None else device_count
  process_count = jax.process_count() if process_count is None else process_count
  errors = (_objective_errors(config) + _input_errors(config) + _mixture_errors(config) + _model_errors(config)
            + _batch_errors(config, device_count, process_count) + _schedule_errors(config) + _eval_errors(config)
            + _text_text_errors(config, device_count) + _topic_errors(config))
  if workdir is not None and os.path.isfile(workdir):
    errors.append(f"workdir: {workdir} is a file, not a directory")
  return errors


def check(config, **kwargs) -> None:
  """Raises ConfigError listing every problem of `config` (see `validate`)."""
  errors = validate(config, **kwargs)
  if errors:
    raise ConfigError(errors)
