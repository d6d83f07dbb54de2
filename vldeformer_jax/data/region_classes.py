"""Region-class targets for masked object classification (docs/method.md §4.8): detector class -> word id.

The prepared records carry the detector's class of each region (`region_classes`, from predictions.tsv,
data/prepare.py). Masked object classification predicts that class at a masked region's output through the
MLM head, whose decoder is tied to the word embeddings, so a class is named by a wordpiece id of the
tokenizer's vocabulary: the first wordpiece of the class name's last word (its head noun: "traffic light"
-> "light", "tennis racket" -> "rack" of "rack ##et"). No new parameters, so exports and checkpoints keep
their structure, and the targets are the words the detector tags are already fed as. Classes that share
that wordpiece ("hot dog" and "dog") share a target; every class of the demo world is a single wordpiece.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

REGION_CLASSES_KEY = "region_classes"
NO_LABEL = 0  # the [PAD] id: a padding region, or one whose class is unknown; never a target


class MissingRegionClassesError(KeyError):
  """A record has no per-region detector classes (a dataset prepared before they were stored)."""

  def __str__(self) -> str:  # KeyError would print the message quoted
    return str(self.args[0])


def as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def record_region_classes(record, index: int) -> list[str]:
  """The region classes of one source record, or one clear error naming what to do."""
  if REGION_CLASSES_KEY not in record:
    raise MissingRegionClassesError(
        f"record {index} (image_id {record.get('image_id', '?')}) has no {REGION_CLASSES_KEY!r} field "
        f"(fields: {sorted(record)}): the dataset was prepared before per-region detector classes were stored; "
        f"prepare it again (launch/prepare_data.py --overwrite, or launch/make_demo_data.py into a new "
        f"data_dir) or set config.early_interaction.moc_weight=0")
  return [as_str(c) for c in record[REGION_CLASSES_KEY]]


class ClassWords:
  """Class name -> the id of the first wordpiece of its last word (cached; one tokenizer call per name)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._ids: dict[str, int] = {}

  def __getstate__(self):  # picklable for grain workers: the cache travels, the tokenizer too
    return dict(self.__dict__)

  def id_of(self, name: str) -> int:
    if name not in self._ids:
      words = name.split()
      pieces = self.tokenizer(words[-1], add_special_tokens=False)["input_ids"] if words else []
      self._ids[name] = int(pieces[0]) if pieces else NO_LABEL
    return self._ids[name]

  def label_ids(self, classes_per_image: Sequence[Sequence[str]], max_regions: int) -> np.ndarray:
    """int32 [N, max_regions]: the word id of region r's class, NO_LABEL past the image's regions (regions
    beyond `max_regions` are cut, as the pipeline cuts their features)."""
    out = np.full((len(classes_per_image), max_regions), NO_LABEL, np.int32)
    for i, classes in enumerate(classes_per_image):
      for r, name in enumerate(list(classes)[:max_regions]):
        out[i, r] = self.id_of(name)
    return out
