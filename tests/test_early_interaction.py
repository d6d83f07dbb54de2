"""Stage-1 objective: pair construction against pack_pairs, the BERT masking rule, hard negatives, sharded
equality and that a few optimiser steps lower both losses on a toy batch. Tolerances: tests/tolerances.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vldeformer_jax.training import early_interaction as ei
from vldeformer_jax.model.inputs import IMAGE_KEYS, TEXT_KEYS, pack_pairs
from vldeformer_jax.model.vldeformer import VLDeformer, init_params
from vldeformer_jax.model.config import ModelConfig
from model_helpers import logit_bounds
from tolerances import ELEMENTARY, assert_f32, max_abs, transformer_depth

LT, R, F, V = 8, 4, 6, 200
H = 32
# Rule F32 chain lengths of tiny_config(): one forward over a packed pair (2 LT tokens + R regions) or over
# one modality (LT tag tokens + R regions at most), the heads on top of it, and the losses.
N_PAIR = transformer_depth(hidden=H, intermediate=64, layers=2, heads=4, seq_len=2 * LT + R)
N_SINGLE = transformer_depth(hidden=H, intermediate=64, layers=2, heads=4, seq_len=LT + R, pooling_len=LT + R)
N_ITM = (H + 2 + ELEMENTARY) + (H + 1)  # pooler dense + tanh, classifier dense
N_MLM = (H + 2) + (1 + ELEMENTARY + 2) + (2 * H + ELEMENTARY + 4) + (H + 1)  # dense, GELU, LayerNorm, tied decoder


def ce_n(classes, rows):
  """Rule F32 chain of a mean cross-entropy: logsumexp over `classes` (exp, log), minus the label's logit,
  a (weighted) mean over `rows`."""
  return classes + 2 * ELEMENTARY + 3 + 2 * rows


def ce_scale(max_logit, classes):
  """Magnitude of the terms of a cross-entropy: logsumexp <= max|z| + log C and the label's logit <= max|z|
  (and a logit error e moves a row's cross-entropy by at most 2 e)."""
  return 2 * max_logit + np.log(classes)


def tiny_config(**kw):
  base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=32, img_feature_dim=F, max_text_len=LT, max_regions=R,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  base.update(kw)
  return ModelConfig(**base)


def make_batch(n, seed=0, k_neg=0, aligned=False):
  rs = np.random.RandomState(seed)

  def segment(rows, token_type):
    ids = np.zeros((rows, LT), np.int32)
    mask = np.zeros((rows, LT), np.int32)
    for i in range(rows):
      m = rs.randint(1, LT - 1)
      ids[i, :m + 2] = [101] + list(rs.randint(110, V, size=m)) + [102]
      mask[i, :m + 2] = 1
    return ids, mask * token_type, mask

  def pieces(rows):
    t_ids, t_tt, t_mask = segment(rows, 0)
    g_ids, g_tt, g_mask = segment(rows, 1)
    if aligned:  # the tags name the caption's words: matching is learnable from the tokens alone
      g_ids, g_tt, g_mask = t_ids.copy(), t_mask.copy(), t_mask.copy()
    regions = (np.arange(R)[None, :] < rs.randint(1, R + 1, size=(rows, 1))).astype(np.int32)
    feats = rs.randn(rows, R, F).astype(np.float32) * regions[..., None]
    text = {"input_ids": t_ids, "token_type_ids": t_tt, "attention_mask": t_mask}
    image = {"input_ids": g_ids, "token_type_ids": g_tt, "attention_mask": np.concatenate([g_mask, regions], 1),
             "img_feats": feats}
    return text, image

  text, image = pieces(n)
  batch = {f"text_{k}": v for k, v in text.items()}
  batch.update({f"image_{k}": v for k, v in image.items()})
  batch["image_id"] = np.arange(n, dtype=np.int64) + 1000
  if k_neg:
    nt, ni = pieces(n * k_neg)
    batch.update({f"neg_text_{k}": v.reshape((n, k_neg) + v.shape[1:]) for k, v in nt.items()})
    batch.update({f"neg_image_{k}": v.reshape((n, k_neg) + v.shape[1:]) for k, v in ni.items()})
  return batch


def train_config(**ei_fields):
  c = ml_collections.ConfigDict()
  c.early_interaction = ml_collections.ConfigDict(dict(ei.DEFAULTS, **ei_fields))
  c.loss = ml_collections.ConfigDict({"mlm_weight": 1.0})
  return c


def rows(d, idx):
  return {k: np.asarray(v)[np.asarray(idx)] for k, v in d.items()}


@pytest.fixture(scope="module")
def model_and_params():
  cfg = tiny_config()
  return VLDeformer(cfg), jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))


