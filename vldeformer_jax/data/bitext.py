"""Caption-caption pairs (a caption and its translation) for MURAL's text-text task (docs/method.md §4.9).

A bitext file is JSON: `{"format": "vldeformer_jax.bitext", "version": 1, "pairs": [[caption, translation],
...]}`. Training draws `data.bitext_batch_size` pairs per global step beside the image-caption batch
(`bitext_a_*` / `bitext_b_*` token arrays, [Bt, L] each, like `text_*`), deterministically in (seed, step),
process p taking rows [p*Bt/P, (p+1)*Bt/P); the decomposition embeds both sides with the one text encoder and
adds `loss.text_text_weight` x a symmetric in-batch InfoNCE over the gathered pairs
(training/text_text_term.py `sharded_text_text_loss`).

The demo's second language (`prepare_bitext_demo`): Spanish, from a small hand-made lexicon of real words for
the demo world's classes, colours, sizes and relations, with Spanish word order (adjectives after the noun,
colour then size), gender agreement of articles and adjectives, and the contractions del / al. Its captions
exist only as translations: of every training caption (the bitext file, never paired with an image) and of
every test caption (a prepared dataset `<name>_es` with the test split only: the same images, Spanish
captions), so language-B retrieval can be learned only through the bitext. The translator parses the demo's
English caption grammar (data/demo_world.py `_caption`) and refuses anything else.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from vldeformer_jax.io import files as fileio

log = logging.getLogger(__name__)

FORMAT = "vldeformer_jax.bitext"
STREAM_BITEXT = 4  # pipeline random streams 1-3 are taken (data/pipeline.py)

# Spanish lexicon: class -> (noun, gender).
NOUNS = {
    "dog": ("perro", "m"), "cat": ("gato", "m"), "horse": ("caballo", "m"), "bird": ("pájaro", "m"),
    "cow": ("vaca", "f"), "sheep": ("oveja", "f"), "elephant": ("elefante", "m"), "bear": ("oso", "m"),
    "car": ("coche", "m"), "bus": ("autobús", "m"), "truck": ("camión", "m"), "bicycle": ("bicicleta", "f"),
    "boat": ("barco", "m"), "train": ("tren", "m"), "airplane": ("avión", "m"), "chair": ("silla", "f"),
    "table": ("mesa", "f"), "bed": ("cama", "f"), "lamp": ("lámpara", "f"), "clock": ("reloj", "m"),
    "cup": ("taza", "f"), "bottle": ("botella", "f"), "bowl": ("cuenco", "m"), "book": ("libro", "m"),
    "phone": ("teléfono", "m"), "laptop": ("portátil", "m"), "ball": ("pelota", "f"),
    "umbrella": ("paraguas", "m"), "bag": ("bolso", "m"), "hat": ("sombrero", "m"), "kite": ("cometa", "f"),
    "apple": ("manzana", "f"),
}
# Adjectives: (masculine, feminine).
COLOURS = {"red": ("rojo", "roja"), "blue": ("azul", "azul"), "green": ("verde", "verde"),
           "yellow": ("amarillo", "amarilla"), "black": ("negro", "negra"), "white": ("blanco", "blanca"),
           "brown": ("marrón", "marrón"), "pink": ("rosa", "rosa")}
SIZES = {"small": ("pequeño", "pequeña"), "little": ("pequeño", "pequeña"), "large": ("grande", "grande"),
         "big": ("grande", "grande")}
RELATIONS = {("to", "the", "left", "of"): "a la izquierda de", ("left", "of"): "a la izquierda de",
             ("to", "the", "right", "of"): "a la derecha de", ("right", "of"): "a la derecha de",
             ("above",): "encima de", ("below",): "debajo de", ("under",): "debajo de", ("next", "to"): "junto a"}
ARTICLES = {("a", "m"): "un", ("a", "f"): "una", ("an", "m"): "un", ("an", "f"): "una", ("the", "m"): "el",
            ("the", "f"): "la"}
FIXED = {("a", "photo", "of"): "una foto de", ("a", "picture", "of"): "una imagen de", ("there", "is"): "hay",
         ("is",): "está", ("and",): "y", (",",): ","}


class TranslationError(ValueError):
  """A caption outside the demo's grammar."""


