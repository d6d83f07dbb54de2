"""Table 6: the training input pipeline, pairs per second per CPU core, prepared data -> device batch.

Why: one accelerator running BERT-base in the VinVL shape eats thousands of pairs per second, each pair
70 x 2054 region features (575 KB as float32), a caption and tags, and with hard negatives a composed
caption and a composed image. This measures what one host core delivers, from the prepared tfds
array_record dataset to the global `jax.Array` batch on the device (`parallel.global_batch`), the way the
training loop consumes it (`data/pipeline.py` `BatchBuilder`, one process, no prefetch threads, so the
figure is one core's work).

The dataset is written by the project's own writers: a VinVL file layout (features.tsv, predictions.tsv,
captions) at the VinVL shape (70 regions x 2054 float32, captions of 8-16 words, 70 detector tags that
fill the 35 tag tokens), converted by `data/prepare.py:prepare_vinvl`, once per storage layout, into
`--data_dir` (kept between runs). "Pairs per CPU-second" divides the pairs by the process's CPU time
(all its threads), so another process's load on a shared machine does not lower it; wall-clock pairs/s
is reported beside it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import time

import numpy as np

from benchmarks import common

FEATURE_DIM = 2054
NUM_REGIONS = 70
MAX_TEXT_LEN = 35
GOAL_PAIRS_PER_CORE = 300.0
_WORDS = ("man", "woman", "person", "dog", "cat", "horse", "car", "bus", "truck", "bicycle", "table", "chair",
          "plate", "pizza", "cake", "cup", "bottle", "tree", "street", "building", "sign", "window", "door",
          "shirt", "hat", "bag", "umbrella", "kite", "surfboard", "skateboard", "train", "boat", "bench",
          "grass", "sky", "water", "wall", "floor", "light", "pole", "fence", "field", "road", "sidewalk")
_FILLER = ("a", "the", "is", "on", "with", "of", "in", "near", "sitting", "standing", "next", "to", "two",
           "red", "white", "large", "small", "young", "holding", "riding", "an", "old", "blue", "wooden")


def write_vinvl_shape(out_dir: str, num_images: int, seed: int = 0) -> dict:
  """A VinVL file layout at the VinVL shape: every image 70 regions of 2054 float32 (non-negative, like
  ReLU detector features, last 6 = box), 70 detector tags (class names), 5 captions mixing object words
  and filler words. Train split only; returns the two directories prepare_vinvl reads."""
  import base64

  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  ids = [int(i) for i in rng.choice(np.arange(1, 10 ** 7), num_images, replace=False)]
  offsets, pred_offsets = [], []
  with open(os.path.join(out_dir, "features.tsv"), "wb") as f, \
       open(os.path.join(out_dir, "predictions.tsv"), "wb") as p:
    for image_id in ids:
      feats = np.abs(rng.standard_normal((NUM_REGIONS, FEATURE_DIM), np.float32)) * 2.0
      offsets.append(f.tell())
      f.write(b"\t".join([str(image_id).encode(), str(NUM_REGIONS).encode(),
                          base64.b64encode(feats.astype("<f4").tobytes())]) + b"\n")
      objects = [{"class": _WORDS[int(c)], "rect": [0, 0, 1, 1], "conf": 0.9}
                 for c in rng.integers(len(_WORDS), size=NUM_REGIONS)]
      pred_offsets.append(p.tell())
      p.write(str(image_id).encode() + b"\t" + json.dumps({"objects": objects, "image_h": 480,
                                                           "image_w": 640}).encode() + b"\n")
  for name, offs in (("features.lineidx", offsets), ("predictions.lineidx", pred_offsets)):
    with open(os.path.join(out_dir, name), "w") as f:
      f.write("".join(f"{o}\n" for o in offs))
  with open(os.path.join(out_dir, "imageid2idx.json"), "w") as f:
    json.dump({str(i): r for r, i in enumerate(ids)}, f)
  captions = {}
  for image_id in ids:
    caps = []
    for _ in range(5):
      n = int(rng.integers(8, 17))
      caps.append(" ".join(_WORDS[int(rng.integers(len(_WORDS)))] if rng.random() < 0.35
                           else _FILLER[int(rng.integers(len(_FILLER)))] for _ in range(n)) + ".")
    captions[str(image_id)] = caps
  with open(os.path.join(out_dir, "train_captions.json"), "w") as f:
    json.dump(captions, f)
  return {"captions_dir": out_dir, "features_dir": out_dir}


def prepared(data_dir: str, num_images: int, layout: dict) -> tuple[str, str]:
  """(data_dir, name) of the prepared dataset of `layout` (prepare options), made when missing."""
  from vldeformer_jax.data import prepare
  suffix = "_".join(f"{k}_{v}" for k, v in sorted(layout.items())) or "default"
  name = f"vinvl_shape_{num_images}_{suffix}".replace("-", "_").lower()
  if prepare.read_metadata(data_dir, name) is None:
    raw = os.path.join(data_dir, f"raw_{num_images}")
    if not os.path.isfile(os.path.join(raw, "train_captions.json")):
      write_vinvl_shape(raw, num_images)
    prepare.prepare_vinvl(raw, raw, name, data_dir, splits=("train",), **layout)
  return data_dir, name


def _builder(source, negatives: int, batch: int, vocabulary, pipeline):
  from vldeformer_jax.model import inputs
  return pipeline.BatchBuilder(
      source, tokenizer=inputs.load_tokenizer(), global_batch_size=batch, seed=0, max_text_len=MAX_TEXT_LEN,
      max_regions=NUM_REGIONS, feature_dim=FEATURE_DIM, num_captions_per_image=5, negatives_per_pair=negatives,
      replace_ratio=0.3, process_index=0, process_count=1, tag_vocabulary=vocabulary)


def measure(source, negatives: int, batch: int, steps: int, vocabulary, profile: bool = False,
            pipeline=None) -> dict:
  """Pairs per CPU-second and per wall second of `steps` batches built and put on the device."""
  import jax
  from vldeformer_jax import parallel

  builder = _builder(source, negatives, batch, vocabulary, pipeline or pipeline_module(None))
  mesh = parallel.make_mesh()

  def one(step):
    local = {k: v for k, v in builder(step).items() if k != "image_id"}
    jax.block_until_ready(parallel.global_batch(local, mesh))

  one(0)  # warm-up: permutation, first reads, transfer paths
  profiler = cProfile.Profile() if profile else None
  wall, cpu = time.perf_counter(), time.process_time()
  if profiler:
    profiler.enable()
  for s in range(1, steps + 1):
    one(s)
  if profiler:
    profiler.disable()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  pairs = steps * batch
  out = {"negatives_per_pair": negatives, "batch": batch, "steps": steps, "pairs": pairs,
         "wall_seconds": wall, "cpu_seconds": cpu, "pairs_per_cpu_second": pairs / cpu,
         "pairs_per_wall_second": pairs / wall}
  if profiler:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    out["profile_top"] = text.getvalue()
  return out


BEFORE_REVISION = "7fa18cc"  # the last commit before the input pipeline was sped up
LAYOUTS = {
    # name: (prepare options of data/prepare.py + data/storage.py, pipeline code). The first two are the
    # way every dataset was stored before the storage options (tfds's default array_record compression),
    # read by data/pipeline.py as it was at BEFORE_REVISION and as it is now.
    "before: float32, compressed; pipeline.py at " + BEFORE_REVISION: ({"compression": "default"}, BEFORE_REVISION),
    "float32, compressed": ({"compression": "default"}, None),
    "float32, uncompressed": ({"compression": "none"}, None),
    "bfloat16, uncompressed": ({"compression": "none", "feature_dtype": "bfloat16"}, None),
    "float16, uncompressed": ({"compression": "none", "feature_dtype": "float16"}, None),
}


def pipeline_module(revision: str | None):
  """data/pipeline.py now (None) or as it was at git `revision` (read with `git show`, loaded as a module
  beside the current package, whose other modules it imports)."""
  from vldeformer_jax.data import pipeline
  if revision is None:
    return pipeline
  import importlib.util
  import subprocess
  import tempfile
  code = subprocess.run(["git", "show", f"{revision}:vldeformer_jax/data/pipeline.py"], cwd=common.REPO,
                        capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(prefix="pipeline-"), f"pipeline_{revision}.py")
  with open(path, "w") as f:
    f.write(code)
  spec = importlib.util.spec_from_file_location(f"pipeline_{revision}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run(data_dir: str, num_images: int, batch: int, steps: int, layouts=None, profile: bool = False) -> dict:
  from vldeformer_jax.data import negatives as negatives_lib
  from vldeformer_jax.data import prepare

  rows = []
  for label in layouts or LAYOUTS:
    options, revision = LAYOUTS[label]
    d, name = prepared(data_dir, num_images, options)
    try:
      module = pipeline_module(revision)
    except (OSError, subprocess.CalledProcessError) as e:  # no git checkout: the row says so
      rows.append({"layout": label, "error": f"git show {revision}: {e}"})
      continue
    source = prepare.load_split(d, name, "train")
    vocabulary = negatives_lib.build_tag_vocabulary(source, cache_path=os.path.join(d, f"{name}_tags.json"),
                                                    progress=False)
    for k in (0, 1):
      row = measure(source, k, batch, steps, vocabulary, profile, module)
      row.update(layout=label, dataset=name)
      rows.append(row)
  return {"rows": rows, "num_images": num_images, "regions": NUM_REGIONS, "feature_dim": FEATURE_DIM,
          "max_text_len": MAX_TEXT_LEN, "goal_pairs_per_core": GOAL_PAIRS_PER_CORE}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", default=os.environ.get("VLD_PIPELINE_DATA", "/tmp/vldeformer_pipeline_bench"))
  p.add_argument("--num_images", type=int, default=2000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--layouts", default="", help="comma-separated LAYOUTS keys (default: all)")
  p.add_argument("--profile", action="store_true", help="add cProfile's top entries to each row")
  a = p.parse_args()
  layouts = [x.strip() for x in a.layouts.split(";") if x.strip()] or None
  common.emit(run(a.data_dir, a.num_images, a.batch, a.steps, layouts, a.profile))


if __name__ == "__main__":
  main()