def test_random_pairs_match_pack_pairs(model_and_params):
  model, params = model_and_params
  n, k, kc = 6, 2, 1
  batch = make_batch(n, k_neg=kc)
  opts = ei.options(train_config(num_negatives=k))
  rng = jax.random.PRNGKey(3)
  pairs, labels = jax.jit(lambda b, r: ei.build_match_pairs(model, params, b, r, opts))(batch, rng)
  r_img, r_txt = jax.random.split(rng)
  img_j = np.asarray(ei.random_others(r_img, n, k))
  txt_j = np.asarray(ei.random_others(r_txt, n, k))
  assert np.all(img_j != np.arange(n)[:, None]) and np.all(txt_j != np.arange(n)[:, None])
  text, image = ei.split_batch(batch)
  ntext, nimage = (ei.flatten_k(d) for d in ei.split_batch(batch, "neg_"))
  anchors = np.repeat(np.arange(n), k)
  expected_t = [text, rows(text, anchors), rows(text, txt_j.reshape(-1)),
                rows(text, np.repeat(np.arange(n), kc)), ntext]
  expected_i = [image, rows(image, img_j.reshape(-1)), rows(image, anchors),
                nimage, rows(image, np.repeat(np.arange(n), kc))]
  expected = pack_pairs({k_: np.concatenate([np.asarray(d[k_]) for d in expected_t]) for k_ in TEXT_KEYS},
                        {k_: np.concatenate([np.asarray(d[k_]) for d in expected_i]) for k_ in IMAGE_KEYS})
  assert pairs["input_ids"].shape[0] == n * (1 + 2 * k + 2 * kc)
  for key in IMAGE_KEYS:
    np.testing.assert_array_equal(np.asarray(pairs[key]), np.asarray(expected[key]), err_msg=key)
  np.testing.assert_array_equal(np.asarray(labels), (np.arange(len(labels)) < n).astype(np.int32))
  # Switched off, the composed negatives are not used.
  opts_off = dict(opts, composed_negatives=False)
  pairs_off = jax.eval_shape(lambda b, r: ei.build_match_pairs(model, params, b, r, opts_off)[0], batch, rng)
  assert pairs_off["input_ids"].shape[0] == n * (1 + 2 * k)


def test_hard_negatives_by_embedding_and_match_score(model_and_params):
  model, params = model_and_params
  n = 8
  batch = make_batch(n, seed=1)
  batch["image_id"][3] = batch["image_id"][5]  # two rows of one image: never each other's negative
  text, image = ei.split_batch(batch)
  embed = jax.jit(lambda *a: model.apply({"params": params}, *a, method=VLDeformer.embed))
  t = np.asarray(embed(*[text[x] for x in TEXT_KEYS]))
  v = np.asarray(embed(*[image[x] for x in IMAGE_KEYS]))
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  sim = t @ v.T
  same = np.eye(n, dtype=bool)
  same[3, 5] = same[5, 3] = True
  sim[same] = -np.inf
  img_for_text, text_for_img = jax.jit(lambda t_, i_, s_: ei.hard_by_embedding(model, params, t_, i_, s_, 1))(
      text, image, jnp.asarray(same))
  np.testing.assert_array_equal(np.asarray(img_for_text)[:, 0], sim.argmax(1))
  np.testing.assert_array_equal(np.asarray(text_for_img)[:, 0], sim.argmax(0))

  rng = jax.random.PRNGKey(7)
  got_img, got_txt = jax.jit(
      lambda t_, i_, s_, r_: ei.hard_by_match_score(model, params, t_, i_, s_, 1, 4, r_))(
          text, image, jnp.asarray(same), rng)
  r_img, _ = jax.random.split(rng)
  cand = np.asarray(ei.random_others(r_img, n, 4))
  # Reference: score every (caption i, candidate image) pair, one pair per row, and take the best.
  p = pack_pairs(rows(text, np.repeat(np.arange(n), 4)), rows(image, cand.reshape(-1)))
  scores = np.array(jax.jit(lambda p_: ei.match_score_logit(model, params, p_))(p)).reshape(n, 4)
  scores[same[np.arange(n)[:, None], cand]] = -np.inf
  np.testing.assert_array_equal(np.asarray(got_img)[:, 0], cand[np.arange(n), scores.argmax(1)])
  assert not same[np.arange(n), np.asarray(got_txt)[:, 0]].any()


