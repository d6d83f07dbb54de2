"""PyTorch / safetensors BERT checkpoints -> the Flax parameter tree of `model.init_params`, checked.

Conversion is a rule table over numpy arrays, not a model-to-model copy: every source key is renamed
(`.` -> `/`; Linear `weight` -> `kernel`, transposed; LayerNorm `weight`/`gamma` -> `scale`, `bias`/`beta`
-> `bias`; Embedding `weight` -> `embedding`), buffers are dropped, and every tensor is compared with the
shape the initialised model expects (`jax.eval_shape(init_params)`, so no memory is spent on a random
BERT). Missing, unexpected and mismatched keys are reported by name and refused; only the parts a source
cannot hold are freshly initialised, and the report says which:

- VinVL / Oscar (`bert.*`, optionally `classifier.*` -> the early-interaction head, `cls.predictions.*` ->
  the MLM head with its tied decoder checked and dropped, `cls.seq_relationship.*` dropped);
- VLDeformer `model.cpkt` (a state dict, possibly wrapped in {"state_dict": ...} and `module.`-prefixed);
- plain HF BERT with or without the `bert.` prefix: it has no region embedding (`img_embedding` and the
  image `LayerNorm`), so those are initialised fresh, like the heads.

torch is imported only to read `.bin` / `.cpkt` files; safetensors files are read without it.
`merge_params` is the general loader that training reuses (e.g. an export into a model with a new head).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from vldeformer_jax.model.vldeformer import init_params
from vldeformer_jax.model.config import ModelConfig

_log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.cpkt", "model.ckpt")

# Source key -> Flax path, first match wins; "T" transposes a 2-D PyTorch Linear weight [out, in].
RENAME_RULES: tuple[tuple[str, str, str | None], ...] = (
    (r"^(.*LayerNorm)\.(weight|gamma)$", r"\1/scale", None),
    (r"^(.*LayerNorm)\.(bias|beta)$", r"\1/bias", None),
    (r"^(.*_embeddings)\.weight$", r"\1/embedding", None),
    (r"^(.*)\.weight$", r"\1/kernel", "T"),
    (r"^(.*)\.bias$", r"\1/bias", None),
)
# Non-parameter buffers of some BERT versions.
BUFFER_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
# Pre-training heads we do not have: reported, then dropped.
DROPPED_HEADS = re.compile(r"^cls\.seq_relationship\.")
# Plain-BERT keys that get the `bert.` prefix.
BACKBONE_PREFIXES = ("embeddings.", "encoder.", "pooler.", "img_embedding.", "LayerNorm.")
# Parts a checkpoint may lack, freshly initialised: the heads always, the region embedding only when the
# source has no region embedding at all (plain text BERT).
HEAD_PATHS = (r"^classifier/", r"^cls/", r"^projection/")
REGION_PATHS = (r"^bert/img_embedding/", r"^bert/LayerNorm/")


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and the offending keys."""


@dataclasses.dataclass
class ParamDiff:
  missing: list[str]
  unexpected: list[str]
  mismatched: list[tuple[str, tuple, tuple]]  # (path, loaded shape, expected shape)


def flatten(tree: Mapping) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for path, leaf in jax.tree.flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def diff_params(loaded: Mapping[str, Any], expected: Mapping[str, Any]) -> ParamDiff:
  """Compares two flat {path: array-like} dicts by name and shape."""
  mismatched = [(k, tuple(np.shape(loaded[k])), tuple(expected[k].shape))
                for k in sorted(set(loaded) & set(expected))
                if tuple(np.shape(loaded[k])) != tuple(expected[k].shape)]
  return ParamDiff(missing=sorted(set(expected) - set(loaded)),
                   unexpected=sorted(set(loaded) - set(expected)), mismatched=mismatched)


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(re.search(p, name) for p in patterns)


