"""Writer and reader processes of the cross-topology export tests (tests/test_export.py, tests/test_resume.py).

`write`: one of 2 processes x 4 CPU devices joined by `jax.distributed` on loopback (gloo), as on a pod:
builds the configs/tiny.py model's parameters sharded over the 8 global devices (a ('data', 'fsdp',
'model') = (2, 2, 2) mesh, FSDP down to small tensors, so parameters really are split across the
processes), writes them with `write_export`, and from process 0 saves what the writer had: its parameters
(gathered) and the embeddings of `CAPTIONS` / `images()` computed on the 8-device mesh.

`read`: a fresh process with 1 CPU device: `Encoder.load(export)`, then saves the loaded parameters and
the embeddings computed from them, and the embeddings computed in the same process from the writer's
parameters (`--writer_params`), for the test to compare.

    python tests/export_worker.py write --port 12345 --process_id 0 --out DIR
    python tests/export_worker.py read --export DIR/export --writer_params DIR/writer.npz --out DIR/read.npz
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

CAPTIONS = ["a small red dog left of a blue car", "two cats on a bench", "a man riding a horse on the beach",
            "a plate of food", "kids playing football in the rain"]
TAGS = ["dog car", "cat bench", "man horse beach", "plate food table", "child ball grass"]


def images(feature_dim: int) -> list[np.ndarray]:
  """Region features of the test images (1 to 5 regions each), the same in every process."""
  rng = np.random.default_rng(0)
  return [rng.normal(size=(n, feature_dim)).astype(np.float32) for n in (3, 1, 5, 2, 4)]


def embeddings(encoder) -> dict[str, np.ndarray]:
  return {"texts": encoder.embed_texts(CAPTIONS),
          "images": encoder.embed_images(images(encoder.model_config.img_feature_dim), TAGS)}


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def tiny_model_config():
  from repo_configs import get_config  # tests/ is on sys.path: the script's own folder
  from vldeformer_jax.training import setup as train_setup
  return train_setup.model_config_from(get_config("tiny"))[0]


def write(args) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  from vldeformer_jax import parallel
  started = parallel.initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id)
  assert started and jax.process_count() == 2 and jax.device_count() == 8, (started, jax.device_count())
  from vldeformer_jax.io import convert, export
  from vldeformer_jax.model import inputs
  from vldeformer_jax.model.vldeformer import init_params
  from vldeformer_jax.retrieval.encoder import Encoder

  mc = tiny_model_config()
  mesh = parallel.make_mesh(data=2, fsdp=2, model=2)
  init = lambda key: init_params(mc, key)  # noqa: E731
  shardings = parallel.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, fsdp_min_size=256)
  params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  split = [k for k, x in convert.flatten(params).items() if not x.is_fully_addressable]
  assert split, "no parameter is split across the processes"
  export.write_export(os.path.join(args.out, "export"), params, mc, inputs.BUNDLED_VOCAB,
                      metadata={"source": "tests/export_worker.py: 2 processes x 4 devices"})
  host = {k: export.host_array(x) for k, x in convert.flatten(params).items()}  # collective: every process
  encoder = Encoder(mc, convert.unflatten(host), mesh=jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                    batch_size=8, progress=False)
  emb = embeddings(encoder)  # collective too: the batches are sharded over both processes' devices
  if jax.process_index() == 0:
    save_npz(os.path.join(args.out, "writer_params.npz"), host)
    save_npz(os.path.join(args.out, "writer_embeddings.npz"), emb)
  jax.distributed.shutdown()


def read(args) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", 1)
  assert jax.device_count() == 1 and jax.process_count() == 1, jax.devices()
  from vldeformer_jax.io import convert
  from vldeformer_jax.retrieval.encoder import Encoder

  loaded = Encoder.load(args.export, batch_size=8, progress=False)
  writer_params = convert.unflatten(dict(np.load(args.writer_params)))
  from_writer = Encoder(loaded.model_config, writer_params, loaded.tokenizer, batch_size=8, progress=False)
  out = {f"param:{k}": np.asarray(x) for k, x in convert.flatten(loaded.params).items()}
  out.update({f"export:{k}": v for k, v in embeddings(loaded).items()})
  out.update({f"writer:{k}": v for k, v in embeddings(from_writer).items()})
  out["devices"] = np.array([len(x.sharding.device_set) for x in jax.tree.leaves(loaded.params)])
  save_npz(args.out, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("mode", choices=["write", "read"])
  parser.add_argument("--port", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--export")
  parser.add_argument("--writer_params")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  write(args) if args.mode == "write" else read(args)


if __name__ == "__main__":
  main()


# ------------------------------------------------------------------------------------------------------
# Used by the tests (in the pytest process).


def worker_env(**extra: str) -> dict[str, str]:
  """The environment of a worker: CPU only, the repository importable, no simulated device count (each
  mode sets its own)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([repo, env.get("PYTHONPATH", "")]), **extra)
  return env


def start_reader(export_dir: str, writer_params: str, out: str):
  import subprocess
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), "read", "--export", export_dir,
                           "--writer_params", writer_params, "--out", out],
                          env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(procs, timeout: float = 240) -> list[str]:
  """Waits for every worker (killing the rest when one times out), asserts each exited 0; their outputs."""
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-3000:]}"
  return logs


def check_read(read: dict[str, np.ndarray], writer_params: dict[str, np.ndarray],
               writer_embeddings: dict[str, np.ndarray], model_config) -> None:
  """What a 1-device reader (`read`) saw against what the writer had."""
  from model_helpers import embed_depth
  from tolerances import assert_bitwise, assert_f32
  assert set(read["devices"].tolist()) == {1}  # restored onto the reader's one device
  # Rule EXACT: restoring copies the stored bytes; the parameters are the writer's, bit for bit.
  loaded = {k[len("param:"):]: v for k, v in read.items() if k.startswith("param:")}
  assert sorted(loaded) == sorted(writer_params) and loaded
  for k, v in writer_params.items():
    assert_bitwise(loaded[k], v, err_msg=k)
  for k in ("texts", "images"):
    # Rule EXACT: the same compiled forward in the same process on bitwise-equal parameters.
    assert_bitwise(read[f"export:{k}"], read[f"writer:{k}"], err_msg=k)
    # Rule F32-PAIR: the writer embedded on its 8-device mesh, the reader on 1 device (another program,
    # the same float32 forward); unit vectors (scale 1), n = one BERT forward, its mean pooling and norm.
    assert_f32(read[f"export:{k}"], writer_embeddings[k], n=embed_depth(model_config), scale=1.0, pair=True,
               err_msg=k)