def test_hard_fraction_mixes_hard_and_random_negatives(model_and_params):
  model, params = model_and_params
  n, k = 16, 2
  batch = make_batch(n, seed=2)
  rng = jax.random.PRNGKey(5)

  def image_rows(negatives, fraction):  # which image each (caption i, negative image) pair uses
    opts = ei.options(train_config(num_negatives=k, negatives=negatives, hard_fraction=fraction))
    pairs, _ = jax.jit(lambda b, r: ei.build_match_pairs(model, params, b, r, opts))(batch, rng)
    feats = np.asarray(pairs["img_feats"][n:n + n * k]).reshape(n, k, -1)
    own = np.asarray(batch["image_img_feats"]).reshape(n, -1)
    return np.array([[int(np.flatnonzero((own == f).all(1))[0]) for f in row] for row in feats])

  rand, hard = image_rows("random", 1.0), image_rows("hard_embed", 1.0)
  np.testing.assert_array_equal(image_rows("hard_embed", 0.0), rand)
  mixed = image_rows("hard_embed", 0.5)
  from_hard, from_rand = mixed == hard, mixed == rand
  assert np.all(from_hard | from_rand)
  assert (from_hard & ~from_rand).any() and (from_rand & ~from_hard).any()  # both kinds occur
  with pytest.raises(ValueError, match="hard_fraction"):
    ei.options(train_config(hard_fraction=1.5))


def test_ranking_loss_is_a_softmax_over_each_positives_candidates(model_and_params):
  n, k = 4, 2
  logits = np.random.default_rng(0).normal(size=(n * (1 + 2 * k), 2)).astype(np.float32)
  margin = (logits[:, 1] - logits[:, 0]).astype(np.float64)
  pos = margin[:n]
  ref = 0.0
  for block in (margin[n:n + n * k].reshape(n, k), margin[n + n * k:].reshape(n, k)):  # other images, captions
    cand = np.concatenate([pos[:, None], block], axis=1)
    ref += 0.5 * np.mean(np.log(np.exp(cand).sum(1)) - pos)
  # Rule F32 against float64: the margin, a (1 + k)-way cross-entropy over n rows, two directions.
  assert_f32(ei.ranking_loss(jnp.asarray(logits), n, k), ref, n=1 + ce_n(1 + k, n) + 2,
             scale=ce_scale(max_abs(margin), 1 + k))
  # In the objective: added with its weight to the other terms.
  model, params = model_and_params
  batch = make_batch(5, seed=4)
  cfg = train_config(rank_weight=0.5)
  loss, m = jax.jit(lambda b, r: ei.early_interaction_loss(model, params, b, r, cfg))(batch, jax.random.PRNGKey(2))
  extra = float(m["mlm_loss"]) if "mlm_loss" in m else 0.0
  # Rule F32: the float32 sum of these float32 terms (a product and two additions) against the float64 sum.
  assert_f32(loss, float(m["itm_loss"]) + 0.5 * float(m["rank_loss"]) + extra, n=3,
             scale=abs(float(m["itm_loss"])) + 0.5 * abs(float(m["rank_loss"])) + abs(extra))


def test_mask_tokens_follows_bert_rule():
  n, length = 3000, 16
  rs = np.random.RandomState(0)
  ids = rs.randint(1000, 5000, size=(n, length)).astype(np.int32)
  real = rs.randint(3, length + 1, size=n)
  attn = (np.arange(length)[None] < real[:, None]).astype(np.int32)
  ids[:, 0] = 101
  ids[np.arange(n), real - 1] = 102
  ids[attn == 0] = 0
  opts = dict(ei.DEFAULTS, max_predictions=3)
  pairs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(np.concatenate([attn, np.ones((n, 2), np.int32)], 1))}
  fn = jax.jit(lambda p_, r_: ei.mask_tokens(r_, p_, opts, 30522))
  masked, pos, labels, w = (np.asarray(x) for x in fn(pairs, jax.random.PRNGKey(0)))
  n_cand = real - 2
  expected = np.minimum(3, np.maximum(1, np.round(n_cand * 0.15))) * (n_cand > 0)
  np.testing.assert_array_equal(w.sum(1), expected)
  sel = w > 0
  rows_ = np.broadcast_to(np.arange(n)[:, None], pos.shape)
  assert np.all(attn[rows_[sel], pos[sel]] == 1)
  assert not np.isin(ids[rows_[sel], pos[sel]], [0, 101, 102]).any()  # specials and pads never masked
  np.testing.assert_array_equal(labels, np.take_along_axis(ids, pos, 1))
  assert len(set(map(tuple, np.sort(pos, 1)))) > 1
  for r in range(50):  # selected positions are distinct
    assert len(set(pos[r][sel[r]])) == sel[r].sum()
  changed = np.zeros_like(ids, bool)
  changed[rows_[sel], pos[sel]] = True
  np.testing.assert_array_equal(masked[~changed], ids[~changed])  # nothing else touched
  new = masked[rows_[sel], pos[sel]]
  old = ids[rows_[sel], pos[sel]]
  frac_mask = np.mean(new == 103)
  frac_same = np.mean(new == old)
  frac_rand = 1 - frac_mask - frac_same
  assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015 and abs(frac_rand - 0.1) < 0.015