def merge_params(loaded, initialised, allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                 *, what: str = "loaded parameters"):
  """Loaded parameters placed into an initialised tree, with every difference logged and checked.

  `loaded` and `initialised` are nested dicts (or flat {"a/b": x} dicts) of arrays; leaves of
  `initialised` may be `jax.ShapeDtypeStruct` when nothing is missing. Paths of `initialised` absent from
  `loaded` keep their initial value only if they match one of the `allow_missing` regexes; loaded paths the
  model does not have are dropped only if they match `allow_unexpected`; any other difference, and any
  shape mismatch, raises ConversionError naming every offending path. Loaded leaves are cast to the
  initialised dtype. Returns a nested dict.
  """
  allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
  flat_loaded = loaded if _is_flat(loaded) else flatten(loaded)
  flat_init = initialised if _is_flat(initialised) else flatten(initialised)
  d = diff_params(flat_loaded, flat_init)
  if d.missing:
    _log.info("%s: %d parameter(s) not loaded, kept as initialised: %s", what, len(d.missing), ", ".join(d.missing))
  if d.unexpected:
    _log.info("%s: %d parameter(s) the model does not have: %s", what, len(d.unexpected), ", ".join(d.unexpected))
  problems = []
  bad_missing = [k for k in d.missing if not _matches(k, allow_missing)]
  if bad_missing:
    problems.append(f"missing {len(bad_missing)} parameter(s) the model needs: {', '.join(bad_missing)}")
  bad_unexpected = [k for k in d.unexpected if not _matches(k, allow_unexpected)]
  if bad_unexpected:
    problems.append(f"{len(bad_unexpected)} unexpected parameter(s) the model does not have: "
                    f"{', '.join(bad_unexpected)}")
  if d.mismatched:
    problems.append("shape mismatch: " + ", ".join(
        f"{k} is {list(got)} but the model expects {list(want)}" for k, got, want in d.mismatched))
  if problems:
    raise ConversionError(f"{what}: " + "; ".join(problems))
  out = {}
  for k, init in flat_init.items():
    if k in flat_loaded:
      out[k] = np.asarray(flat_loaded[k]).astype(init.dtype, copy=False)
    elif isinstance(init, jax.ShapeDtypeStruct):
      raise ConversionError(f"{what}: {k} is missing and no initial value was given for it")
    else:
      out[k] = init
  return unflatten(out)


def _is_flat(tree) -> bool:
  return isinstance(tree, Mapping) and all(not isinstance(v, Mapping) for v in tree.values())


# ----------------------------------------------------------------------------------------- reading

def find_weights(src_dir: str) -> list[str]:
  """The weight file(s) of a checkpoint directory: safetensors (possibly sharded), .bin, or .cpkt."""
  if not os.path.isdir(src_dir):
    raise ConversionError(f"checkpoint directory not found: {src_dir}")
  shards = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
  if shards:
    return shards
  for name in WEIGHT_FILES[1:]:
    p = os.path.join(src_dir, name)
    if os.path.isfile(p):
      return [p]
  raise ConversionError(f"checkpoint {src_dir}: no weights found (looked for *.safetensors, "
                        f"{', '.join(WEIGHT_FILES[1:])})")