def _noun_phrase(words: list[str], i: int) -> tuple[str, int] | None:
  """`det (size)? (colour)? class` at words[i:] -> (Spanish phrase, next index), or None."""
  if i >= len(words) or words[i] not in ("a", "an", "the"):
    return None
  det, j = words[i], i + 1
  size = colour = None
  if j < len(words) and words[j] in SIZES:
    size, j = words[j], j + 1
  if j < len(words) and words[j] in COLOURS:
    colour, j = words[j], j + 1
  if j >= len(words) or words[j] not in NOUNS:
    return None
  noun, gender = NOUNS[words[j]]
  g = 0 if gender == "m" else 1
  out = [ARTICLES[(det, gender)], noun]
  if colour:
    out.append(COLOURS[colour][g])
  if size:
    out.append(SIZES[size][g])
  return " ".join(out), j + 1


def translate(caption: str) -> str:
  """The Spanish translation of a demo caption (data/demo_world.py grammar); TranslationError otherwise."""
  words = caption.split()
  out, i = [], 0
  while i < len(words):
    np_ = _noun_phrase(words, i)
    if np_ is not None:
      out.append(np_[0])
      i = np_[1]
      continue
    for table in (RELATIONS, FIXED):
      hit = next((k for k in sorted(table, key=len, reverse=True) if tuple(words[i:i + len(k)]) == k), None)
      if hit is not None:  # the longest entry first: "there is" before "is"
        out.append(table[hit])
        i += len(hit)
        break
    else:
      raise TranslationError(f"cannot translate {caption!r}: unknown word {words[i]!r} at position {i}")
  text = " ".join(out)
  # de + el = del, a + el = al (Spanish contractions).
  return text.replace(" de el ", " del ").replace(" a el ", " al ")


def write_bitext(path: str, pairs: Sequence[Sequence[str]], **meta) -> None:
  fileio.write_json_atomic(path, {"format": FORMAT, "version": 1, **meta, "pairs": [list(p) for p in pairs]})


def read_bitext(path: str) -> list[tuple[str, str]]:
  """The pairs of a bitext file; one clear error naming the file and the first bad entry otherwise."""
  data = fileio.read_json(path, what="bitext file")
  if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("pairs"), list):
    raise ValueError(f"{path}: not a bitext file (expected {{'format': {FORMAT!r}, 'pairs': [[a, b], ...]}})")
  pairs = []
  for k, p in enumerate(data["pairs"]):
    if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p)):
      raise ValueError(f"{path}: pair {k} is not two non-empty strings: {str(p)[:80]}")
    pairs.append((p[0], p[1]))
  if not pairs:
    raise ValueError(f"{path}: no pairs")
  return pairs


class BitextBatches:
  """Global step -> this process's bitext rows, tokenised: `bitext_a_*`, `bitext_b_*` ([Bt/P, L] each).

  Step s takes pairs [j*Bt, (j+1)*Bt) of the permutation of epoch e (seed, stream 4, e), j = s mod
  (pairs // Bt), e = s div that: a pure function of (seed, step), as the image-caption batches are."""

  def __init__(self, pairs: Sequence[tuple[str, str]], *, global_batch_size: int, seed: int, max_len: int,
               process_index: int, process_count: int):
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"bitext batch size {global_batch_size} is not a positive multiple of the process count "
                       f"{process_count}")
    if len(pairs) < global_batch_size:
      raise ValueError(f"{len(pairs)} bitext pairs, fewer than one bitext batch of {global_batch_size}")
    self.pairs = list(pairs)
    self.global_batch_size, self.seed, self.max_len = int(global_batch_size), int(seed), int(max_len)
    self.local = self.global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = len(self.pairs) // self.global_batch_size

  def rows(self, step: int) -> list[tuple[str, str]]:
    epoch, j = divmod(int(step), self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, STREAM_BITEXT, epoch]).permutation(len(self.pairs))
    start = j * self.global_batch_size + self.process_index * self.local
    return [self.pairs[int(i)] for i in perm[start:start + self.local]]

  def __call__(self, step: int, tokenizer) -> dict[str, np.ndarray]:
    from vldeformer_jax.model import inputs
    rows = self.rows(step)
    out = {}
    for side, texts in (("a", [a for a, _ in rows]), ("b", [b for _, b in rows])):
      out.update({f"bitext_{side}_{k}": v for k, v in inputs.text_inputs(tokenizer, texts, self.max_len).items()})
    return out


