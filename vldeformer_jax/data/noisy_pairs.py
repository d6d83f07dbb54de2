"""Noisy image-caption pairs (docs/method.md §4.10): a fraction of a split's captions replaced by captions
of other images, the setting of web-crawled pairs (Patel et al.; the Twitter-embeddings paper) in which a
topic target or the max-violation hinge should lose less than plain InfoNCE.

Used by the demo writer (`data/demo_world.py write_demo_vinvl(noisy_captions=p)`, `launch/make_demo_data.py
--noisy_captions=p`) on the training split only; the test split stays clean.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def replace_captions(captions: Sequence[Sequence[str]], fraction: float, seed: int
                     ) -> tuple[list[list[str]], list[tuple[int, int, int, int]]]:
  """Replaces round(fraction * N) of the N caption slots (drawn without replacement) by a caption of
  another image: the donor image is drawn uniformly among the others and its caption among its (clean)
  captions, drawn again while the text equals one of the image's own captions. Deterministic in `seed`.

  Returns (the new caption lists, [(image, slot, donor image, donor slot)] sorted by (image, slot)).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"noisy_captions: the fraction of replaced captions must be in [0, 1], got {fraction}")
  if len(captions) < 2 and fraction > 0:
    raise ValueError("noisy_captions: needs at least 2 images to take captions from another image")
  slots = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
  k = int(round(fraction * len(slots)))
  rng = np.random.default_rng([int(seed), 16])
  chosen = sorted(slots[s] for s in rng.choice(len(slots), size=k, replace=False))
  out = [list(caps) for caps in captions]
  replaced = []
  for i, j in chosen:
    own = set(captions[i])
    for _ in range(1000):
      donor = int(rng.integers(len(captions) - 1))
      donor += donor >= i  # uniform over the other images
      if not captions[donor]:
        continue
      slot = int(rng.integers(len(captions[donor])))
      if captions[donor][slot] not in own:
        break
    else:
      raise ValueError(f"noisy_captions: no other image has a caption different from image {i}'s")
    out[i][j] = captions[donor][slot]
    replaced.append((i, j, donor, slot))
  return out, replaced
