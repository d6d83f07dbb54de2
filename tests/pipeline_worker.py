"""The synthetic source of the pipeline tests, and one process of their multi-process run.

`SyntheticSource` is a random-access source of records (ARCHITECTURE.md "Dataset records") whose region
rows say where they come from (column 0 = source index, column 1 = region number), so a test can check
that a composed negative image copies exact rows of the right images. It lives here, not in the test
file, so that grain's spawned worker processes can unpickle it.

Run by tests/test_pipeline.py as two processes with 4 CPU devices each, joined by `jax.distributed` on
loopback (gloo): each builds the iterator with JAX's process index and count, runs it for `--steps`
steps, runs it again interrupted at `--resume_at` and restored from a JSON state, stitches its step-0 batch
into global arrays with `parallel.global_batch`, and writes `<out>/process_<id>.npz` (temporary name,
then renamed).

    python tests/pipeline_worker.py --port 12345 --process_id 0 --num_processes 2 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

WORDS = ("man", "woman", "dog", "cat", "shirt", "table", "tree", "car", "traffic", "light", "sky", "horse")
FILLER = ("a", "the", "near", "with", "is", "sitting", "on", "under", "big", "small")
FEATURE_DIM = 6
# One setting shared by the test process and the worker processes.
NUM_IMAGES = 43
PIPELINE = dict(global_batch_size=8, seed=11, max_text_len=16, max_regions=5, feature_dim=FEATURE_DIM,
                negatives_per_pair=2, replace_ratio=0.3)
STEPS, RESUME_AT = 12, 4  # 12 steps at 5 steps per epoch: three epochs, resumed mid-epoch


class SyntheticSource:
  """`len` / `[i]` over deterministic records; text as bytes, like `tfds.data_source`."""

  def __init__(self, num_images: int = NUM_IMAGES, feature_dim: int = FEATURE_DIM, seed: int = 0):
    self.num_images, self.feature_dim, self.seed = num_images, feature_dim, seed

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < self.num_images:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, i])
    n = int(rng.integers(1, 10))  # 1..9 regions, some above max_regions
    features = rng.normal(size=(n, self.feature_dim)).astype(np.float32)
    features[:, 0], features[:, 1] = i, np.arange(n)
    tags = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 7))))
    num_captions = (3, 5, 7)[i % 3]  # fewer, exactly, and more than num_captions_per_image

    def caption(c):
      if i % 5 == 4 and c == 0:  # a caption without any object word
        return f"{rng.choice(FILLER)} {rng.choice(FILLER)} {rng.choice(FILLER)}"
      words = [rng.choice(WORDS if k % 2 else FILLER) for k in range(int(rng.integers(3, 10)))]
      return " ".join(words)

    return {"image_id": np.int64(1000 + 7 * i), "features": features, "tags": tags.encode(),
            "captions": np.array([caption(c).encode() for c in range(num_captions)], dtype=object)}


def stack_batches(batches: list[dict]) -> dict[str, np.ndarray]:
  """[{key: [B, ...]}] over steps -> {key: [steps, B, ...]}."""
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def run_iterator(make, steps: int, resume_at: int | None = None) -> dict[str, np.ndarray]:
  """`steps` batches of `make()`; with `resume_at`, a fresh iterator restored from the JSON state taken
  after `resume_at` batches yields the rest."""
  it = make()
  batches = [next(it) for _ in range(steps if resume_at is None else resume_at)]
  if resume_at is not None:
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    it = make()
    it.set_state(state)
    batches += [next(it) for _ in range(steps - resume_at)]
  it.close()
  return stack_batches(batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id)
  assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id

  from vldeformer_jax.model import inputs

  from vldeformer_jax import parallel
  from vldeformer_jax.data import pipeline
  tokenizer = inputs.load_tokenizer()
  source = SyntheticSource()

  def make():  # process index and count from JAX
    return pipeline.make_train_iterator(source, tokenizer=tokenizer, **PIPELINE)

  out = {f"straight_{k}": v for k, v in run_iterator(make, STEPS).items()}
  out.update({f"resumed_{k}": v for k, v in run_iterator(make, STEPS, RESUME_AT).items()})

  # The local rows stitch into one global array whose local shards are exactly these rows.
  mesh = parallel.make_mesh(data=-1)
  local = {k: out[f"straight_{k}"][0] for k in ("image_id", "neg_image_img_feats")}
  glob = parallel.global_batch(local, mesh)
  g = PIPELINE["global_batch_size"]
  for key, arr in glob.items():
    assert arr.shape == (g,) + local[key].shape[1:], (key, arr.shape)
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows = np.concatenate([np.asarray(s.data) for s in shards])
    start = shards[0].index[0].start or 0
    assert start == args.process_id * (g // args.num_processes), (key, start)
    np.testing.assert_array_equal(rows, local[key])
  out["process_index"] = np.array(jax.process_index())
  out["process_count"] = np.array(jax.process_count())
  out["global_devices"] = np.array(jax.device_count())

  path = os.path.join(args.out, f"process_{args.process_id}.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
