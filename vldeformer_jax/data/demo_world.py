"""The synthetic demo dataset: small, learnable on 2 CPU cores, written in the real VinVL file layout.

There is no COCO and no VinVL detector on this machine, so the project shows the paper's claim on data it
makes itself. It is written as VinVL files (docs/method.md §3.3) and converted by the same `prepare_vinvl` as real
data, so the demo exercises the whole path.

Each image holds 2-5 objects: a class (single-wordpiece everyday nouns), a colour, a size and a box on a
3x3 grid. A region is one noisy 2054-d vector: 2048 values = fixed random prototypes of its class, colour
and size, plus an image-level "lighting" vector and Gaussian noise, then the normalised box of docs/method.md §1.2.
Detector tags name only the classes (colour and size live only in the regions), in region order, with an
occasional miss or false alarm. Five captions per image name objects with attributes and spatial relations
(left of / right of / above / below, computed from the boxes) through several templates. Images come in
groups sharing the same classes, often differing by a single colour, size or position swap, so that
matching a bag of tags is not enough: retrieval needs the attributes and the relations.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid

import numpy as np
from tqdm import tqdm

from vldeformer_jax.io import files as fileio

log = logging.getLogger(__name__)

DEMO_NAME = "vldeformer_demo"
SCENES_FILE = "scenes.json"  # image_id -> scene_description, beside the VinVL files
GENERATOR_VERSION = 2  # 2: scenes.json beside the files (the records are those of version 1)
DEFAULT_NUM_TRAIN = 6000
VISUAL_DIM = 2048
FEATURE_DIM = VISUAL_DIM + 6
CLASSES = ("dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "bear", "car", "bus", "truck", "bicycle",
           "boat", "train", "airplane", "chair", "table", "bed", "lamp", "clock", "cup", "bottle", "bowl",
           "book", "phone", "laptop", "ball", "umbrella", "bag", "hat", "kite", "apple")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
                  "above": ("above",), "below": ("below", "under")}
TEMPLATE_WORDS = "a an the of photo picture is there and next to , with".split()
# Region = proto_class + 0.8 proto_colour + 0.6 proto_size + 0.3 lighting + noise (std 1).
_W_CLASS, _W_COLOUR, _W_SIZE, _W_LIGHT, _NOISE = 1.0, 0.8, 0.6, 0.3, 1.0
_P_MISS, _P_FALSE_ALARM, _P_DUPLICATE_CLASS, _P_ONE_CHANGE = 0.04, 0.15, 0.25, 0.6


def vocabulary() -> list[str]:
  """Every word the demo captions and tags can use (for tokeniser checks)."""
  words = set(CLASSES) | set(COLOURS) | set(TEMPLATE_WORDS)
  for group in (SIZE_WORDS, RELATION_WORDS):
    for phrases in group.values():
      for p in phrases:
        words.update(p.split())
  return sorted(words)


@dataclasses.dataclass
class WorldObject:
  """One object of the world: indices into CLASSES / COLOURS / SIZES, a grid cell and its box jitter."""
  cls: int
  colour: int
  size: int  # 0 small, 1 large
  cell: int  # 0..8 on a 3x3 grid, row-major
  jitter: tuple[float, float, float, float]  # centre dx, dy, width and height factors


@dataclasses.dataclass
class WorldImage:
  """One generated image: what its captions describe, what the detector saw, and its captions."""
  image_id: int
  width: int
  height: int
  objects: list[WorldObject]  # what the captions describe
  regions: list[WorldObject]  # what the detector saw: objects minus misses plus false alarms, in region order
  captions: list[str]


def new_object(rng, cls, cell) -> WorldObject:
  """An object of class `cls` in grid `cell`; colour, size and jitter drawn from `rng`."""
  return WorldObject(int(cls), int(rng.integers(len(COLOURS))), int(rng.integers(2)), int(cell),
                     tuple(float(v) for v in rng.uniform(-1, 1, 4)))


def _box(o: WorldObject, w: int, h: int) -> tuple[float, float, float, float]:
  """Pixel box: the cell centre plus jitter; small objects span ~13% of the image side, large ~26%."""
  frac = (0.13, 0.26)[o.size]
  cx = ((o.cell % 3) + 0.5) / 3 + 0.06 * o.jitter[0]
  cy = ((o.cell // 3) + 0.5) / 3 + 0.06 * o.jitter[1]
  bw, bh = frac * (1 + 0.2 * o.jitter[2]), frac * (1 + 0.2 * o.jitter[3])
  x1, x2 = max(0.0, cx - bw / 2), min(1.0, cx + bw / 2)
  y1, y2 = max(0.0, cy - bh / 2), min(1.0, cy + bh / 2)
  return x1 * w, y1 * h, x2 * w, y2 * h


def _relation(a: WorldObject, b: WorldObject) -> str | None:
  """Where `a` is relative to `b`, if one axis clearly dominates (grid cells make this the usual case)."""
  dx = (a.cell % 3 - b.cell % 3) / 3 + 0.06 * (a.jitter[0] - b.jitter[0])
  dy = (a.cell // 3 - b.cell // 3) / 3 + 0.06 * (a.jitter[1] - b.jitter[1])
  if abs(dx) >= 1.5 * abs(dy) and abs(dx) > 0.15:
    return "left" if dx < 0 else "right"
  if abs(dy) >= 1.5 * abs(dx) and abs(dy) > 0.15:
    return "above" if dy < 0 else "below"
  return None


def _scene(rng, classes) -> list[WorldObject]:
  cells = rng.choice(9, size=len(classes), replace=False)
  objs = [new_object(rng, c, cell) for c, cell in zip(classes, cells)]
  _distinct_duplicates(rng, objs)
  return objs


def _distinct_duplicates(rng, objs) -> None:
  """Two objects of one class always differ in colour, so captions can tell them apart."""
  for i, o in enumerate(objs):
    taken = {p.colour for p in objs[:i] if p.cls == o.cls}
    while o.colour in taken:
      o.colour = int(rng.integers(len(COLOURS)))


def _one_change(rng, base: list[WorldObject]) -> list[WorldObject]:
  """A copy of `base` with one colour, one size, or the positions of two objects changed."""
  objs = [dataclasses.replace(o) for o in base]
  kind = rng.integers(3)
  k = int(rng.integers(len(objs)))
  if kind == 0:
    taken = {p.colour for p in objs if p.cls == objs[k].cls}
    objs[k].colour = int(rng.choice([c for c in range(len(COLOURS)) if c not in taken]))
  elif kind == 1:
    objs[k].size = 1 - objs[k].size
  else:
    j = (k + 1 + int(rng.integers(len(objs) - 1))) % len(objs)
    objs[k].cell, objs[j].cell = objs[j].cell, objs[k].cell
  return objs


def with_article(phrase: str) -> str:
  """'a' or 'an' + `phrase`."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng, o: WorldObject) -> str:
  style = rng.choice(4, p=(0.4, 0.35, 0.15, 0.1))
  size = str(rng.choice(SIZE_WORDS[SIZES[o.size]]))
  words = ([[COLOURS[o.colour]], [size, COLOURS[o.colour]], [size], []][style]) + [CLASSES[o.cls]]
  return " ".join(words)


