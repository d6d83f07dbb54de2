"""Search and the persistent index: exact top-k equals brute force (chunked, blocked, 8 devices), compact
codes score what they claim, and an index round trip answers like fresh embeddings; bad indexes are refused.
Tolerances: tests/tolerances.py (float32 scores against float64 brute force by rule F32; rankings compared
exactly only where the float64 scores they depend on are further apart than the rounding can move them)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vldeformer_jax.io import export

from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import index, index_build, index_query, search
from model_helpers import embed_depth, tiny_params
from tolerances import assert_f32, assert_within, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_text_len=16,
            max_regions=6)


def brute_topk(q, g, k):
  """Stable descending argsort of the full score matrix (ties by ascending index)."""
  s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, idx, axis=1), idx


def dot_scale(q, g, idx=None):
  """sum_k |q_k g_k| of each score (of the columns `idx`): the magnitude of a dot product's terms."""
  s = np.abs(np.asarray(q, np.float64)) @ np.abs(np.asarray(g, np.float64)).T
  return s if idx is None else np.take_along_axis(s, idx, axis=1)


def assert_ranking_decided(scores, k, bound, boundary_only=False):
  """In each row the k + 1 best float64 scores (or only the k-th and the (k+1)-th) are more than 2 * bound
  apart: float32 scores within `bound` of them keep that order, so the top-k indices are exact."""
  top = -np.sort(-np.asarray(scores, np.float64), axis=1)[:, :k + 1]
  gaps = top[:, k - 1] - top[:, k] if boundary_only else -np.diff(top, axis=1)
  bound = np.broadcast_to(np.asarray(bound, np.float64), (len(top),))
  assert np.all(gaps.reshape(len(top), -1).min(1) > 2 * bound), (gaps.min(), bound.max())


def ref_scores(q, g):
  return np.asarray(q, np.float64) @ np.asarray(g, np.float64).T


def mesh8():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))


@pytest.mark.parametrize("chunk,block,use_mesh", [(4096, 1 << 18, False), (7, 20, False), (5, 80, True)])
def test_exact_topk_equals_brute_force(chunk, block, use_mesh):
  rng = np.random.default_rng(0)
  g = rng.normal(size=(203, 24)).astype(np.float32)  # not a multiple of any chunk: padding is masked
  q = rng.normal(size=(11, 24)).astype(np.float32)
  top = search.exact_topk(q, g, 10, chunk_size=chunk, block_rows=block, query_batch=4,
                          mesh=mesh8() if use_mesh else None)
  ref_s, ref_i = brute_topk(q, g, 10)
  # Rule F32: 24-term float32 dot products; the ranking is decided by more than their bound.
  assert_ranking_decided(ref_scores(q, g), 10, gamma(24) * dot_scale(q, g).max(1))
  np.testing.assert_array_equal(top.indices, ref_i)
  assert_f32(top.scores, ref_s, n=24, scale=dot_scale(q, g, ref_i))


@pytest.mark.parametrize("use_mesh", [False, True])
def test_ties_are_broken_by_index_across_chunks_and_devices(use_mesh):
  # Integer-valued rows: many exactly equal scores, spread over chunks and devices.
  rng = np.random.default_rng(1)
  g = rng.integers(-1, 2, size=(96, 4)).astype(np.float32)
  q = rng.integers(-1, 2, size=(6, 4)).astype(np.float32)
  top = search.exact_topk(q, g, 17, chunk_size=3, mesh=mesh8() if use_mesh else None)
  ref_s, ref_i = brute_topk(q, g, 17)
  np.testing.assert_array_equal(top.indices, ref_i)
  np.testing.assert_array_equal(top.scores, ref_s)


@pytest.mark.parametrize("values", ["random", "ties"])
def test_two_stage_chunk_topk_equals_full_top_k(values):
  """The block-maxima top-k returns what one lax.top_k over the chunk does, ties included (the true top-k
  straddling blocks, several equal block maxima, -inf padding columns)."""
  rng = np.random.default_rng(3)
  if values == "random":
    s = rng.normal(size=(64, 4096)).astype(np.float32)
  else:
    s = rng.integers(0, 4, size=(64, 4096)).astype(np.float32)  # ~1000 columns tie at the maximum
  s[:, -300:] = -np.inf
  s[0, 5:15] = 9.0  # a row whose top-k sits in one block
  # A tie at the k-th place between a block with a larger maximum and an earlier one: the earlier column
  # must win, although its block ranks second by maximum.
  s[1, :] = -1.0
  s[1, 0], s[1, 256], s[1, 257] = 3.0, 9.0, 3.0
  for k in (1, 10, 15):
    got_v, got_i = jax.jit(search._chunk_topk, static_argnums=1)(s, k)
    ref_i = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(got_i), ref_i)
    np.testing.assert_array_equal(np.asarray(got_v), np.take_along_axis(s, ref_i, axis=1))


