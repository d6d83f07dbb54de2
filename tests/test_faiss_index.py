"""The faiss index backend (retrieval/faiss_backend.py, `--backend=faiss` of retrieval/index.py): flat search
answers as the JAX exact search, IVF / HNSW keep a stated recall on clustered data, and a faiss index keeps
the index directory's contract (fingerprint, sha256, meta.json against the stored structure, a missing
faiss refused with the fix). Tolerances: tests/tolerances.py (rule F32 for float32 scores against a float64
brute force; top-k sets compared exactly only where the k-th and (k+1)-th float64 scores are further apart
than the rounding bound)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import faiss  # the test extra installs faiss-cpu (pip install .[test])
from vldeformer_jax.retrieval import faiss_backend, index, search
from tolerances import assert_f32, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 64
FP = "a" * 64


@pytest.fixture(scope="module")
def clustered():
  """Unit vectors around 40 centres (like embeddings of a gallery with look-alikes), queries near rows."""
  rng = np.random.default_rng(7)
  centres = rng.normal(size=(40, DIM))
  g = centres[rng.integers(0, 40, 4000)] + 0.6 * rng.normal(size=(4000, DIM))
  g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
  q = g[rng.integers(0, 4000, 64)] + 0.2 * rng.normal(size=(64, DIM))
  q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
  exact = search.exact_topk(q, g, 10)
  return g, q, exact


def _decided_sets(q, g, k):
  """float64 scores, the reference top-k sets, and whether each query's k-th and (k+1)-th scores are
  more than twice the rule F32 bound apart (then float32 search must return exactly that set)."""
  s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
  order = np.argsort(-s, axis=1, kind="stable")
  top = np.take_along_axis(s, order[:, :k + 1], axis=1)
  bound = gamma(DIM) * (np.abs(q).astype(np.float64) @ np.abs(g).astype(np.float64).T).max(1)
  return s, order[:, :k], top[:, k - 1] - top[:, k] > 2 * bound


def test_flat_equals_jax_exact_search(clustered, tmp_path):
  g, q, exact = clustered
  s, ref, decided = _decided_sets(q, g, 10)
  assert decided.mean() > 0.9  # the comparison below covers most queries
  index.write_index(str(tmp_path / "flat"), g, np.arange(len(g)) + 100, [f"r{i}" for i in range(len(g))],
                    fingerprint=FP, side="images", backend="faiss", faiss_index="flat")
  ix = index.Index.load(str(tmp_path / "flat"))
  assert ix.backend == "faiss" and ix.meta["faiss"]["index"] == "flat"
  for top in (faiss_backend.search(faiss_backend.build(g, "flat"), q, 10), ix.search(q, 10),
              faiss_backend.search(faiss_backend.build(g, "flat"), q[:3], 10)):  # < 20 queries: faiss' SIMD loop
    nq = len(top.indices)
    for i in np.flatnonzero(decided[:nq]):
      # Rule RANKS: the set is decided by more than the bound; equal to the JAX search's and the reference's.
      assert set(top.indices[i]) == set(ref[i]) == set(exact.indices[i])
    # Rule F32: each returned score is a 64-term float32 dot product of the row it names.
    rows = np.clip(top.indices, 0, None)
    assert (top.indices >= 0).all()
    scale = np.sum(np.abs(q[:nq, None, :].astype(np.float64)) * np.abs(g[rows].astype(np.float64)), axis=-1)
    assert_f32(top.scores, np.take_along_axis(s[:nq], rows, axis=1), n=DIM, scale=scale)
    # And within F32-PAIR of the JAX search's k-th score (the same quantity, another summation order).
    assert_f32(top.scores[:, -1], exact.scores[:nq, -1], n=DIM, scale=1.0, pair=True)


def test_ivf_and_hnsw_recall_on_clustered_data(clustered, tmp_path):
  g, q, exact = clustered
  _, ref, decided = _decided_sets(q, g, 10)
  recall = {}
  for kind, params in (("ivf", {"nlist": 64, "nprobe": 2}), ("hnsw", {"M": 16, "ef_search": 32})):
    index.write_index(str(tmp_path / kind), g, np.arange(len(g)), ["x"] * len(g), fingerprint=FP, side="images",
                      backend="faiss", faiss_index=kind, faiss_params=params)
    ix = index.Index.load(str(tmp_path / kind))
    assert {k: ix.meta["faiss"][k] for k in params} == params  # the parameters are recorded and restored
    assert {k: faiss_backend.describe(ix.faiss)[k] for k in params} == params
    recall[kind] = search.recall_vs_exact(ix.search(q, 10).indices, exact.indices)
  # Stated bounds. Measured with faiss-cpu 1.15.1 on this data: IVF 2 of 64 lists 0.945 (1 list: 0.77,
  # 4: 0.994), HNSW M=16 ef_search 32: 0.963 (ef 16: 0.91). The bounds leave room for another faiss
  # version's k-means / graph; chance is 10 / 4000.
  assert recall["ivf"] >= 0.85, recall
  assert recall["hnsw"] >= 0.90, recall
  # Scanning every list makes IVF exact (rule RANKS on the decided queries); the per-call override
  # does not change the stored index.
  full = index.Index.load(str(tmp_path / "ivf")).search(q, 10, nprobe=64)
  for i in np.flatnonzero(decided):
    assert set(full.indices[i]) == set(ref[i])
  assert faiss_backend.describe(index.Index.load(str(tmp_path / "ivf")).faiss)["nprobe"] == 2


def test_faiss_index_contract_refusals(clustered, tmp_path):
  g, _, _ = clustered
  path = str(tmp_path / "idx")
  index.write_index(path, g[:500], np.arange(500), ["x"] * 500, fingerprint=FP, side="images", backend="faiss",
                    faiss_index="ivf", faiss_params={"nlist": 8})
  ix = index.Index.load(path)
  with pytest.raises(index.BadIndexError, match="built by the export with fingerprint .* another space"):
    ix.check_fingerprint("b" * 64, "export OTHER")
  with pytest.raises(ValueError, match="JAX-backend option"):
    index.write_index(str(tmp_path / "x"), g[:5], np.arange(5), ["x"] * 5, fingerprint=FP, side="images",
                      backend="faiss", faiss_index="flat", compact="int8")
  with pytest.raises(ValueError, match="unknown parameter"):
    index.write_index(str(tmp_path / "x"), g[:5], np.arange(5), ["x"] * 5, fingerprint=FP, side="images",
                      backend="faiss", faiss_index="flat", faiss_params={"nprobe": 3})
  # add_items keeps the backend and its query parameters (the structure is rebuilt over all rows).
  meta = index.add_items(path, g[500:520], np.arange(20), ["y"] * 20, fingerprint=FP)
  assert meta["backend"] == "faiss" and meta["faiss"]["index"] == "ivf" and meta["num"] == 520
  assert index.Index.load(path).faiss.ntotal == 520
  meta_path = os.path.join(path, index.META)
  good_meta = open(meta_path).read()
  # meta.json's kind and the stored structure disagree.
  meta = json.loads(good_meta)
  meta["faiss"]["index"] = "hnsw"
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(index.BadIndexError, match="faiss.index is a ivf index of 520 x 64, meta.json says hnsw"):
    index.Index.load(path)
  open(meta_path, "w").write(good_meta)
  # One changed byte of the faiss structure: the sha256 check refuses it.
  f = os.path.join(path, index.FAISS_FILE)
  raw = bytearray(open(f, "rb").read())
  raw[len(raw) // 2] ^= 0xFF
  open(f, "wb").write(bytes(raw))
  with pytest.raises(index.BadIndexError, match="faiss.index does not match its sha256"):
    index.Index.load(path)
  # A truncated structure whose sha256 was updated too (a bad writer): faiss cannot read it.
  open(f, "wb").write(bytes(raw[:100]))
  meta = json.loads(good_meta)
  meta["files"][index.FAISS_FILE] = index._sha256(f)
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(index.BadIndexError, match="cannot read faiss.index"):
    index.Index.load(path)


def test_missing_faiss_is_one_line_naming_the_fix(clustered, tmp_path):
  """With faiss not importable: the CLI refuses a faiss index (naming it and the install) before loading
  any model, and the library refuses to build one."""
  g, _, _ = clustered
  path = str(tmp_path / "idx")
  index.write_index(path, g[:50], np.arange(50), ["x"] * 50, fingerprint=FP, side="images", backend="faiss",
                    faiss_index="flat")
  blocker = tmp_path / "no_faiss" / "faiss"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('No module named faiss (hidden by the test)')\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]))
  out = subprocess.run([sys.executable, "launch/index.py", "query", f"--index={path}", f"--export={tmp_path}/none",
                        "--text=a dog"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: index {path} was built with --backend=faiss (flat)")
  assert "install faiss-cpu (pip install .[faiss]" in lines[0]
  sys.modules["faiss"] = None  # import faiss now raises ImportError in this process
  try:
    with pytest.raises(faiss_backend.FaissMissingError, match=r"needs faiss.*install faiss-cpu \(pip install \.\[faiss\]"):
      index.write_index(str(tmp_path / "new"), g[:5], np.arange(5), ["x"] * 5, fingerprint=FP, side="images",
                        backend="faiss", faiss_index="flat")
    with pytest.raises(index.BadIndexError, match="install faiss-cpu"):
      index.Index.load(path)
    assert not os.path.exists(tmp_path / "new")
  finally:
    sys.modules["faiss"] = faiss


def test_simd_level_names_the_loaded_code():
  info = faiss_backend.simd_info()
  assert info["level"] == faiss_backend.simd_level()
  assert info["version"] == faiss.__version__
  # The level is one faiss knows: a dispatched level of this build, or the loader's module suffix.
  if info["dynamic_dispatch"]:
    assert info["level"] == "generic" or info["level"] == faiss.SIMDConfig.get_level_name()
  else:
    assert info["module"].startswith("swigfaiss")