# ------------------------------------------------------------------------------------------------------
# The demo's second language.


def bitext_path(data_dir: str, name: str) -> str:
  """Where `prepare_bitext_demo` writes the training bitext of dataset `name`."""
  return os.path.join(data_dir, f"{name}_train_bitext_es.json")


def prepare_bitext_demo(data_dir: str, name: str = "vldeformer_demo", *, overwrite: bool = False) -> dict[str, Any]:
  """From the prepared demo dataset `name` in `data_dir`: the training bitext (every training caption and
  its Spanish translation) and the dataset `<name>_es` (test split only: the test images with their
  captions translated). Returns what was written; skips what exists unless `overwrite`."""
  from vldeformer_jax.data import prepare  # tfds is only needed here
  train = prepare.load_split(data_dir, name, "train")
  test = prepare.load_split(data_dir, name, "test")
  as_str = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)  # noqa: E731
  path = bitext_path(data_dir, name)
  if overwrite or not os.path.isfile(path):
    pairs = [(as_str(c), translate(as_str(c))) for i in range(len(train)) for c in train[i]["captions"]]
    write_bitext(path, pairs, source=f"{name}/train", language_b="es")
  es_name = f"{name}_es"
  if overwrite or prepare.read_metadata(data_dir, es_name) is None:
    _prepare_translated_test(data_dir, name, es_name, test, as_str, overwrite)
  return {"bitext": path, "dataset": es_name}


def _prepare_translated_test(data_dir, name, es_name, test, as_str, overwrite) -> None:
  """Writes the test split again in the VinVL layout (its regions, tags and order), captions translated,
  and prepares it as `es_name` (test split only)."""
  import base64
  from vldeformer_jax.data import prepare
  scratch = tempfile.mkdtemp(prefix=".bitext-", dir=data_dir)
  try:
    vinvl = os.path.join(scratch, "vinvl")
    os.makedirs(vinvl)
    records = [test[i] for i in range(len(test))]
    caps, offsets_f, offsets_p = {}, [], []
    with open(os.path.join(vinvl, "features.tsv"), "wb") as ff, open(os.path.join(vinvl, "predictions.tsv"), "wb") as fp:
      for r in records:
        image_id = int(r["image_id"])
        x = np.asarray(r["features"], "<f4")
        offsets_f.append(ff.tell())
        ff.write(b"\t".join([str(image_id).encode(), str(len(x)).encode(), base64.b64encode(x.tobytes())]) + b"\n")
        classes = [as_str(c) for c in r.get("region_classes", [])] or as_str(r["tags"]).split()
        offsets_p.append(fp.tell())
        fp.write(str(image_id).encode() + b"\t" + json.dumps({"objects": [{"class": c} for c in classes]}).encode()
                 + b"\n")
        caps[str(image_id)] = [translate(as_str(c)) for c in r["captions"]]
    for tsv, offs in (("features", offsets_f), ("predictions", offsets_p)):
      with open(os.path.join(vinvl, f"{tsv}.lineidx"), "w") as f:
        f.write("".join(f"{o}\n" for o in offs))
    with open(os.path.join(vinvl, "imageid2idx.json"), "w") as f:
      json.dump({str(int(r["image_id"])): k for k, r in enumerate(records)}, f)
    with open(os.path.join(vinvl, "test_captions.json"), "w") as f:
      json.dump(caps, f, ensure_ascii=False)
    with open(os.path.join(vinvl, "test_img_keys.tsv"), "w") as f:
      f.write("".join(f"{int(r['image_id'])}\n" for r in records))
    prepare.prepare_vinvl(vinvl, vinvl, es_name, data_dir, splits=("test",), overwrite=overwrite,
                          description=f"{name}'s test split with Spanish captions (data/bitext.py)",
                          extra_metadata={"bitext_of": name, "language": "es"})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