@pytest.mark.parametrize("use_mesh", [False, True])
def test_exact_topk_with_two_stage_chunks_equals_brute_force(use_mesh):
  # Chunks of 1024 columns (8 blocks of 128 > 2k): the two-stage path, with ties across chunks, blocks
  # and devices, a partial last block and a padded tail.
  rng = np.random.default_rng(4)
  g = rng.integers(-2, 3, size=(20000, 6)).astype(np.float32)
  q = rng.integers(-2, 3, size=(9, 6)).astype(np.float32)
  top = search.exact_topk(q, g, 3, chunk_size=1024, block_rows=8192, mesh=mesh8() if use_mesh else None)
  ref_s, ref_i = brute_topk(q, g, 3)
  np.testing.assert_array_equal(top.indices, ref_i)
  np.testing.assert_array_equal(top.scores, ref_s)


def test_k_larger_than_gallery_pads_with_minus_one():
  g = np.eye(3, dtype=np.float32)
  top = search.exact_topk(np.array([[0.0, 1.0, 0.5]], np.float32), g, 5, chunk_size=2)
  np.testing.assert_array_equal(top.indices, [[1, 2, 0, -1, -1]])
  assert np.isneginf(top.scores[0, 3:]).all()


@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_compact_codes_score_as_documented(kind):
  rng = np.random.default_rng(2)
  g = rng.normal(size=(150, 20)).astype(np.float32)
  q = rng.normal(size=(5, 20)).astype(np.float32)
  if kind == "int8":
    codes, scales = search.quantize_int8(g)
    # Half a quantisation step, plus the float32 rounding of encoding (x / scale * 127: 2 operations) and
    # decoding (2 operations) relative to the row's scale (rule F32).
    decode_err = np.abs(codes.astype(np.float32) * scales[:, None] / 127 - g)
    assert_within(decode_err, 0.0, scales[:, None] * (0.5 / 127 + gamma(4)), rule="quantisation + rule F32")
    decoded, qq = codes.astype(np.float64) * scales[:, None] / 127.0, q
  else:
    codes, scales = search.pack_signs(g), None
    assert codes.shape == (150, 3) and codes.dtype == np.uint8
    decoded, qq = np.where(g >= 0, 1.0, -1.0), np.where(q >= 0, 1.0, -1.0)
  top = search.search_codes(q, codes, 8, kind=kind, scales=scales, dim=20, chunk_size=16, mesh=mesh8())
  ref_s, ref_i = brute_topk(qq, decoded, 8)
  if kind == "binary":  # integer scores (rule EXACT: sums of +-1), ties by index
    np.testing.assert_array_equal(top.scores, ref_s)
    np.testing.assert_array_equal(top.indices, ref_i)
  else:  # rule F32: a 20-term dot product with the codes, times scale / 127
    assert_f32(top.scores, ref_s, n=20 + 3, scale=dot_scale(qq, decoded, ref_i))
  # Re-scoring a shortlist that is the whole gallery gives the exact float answer (rule F32 for the
  # 20-term float32 scores, the ranking decided by more than that).
  full = search.search_codes(q, codes, 150, kind=kind, scales=scales, dim=20)
  exact = search.rescore(q, g, full.indices, 10)
  assert_ranking_decided(ref_scores(q, g), 10, gamma(20) * dot_scale(q, g).max(1))
  np.testing.assert_array_equal(exact.indices, brute_topk(q, g, 10)[1])