def _to_numpy(t) -> np.ndarray:
  import torch  # only called on torch tensors
  t = t.detach().cpu()
  if t.is_floating_point() and t.dtype != torch.float32:
    t = t.float()
  return t.numpy()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """One weight file -> {PyTorch key: numpy array}; floating tensors become float32."""
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      sd = load_file(path)
      return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"
              else v for k, v in sd.items()}
    import torch  # lazily: training and serving never need it
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except ConversionError:
    raise
  except Exception as e:  # a truncated zip, a pickle error, a header error...
    raise ConversionError(f"{path}: cannot read the weights file ({type(e).__name__}: {e})") from e
  # Training scripts wrap the state dict in various ways; unwrap one level of the usual names.
  if isinstance(obj, dict):
    for wrapper in ("state_dict", "model_state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a state dict (a dict of tensors), found {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = _to_numpy(v)
  return out


def load_state_dict(src_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """All weights of a checkpoint directory as one dict, and a description of where they came from."""
  files = find_weights(src_dir)
  sd: dict[str, np.ndarray] = {}
  for f in files:
    part = read_state_dict(f)
    dup = sorted(set(sd) & set(part))
    if dup:
      raise ConversionError(f"{f}: keys also present in another shard: {', '.join(dup[:10])}")
    sd.update(part)
  return sd, ", ".join(files)


def load_model_config(src_dir: str, **overrides) -> ModelConfig:
  """ModelConfig from a checkpoint's config.json (HF/Oscar field names; img_feature_dim defaults 2054)."""
  path = os.path.join(src_dir, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"checkpoint {src_dir}: no config.json (the model sizes are read from it)")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
  kind = str(d.get("img_feature_type", ""))
  if kind.startswith("dis_code"):
    raise ConversionError(f"{path}: img_feature_type {kind!r} (discrete codes) is not supported; "
                          f"only the Linear region embedding")
  if isinstance(d.get("classifier"), str) and d["classifier"] != "linear":
    raise ConversionError(f"{path}: classifier {d['classifier']!r} is not supported; only 'linear'")
  try:
    return ModelConfig.from_dict({**d, **overrides}, source=path)
  except ValueError as e:
    raise ConversionError(str(e)) from e


# ------------------------------------------------------------------------------------- conversion

@dataclasses.dataclass
class ConversionReport:
  source: str
  layout: str  # "oscar" (has a region embedding) or "bert" (text only)
  converted: int = 0
  dropped: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    out = [f"source: {self.source} ({self.layout} layout), {self.converted} tensors converted"]
    if self.dropped:
      out.append(f"dropped {len(self.dropped)} key(s): {', '.join(self.dropped)}")
    if self.fresh:
      out.append(f"freshly initialised (not in the checkpoint): {', '.join(self.fresh)}")
    return out


def _normalise_key(key: str) -> str:
  if key.startswith("module."):
    key = key[len("module."):]
  if key.startswith(BACKBONE_PREFIXES):
    key = "bert." + key
  return key


def rename(key: str) -> tuple[str, str | None]:
  """A (normalised) PyTorch key -> (Flax path, transform)."""
  for pattern, repl, transform in RENAME_RULES:
    if re.match(pattern, key):
      return re.sub(pattern, repl, key).replace(".", "/"), transform
  return key.replace(".", "/"), None  # no rule: kept as is, then reported as unexpected


def torch_key(path: str) -> str:
  """The PyTorch key a Flax path comes from (for messages)."""
  return re.sub(r"/(kernel|scale|embedding)$", ".weight", path).replace("/", ".")


@functools.lru_cache(maxsize=8)
def expected_shapes(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """{Flax path: ShapeDtypeStruct} of the initialised model, traced once per config (no arrays)."""
  return flatten(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))


def to_state_dict(params) -> dict[str, np.ndarray]:
  """The inverse rule table: a Flax tree -> a PyTorch state dict in the Oscar key layout (`bert.*`,
  `classifier.*`, `cls.predictions.*`; the tied MLM decoder is not written). For PyTorch consumers and
  round-trip tests."""
  out = {}
  for path, value in flatten(params).items():
    value = np.asarray(value)
    if path.endswith("/kernel") and value.ndim == 2:
      value = value.T
    out[torch_key(path)] = np.ascontiguousarray(value)
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: ModelConfig, *, source: str = "checkpoint",
                       allow_missing: Iterable[str] = (), seed: int = 0) -> tuple[dict, ConversionReport]:
  """A PyTorch state dict -> (Flax parameter tree, report), every tensor checked against the model.

  Raises ConversionError naming every missing, unexpected or mismatched key. `allow_missing` adds regexes
  (on Flax paths) of parameters that may be absent and are then initialised from `seed`.
  """
  sd = {_normalise_key(k): v for k, v in state_dict.items()}
  has_regions = any(k.startswith(("bert.img_embedding.", "bert.LayerNorm.")) for k in sd)
  report = ConversionReport(source=source, layout="oscar" if has_regions else "bert")
  flat: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for key in sorted(sd):
    value = np.asarray(sd[key])
    if BUFFER_KEYS.search(key):
      report.dropped.append(f"{key} (buffer)")
      continue
    if DROPPED_HEADS.match(key):
      report.dropped.append(key)
      continue
    if key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
      tied = "bert.embeddings.word_embeddings.weight" if key.endswith("weight") else "cls.predictions.bias"
      if tied not in sd or sd[tied].shape != value.shape or not np.array_equal(sd[tied], value):
        raise ConversionError(f"{source}: {key} is not tied to {tied} (the Flax MLM head ties them)")
      report.dropped.append(f"{key} (tied to {tied})")
      continue
    path, transform = rename(key)
    if transform == "T" and value.ndim == 2:
      value = value.T
    flat[path] = np.ascontiguousarray(value)
    origin[path] = key
  expected = expected_shapes(config)
  d = diff_params(flat, expected)
  may_miss = HEAD_PATHS + (() if has_regions else REGION_PATHS) + tuple(allow_missing)
  problems = []
  bad_missing = [k for k in d.missing if not _matches(k, may_miss)]
  if bad_missing:
    problems.append(f"missing {len(bad_missing)} key(s) the model needs: " + ", ".join(
        f"{torch_key(k)} (-> {k} {list(expected[k].shape)})" for k in bad_missing))
  if d.unexpected:
    problems.append(f"{len(d.unexpected)} unexpected key(s) the model does not have: " + ", ".join(
        f"{origin[k]} (-> {k})" for k in d.unexpected))
  if d.mismatched:
    problems.append("shape mismatch: " + ", ".join(
        f"{origin[k]} has shape {list(got)}, the model (config.json) expects {list(want)} for {k}"
        for k, got, want in d.mismatched))
  if problems:
    raise ConversionError(f"{source}: " + "; ".join(problems))
  report.converted = len(flat)
  report.fresh = list(d.missing)
  if d.missing:
    initialised = {k: fresh_param(k, v.shape, config, seed) if k in d.missing else v for k, v in expected.items()}
    params = merge_params(flat, initialised, allow_missing=[re.escape(k) for k in d.missing], what=source)
  else:
    params = merge_params(flat, expected, what=source)
  return params, report


def fresh_param(path: str, shape, config: ModelConfig, seed: int) -> np.ndarray:
  """BERT's initialisation (the same as model.py's initialisers), in numpy so that conversion compiles
  nothing: kernels, embeddings and the region-embedding bias ~ N(0, initializer_range), LayerNorm scales 1,
  other biases 0. Seeded per path."""
  if path.endswith(("/kernel", "/embedding")) or path == "bert/img_embedding/bias":
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "little")])
    return (rng.standard_normal(shape, dtype=np.float32) * config.initializer_range).astype(np.float32)
  if path.endswith("/scale"):
    return np.ones(shape, np.float32)
  if path.endswith("/bias"):
    return np.zeros(shape, np.float32)
  raise ConversionError(f"no initialiser rule for the missing parameter {path}")