@pytest.mark.parametrize("mlm_pass", ["separate", "shared"])
def test_mlm_loss_matches_full_sequence_reference(model_and_params, mlm_pass):
  model, params = model_and_params
  batch = make_batch(5, seed=2)
  cfg = train_config(mlm_pass=mlm_pass)
  cfg.loss.mlm_weight = 1.0
  loss, m = jax.jit(lambda b, r: ei.early_interaction_loss(model, params, b, r, cfg))(batch, jax.random.PRNGKey(1))
  # Reference: recompute the masked positives, run the MLM head on every position, gather, average.
  # 'shared': every packed pair is masked, the ITM logits come from that same masked forward.
  opts = ei.options(cfg)
  r_neg, _, r_mask, _ = jax.random.split(jax.random.PRNGKey(1), 4)

  @jax.jit
  def reference_pieces(b):
    pairs, labels = ei.build_match_pairs(model, params, b, r_neg, opts)
    itm = None
    pos = {k: v[:5] for k, v in pairs.items()}
    if mlm_pass == "shared":
      all_masked, positions, mlm_labels, w = ei.mask_tokens(r_mask, pairs, opts, V)
      itm = model.apply({"params": params}, all_masked, *[pairs[k] for k in IMAGE_KEYS[1:]],
                        method=VLDeformer.match_logits), labels
      masked, positions, mlm_labels, w = all_masked[:5], positions[:5], mlm_labels[:5], w[:5]
    else:
      masked, positions, mlm_labels, w = ei.mask_tokens(r_mask, pos, opts, V)
    h, _ = model.apply({"params": params}, masked, pos["token_type_ids"], pos["attention_mask"],
                       pos["img_feats"], method=VLDeformer.encode)
    return model.apply({"params": params}, h, method=VLDeformer.mlm_logits), positions, mlm_labels, w, itm

  logits, positions, labels, w, itm = reference_pieces(batch)
  # The reference runs the same float32 forward as another program, then its loss in float64: rule
  # F32-PAIR over the forward and the head, plus the cross-entropy's own float32 chain.
  if itm is not None:  # class-balanced cross entropy of the match head on the masked pairs
    z, y = np.asarray(itm[0], np.float64), np.asarray(itm[1])
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    assert_f32(m["itm_loss"], 0.5 * ce[y == 1].mean() + 0.5 * ce[y == 0].mean(), n=N_PAIR + N_ITM + ce_n(2, len(y)),
               scale=ce_scale(max_abs(z), 2), pair=True)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  gathered = np.take_along_axis(logp, np.asarray(positions)[..., None], 1)  # [B, P, V]
  nll = -np.take_along_axis(gathered, np.asarray(labels)[..., None], 2)[..., 0]
  ref = (nll * np.asarray(w)).sum() / np.asarray(w).sum()
  n_mlm, mlm_scale = N_PAIR + N_MLM + ce_n(V, w.size), ce_scale(max_abs(logits), V)
  assert_f32(m["mlm_loss"], ref, n=n_mlm, scale=mlm_scale, pair=True)
  assert_f32(loss, float(m["itm_loss"]) + ref, n=n_mlm + 1, scale=mlm_scale + abs(float(m["itm_loss"])), pair=True)


