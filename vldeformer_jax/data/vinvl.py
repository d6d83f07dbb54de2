"""Readers for the VinVL / Oscar file layout of docs/method.md §3.3, one row at a time.

The COCO release is ~120K images and ~25 GB of base64 region features, so nothing here loads a whole
`features.tsv`: a `TsvFile` keeps only the byte offset of each row (its `.lineidx`) and seeks to the row it
is asked for. Every malformed input raises `VinvlFormatError` naming the file, the 1-based line and, where
known, the image id, because a bad row deep inside a 25 GB file is otherwise impossible to find.

Layout (file names as the Oscar/VLDeformer code expects them):
  features dir: `features.tsv` (+ `features.lineidx`): `image_id \\t num_boxes \\t base64(float32 LE)`;
                `imageid2idx.json`: `{"<image_id>": row}`;
                `predictions.tsv` (+ `.lineidx`): `image_id \\t json`, the json `{"objects": [{"class": ..},
                ..], "image_h", "image_w"}` or a bare list of objects.
  captions dir: `{split}_captions.pt` (torch pickle) or `{split}_captions.json`: image_id -> list of
                captions, or a JSON string of one; `test_img_keys.tsv`, `test_img_keys_1k.tsv`: one id a line.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from typing import Iterable

import numpy as np

from vldeformer_jax.io import files as fileio

log = logging.getLogger(__name__)

FEATURES_TSV = "features.tsv"
PREDICTIONS_TSV = "predictions.tsv"
IMAGEID2IDX = "imageid2idx.json"


class VinvlFormatError(ValueError):
  """A VinVL input file is malformed; the message names the file, line and image id."""


def lineidx_path(tsv_path: str) -> str:
  return os.path.splitext(tsv_path)[0] + ".lineidx"


def scan_line_offsets(tsv_path: str, chunk_bytes: int = 1 << 24) -> np.ndarray:
  """Byte offset of the start of every non-empty line, found by one streaming pass (bounded memory)."""
  offsets = []
  pos = 0
  line_start = 0
  with open(tsv_path, "rb") as f:
    while True:
      chunk = f.read(chunk_bytes)
      if not chunk:
        break
      start = 0
      while True:
        nl = chunk.find(b"\n", start)
        if nl < 0:
          break
        if pos + nl > line_start:  # skip empty lines
          offsets.append(line_start)
        line_start = pos + nl + 1
        start = nl + 1
      pos += len(chunk)
  if pos > line_start:  # a last line without a trailing newline
    offsets.append(line_start)
  return np.asarray(offsets, np.int64)


class TsvFile:
  """Random access to the rows of a TSV file through its `.lineidx` (one byte offset a line).

  A missing `.lineidx` is rebuilt by one streaming scan, logged, and saved next to the TSV when the
  directory is writable (as Oscar's own TSVFile does); otherwise it is kept in memory for this run.
  """

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"VinVL file not found: {path}")
    self.lineidx = lineidx_path(path)
    self._size = os.path.getsize(path)
    if os.path.isfile(self.lineidx):
      self.offsets = self._read_lineidx()
    else:
      log.warning("%s is missing: rebuilding it by scanning %s", self.lineidx, path)
      self.offsets = scan_line_offsets(path)
      try:
        fileio.write_text_atomic(self.lineidx, "".join(f"{o}\n" for o in self.offsets.tolist()))
        log.warning("rebuilt %s (%d rows)", self.lineidx, len(self.offsets))
      except OSError as e:
        log.warning("could not save the rebuilt %s (%s); using it in memory", self.lineidx, e)
    self._f = open(path, "rb")

  def _read_lineidx(self) -> np.ndarray:
    offsets = []
    with open(self.lineidx, "rb") as f:
      for i, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          o = int(line)
        except ValueError:
          raise VinvlFormatError(f"{self.lineidx} line {i}: not an integer byte offset: {line[:50]!r}") from None
        if o < 0 or o >= self._size or (offsets and o <= offsets[-1]):
          raise VinvlFormatError(
              f"{self.lineidx} line {i}: offset {o} is out of order or beyond the end of {self.path} "
              f"({self._size} bytes); delete the .lineidx to rebuild it")
        offsets.append(o)
    return np.asarray(offsets, np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def read_row(self, row: int) -> list[bytes]:
    """The TAB-separated columns of row `row` (0-based), as bytes."""
    if not 0 <= row < len(self.offsets):
      raise VinvlFormatError(f"{self.path}: row {row} requested, but the file has {len(self.offsets)} rows "
                             f"(per {self.lineidx})")
    self._f.seek(int(self.offsets[row]))
    line = self._f.readline().rstrip(b"\r\n")
    if not line:
      raise VinvlFormatError(f"{self.path} line {row + 1}: empty row at byte offset {self.offsets[row]}; "
                             f"is {self.lineidx} stale? Delete it to rebuild it")
    return line.split(b"\t")

  def close(self) -> None:
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _int_field(value: bytes, what: str, where: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise VinvlFormatError(f"{where}: {what} is not an integer: {value[:50]!r}") from None


def _same_id(value: bytes, image_id: int) -> bool:
  try:
    return int(value) == image_id
  except ValueError:
    return False


def decode_feature_row(cols: list[bytes], where: str, feature_dim: int | None = None) -> tuple[int, np.ndarray]:
  """(image_id, float32 [num_boxes, F]) from `image_id \\t num_boxes \\t base64`; F inferred if None."""
  if len(cols) < 3:
    raise VinvlFormatError(f"{where}: expected 3 TAB-separated columns (image_id, num_boxes, base64 "
                           f"float32), found {len(cols)}")
  image_id = _int_field(cols[0], "image_id (column 1)", where)
  where = f"{where} (image {image_id})"
  num_boxes = _int_field(cols[1], "num_boxes (column 2)", where)
  try:
    raw = base64.b64decode(cols[-1], validate=True)
  except (binascii.Error, ValueError) as e:
    raise VinvlFormatError(f"{where}: the base64 feature data is corrupt or truncated "
                           f"({len(cols[-1])} base64 characters): {e}") from None
  if len(raw) % 4:
    raise VinvlFormatError(f"{where}: {len(raw)} feature bytes is not a whole number of float32 values "
                           f"(truncated row?)")
  n_values = len(raw) // 4
  if num_boxes < 0:
    raise VinvlFormatError(f"{where}: negative num_boxes {num_boxes}")
  if feature_dim is None:
    if num_boxes == 0 or n_values % num_boxes:
      raise VinvlFormatError(f"{where}: cannot infer the feature dim: {n_values} float32 values for "
                             f"{num_boxes} boxes")
    feature_dim = n_values // num_boxes
  if num_boxes * feature_dim != n_values:
    raise VinvlFormatError(f"{where}: num_boxes {num_boxes} x feature dim {feature_dim} = "
                           f"{num_boxes * feature_dim} float32 values expected, found {n_values} "
                           f"(truncated row or wrong num_boxes)")
  return image_id, np.frombuffer(raw, "<f4").reshape(num_boxes, feature_dim).astype(np.float32)


def parse_prediction_row(cols: list[bytes], where: str) -> tuple[int, str]:
  """(image_id, tags) from `image_id \\t json`: the detector classes joined by spaces, in file order."""
  image_id, classes = parse_prediction_classes(cols, where)
  return image_id, " ".join(classes)


def parse_prediction_classes(cols: list[bytes], where: str) -> tuple[int, list[str]]:
  """(image_id, [class of each detected object]) from `image_id \\t json`, in file order: one per region
  when predictions.tsv lists the boxes of features.tsv (VinVL writes both from one detector pass)."""
  if len(cols) < 2:
    raise VinvlFormatError(f"{where}: expected 2 TAB-separated columns (image_id, json), found {len(cols)}")
  image_id = _int_field(cols[0], "image_id (column 1)", where)
  where = f"{where} (image {image_id})"
  try:
    pred = json.loads(cols[1])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise VinvlFormatError(f"{where}: malformed predictions JSON: {e}") from None
  objects = pred.get("objects") if isinstance(pred, dict) else pred
  if not isinstance(objects, list):
    raise VinvlFormatError(f"{where}: predictions JSON must be a list of objects or a dict with an "
                           f"'objects' list, got {type(pred).__name__}"
                           + (f" with keys {sorted(pred)[:8]}" if isinstance(pred, dict) else ""))
  classes = []
  for k, obj in enumerate(objects):
    if not isinstance(obj, dict) or not isinstance(obj.get("class"), str):
      raise VinvlFormatError(f"{where}: object {k} has no string 'class' field: {str(obj)[:80]}")
    classes.append(obj["class"])
  return image_id, classes


def load_imageid2idx(path: str) -> dict[int, int]:
  """`imageid2idx.json` as {int image_id: row}."""
  raw = fileio.read_json(path, what="VinVL file", error=VinvlFormatError)
  if not isinstance(raw, dict):
    raise VinvlFormatError(f"{path}: expected a JSON object {{image_id: row}}, got {type(raw).__name__}")
  out = {}
  for k, v in raw.items():
    try:
      out[int(k)] = int(v)
    except (TypeError, ValueError):
      raise VinvlFormatError(f"{path}: key {k!r} -> {v!r} is not an integer image id -> integer row") from None
  return out


class VinvlFeatures:
  """Region features and detector tags of one features dir, by image id, read one row at a time."""

  def __init__(self, features_dir: str, feature_dim: int | None = None):
    self.features_dir = features_dir
    self.imageid2idx_path = os.path.join(features_dir, IMAGEID2IDX)
    self.id2row = load_imageid2idx(self.imageid2idx_path)
    self.features = TsvFile(os.path.join(features_dir, FEATURES_TSV))
    try:
      self.predictions = TsvFile(os.path.join(features_dir, PREDICTIONS_TSV))
    except BaseException:
      self.features.close()
      raise
    self.feature_dim = feature_dim
    self._pred_index: dict[int, int] | None = None  # image id -> predictions row, when not row-aligned

  def __contains__(self, image_id: int) -> bool:
    return image_id in self.id2row

  def missing(self, image_ids: Iterable[int]) -> list[int]:
    return [i for i in image_ids if i not in self.id2row]

  def region_features(self, image_id: int) -> np.ndarray:
    """float32 [num_boxes, F]; F is inferred from the first row read unless given."""
    if image_id not in self.id2row:
      raise VinvlFormatError(f"image {image_id} has captions but no features: it is not in "
                             f"{self.imageid2idx_path}")
    row = self.id2row[image_id]
    where = f"{self.features.path} line {row + 1}"
    cols = self.features.read_row(row)
    got_id, feats = decode_feature_row(cols, where, self.feature_dim)
    if got_id != image_id:
      raise VinvlFormatError(f"{where}: holds image {got_id}, but {self.imageid2idx_path} maps image "
                             f"{image_id} to this row (stale imageid2idx.json or .lineidx?)")
    if self.feature_dim is None:
      self.feature_dim = feats.shape[1]
      log.info("feature dim %d (read from %s)", self.feature_dim, where)
    return feats

  def tags(self, image_id: int) -> str:
    """The detector classes of `image_id` joined by spaces (predictions.tsv, file order)."""
    return " ".join(self.detected_classes(image_id))

  def detected_classes(self, image_id: int) -> list[str]:
    """The detector class of each object predictions.tsv lists for `image_id`, in file order."""
    row = self.id2row.get(image_id)
    if self._pred_index is None and row is not None and row < len(self.predictions):
      # VinVL writes predictions.tsv in the row order of features.tsv: try that first, check the id.
      cols = self.predictions.read_row(row)
      if _same_id(cols[0], image_id):
        return parse_prediction_classes(cols, f"{self.predictions.path} line {row + 1}")[1]
    if self._pred_index is None:
      self._pred_index = self._index_predictions()
    if image_id not in self._pred_index:
      raise VinvlFormatError(f"image {image_id} has no row in {self.predictions.path}")
    row = self._pred_index[image_id]
    return parse_prediction_classes(self.predictions.read_row(row), f"{self.predictions.path} line {row + 1}")[1]

  def region_classes(self, image_id: int, num_regions: int) -> list[str]:
    """The detector class of each of the `num_regions` regions of `image_id` (the masked-object targets,
    docs/method.md §4.8), or [] when predictions.tsv lists another number of objects than features.tsv
    has boxes: then which class belongs to which region is unknown, and the image has no region targets."""
    classes = self.detected_classes(image_id)
    return classes if len(classes) == num_regions else []

  def _index_predictions(self) -> dict[int, int]:
    log.info("%s is not row-aligned with %s: indexing it by image id", self.predictions.path,
             self.features.path)
    index = {}
    for row in range(len(self.predictions)):
      first = self.predictions.read_row(row)[0]
      index.setdefault(_int_field(first, "image_id (column 1)", f"{self.predictions.path} line {row + 1}"), row)
    return index

  def close(self) -> None:
    self.features.close()
    self.predictions.close()


def _normalise_captions(raw, path: str) -> dict[int, list[str]]:
  if not isinstance(raw, dict):
    raise VinvlFormatError(f"{path}: expected a dict image_id -> captions, got {type(raw).__name__}")
  out = {}
  for key, value in raw.items():
    try:
      image_id = int(key)
    except (TypeError, ValueError):
      raise VinvlFormatError(f"{path}: key {key!r} is not an integer image id") from None
    if isinstance(value, (str, bytes)):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise VinvlFormatError(f"{path}: image {image_id}: captions are a string but not a JSON list: "
                               f"{e}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
      raise VinvlFormatError(f"{path}: image {image_id}: captions must be a list of strings, got "
                             f"{str(value)[:80]}")
    if not value:
      raise VinvlFormatError(f"{path}: image {image_id} has no captions")
    if image_id in out:
      raise VinvlFormatError(f"{path}: image {image_id} appears twice")
    out[image_id] = [str(c) for c in value]  # np.str_ -> str
  return out


CAPTION_FORMATS = ("a torch-saved dict {image_id: [caption, ...]} (.pt; int / numpy-int keys, str values)",
                   "a JSON object {\"image_id\": [caption, ...]} (.json, no torch needed)")


def captions_path(captions_dir: str, split: str) -> str | None:
  """`{split}_captions.pt` (preferred, as the reference code reads it) or `{split}_captions.json`."""
  for ext in (".pt", ".json"):
    path = os.path.join(captions_dir, f"{split}_captions{ext}")
    if os.path.isfile(path):
      return path
  return None


def _numpy_scalar_globals() -> list:
  """The pickle globals that numpy scalars (e.g. `np.int64` keys, `np.str_` captions) are saved with:
  numpy's scalar reconstructor and its dtype classes. Nothing that can run other code."""
  import numpy as np
  core = getattr(np, "_core", None) or np.core
  dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
  return [core.multiarray.scalar, np.dtype, *dtype_classes]


def _load_torch_captions(path: str):
  try:
    import torch  # only .pt caption files need torch
  except ImportError:
    raise VinvlFormatError(f"{path}: reading a .pt caption file needs torch (pip install "
                           f"'vldeformer_jax[torch]'); or give the captions as {CAPTION_FORMATS[1]}") from None
  try:
    # weights_only: a safe unpickler; numpy scalars (keys written from numpy code) are allowed for this one
    # load, and anything else a pickle may carry (arbitrary classes, code) stays refused.
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors come in many types; torch's own text advises unsafe loading
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"it holds {hint.group(1)}, which is not plain data" if hint else first[:200]
    raise VinvlFormatError(f"{path}: cannot be read safely as a dict of captions ({what}); supported: "
                           f"{' or '.join(CAPTION_FORMATS)}") from None


def load_captions(path: str) -> dict[int, list[str]]:
  """{image_id: [captions]} in file order, from a torch `.pt` pickle or a `.json` file."""
  if path.endswith(".pt"):
    raw = _load_torch_captions(path)
  else:
    raw = fileio.read_json(path, what="captions file", error=VinvlFormatError)
  return _normalise_captions(raw, path)


def load_image_keys(path: str, with_lines: bool = False) -> list:
  """Image ids of a `*_img_keys*.tsv`, one per line, order kept; (line, id) pairs if `with_lines`."""
  keys, seen = [], set()
  with open(path, "rb") as f:
    for i, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      image_id = _int_field(line.split(b"\t")[0], "image id", f"{path} line {i}")
      if image_id in seen:
        raise VinvlFormatError(f"{path} line {i}: image {image_id} is listed twice")
      seen.add(image_id)
      keys.append((i, image_id) if with_lines else image_id)
  return keys