def convert_checkpoint(src_dir: str, output: str, *, overwrite: bool = False, allow_missing: Iterable[str] = (),
                       seed: int = 0, config_overrides: Mapping[str, Any] | None = None) -> ConversionReport:
  """Converts a checkpoint directory (config.json, vocab.txt, weights) into an export at `output`.

  Nothing is written unless every check passes; the export is written atomically.
  """
  from vldeformer_jax.io import export  # here: export is the only consumer-facing dependency of conversion

  src_dir = os.path.abspath(src_dir)
  if not os.path.isdir(src_dir):
    raise ConversionError(f"checkpoint directory not found: {src_dir}")
  if os.path.exists(output) and not overwrite:
    raise ConversionError(f"output already exists: {output} (pass overwrite to replace it)")
  config = load_model_config(src_dir, **dict(config_overrides or {}))
  vocab = os.path.join(src_dir, "vocab.txt")
  if not os.path.isfile(vocab):
    raise ConversionError(f"checkpoint {src_dir}: no vocab.txt (the tokenizer vocabulary)")
  state_dict, files = load_state_dict(src_dir)
  params, report = convert_state_dict(state_dict, config, source=files, allow_missing=allow_missing, seed=seed)
  for line in report.lines():
    _log.info("%s", line)
  export.write_export(output, params, config, vocab, overwrite=overwrite, metadata={
      "source": src_dir, "weights": files, "layout": report.layout, "dropped": report.dropped,
      "freshly_initialised": report.fresh, "init_seed": seed, export.UNTRAINED_KEY: sorted(report.fresh)})
  return report
