"""Masked object classification (training/moc.py, docs/method.md §4.8): what is masked, the loss against a
float64 reference, and the pipeline's region labels. Tolerances: tests/tolerances.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax.data import pipeline
from vldeformer_jax.data import region_classes
from vldeformer_jax.model import inputs
from vldeformer_jax.model.inputs import pack_pairs
from vldeformer_jax.model.vldeformer import VLDeformer
from vldeformer_jax.training import early_interaction as ei
from vldeformer_jax.training import moc
from test_early_interaction import (LT, N_MLM, N_PAIR, R, V, ce_n, ce_scale, make_batch, train_config)
from tolerances import assert_f32, f32_bound, max_abs

MASK_ID = 103


def labelled_batch(n, seed):
  """A stage-1 toy batch whose region labels are non-zero on padding too (they must never be used there)
  and 0 on one real region of row 0 (an unknown class: never masked)."""
  batch = make_batch(n, seed=seed)
  rs = np.random.RandomState(seed + 100)
  labels = rs.randint(110, V, size=(n, R)).astype(np.int32)
  labels[0, 0] = region_classes.NO_LABEL
  # Make a few tag tokens carry the class words of their regions, and one caption token too: only the
  # tag copies may be masked.
  for i in range(n):
    n_tags = int(batch["image_attention_mask"][i, :LT].sum()) - 2
    for r in range(min(n_tags, R)):
      batch["image_input_ids"][i, 1 + r] = labels[i, r] if labels[i, r] else 150
  batch["text_input_ids"][1, 1] = labels[1, 0]
  batch["image_region_labels"] = labels
  return batch


def test_only_real_labelled_regions_are_masked_and_masked_inputs_are_exactly_zero():
  n = 64
  batch = labelled_batch(n, seed=4)
  text, image = ei.split_batch(batch)
  pairs = pack_pairs(text, image)
  labels = batch["image_region_labels"]
  real = np.asarray(batch["image_attention_mask"][:, LT:]) > 0
  eligible = real & (labels != region_classes.NO_LABEL)
  assert (~real).any() and (real & (labels == 0)).any()  # the toy batch has padding and an unknown class
  # Probability 1 masks exactly the eligible regions (EXACT: a comparison's outcome).
  every = np.asarray(moc.choose_masked_regions(jax.random.PRNGKey(0), moc.region_part(pairs), labels, 1.0))
  np.testing.assert_array_equal(every, eligible)
  masked = np.asarray(moc.choose_masked_regions(jax.random.PRNGKey(1), moc.region_part(pairs), labels, 0.15))
  assert not (masked & ~eligible).any() and masked.any()
  assert abs(masked.sum() / eligible.sum() - 0.15) < 0.06  # ~15% of the eligible regions (n * R draws)
  out = jax.tree.map(np.asarray, moc.mask_pairs(pairs, jnp.asarray(masked), labels, mask_tags=True,
                                                mask_token_id=MASK_ID))
  feats = np.asarray(pairs["img_feats"])
  assert np.all(out["img_feats"][masked] == 0.0)  # EXACT
  np.testing.assert_array_equal(out["img_feats"][~masked], feats[~masked])
  # Tag tokens naming a masked region's class are [MASK]; nothing else changes (captions included).
  ids = np.asarray(pairs["input_ids"])
  is_tag = (np.asarray(pairs["token_type_ids"]) == 1) & (np.asarray(pairs["attention_mask"])[:, :ids.shape[1]] > 0)
  want = ids.copy()
  for i in range(n):
    for r in np.nonzero(masked[i])[0]:
      want[i, is_tag[i] & (ids[i] == labels[i, r])] = MASK_ID
  np.testing.assert_array_equal(out["input_ids"], want)
  assert (want != ids).any()
  off = moc.mask_pairs(pairs, jnp.asarray(masked), labels, mask_tags=False, mask_token_id=MASK_ID)
  np.testing.assert_array_equal(np.asarray(off["input_ids"]), ids)


@pytest.fixture(scope="module")
def model_and_params():
  from test_early_interaction import tiny_config
  from vldeformer_jax.model.vldeformer import init_params
  cfg = tiny_config()
  return VLDeformer(cfg), jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))


def test_moc_loss_matches_float64_reference_over_masked_real_regions_only(model_and_params):
  model, params = model_and_params
  n = 6
  batch = labelled_batch(n, seed=5)
  cfg = train_config(moc_weight=0.5, moc_probability=0.5, rank_weight=0.0, itc_weight=0.0)
  cfg.loss.mlm_weight = 0.0
  rng = jax.random.PRNGKey(2)
  loss, m = jax.jit(lambda b, r: ei.early_interaction_loss(model, params, b, r, cfg))(batch, rng)
  # The masked set the term drew (same keys), checked, then the reference built from it in numpy.
  r_mask = jax.random.split(rng, 5)[2]
  r_choose = jax.random.split(jax.random.fold_in(r_mask, 7), 3)[0]
  text, image = ei.split_batch(batch)
  pairs = jax.tree.map(np.asarray, pack_pairs(text, image))
  labels = batch["image_region_labels"]
  masked = np.asarray(moc.choose_masked_regions(r_choose, moc.region_part(pairs), labels, 0.5))
  real = np.asarray(batch["image_attention_mask"][:, LT:]) > 0
  assert masked.sum() >= 2 and not (masked & ~(real & (labels != 0))).any()
  ids = pairs["input_ids"].copy()
  feats = pairs["img_feats"].copy()
  for i, r in zip(*np.nonzero(masked)):
    feats[i, r] = 0.0
    ids[i, (pairs["token_type_ids"][i] == 1) & (pairs["input_ids"][i] == labels[i, r])] = MASK_ID
  h, _ = model.apply({"params": params}, ids, pairs["token_type_ids"], pairs["attention_mask"], feats,
                     method=VLDeformer.encode)
  logits = np.asarray(model.apply({"params": params}, h[:, ids.shape[1]:], method=VLDeformer.mlm_logits),
                      np.float64)  # [n, R, V]: every region slot, padding included
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, labels[..., None].astype(np.int64), -1)[..., 0]
  ref = nll[masked].mean()
  # Another program runs the same float32 forward (rule F32-PAIR), the reference's loss is float64.
  n_moc, scale = N_PAIR + N_MLM + ce_n(V, masked.size), ce_scale(max_abs(logits), V)
  assert_f32(m["moc_loss"], ref, n=n_moc, scale=scale, pair=True)
  assert float(m["moc_masked"]) == masked.sum()  # EXACT: a count
  # The test tells: averaging over every real region, or over every slot (padding too), gives another value.
  bound = f32_bound(n_moc, scale, pair=True)
  assert abs(nll[real].mean() - ref) > 2 * bound and abs(nll.mean() - ref) > 2 * bound
  assert_f32(loss, float(m["itm_loss"]) + 0.5 * ref, n=n_moc + 1, scale=scale + abs(float(m["itm_loss"])), pair=True)


def test_pipeline_region_labels_and_old_records():
  tok = inputs.load_tokenizer()
  rs = np.random.RandomState(0)
  records = [{"image_id": i, "features": rs.randn(k, 6).astype(np.float32), "tags": " ".join(c),
              "captions": [f"a photo {i}"], "region_classes": c}
             for i, (k, c) in enumerate([(3, ["dog", "tennis racket", "cup"]), (2, ["bus", "cat"]),
                                         (4, ["man", "hat", "kite", "bag"]), (1, ["apple"])])]
  builder = pipeline.BatchBuilder(records, tokenizer=tok, global_batch_size=4, seed=0, max_text_len=8,
                                  max_regions=3, feature_dim=6, num_captions_per_image=1, negatives_per_pair=0,
                                  replace_ratio=0.0, process_index=0, process_count=1, region_labels=True)
  batch = builder(0)
  # A class is the first wordpiece of its last word: "tennis racket" -> "rack" (of "rack ##et").
  piece = {"dog": "dog", "tennis racket": "rack", "cup": "cup", "bus": "bus", "cat": "cat", "man": "man",
           "hat": "hat", "kite": "kite", "apple": "apple"}
  for row, image_id in enumerate(batch["image_id"]):
    classes = records[int(image_id)]["region_classes"][:3]
    want = [tok.convert_tokens_to_ids(piece[c]) for c in classes] + [0] * (3 - len(classes))
    assert region_classes.NO_LABEL not in want[:len(classes)] and tok.unk_token_id not in want
    np.testing.assert_array_equal(batch["image_region_labels"][row], want)
    np.testing.assert_array_equal(batch["image_region_labels"][row] > 0, batch["image_attention_mask"][row, 8:] > 0)
  old = [{k: v for k, v in r.items() if k != "region_classes"} for r in records]
  builder_old = pipeline.BatchBuilder(old, tokenizer=tok, global_batch_size=4, seed=0, max_text_len=8,
                                      max_regions=3, feature_dim=6, num_captions_per_image=1, negatives_per_pair=0,
                                      replace_ratio=0.0, process_index=0, process_count=1, region_labels=True)
  with pytest.raises(region_classes.MissingRegionClassesError, match="prepared before per-region detector classes"):
    builder_old(0)
  plain = pipeline.BatchBuilder(old, tokenizer=tok, global_batch_size=4, seed=0, max_text_len=8, max_regions=3,
                                feature_dim=6, num_captions_per_image=1, negatives_per_pair=0, replace_ratio=0.0,
                                process_index=0, process_count=1)
  assert "image_region_labels" not in plain(0)  # old datasets stay readable without MOC


def test_moc_config_validates_and_old_datasets_are_refused_with_one_line():
  from repo_configs import get_config
  from vldeformer_jax.training import config_checks, data_checks
  from vldeformer_jax.training.setup import Data
  c = get_config("demo_moc")
  assert c.early_interaction.moc_weight == 1.0 and moc.wants_region_labels(c)
  assert config_checks.validate(c, device_count=1, process_count=1) == []
  old = [{"image_id": 1, "features": np.zeros((2, 4), np.float32), "tags": b"dog", "captions": [b"a dog"]}]
  errors = data_checks._region_class_errors(c, Data(train=old, eval=None, feature_dim=4, data_dir="/d"))
  assert len(errors) == 1 and errors[0].startswith("config.early_interaction.moc_weight: masked object")
  assert data_checks._region_class_errors(c, Data(train=[dict(old[0], region_classes=[b"dog"])], eval=None,
                                                    feature_dim=4, data_dir="/d")) == []
  bad = get_config("demo_moc")
  bad.early_interaction.moc_probability = 0.0
  assert any("moc_probability must be in (0, 1]" in e for e in config_checks.validate(bad, device_count=1, process_count=1))


def test_demo_corpus_records_carry_region_classes():
  """Stage 1 of the demo reads the generated corpus: one class per region, in region order (the tags)."""
  from vldeformer_jax.data import demo_world
  corpus = demo_world.CorpusSource(8, seed=1, world_seed=0)
  for i in range(8):
    rec = corpus[i]
    assert rec["region_classes"] == rec["tags"].split() and len(rec["region_classes"]) == len(rec["features"])
