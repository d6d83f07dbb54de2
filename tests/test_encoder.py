"""The Encoder's batching, sharding and API contracts on a tiny random export (parity is in test_parity).

Known answers: a row's embedding does not depend on the batch it was computed in (padding rows are masked
and dropped), one compile serves every batch, a device mesh gives the unsharded result, outputs are unit
norm float32. Tolerances: tests/tolerances.py.
"""
import jax
import numpy as np
import pytest

from vldeformer_jax.io import convert
from vldeformer_jax.io import export
from vldeformer_jax.model import inputs
from vldeformer_jax.retrieval.encoder import Encoder
from vldeformer_jax.model.config import ModelConfig
from model_helpers import embed_depth, logit_bounds, match_depth
from tolerances import ELEMENTARY, assert_bitwise, assert_f32

CFG = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  img_feature_dim=6, max_text_len=8, max_regions=4)
CAPTIONS = ["a dog on a couch", "two men riding horses on a beach at sunset with a red kite", "cat",
            "a plate of food", "people walking in the street", "a small boat", "kids playing football"]
TAGS = ["dog couch", "man horse beach kite", "cat", "plate food table", "person street car", "boat water",
        "child ball grass"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  params = convert.unflatten({
      k: (1.0 + 0.1 * rng.standard_normal(v.shape) if k.endswith("/scale") else 0.2 * rng.standard_normal(v.shape)
          ).astype(np.float32) for k, v in sorted(convert.expected_shapes(CFG).items())})
  path = str(tmp_path_factory.mktemp("enc") / "export")
  export.write_export(path, params, CFG, inputs.BUNDLED_VOCAB, metadata={"source": "test_encoder"})
  return path


@pytest.fixture(scope="module")
def enc(export_dir):
  return Encoder.load(export_dir, batch_size=4)


# Rule F32-PAIR for two float32 evaluations of the same rows (another batch position, another program):
# embeddings are unit vectors (scale 1); a match score sigmoid(margin) moves by at most a quarter of the
# margin's error, i.e. half of the logits' (scale: their bound from the classifier), plus its own rounding.
N_EMBED = embed_depth(CFG)
N_NORM = 2 * CFG.hidden_size + 4  # normalised in float32, then its norm in float32 again


def assert_same_scores(got, want, enc):
  assert_f32(got, want, n=match_depth(CFG) + ELEMENTARY + 3, scale=max(1.0, logit_bounds(enc.params)[0]), pair=True)


def regions(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(int(k), 6)).astype(np.float32) for k in rng.integers(0, 7, size=n)]


def test_load(enc, export_dir):
  assert enc.fingerprint == export.read_metadata(export_dir)["fingerprint"]
  assert enc.fingerprint == export.export_fingerprint(enc.params)
  assert enc.model_config == CFG and enc.embed_dim == 32
  bf = Encoder.load(export_dir, dtype="bfloat16")
  assert bf.model_config.dtype == "bfloat16"
  assert jax.tree.leaves(bf.params)[0].dtype == np.float32  # compute dtype only; parameters stay float32


def test_texts_independent_of_batching_one_compile(enc):
  full = enc.embed_texts(CAPTIONS)  # 7 rows in batches of 4: two batches, the second padded
  assert full.shape == (7, 32) and full.dtype == np.float32
  assert_f32(np.linalg.norm(full, axis=1), 1.0, n=N_NORM, scale=1.0)  # rule F32
  assert enc._embed._cache_size() == 1
  for i in (0, 1, 6):  # rule F32-PAIR: alone in its (padded) batch, the row sits at another position
    assert_f32(enc.embed_texts([CAPTIONS[i]]), full[i:i + 1], n=N_EMBED, scale=1.0, pair=True)
  x = inputs.text_inputs(enc.tokenizer, CAPTIONS, CFG.max_text_len)
  assert_bitwise(enc.embed_text_inputs(x), full)  # rule EXACT: the same inputs through the same program
  assert np.abs(full[0] - full[1]).max() > 0.1  # different captions, different embeddings
  assert enc.embed_texts([]).shape == (0, 32)


def test_images_independent_of_batching(enc):
  feats = regions(7)
  full = enc.embed_images(feats, TAGS)
  assert full.shape == (7, 32)
  assert_f32(np.linalg.norm(full, axis=1), 1.0, n=N_NORM, scale=1.0)  # rule F32
  for i in (0, 5):  # rule F32-PAIR: another batch position
    assert_f32(enc.embed_images(feats[i:i + 1], TAGS[i:i + 1]), full[i:i + 1], n=N_EMBED, scale=1.0, pair=True)
  x = enc.image_inputs(feats, TAGS)
  assert x["attention_mask"].shape == (7, 8 + 4) and x["img_feats"].shape == (7, 4, 6)
  assert_bitwise(enc.embed_image_inputs(x), full)  # rule EXACT
  with pytest.raises(ValueError, match="7 region feature arrays but 6 tag strings"):
    enc.embed_images(feats, TAGS[:6])


def test_match_scores(enc):
  feats = regions(7, seed=1)
  s = enc.match_scores(feats, TAGS, CAPTIONS)
  assert s.shape == (7,) and s.dtype == np.float32 and np.all((s > 0) & (s < 1))
  assert_same_scores(enc.match_scores(feats[2:3], TAGS[2:3], CAPTIONS[2:3]), s[2:3], enc)  # F32-PAIR: position
  with pytest.raises(ValueError, match="pairs need equal counts"):
    enc.match_scores(feats, TAGS, CAPTIONS[:3])


def test_mesh_sharding_matches_unsharded(enc, export_dir):
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharded = Encoder.load(export_dir, mesh=mesh, batch_size=5)
  assert sharded.batch_size == 8  # rounded up to a multiple of the data axis
  feats = regions(7, seed=2)
  # Rule F32-PAIR: the same rows through another program (8 devices, batches of 8).
  assert_f32(sharded.embed_texts(CAPTIONS), enc.embed_texts(CAPTIONS), n=N_EMBED, scale=1.0, pair=True)
  assert_f32(sharded.embed_images(feats, TAGS), enc.embed_images(feats, TAGS), n=N_EMBED, scale=1.0, pair=True)
  assert_same_scores(sharded.match_scores(feats, TAGS, CAPTIONS), enc.match_scores(feats, TAGS, CAPTIONS), enc)
  with pytest.raises(ValueError, match="no data axis 'data'"):
    Encoder.load(export_dir, mesh=jax.sharding.Mesh(np.array(devices), ("batch",)))