def _caption(rng, objs: list[WorldObject]) -> str:
  pairs = [(a, b, r) for a in objs for b in objs if a is not b and (r := _relation(a, b))]
  kind = int(rng.integers(6)) if pairs else int(rng.choice([3, 4, 5]))
  if kind <= 2:
    a, b, r = pairs[int(rng.integers(len(pairs)))]
    rel = str(rng.choice(RELATION_WORDS[r]))
    na, nb = _noun_phrase(rng, a), _noun_phrase(rng, b)
    if kind == 0:
      return f"{with_article(na)} {rel} {with_article(nb)}"
    if kind == 1:
      return f"the {na} is {rel} the {nb}"
    others = [o for o in objs if o is not a and o is not b]
    if not others:
      return f"a photo of {with_article(na)} {rel} {with_article(nb)}"
    return f"there is {with_article(na)} {rel} {with_article(nb)} and {with_article(_noun_phrase(rng, others[0]))}"
  order = [objs[i] for i in rng.permutation(len(objs))]
  if kind == 3:
    return f"a {rng.choice(['photo', 'picture'])} of {with_article(_noun_phrase(rng, order[0]))} and " \
           f"{with_article(_noun_phrase(rng, order[1]))}"
  if kind == 4 and len(objs) >= 3:
    nps = [with_article(_noun_phrase(rng, o)) for o in order[:4]]
    return " , ".join(nps[:-1]) + " and " + nps[-1]
  return f"{with_article(_noun_phrase(rng, order[0]))} next to {with_article(_noun_phrase(rng, order[1]))}"


def _captions(rng, objs, n=5) -> list[str]:
  out = []
  for _ in range(50):
    c = _caption(rng, objs)
    if c not in out:
      out.append(c)
    if len(out) == n:
      return out
  while len(out) < n:  # tiny scenes may not have five distinct captions
    out.append(_caption(rng, objs))
  return out