@pytest.mark.parametrize("pooling", ["cls", "model"])
def test_itc_term_matches_numpy_infonce_and_reuses_embeddings_for_hard_negatives(model_and_params, pooling):
  model, params = model_and_params
  batch = make_batch(6, seed=7)
  tau = 0.1
  cfg = train_config(negatives="hard_embed", itc_weight=0.5, itc_temperature=tau, itc_pooling=pooling)
  loss, m = jax.jit(lambda p, b, r: ei.early_interaction_loss(model, p, b, r, cfg))(
      params, batch, jax.random.PRNGKey(3))
  text, image = ei.split_batch(batch)
  if pooling == "cls":  # the pooler output tanh(Dense(h_CLS)) that the ITM head reads
    emb = lambda x: model.apply({"params": params}, *x, method=VLDeformer.encode)[1]
  else:
    emb = lambda x: model.apply({"params": params}, *x, method=VLDeformer.embed)
  t = np.asarray(emb([text[k] for k in TEXT_KEYS]))
  v = np.asarray(emb([image[k] for k in IMAGE_KEYS]))
  t, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (t, v))
  x = (t @ v.T).astype(np.float64) / tau

  def ce(z):  # rows are queries, the diagonal is the positive
    return np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))

  # Rule F32-PAIR: the embeddings come from another program (then float64 here); per branch the forward,
  # the pooling (pooler or mean, tanh) and normalisation, the cosine (H) over tau, then a 6-way
  # cross-entropy per direction with logits up to 1 / tau.
  n_itc = N_SINGLE + N_ITM + H + 1 + 2 * ce_n(len(x), len(x))
  assert_f32(m["itc_loss"], ce(x) + ce(x.T), n=n_itc, scale=2 * ce_scale(1 / tau, len(x)), pair=True)
  # Rule F32: the float32 sum of the float32 terms against their float64 sum.
  assert_f32(loss, float(m["itm_loss"]) + 0.5 * float(m["itc_loss"]) + float(m["mlm_loss"]), n=4,
             scale=abs(float(m["itm_loss"])) + 0.5 * abs(float(m["itc_loss"])) + abs(float(m["mlm_loss"])))
  if pooling == "cls":
    return
  # the reused ITC embeddings pick the same hard negatives as hard_by_embedding's own passes
  opts = ei.options(cfg)
  got, _ = ei.build_match_pairs(model, params, batch, jax.random.PRNGKey(0), opts,
                                embeddings=(jnp.asarray(t), jnp.asarray(v)))
  ref, _ = ei.build_match_pairs(model, params, batch, jax.random.PRNGKey(0), opts)
  for k in ref:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)


def test_sharded_batch_gives_the_same_loss(model_and_params):
  model, params = model_and_params
  batch = make_batch(8, seed=4, k_neg=1)
  cfg = train_config(negatives="random")
  fn = jax.jit(lambda p, b, r: ei.early_interaction_loss(model, p, b, r, cfg))
  ref, _ = fn(params, batch, jax.random.PRNGKey(0))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  got, _ = fn(params, sharded, jax.random.PRNGKey(0))
  # Rule F32-PAIR: the same float32 objective (ITM + MLM) on a batch split over 8 devices; logit
  # magnitudes bounded from the parameters.
  itm_max, mlm_max = logit_bounds(params)
  pairs = 8 * (1 + 2 * 1 + 2 * 1)  # positives, a random negative each way, a composed negative each way
  masked = 8 * ei.DEFAULTS["max_predictions"]  # at most, over the positives
  assert_f32(got, ref, n=N_PAIR + max(N_ITM + ce_n(2, pairs), N_MLM + ce_n(V, masked)) + 1,
             scale=ce_scale(itm_max, 2) + ce_scale(mlm_max, V), pair=True)


def test_training_lowers_itm_and_mlm_losses(model_and_params):
  model, params = model_and_params
  batch = make_batch(8, seed=5, aligned=True)
  cfg = train_config(negatives="random")
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, r):
    (loss, m), g = jax.value_and_grad(lambda p_: ei.early_interaction_loss(model, p_, batch, r, cfg),
                                      has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, m

  first, last = [], []
  for s in range(80):
    params, opt, m = step(params, opt, jax.random.PRNGKey(100 + s))
    (first if s < 3 else last if s >= 77 else []).append((float(m["itm_loss"]), float(m["mlm_loss"])))
  f, l = np.mean(first, 0), np.mean(last, 0)
  prior = np.log(2.0)  # balanced CE of a head that cannot tell pairs apart
  assert np.all(np.isfinite(l))
  assert l[0] < 0.6 * prior, (f, l)  # matching: tells this batch's positives from random pairings
  assert l[1] < 0.7 * f[1], (f, l)  # MLM: learned the batch's tokens


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match="hardest"):
    ei.options(train_config(hardest=1))
  with pytest.raises(ValueError, match="negatives"):
    ei.options(train_config(negatives="nope"))
  with pytest.raises(ValueError, match="itc_pooling"):
    ei.options(train_config(itc_pooling="mean"))
