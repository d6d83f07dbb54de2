"""`launch/index.py build` run by 2 processes x 4 CPU devices (jax.distributed on loopback, gloo) writes the
same index as one process, and a query reads it on one device (retrieval/index_build.py `_build_streamed`).

Tolerances: tests/tolerances.py. The two builds embed each image with the same model and parameters but in
other batches (the 1-process build runs batches of 4 on one device; each of the 2 processes shards its
batches of 4 over 4 devices, one row each, and starts at its own share's first row), so an embedding may
differ in the last bits: rule F32-PAIR (unit vectors, scale 1). Ids, texts and the per-row int8 codes of the
stored embeddings are compared exactly (rule EXACT: the same data, or the same numpy function of the
same stored row)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from vldeformer_jax.io import export
from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import index, index_build, index_query, search
from vldeformer_jax.retrieval.encoder import Encoder
from export_worker import wait_all, worker_env
from model_helpers import embed_depth, tiny_params
from tolerances import assert_f32, assert_within, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_text_len=16,
            max_regions=6)
NUM_TEST = 19  # odd: the processes' shares differ (10 and 9 rows), and neither is a multiple of the batch


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("num,count", [(19, 2), (0, 3), (2, 3), (1000, 7)])
def test_process_rows_cover_every_row_once(num, count):
  shares = [index_build.process_rows(num, p, count) for p in range(count)]
  assert shares[0][0] == 0 and shares[-1][1] == num
  assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in process order
  sizes = [hi - lo for lo, hi in shares]
  assert max(sizes) - min(sizes) <= 1


def test_two_process_build_equals_one_process_build(tmp_path):
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.data import prepare
  cfg = ModelConfig(**TINY)
  export.write_export(str(tmp_path / "export"), tiny_params(cfg, 0), cfg, inputs.BUNDLED_VOCAB)
  name = demo.prepare_demo(str(tmp_path / "data"), seed=0, num_train=2, num_test=NUM_TEST)
  common = [f"--export={tmp_path / 'export'}", f"--data_dir={tmp_path / 'data'}", f"--dataset={name}",
            "--split=test", "--side=images", "--compact=int8", "--batch_size=4"]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "launch/index.py", "build", *common, f"--index={tmp_path / 'two'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=worker_env(JAX_NUM_CPU_DEVICES="4"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  logs = wait_all(procs)
  assert all(f"wrote index {tmp_path / 'two'}: {NUM_TEST} images" in log for log in logs)
  # No temporary directory or text part is left beside or inside the index.
  assert sorted(os.listdir(tmp_path)) == ["data", "export", "two"]

  encoder = Encoder.load(str(tmp_path / "export"), batch_size=4)  # this process: one device, no mesh
  source = prepare.load_split(str(tmp_path / "data"), name, "test")
  index_build.build_index(encoder, source, str(tmp_path / "one"), side="images", compact="int8", batch_size=4)
  one, two = index.Index.load(str(tmp_path / "one")), index.Index.load(str(tmp_path / "two"))  # sha256 checked
  assert two.meta["processes"] == 2 and two.meta["local_devices"] == 4
  assert sorted(two.meta["files"]) == sorted(one.meta["files"])
  for key in ("fingerprint", "side", "num", "dim", "compact", "encoders", "backend"):
    assert two.meta[key] == one.meta[key], key
  np.testing.assert_array_equal(two.ids, one.ids)  # rule EXACT
  assert two.texts == one.texts
  np.testing.assert_array_equal(two.entry_encoders, one.entry_encoders)
  # Rule F32-PAIR: the same rows embedded in other batches, on other devices.
  assert_f32(two.embeddings, one.embeddings, n=embed_depth(cfg), scale=1.0, pair=True)
  # Every process's rows landed with their codes: the stored codes are those of the stored rows (EXACT).
  codes, scales = search.quantize_int8(np.asarray(two.embeddings))
  np.testing.assert_array_equal(two.codes, codes)
  np.testing.assert_array_equal(two.scales, scales)

  # A query reads the 2-process index on one device and answers as the 1-process index does. Bound on a
  # score of `two` against the float64 score of the same query with `one`'s rows: the rows differ by at
  # most e = 2 gamma(embed_depth) per entry (above), so by Cauchy-Schwarz the unit query's dot product
  # moves by at most sqrt(D) e, plus the float32 dot product's own rule F32 bound gamma(D + 2). The
  # rankings are compared where the float64 scores are further apart than twice that.
  text = "a small red car to the left of a dog"
  q = encoder.embed_texts([text])
  rows_two = index_query.query_index(two, encoder, text=text, k=5, exact=True)
  rows_one = index_query.query_index(one, encoder, text=text, k=5, exact=True)
  ref = np.sort(np.asarray(q, np.float64) @ np.asarray(one.embeddings, np.float64).T)[0, ::-1]
  d = cfg.embed_dim
  bound = np.sqrt(d) * 2 * gamma(embed_depth(cfg)) + gamma(d + 2)
  assert np.all(-np.diff(ref[:6]) > 2 * bound)
  assert [r["image_id"] for r in rows_two] == [r["image_id"] for r in rows_one]
  assert_within([r["score"] for r in rows_two], ref[:5], bound, rule="F32-PAIR rows + rule F32 dot product")
