r"""Peak memory of `launch/prepare_data.py` on COCO-shaped VinVL files of growing size.

  python benchmarks/prepare_memory.py --gb=0.5,2.0 --workdir=/tmp/prepare_memory

For each size it writes a VinVL layout whose features.tsv has about that many GB (2054-d float32 regions,
10-50 boxes an image, 5 captions an image in a torch `.pt` file, a test split with 1K keys), runs the
converter under `/usr/bin/time -v`, checks the output sizes, prints the peak RSS and wall time, and deletes
everything (unless --keep). Bounded memory means the peak does not grow with the file size.
CPU and disk heavy (a 2 GB input is written, read and written again): run it on purpose, not in CI.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("gb", ["0.5", "2.0"], "features.tsv sizes to measure, in GB (1e9 bytes).")
flags.DEFINE_string("workdir", "/tmp/vldeformer_prepare_memory", "Scratch directory (deleted at the end).")
flags.DEFINE_enum("captions_format", "pt", ["pt", "json"], "Caption file format (.pt imports torch).")
flags.DEFINE_bool("keep", False, "Keep the generated files.")

F = 2054
WORDS = "a man woman dog cat sitting on the table with red blue car street next to".split()


def write_coco_shaped(root: str, target_bytes: float, captions_format: str, seed: int = 0) -> dict:
  """VinVL files with a features.tsv of about `target_bytes`; rows stream to disk one at a time."""
  os.makedirs(root)
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal(1 << 24).astype("<f4")  # 64 MB of floats, sliced at random offsets
  offsets, pred_offsets, ids = [], [], []
  written, image_id = 0, 100_000
  with open(os.path.join(root, "features.tsv"), "wb") as ff, \
       open(os.path.join(root, "predictions.tsv"), "wb") as fp:
    while written < target_bytes:
      n = int(rng.integers(10, 51))
      start = int(rng.integers(0, len(pool) - n * F))
      row = b"%d\t%d\t" % (image_id, n) + base64.b64encode(pool[start:start + n * F].tobytes()) + b"\n"
      offsets.append(ff.tell())
      ff.write(row)
      written += len(row)
      objects = [{"class": WORDS[int(k)], "conf": 0.5, "rect": [1.0, 2.0, 30.0, 40.0]}
                 for k in rng.integers(len(WORDS), size=n)]
      pred_offsets.append(fp.tell())
      fp.write(b"%d\t" % image_id + json.dumps({"objects": objects, "image_h": 480, "image_w": 640}).encode()
               + b"\n")
      ids.append(image_id)
      image_id += 1
  for name, offs in (("features", offsets), ("predictions", pred_offsets)):
    with open(os.path.join(root, f"{name}.lineidx"), "w") as f:
      f.write("".join(f"{o}\n" for o in offs))
  with open(os.path.join(root, "imageid2idx.json"), "w") as f:
    json.dump({str(i): r for r, i in enumerate(ids)}, f)
  n_test = max(5, len(ids) // 6)
  order = rng.permutation(len(ids))
  splits = {"train": [ids[i] for i in order[n_test:]], "test": [ids[i] for i in order[:n_test]]}
  for split, split_ids in splits.items():
    caps = {i: [" ".join(rng.choice(WORDS, size=10)) for _ in range(5)] for i in split_ids}
    if captions_format == "pt":
      import torch
      torch.save(caps, os.path.join(root, f"{split}_captions.pt"))
    else:
      with open(os.path.join(root, f"{split}_captions.json"), "w") as f:
        json.dump({str(k): v for k, v in caps.items()}, f)
  keys_1k = splits["test"][:min(1000, n_test // 5)]
  for name, keys in (("test_img_keys.tsv", splits["test"]), ("test_img_keys_1k.tsv", keys_1k)):
    with open(os.path.join(root, name), "w") as f:
      f.write("".join(f"{k}\n" for k in keys))
  return {"bytes": written, "images": len(ids), "train": len(splits["train"]), "test": n_test,
          "test_1k": len(keys_1k)}


def measure(gb: float) -> dict:
  root = os.path.join(FLAGS.workdir, f"{gb}gb")
  shutil.rmtree(root, ignore_errors=True)
  src, out = os.path.join(root, "vinvl"), os.path.join(root, "tfds")
  t0 = time.time()
  info = write_coco_shaped(src, gb * 1e9, FLAGS.captions_format)
  print(f"[{gb} GB] wrote {info['bytes'] / 1e9:.2f} GB features.tsv, {info['images']} images "
        f"in {time.time() - t0:.0f} s", flush=True)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(REPO, "launch", "prepare_data.py"),
         f"--captions_dir={src}", f"--features_dir={src}", "--name=coco_shaped", f"--data_dir={out}"]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"prepare_data failed:\n{res.stderr[-3000:]}")
  peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", res.stderr).group(1)
  sys.path.insert(0, REPO)
  from vldeformer_jax.data import prepare
  for split in ("train", "test", "test_1k"):
    n = len(prepare.load_split(out, "coco_shaped", split))
    assert n == info[split], (split, n, info[split])
  out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  if not FLAGS.keep:
    shutil.rmtree(root)
  return {"gb": info["bytes"] / 1e9, "images": info["images"], "peak_rss_mb": peak_kb / 1024, "wall": wall,
          "output_gb": out_bytes / 1e9}


def main(argv):
  del argv
  rows = [measure(float(gb)) for gb in FLAGS.gb]
  print(f"\nprepare_data.py peak RSS (/usr/bin/time -v), captions as .{FLAGS.captions_format}:")
  print("| features.tsv | images | peak RSS | wall | output |\n| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['gb']:.2f} GB | {r['images']} | {r['peak_rss_mb']:.0f} MB | {r['wall']} | {r['output_gb']:.2f} GB |")
  if not FLAGS.keep:
    shutil.rmtree(FLAGS.workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