def _detections(rng, objs: list[WorldObject]) -> list[WorldObject]:
  seen = list(objs)
  if len(seen) >= 3 and rng.random() < _P_MISS * len(seen):
    seen.pop(int(rng.integers(len(seen))))
  if rng.random() < _P_FALSE_ALARM:
    seen.append(new_object(rng, rng.integers(len(CLASSES)), rng.integers(9)))
  return [seen[i] for i in rng.permutation(len(seen))]


def _images(rng, image_ids) -> list[WorldImage]:
  """Groups of 2-4 images over one class set; later members often differ from the first by one change."""
  images = []
  while len(images) < len(image_ids):
    images.extend(_group_images(rng, image_ids[len(images):]))
  return images


def _group_images(rng, image_ids, size: int | None = None) -> list[WorldImage]:
  """One group over one class set: `size` images (default: 2-4, drawn), at most `len(image_ids)`; the
  first a fresh scene, later ones one change away (or a fresh scene of the same classes)."""
  k = int(rng.integers(2, 6))
  classes = list(rng.choice(len(CLASSES), size=k, replace=False))
  if rng.random() < _P_DUPLICATE_CLASS:
    classes[-1] = classes[0]
  base = _scene(rng, classes)
  size = int(rng.integers(2, 5)) if size is None else size  # drawn here: the original stream order
  images = []
  for j in range(min(size, len(image_ids))):
    objs = base if j == 0 else (_one_change(rng, base) if rng.random() < _P_ONE_CHANGE else _scene(rng, classes))
    w, h = int(rng.integers(480, 641)), int(rng.integers(360, 481))
    images.append(WorldImage(int(image_ids[j]), w, h, objs, _detections(rng, objs), _captions(rng, objs)))
  return images


def region_features(seed: int, protos, img: WorldImage) -> np.ndarray:
  """float32 [n_regions, 2054]; its own random stream, so rows can be written in any order."""
  rng = np.random.default_rng([seed, 1, img.image_id])
  p_cls, p_col, p_size = protos
  light = rng.standard_normal(VISUAL_DIM)
  rows = []
  for o in img.regions:
    visual = (_W_CLASS * p_cls[o.cls] + _W_COLOUR * p_col[o.colour] + _W_SIZE * p_size[o.size]
              + _W_LIGHT * light + _NOISE * rng.standard_normal(VISUAL_DIM))
    x1, y1, x2, y2 = _box(o, img.width, img.height)
    w, h = img.width, img.height
    rows.append(np.concatenate([visual, [x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h]]))
  return np.asarray(rows, np.float32).reshape(len(img.regions), FEATURE_DIM)