def test_compact_recall_cost_is_measured():
  # Clustered unit vectors (like embeddings): recall@10 of the compact scan alone and after re-scoring.
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(20, 64))
  g = centres[rng.integers(0, 20, 2000)] + 0.7 * rng.normal(size=(2000, 64))
  g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
  q = g[rng.integers(0, 2000, 50)] + 0.1 * rng.normal(size=(50, 64)).astype(np.float32)
  exact = search.exact_topk(q, g, 10).indices
  report = search.compact_recall(q, g, 10, rescore_factor=10)
  # Rule EXACT: per query, re-scoring keeps every exact top-10 row of the shortlist, which holds the codes'
  # top 10, so its hit count is never lower; the recalls are mean(hits) / k by one formula, and rounding
  # is monotone. That needs the float32 scores of exact_topk and rescore to agree on each query's top-10
  # set: decided by more than the bound of a 64-term dot product.
  assert_ranking_decided(ref_scores(q, g), 10, gamma(64) * dot_scale(q, g).max(1),
                         boundary_only=True)
  assert report["int8"]["recall@10_rescored"] >= report["int8"]["recall@10_codes_only"]
  assert report["binary"]["recall@10_rescored"] >= report["binary"]["recall@10_codes_only"]
  assert report["int8"]["recall@10_rescored"] > 0.95  # int8 keeps the ranking almost intact
  # Consistency with a direct computation.
  codes, scales = search.quantize_int8(g)
  short = search.search_codes(q, codes, 100, kind="int8", scales=scales).indices
  assert report["int8"]["recall@10_rescored"] == search.recall_vs_exact(search.rescore(q, g, short, 10).indices,
                                                                        exact)


# ------------------------------------------------------------------------------------------------------
# Index round trip with a tiny exported model.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from vldeformer_jax.data import demo_world as demo
  d = tmp_path_factory.mktemp("index")
  cfg = ModelConfig(**TINY)
  export.write_export(str(d / "export"), tiny_params(cfg, 0), cfg, inputs.BUNDLED_VOCAB)
  export.write_export(str(d / "other"), tiny_params(cfg, 1), cfg, inputs.BUNDLED_VOCAB)
  name = demo.prepare_demo(str(d / "data"), seed=0, num_train=4, num_test=20)
  return d, name


def test_index_round_trip_matches_fresh_embeddings(tiny):
  from vldeformer_jax.data import prepare
  d, name = tiny
  enc = Encoder.load(str(d / "export"), batch_size=8)
  src = prepare.load_split(str(d / "data"), name, "test")
  recs = [src[i] for i in range(len(src))]
  meta = index_build.build_index(enc, src, str(d / "img_idx"), side="images", compact="int8")
  index_build.build_index(enc, src, str(d / "cap_idx"), side="captions")
  assert meta["num"] == 20 and meta["fingerprint"] == enc.fingerprint
  # Fresh embeddings, computed independently of the index code.
  img = enc.embed_images([np.asarray(r["features"]) for r in recs], [r["tags"] for r in recs])
  caps = [c.decode() for r in recs for c in r["captions"]]
  txt = enc.embed_texts(caps)
  idx_img, idx_cap = index.Index.load(str(d / "img_idx")), index.Index.load(str(d / "cap_idx"))
  # Rule F32-PAIR: the index embedded the same rows in its own batches (unit vectors, scale 1).
  cfg = enc.model_config
  assert_f32(idx_img.embeddings, img, n=embed_depth(cfg), scale=1.0, pair=True)
  assert_f32(idx_cap.embeddings, txt, n=embed_depth(cfg), scale=1.0, pair=True)
  # Searches against float64 brute force over the stored embeddings, with the query embedded as
  # query_index embeds it (the same call: bitwise the same): rule F32 for a dot product of unit vectors
  # (scale 1), and rankings decided by more than that.
  bound = gamma(cfg.embed_dim + 2)
  # text -> images (exact scan and compact scan + float re-scoring), image -> captions
  q = "a small red car to the left of a dog"
  qe = enc.embed_texts([q])
  for exact in (True, None):
    rows = index_query.query_index(idx_img, enc, text=q, k=7, exact=exact)
    ref_s, ref_i = brute_topk(qe, idx_img.embeddings, 7)
    assert_ranking_decided(ref_scores(qe, idx_img.embeddings), 7, bound)
    assert [r["image_id"] for r in rows] == [int(recs[i]["image_id"]) for i in ref_i[0]]
    assert_f32([r["score"] for r in rows], ref_s[0], n=cfg.embed_dim + 2, scale=1.0)
  rows = index_query.query_index(idx_cap, enc, image_record=recs[3], k=10)
  qi = enc.embed_images([np.asarray(recs[3]["features"], np.float32)], [recs[3]["tags"].decode()])
  ref_s, ref_i = brute_topk(qi, idx_cap.embeddings, 10)
  assert_ranking_decided(ref_scores(qi, idx_cap.embeddings), 10, bound)
  assert [r["text"] for r in rows] == [caps[i] for i in ref_i[0]]
  # 8-device sharded search over the stored index gives the same answer.
  top = idx_cap.search(img[3:4], 10, mesh=mesh8())
  ref_s, ref_i = brute_topk(img[3:4], idx_cap.embeddings, 10)
  assert_ranking_decided(ref_scores(img[3:4], idx_cap.embeddings), 10, bound)
  np.testing.assert_array_equal(top.indices[0], ref_i[0])


