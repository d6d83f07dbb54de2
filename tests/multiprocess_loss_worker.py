"""One process of the multi-process loss test, and the problem it shares with the tests.

Run by tests/test_losses.py as two processes with 4 CPU devices each, joined by `jax.distributed` on
loopback (gloo collectives): the real multi-host code path of a pod, on one machine. Each process builds
the same global problem from a shared seed, keeps only its rows (`process_slice`), turns them into global
arrays (`global_batch`), computes the sharded loss and its gradients, and writes what it can see to
`<out>/<loss>_process_<id>.npz` (written to a temporary name, then renamed). The test compares the two files
with the same computation on 1 process x 8 devices.

    python tests/multiprocess_loss_worker.py --port 12345 --process_id 0 --num_processes 2 \
        --losses infonce,hardness --out DIR
"""
from __future__ import annotations

import argparse
import os

import numpy as np

GLOBAL_ROWS, NUM_NEG, FEAT_DIM, EMB_DIM = 16, 2, 6, 8
TEMPS = (0.05, 0.07)
EMB_KEYS = ("text", "image", "neg_text", "neg_image")


def loss_kwargs(name: str) -> dict:
  """The options each objective is tested with."""
  return {"infonce": {"name": "infonce"},
          "hardness": {"name": "hardness", "beta": 0.5, "tau_plus": 0.1},
          "hinge": {"name": "hinge", "margin": 0.2}}[name]


def make_problem(seed: int = 0) -> dict[str, np.ndarray]:
  """A tiny linear "encoder" (shared weight, like the shared BERT) and the features it embeds.

  Half of the pairs are strongly aligned (as after some training), so accuracies are not trivial and the
  hardness objective's lower clamp is active on some rows.
  """
  rng = np.random.default_rng(seed)
  g, k = GLOBAL_ROWS, NUM_NEG
  text = rng.normal(size=(g, FEAT_DIM))
  image = rng.normal(size=(g, FEAT_DIM))
  aligned = np.arange(g) % 2 == 0
  image[aligned] = text[aligned] + 0.05 * rng.normal(size=(aligned.sum(), FEAT_DIM))
  return {
      "w": rng.normal(size=(FEAT_DIM, EMB_DIM)).astype(np.float32),
      "text": text.astype(np.float32),
      "image": image.astype(np.float32),
      "neg_text": rng.normal(size=(g, k, FEAT_DIM)).astype(np.float32),
      "neg_image": rng.normal(size=(g, k, FEAT_DIM)).astype(np.float32),
  }


def sharded_loss_and_grads(mesh, feats, w, options):
  """jit of value_and_grad of the sharded loss w.r.t. (w, embedding offsets, temperatures).

  Embeddings are `feats @ w + offset` with zero offsets: the gradient w.r.t. an offset is exactly the
  gradient w.r.t. that embedding, and the one w.r.t. `w` runs through the all_gather's transpose.
  `feats` are global batch-sharded arrays, `w` a replicated array.
  """
  import jax
  import jax.numpy as jnp
  from vldeformer_jax.training import losses
  from vldeformer_jax import parallel

  loss_fn = losses.sharded_contrastive_loss(mesh, **options)

  def objective(w, offsets, temps, feats):
    embs = {k: jnp.einsum("...f,fd->...d", feats[k], w) + offsets[k] for k in EMB_KEYS}
    return loss_fn(embs["text"], embs["image"], embs["neg_text"], embs["neg_image"], temps)

  grad_fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
  batch = parallel.batch_sharding(mesh)
  offsets = {k: jax.jit(lambda x: jnp.zeros(x.shape[:-1] + (EMB_DIM,), jnp.float32),
                        out_shardings=batch)(feats[k]) for k in EMB_KEYS}
  temps = tuple(jnp.float32(t) for t in TEMPS)
  return grad_fn(w, offsets, temps, feats)


def _local_rows(x) -> dict[int, np.ndarray]:
  """{global row: value} for the rows of a batch-sharded array this process can see."""
  rows = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    for i, row in enumerate(np.asarray(shard.data)):
      rows[start + i] = row
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--losses", default="infonce", help="comma-separated loss names")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  from vldeformer_jax import parallel

  started = parallel.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
  assert started and jax.process_count() == args.num_processes, (started, jax.process_count())
  mesh = parallel.make_mesh(data=2, fsdp=2, model=2)
  problem = make_problem()
  rows = parallel.process_slice(GLOBAL_ROWS)
  feats = parallel.global_batch({k: problem[k][rows] for k in EMB_KEYS}, mesh)
  w = jax.make_array_from_callback(problem["w"].shape, parallel.replicated(mesh), lambda i: problem["w"][i])
  for name in args.losses.split(","):
    (loss, metrics), (g_w, g_off, g_temps) = sharded_loss_and_grads(mesh, feats, w, loss_kwargs(name))
    out = {"loss": np.asarray(loss.addressable_data(0)), "grad_w": np.asarray(g_w.addressable_data(0)),
           "grad_temps": np.array([np.asarray(t.addressable_data(0)) for t in g_temps]),
           "process_rows": np.arange(GLOBAL_ROWS)[rows]}
    for k, v in metrics.items():
      out[f"metric_{k}"] = np.asarray(v.addressable_data(0))
    for k in EMB_KEYS:
      local = _local_rows(g_off[k])
      out[f"grad_{k}_rows"] = np.array(sorted(local))
      out[f"grad_{k}"] = np.stack([local[i] for i in sorted(local)])
    path = os.path.join(args.out, f"{name}_process_{args.process_id}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
