"""A split as a retrieval gallery: its images and captions in record order, embedded once.

Records are the dataset contract of ARCHITECTURE.md (`image_id`, `features` [n, F], `tags`, `captions`),
from `data.prepare.load_split` or any sequence of such dicts; text may be bytes or str. Region features
stay on disk until a batch of images is encoded.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from vldeformer_jax.model import inputs


def text_of(x) -> str:
  """Dataset text (bytes from tfds, or str) as str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass
class Gallery:
  """The images and captions of a split, in record order; captions flattened image-major."""
  source: Any  # random access: len(), [i] -> record
  rows: np.ndarray  # record index of each evaluated image
  image_ids: np.ndarray  # [N_img] int64
  captions: list[str]  # [N_txt]
  txt2img: np.ndarray  # [N_txt] image position of each caption

  @property
  def num_images(self) -> int:
    return len(self.rows)

  def image_inputs(self, encoder, positions: Sequence[int]) -> dict[str, np.ndarray]:
    """Tokenised tags + padded regions of the images at these positions (records read on demand)."""
    cfg = encoder.model_config
    recs = [self.source[int(self.rows[p])] for p in positions]
    return inputs.image_inputs(encoder.tokenizer, [np.asarray(r["features"], np.float32) for r in recs],
                               [text_of(r["tags"]) for r in recs], cfg.tag_len, cfg.max_regions,
                               cfg.img_feature_dim)

  def text_inputs(self, encoder, positions: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    caps = self.captions if positions is None else [self.captions[int(p)] for p in positions]
    return inputs.text_inputs(encoder.tokenizer, caps, encoder.model_config.max_text_len)


def load_gallery(source, max_images: int | None = None, image_ids: Sequence[int] | None = None) -> Gallery:
  """Reads ids and captions of a split (features stay on disk); `max_images`: the first N images only;
  `image_ids`: only these images, in this order (a key file)."""
  n = len(source)
  if image_ids is not None:
    wanted = {int(i): p for p, i in enumerate(image_ids)}
    found = {}
    for r in range(n):
      iid = int(source[r]["image_id"])
      if iid in wanted:
        found[iid] = r
    missing = [i for i in wanted if i not in found]
    if missing:
      raise KeyError(f"{len(missing)} image ids of the key list are not in the split "
                     f"(first: {missing[:5]})")
    rows = np.array([found[int(i)] for i in image_ids], np.int64)
  else:
    rows = np.arange(n if max_images is None else min(n, int(max_images)), dtype=np.int64)
  ids, captions, txt2img = [], [], []
  for pos, r in enumerate(rows):
    rec = source[int(r)]
    caps = [text_of(c) for c in list(rec["captions"])]
    if not caps:
      raise ValueError(f"record {int(r)} (image_id {int(rec['image_id'])}) has no captions")
    ids.append(int(rec["image_id"]))
    captions.extend(caps)
    txt2img.extend([pos] * len(caps))
  return Gallery(source, rows, np.array(ids, np.int64), captions, np.array(txt2img, np.int64))


def with_mesh(encoder, mesh):
  """The encoder itself, or the same weights sharding each batch over `mesh` (its 'data' axis)."""
  if mesh is None or getattr(encoder, "mesh", None) is mesh:
    return encoder
  return type(encoder)(encoder.model_config, encoder.params, encoder.tokenizer, mesh=mesh,
                       batch_size=encoder.batch_size, fingerprint=encoder.fingerprint)


def embed_gallery(encoder, gallery: Gallery, batch_size: int | None = None, chunk: int = 1024,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
  """(image embeddings [N_img, D], caption embeddings [N_txt, D], timing), both L2-normalised.

  Images are read and tokenised `chunk` at a time, so region features never all sit in memory. The
  timing excludes compilation (one warm-up batch per branch) and reading / tokenising the inputs.
  """
  timing = {"encode_images_s": 0.0, "encode_captions_s": 0.0}
  if gallery.num_images:  # compile both branches outside the clock (one batch shape each)
    encoder.embed_image_inputs(gallery.image_inputs(encoder, [0]), batch_size=batch_size)
    encoder.embed_text_inputs(gallery.text_inputs(encoder, [0]), batch_size=batch_size)
  img = []
  for a in tqdm(range(0, gallery.num_images, chunk), desc="encode images", disable=not progress):
    x = gallery.image_inputs(encoder, range(a, min(a + chunk, gallery.num_images)))
    t = time.perf_counter()
    img.append(encoder.embed_image_inputs(x, batch_size=batch_size))
    timing["encode_images_s"] += time.perf_counter() - t
  txt = []
  for a in tqdm(range(0, len(gallery.captions), chunk * 5), desc="encode captions", disable=not progress):
    x = gallery.text_inputs(encoder, range(a, min(a + chunk * 5, len(gallery.captions))))
    t = time.perf_counter()
    txt.append(encoder.embed_text_inputs(x, batch_size=batch_size))
    timing["encode_captions_s"] += time.perf_counter() - t
  d = encoder.model_config.embed_dim
  img = np.concatenate(img) if img else np.zeros((0, d), np.float32)
  txt = np.concatenate(txt) if txt else np.zeros((0, d), np.float32)
  return img, txt, timing