def test_foreign_stale_and_corrupt_indexes_are_refused(tiny, tmp_path):
  d, _ = tiny
  enc = Encoder.load(str(d / "export"))
  other = Encoder.load(str(d / "other"))
  emb = enc.embed_texts(["a dog", "a cat", "a red car"])
  path = str(tmp_path / "idx")
  index.write_index(path, emb, [1, 2, 3], ["a dog", "a cat", "a red car"], fingerprint=enc.fingerprint,
                    side="captions")
  with pytest.raises(FileExistsError, match="already exists"):
    index.write_index(path, emb, [1, 2, 3], ["x"] * 3, fingerprint=enc.fingerprint, side="captions")
  ix = index.Index.load(path)
  with pytest.raises(index.BadIndexError, match="built by the export with fingerprint .* another space"):
    index_query.query_index(ix, other, text="a dog", export="export OTHER")
  # corrupt: one byte of the embeddings changed
  raw = bytearray(open(os.path.join(path, "embeddings.npy"), "rb").read())
  raw[-1] ^= 0xFF
  open(os.path.join(path, "embeddings.npy"), "wb").write(bytes(raw))
  with pytest.raises(index.BadIndexError, match="embeddings.npy does not match its sha256"):
    index.Index.load(path)
  # texts.json truncated, loaded without re-hashing: one line naming the file, not a raw JSONDecodeError
  open(os.path.join(path, "texts.json"), "w").write('["a dog", "a c')
  with pytest.raises(index.BadIndexError, match=r"texts\.json: malformed JSON"):
    index.Index.load(path, verify=False)
  # stale format version
  meta = json.load(open(os.path.join(path, index.META)))
  meta["version"] = 0
  json.dump(meta, open(os.path.join(path, index.META), "w"))
  with pytest.raises(index.BadIndexError, match="version 0 is stale"):
    index.Index.load(path)
  os.remove(os.path.join(path, index.META))
  with pytest.raises(index.BadIndexError, match="missing meta.json"):
    index.Index.load(path)
  with pytest.raises(index.BadIndexError, match="index not found"):
    index.Index.load(str(tmp_path / "nope"))


def test_cli_build_query_and_refusal(tiny):
  d, name = tiny
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  common = [f"--export={d / 'export'}", f"--index={d / 'cli_idx'}"]
  build = subprocess.run([sys.executable, "launch/index.py", "build", *common, f"--data_dir={d / 'data'}",
                          f"--dataset={name}", "--split=test", "--side=captions", "--compact=binary"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert build.returncode == 0, build.stderr[-2000:]
  assert "wrote index" in build.stdout and "100 captions" in build.stdout
  from vldeformer_jax.data import prepare
  image_id = int(prepare.load_split(str(d / "data"), name, "test")[3]["image_id"])
  query = subprocess.run([sys.executable, "launch/index.py", "query", *common, f"--image_id={image_id}", "--k=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert query.returncode == 0, query.stderr[-2000:]
  lines = query.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[0].lstrip().startswith("1")
  foreign = subprocess.run([sys.executable, "launch/index.py", "query", f"--export={d / 'other'}",
                            f"--index={d / 'cli_idx'}", "--text=a dog"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert foreign.returncode == 1
  assert "error: index" in foreign.stderr and "another space" in foreign.stderr
  mixed = subprocess.run([sys.executable, "launch/index.py", "query", *common, "--text=a dog", "--compact=int8",
                          "--side=images"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert mixed.returncode == 2 and mixed.stderr.strip().splitlines()[-1] == (
      "usage error: --side, --compact: not a `query` option (see launch/index.py's docstring)"), mixed.stderr