def world_prototypes(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The world's visual prototypes (class, colour, size): what a detector's features are made of. Every
  dataset drawn from one world seed shares them, as images from one detector do."""
  return (rng.standard_normal((len(CLASSES), VISUAL_DIM)), rng.standard_normal((len(COLOURS), VISUAL_DIM)),
          rng.standard_normal((len(SIZES), VISUAL_DIM)))


def scene_description(img: WorldImage) -> list[dict]:
  """The objects an image's captions describe, for drawing it: class, colour, size and 3x3 grid cell."""
  return [{"class": CLASSES[o.cls], "colour": COLOURS[o.colour], "size": SIZES[o.size], "cell": o.cell}
          for o in img.objects]


CORPUS_VS_DOWNSTREAM = (
    "The pre-training corpus and the downstream set come from one world (the same visual prototypes, i.e. one "
    "'detector'; the same classes, colours, sizes, caption templates and group structure) and differ in their "
    "images (disjoint random streams and image ids) and in size; the corpus's images come in groups of four, "
    "the downstream set's in groups of two to four. There is no shift in templates or object mixes: what "
    "stage 2 can carry over is what stage 1 learned about this world.")


class CorpusSource:
  """A pre-training corpus of the demo world, generated on access and never stored.

  Random access like a prepared split (`len`, `[i]` -> record with `image_id`, `features`, `tags`,
  `captions`), so the training pipeline reads it unchanged. Record i is a pure function of (seed, i): images
  come in groups of four over one class set (the first a fresh scene, the others often one change away, as
  in the prepared demo data), group g drawn from its own random stream. The visual prototypes are those of
  `world_seed`, so a corpus and a prepared demo dataset of the same world seed share one "detector"; image
  ids start at 10,000,000, disjoint from prepared demo datasets (100,000-999,999).
  """
  GROUP = 4
  FIRST_ID = 10_000_000

  def __init__(self, num_images: int, *, seed: int, world_seed: int):
    if num_images < 1:
      raise ValueError(f"CorpusSource: num_images must be positive, got {num_images}")
    self.num_images, self.seed, self.world_seed = int(num_images), int(seed), int(world_seed)
    self._protos = world_prototypes(np.random.default_rng(world_seed))
    self._cache: tuple[int, list[WorldImage]] | None = None

  def __len__(self) -> int:
    return self.num_images

  def _group(self, g: int) -> list[WorldImage]:
    cache = self._cache  # one read: prefetch threads may replace it concurrently
    if cache is not None and cache[0] == g:
      return cache[1]
    rng = np.random.default_rng([self.seed, 7, g])
    ids = self.FIRST_ID + g * self.GROUP + np.arange(self.GROUP)
    images = _group_images(rng, ids, size=self.GROUP)
    self._cache = (g, images)
    return images

  def image(self, index: int) -> WorldImage:
    if not 0 <= index < self.num_images:
      raise IndexError(f"CorpusSource index {index} out of range [0, {self.num_images})")
    return self._group(index // self.GROUP)[index % self.GROUP]

  def __getitem__(self, index: int) -> dict:
    img = self.image(int(index))
    feats = region_features(self.seed, self._protos, img)
    classes = [CLASSES[o.cls] for o in img.regions]
    return {"image_id": img.image_id, "features": feats, "tags": " ".join(classes), "captions": list(img.captions),
            "region_classes": classes}


def _write_tsv(path: str, rows) -> None:
  """Writes TAB-joined rows and the matching `.lineidx` (one byte offset per row)."""
  offsets = []
  with open(path, "wb") as f:
    for cols in rows:
      offsets.append(f.tell())
      f.write(b"\t".join(cols) + b"\n")
  with open(os.path.splitext(path)[0] + ".lineidx", "w") as f:
    f.write("".join(f"{o}\n" for o in offsets))


def write_vinvl_files(out_dir: str, seed: int, protos, rows: list[WorldImage],
                      splits: dict[str, tuple[list[WorldImage], list[list[str]]]], key_files: dict[str, list[int]],
                      confidence) -> None:
  """Generated images as the VinVL file set (docs/method.md §3.3), written to a temp dir renamed to `out_dir`.

  `rows`: the images in the files' row order; `splits`: {split: (images, their captions)} for the
  `<split>_captions.json` files (the scene descriptions follow the splits' order); `key_files`: {file name:
  image ids, one per line}; `confidence(obj)`: the detector's score of a region. Why one writer: every
  generated dataset must be read by `prepare_vinvl` exactly as real VinVL files are.
  """
  tmp = f"{out_dir.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    def feature_rows():
      for img in tqdm(rows, desc="demo features", unit="img", mininterval=2.0):
        feats = region_features(seed, protos, img)
        yield [str(img.image_id).encode(), str(len(feats)).encode(), base64.b64encode(feats.astype("<f4").tobytes())]

    def prediction_rows():
      for img in rows:
        objects = [{"class": CLASSES[o.cls], "rect": [round(v, 2) for v in _box(o, img.width, img.height)],
                    "conf": confidence(o)} for o in img.regions]
        yield [str(img.image_id).encode(), json.dumps(
            {"objects": objects, "image_h": img.height, "image_w": img.width}).encode()]

    _write_tsv(os.path.join(tmp, "features.tsv"), feature_rows())
    _write_tsv(os.path.join(tmp, "predictions.tsv"), prediction_rows())
    with open(os.path.join(tmp, "imageid2idx.json"), "w") as f:
      json.dump({str(img.image_id): i for i, img in enumerate(rows)}, f)
    for split, (imgs, caps) in splits.items():
      with open(os.path.join(tmp, f"{split}_captions.json"), "w") as f:
        json.dump({str(img.image_id): c for img, c in zip(imgs, caps)}, f)
    with open(os.path.join(tmp, SCENES_FILE), "w") as f:
      json.dump({str(img.image_id): scene_description(img) for imgs, _ in splits.values() for img in imgs}, f)
    for name, ids in key_files.items():
      with open(os.path.join(tmp, name), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_new_output(out_dir: str, num_train: int, num_test: int) -> None:
  """The generators' shared refusals: `out_dir` must not exist, both splits must be non-empty."""
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} already exists")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"num_train ({num_train}) and num_test ({num_test}) must be positive")


def write_demo_vinvl(out_dir: str, seed: int = 0, num_train: int = DEFAULT_NUM_TRAIN,
                     num_test: int = 1000, noisy_captions: float = 0.0, noise_seed: int = 0) -> dict:
  """Writes the demo in the VinVL layout into `out_dir` (which must not exist); deterministic in `seed`.

  Files: features.tsv/.lineidx, imageid2idx.json, predictions.tsv/.lineidx, {train,test}_captions.json,
  test_img_keys.tsv (all test images, shuffled), test_img_keys_1k.tsv (1000 of them, another order).
  `noisy_captions` p > 0: round(p * N) of the N training captions replaced by other training images'
  captions (data/noisy_pairs.py, seeded by `noise_seed`; the images and the test split are unchanged).
  Returns a summary dict.
  """
  check_new_output(out_dir, num_train, num_test)
  rng = np.random.default_rng(seed)
  protos = world_prototypes(rng)
  ids = rng.choice(np.arange(100_000, 1_000_000), size=num_train + num_test, replace=False)
  train, test = _images(rng, ids[:num_train]), _images(rng, ids[num_train:])
  everything = train + test
  rows = [everything[r] for r in rng.permutation(len(everything))]
  test_ids = [img.image_id for img in test]
  key_files = {"test_img_keys.tsv": [test_ids[i] for i in rng.permutation(len(test_ids))],
               "test_img_keys_1k.tsv": [test_ids[i] for i in rng.permutation(len(test_ids))[:1000]]}
  train_captions = [img.captions for img in train]
  if noisy_captions > 0:  # docs/method.md §4.10
    from vldeformer_jax.data import noisy_pairs
    train_captions, _ = noisy_pairs.replace_captions(train_captions, noisy_captions, noise_seed)
  write_vinvl_files(out_dir, seed, protos, rows,
                    {"train": (train, train_captions), "test": (test, [img.captions for img in test])}, key_files,
                    confidence=lambda o: round(0.5 + 0.5 * (o.jitter[2] + 1) / 2, 4))
  return {"dir": out_dir, "num_train": num_train, "num_test": num_test,
          "num_regions": int(sum(len(i.regions) for i in everything)), "feature_dim": FEATURE_DIM}


def scenes_path(data_dir: str, name: str) -> str:
  """Where `prepare_demo` keeps the scene descriptions of dataset `name` (for drawing its images)."""
  return os.path.join(data_dir, f"{name}_{SCENES_FILE}")


def prepare_demo(data_dir: str, seed: int = 0, *, num_train: int = DEFAULT_NUM_TRAIN, num_test: int = 1000,
                 name: str = DEMO_NAME, overwrite: bool = False, noisy_captions: float = 0.0,
                 noise_seed: int = 0) -> str:
  """Writes the demo VinVL files to a scratch dir and prepares them into `<data_dir>/<name>` with
  `prepare_vinvl`; returns `name`. Skips the work when that dataset exists with the same parameters.
  `noisy_captions` > 0 (with `noise_seed`): see `write_demo_vinvl`; both recorded in the metadata."""
  want = {"seed": int(seed), "num_train": int(num_train), "num_test": int(num_test),
          "generator_version": GENERATOR_VERSION}
  if noisy_captions > 0:  # only then: a clean dataset's metadata is what it always was
    want.update(noisy_captions=float(noisy_captions), noise_seed=int(noise_seed))
  write = lambda out: write_demo_vinvl(out, seed, num_train, num_test, noisy_captions, noise_seed)  # noqa: E731
  return prepare_generated(data_dir, name, want, write,
                           f"VLDeformer synthetic demo (seed {seed}), see vldeformer_jax/data/demo_world.py",
                           overwrite)


def prepare_generated(data_dir: str, name: str, want: dict, write, description: str, overwrite: bool) -> str:
  """`write(vinvl_dir)` into a scratch dir, then `prepare_vinvl` into `<data_dir>/<name>` with `want` as
  its `demo` metadata and the scene descriptions beside it; skipped when that dataset exists with `want`."""
  from vldeformer_jax.data import prepare  # tfds is only needed here
  meta = prepare.read_metadata(data_dir, name)
  if meta is not None and not overwrite:
    if meta.get("demo") == want:
      log.info("demo dataset %s already complete in %s: skipping", name, data_dir)
      return name
    raise FileExistsError(f"{prepare.dataset_dir(data_dir, name)} holds another dataset ({meta.get('demo')}"
                          f", wanted {want}): use another data_dir or name, or overwrite=True")
  os.makedirs(data_dir, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".demo-vinvl-", dir=data_dir)
  try:
    vinvl_dir = os.path.join(scratch, "vinvl")
    write(vinvl_dir)
    fileio.copy_file_atomic(os.path.join(vinvl_dir, SCENES_FILE), scenes_path(data_dir, name))
    prepare.prepare_vinvl(vinvl_dir, vinvl_dir, name, data_dir, overwrite=overwrite, description=description,
                          extra_metadata={"demo": want})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return name
