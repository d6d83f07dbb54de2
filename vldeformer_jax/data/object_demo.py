"""The object-centric demo: one object per image, captions about that object's fine attributes.

It is drawn from the same world as the scene-centric demo (data/demo_world.py: the visual prototypes of
`seed`, the same classes, colours and sizes), so a model trained on the scene-centric demo is evaluated on it
as is, as models trained on COCO are evaluated on fine-grained object-centric sets. Images come in groups
of 2-4 of one class that differ only in colour or size; the detector sees exactly one region per image.
"""
from __future__ import annotations

import numpy as np

from vldeformer_jax.data import demo_world as world

OBJECT_DEMO_NAME = "vldeformer_demo_objects"
OBJECT_GENERATOR_VERSION = 1
_OBJECT_TEMPLATES = ("a photo of {a_full}", "{a_colour}", "the {cls} is {colour}", "a picture of {a_size}",
                     "there is {a_full}", "{a_full}", "the {cls} is {size}")


def _object_captions(rng, o: world.WorldObject, n: int = 5) -> list[str]:
  """Five distinct captions about one object: its class with colour and/or size words."""
  colour, cls = world.COLOURS[o.colour], world.CLASSES[o.cls]
  out = []
  for t in rng.permutation(len(_OBJECT_TEMPLATES)):
    size = str(rng.choice(world.SIZE_WORDS[world.SIZES[o.size]]))
    out.append(_OBJECT_TEMPLATES[int(t)].format(
        a_full=world.with_article(f"{size} {colour} {cls}"), a_colour=world.with_article(f"{colour} {cls}"),
        a_size=world.with_article(f"{size} {cls}"), cls=cls, colour=colour, size=size))
    if len(out) == n:
      break
  return out


def object_images(rng, image_ids, classes=None) -> list[world.WorldImage]:
  """Groups of 2-4 images of one class that differ in colour or size (fine-grained), one object each,
  seen by the detector as exactly one region (no misses, no false alarms)."""
  images = []
  while len(images) < len(image_ids):
    cls = int(rng.integers(len(world.CLASSES))) if classes is None else int(classes[int(rng.integers(len(classes)))])
    seen = set()
    for _ in range(min(int(rng.integers(2, 5)), len(image_ids) - len(images))):
      o = world.new_object(rng, cls, int(rng.integers(9)))
      while (o.colour, o.size) in seen:  # members of a group differ in colour or size
        o.colour, o.size = int(rng.integers(len(world.COLOURS))), int(rng.integers(2))
      seen.add((o.colour, o.size))
      w, h = int(rng.integers(480, 641)), int(rng.integers(360, 481))
      images.append(world.WorldImage(int(image_ids[len(images)]), w, h, [o], [o], _object_captions(rng, o)))
  return images


def _class_indices(classes) -> list[int] | None:
  if classes is None:
    return None
  unknown = [c for c in classes if c not in world.CLASSES]
  if unknown or not classes:
    raise ValueError(f"object demo classes must be a non-empty subset of the demo's CLASSES; unknown: {unknown}")
  return [world.CLASSES.index(c) for c in classes]


def write_object_demo_vinvl(out_dir: str, seed: int = 0, num_train: int = 600, num_test: int = 200,
                            classes=None) -> dict:
  """The object-centric demo in the VinVL layout (the files of `demo_world.write_demo_vinvl`, the test keys
  in split order); deterministic in `seed`, sharing the world prototypes of `seed` with the scene-centric
  demo. `out_dir` must not exist. `classes`: only objects of these class names (a task of a
  class-incremental sequence); default all."""
  world.check_new_output(out_dir, num_train, num_test)
  protos = world.world_prototypes(np.random.default_rng(seed))  # the scene demo's first draw: the same world
  rng = np.random.default_rng([seed, 17])
  ids = rng.choice(np.arange(1_000_000, 2_000_000), size=num_train + num_test, replace=False)
  cls = _class_indices(classes)
  train, test = object_images(rng, ids[:num_train], cls), object_images(rng, ids[num_train:], cls)
  world.write_vinvl_files(out_dir, seed, protos, train + test,
                          {"train": (train, [i.captions for i in train]), "test": (test, [i.captions for i in test])},
                          {"test_img_keys.tsv": [i.image_id for i in test]}, confidence=lambda o: 0.9)
  return {"dir": out_dir, "num_train": num_train, "num_test": num_test, "num_regions": num_train + num_test,
          "feature_dim": world.FEATURE_DIM}


def prepare_object_demo(data_dir: str, seed: int = 0, *, num_train: int = 600, num_test: int = 200,
                        name: str = OBJECT_DEMO_NAME, overwrite: bool = False, classes=None) -> str:
  """`write_object_demo_vinvl` + `prepare_vinvl` into `<data_dir>/<name>` (beside the scene-centric demo);
  returns `name`; skipped when that dataset exists with the same parameters."""
  want = {"variant": "object", "seed": int(seed), "num_train": int(num_train), "num_test": int(num_test),
          "generator_version": OBJECT_GENERATOR_VERSION}
  if classes is not None:
    want["classes"] = list(classes)
  return world.prepare_generated(
      data_dir, name, want, lambda out: write_object_demo_vinvl(out, seed, num_train, num_test, classes),
      f"VLDeformer object-centric demo (seed {seed}), see vldeformer_jax/data/object_demo.py", overwrite)
