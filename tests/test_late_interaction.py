"""Late interaction (retrieval/late_interaction.py): TERAN's MrSw score against a float64 loop over ragged
sets, its invariances, the shortlist re-scorer and stored (bf16 / int8) token states, and recall on
concept-set toy data where the answer is known.

Tolerances (tests/tolerances.py): the score against the float64 loop by rule F32; invariances (extra
padding, token order, chunking) by rule F32-PAIR, since another shape may block the float32 dot products
differently; the chain n is derived in `CHAIN`.
"""
import numpy as np
import pytest

from vldeformer_jax.retrieval import late_interaction as li
from tolerances import ELEMENTARY, assert_bitwise, assert_f32, assert_within, max_abs

D = 16
MAX_T, MAX_W = 70, 35
# Rule F32 chain of one score: each side's L2 normalisation (a D-term sum of squares, rsqrt, a product),
# the cosine (a D-term dot product of unit vectors: its terms' magnitudes sum to at most 1, Cauchy-Schwarz),
# then the sum over at most MAX_W words (+1 for the length normalisation). The scale is the number of real
# words (each term is a cosine, at most 1 in magnitude); 1 for the normalised variant.
CHAIN = 2 * (D + ELEMENTARY + 2) + D + MAX_W + 1


def ragged(seed, q=6, g=7, t_pad=MAX_T, w_pad=MAX_W, negative=False):
  """Random states with 1-70 real image tokens and 1-35 real words (the lengths include both extremes);
  `negative`: every real word is the opposite of every real token's direction (all cosines < 0)."""
  rng = np.random.default_rng(seed)
  t_len = np.concatenate([[1, MAX_T], rng.integers(1, MAX_T + 1, g - 2)])
  w_len = np.concatenate([[1, MAX_W], rng.integers(1, MAX_W + 1, q - 2)])
  tokens = rng.normal(size=(g, t_pad, D)).astype(np.float32)
  words = rng.normal(size=(q, w_pad, D)).astype(np.float32)
  if negative:  # tokens in the positive orthant, words in the negative one
    tokens, words = np.abs(tokens) + 0.1, -np.abs(words) - 0.1
  t_mask = (np.arange(t_pad)[None] < t_len[:, None]).astype(np.int32)
  w_mask = (np.arange(w_pad)[None] < w_len[:, None]).astype(np.int32)
  return words, w_mask, tokens, t_mask


def reference(words, w_mask, tokens, t_mask, normalize=False):
  """float64 loops: for each caption and image, sum over real words of the max over real tokens."""
  out = np.zeros((len(words), len(tokens)))
  for q in range(len(words)):
    ws = [w / np.linalg.norm(w) for w in words[q].astype(np.float64)[w_mask[q] > 0]]
    for g in range(len(tokens)):
      ts = [t / np.linalg.norm(t) for t in tokens[g].astype(np.float64)[t_mask[g] > 0]]
      total = sum(max(float(w @ t) for t in ts) for w in ws)
      out[q, g] = total / len(ws) if normalize else total
  return out


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_mrsw_matches_float64_loop(negative, normalize):
  words, w_mask, tokens, t_mask = ragged(0 + negative, negative=negative)
  got = np.asarray(li.mrsw_scores(words, w_mask, tokens, t_mask, normalize=normalize))
  ref = reference(words, w_mask, tokens, t_mask, normalize)
  scale = 1.0 if normalize else w_mask.sum(1, keepdims=True).astype(np.float64)
  assert_f32(got, ref, n=CHAIN, scale=scale)  # rule F32
  pairs = np.asarray(li.mrsw_pairs(words[:, None].repeat(len(tokens), 1).reshape(-1, MAX_W, D),
                                   w_mask.repeat(len(tokens), 0), np.tile(tokens, (len(words), 1, 1)),
                                   np.tile(t_mask, (len(words), 1)), normalize=normalize))
  assert_f32(pairs.reshape(got.shape), ref, n=CHAIN, scale=scale)  # rule F32
  if negative:
    # Every real similarity is negative, so each word's best match is negative and so is every score:
    # zero padding inside the max (TERAN's code) would have given 0 for every image with padding.
    assert (ref < 0).all() and (got < 0).all()
    assert (t_mask == 0).any(axis=1).sum() >= len(tokens) - 1  # most images do carry padding


def test_extra_padding_and_token_order_change_nothing():
  words, w_mask, tokens, t_mask = ragged(2, t_pad=MAX_T, w_pad=MAX_W)
  base = np.asarray(li.mrsw_scores(words, w_mask, tokens, t_mask))
  scale = w_mask.sum(1, keepdims=True)
  rng = np.random.default_rng(3)
  # More padding on both sides, filled with large garbage (it must never be read).
  padded = li.mrsw_scores(np.concatenate([words, 50 * rng.normal(size=(len(words), 9, D))], 1).astype(np.float32),
                          np.pad(w_mask, ((0, 0), (0, 9))),
                          np.concatenate([tokens, 50 * rng.normal(size=(len(tokens), 13, D))], 1).astype(np.float32),
                          np.pad(t_mask, ((0, 0), (0, 13))))
  assert_f32(padded, base, n=CHAIN, scale=scale, pair=True)  # rule F32-PAIR
  # Each image's tokens (regions) permuted, padding included, masks moved with them; words permuted too.
  perm_t = np.stack([rng.permutation(MAX_T) for _ in range(len(tokens))])
  perm_w = np.stack([rng.permutation(MAX_W) for _ in range(len(words))])
  shuffled = li.mrsw_scores(np.take_along_axis(words, perm_w[..., None], 1), np.take_along_axis(w_mask, perm_w, 1),
                            np.take_along_axis(tokens, perm_t[..., None], 1), np.take_along_axis(t_mask, perm_t, 1))
  assert_f32(shuffled, base, n=CHAIN, scale=scale, pair=True)  # rule F32-PAIR


def test_rescore_shortlist_is_its_own_entries_of_the_full_matrix():
  words, w_mask, tokens, t_mask = ragged(4, q=9, g=11)
  full = np.asarray(li.mrsw_scores(words, w_mask, tokens, t_mask, normalize=True))
  rng = np.random.default_rng(5)
  t2i = np.stack([rng.choice(len(tokens), 4, replace=False) for _ in range(len(words))])
  got = li.rescore_shortlist(words, w_mask, tokens, t_mask, t2i, normalize=True, chunk_size=5)  # ragged last chunk
  assert_f32(got, np.take_along_axis(full, t2i, 1), n=CHAIN, scale=1.0, pair=True)  # rule F32-PAIR
  i2t = np.stack([rng.choice(len(words), 3, replace=False) for _ in range(len(tokens))])
  got = li.rescore_shortlist(words, w_mask, tokens, t_mask, i2t, queries="images", normalize=True, chunk_size=7)
  assert_f32(got, np.take_along_axis(full.T, i2t, 1), n=CHAIN, scale=1.0, pair=True)  # rule F32-PAIR


def test_stored_token_states():
  words, w_mask, tokens, t_mask = ragged(6)
  unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
  assert_bitwise(li.dequantize_tokens(li.quantize_tokens(unit, "float32")), unit)  # rule EXACT: stored as is
  q8 = li.quantize_tokens(unit, "int8")
  assert q8["values"].dtype == np.int8 and q8["scales"].shape == unit.shape[:-1]
  # int8: each entry within half a step (scale / 2) of the original, up to the float32 product (rule F32, n=1).
  assert_within(li.dequantize_tokens(q8), unit, q8["scales"][..., None] * (0.5 + 2 ** -23), rule="int8 half step")
  full = np.asarray(li.mrsw_scores(words, w_mask, unit, t_mask))
  for dtype, step in (("bfloat16", None), ("int8", q8)):
    stored = li.quantize_tokens(unit, dtype)
    rows = np.arange(len(words)).repeat(len(tokens)), np.tile(np.arange(len(tokens)), len(words))
    got = li.score_pairs(words, w_mask, stored, t_mask, *rows, chunk_size=8).reshape(full.shape)
    # A stored entry moves by at most e (bf16: 2^-8 relative, so <= 2^-8 for a unit vector's entries; int8:
    # half a step); a unit word's cosine with it then moves by at most sqrt(D) e (Cauchy-Schwarz), and the
    # re-normalisation at most doubles that; each word's max moves by no more, the sum by W times it.
    e = 2.0 ** -8 if dtype == "bfloat16" else float(q8["scales"].max()) / 2
    bound = w_mask.sum(1, keepdims=True) * 2 * np.sqrt(D) * e + 1e-4
    assert_within(got, full, bound, rule=f"{dtype} storage")
    assert np.abs(got - full).max() > 0  # it did read the stored (rounded) states


def test_content_mask_drops_cls_and_sep():
  mask = np.array([[1, 1, 1, 0, 0, 1, 1, 0],   # [CLS] w [SEP] pad pad | region region pad
                   [1, 1, 0, 0, 0, 1, 0, 0],   # [CLS] [SEP]: no word
                   [1, 1, 1, 1, 1, 0, 0, 0]])  # a full segment, no regions
  got = li.content_mask(mask, 5)
  assert_bitwise(got, np.array([[0, 1, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]],
                               np.int32))  # rule EXACT


def concept_sets(seed, n_groups=40, n_concepts=48, per_image=8, named=3, noise=0.5):
  """Images are sets of `per_image` concepts (a token = its concept's unit vector + Gaussian noise, tokens
  in random order, 2 padded slots); a caption names the first `named` concepts of its image. Each group is
  a base image and `named` distractors, distractor j the base with concept j replaced: every caption's
  own image is the only one holding all the concepts it names."""
  rng = np.random.default_rng(seed)
  concepts = rng.normal(size=(n_concepts, D))
  concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
  sets = []
  for _ in range(n_groups):
    base = rng.choice(n_concepts, per_image, replace=False)
    sets.append(base)
    for j in range(named):
      s = base.copy()
      s[j] = rng.choice(np.setdiff1d(np.arange(n_concepts), base))
      sets.append(s)
  n, t_pad, w_pad = len(sets), per_image + 2, named + 2
  tokens, t_mask = np.zeros((n, t_pad, D), np.float32), np.zeros((n, t_pad), np.int32)
  words, w_mask = np.zeros((n, w_pad, D), np.float32), np.zeros((n, w_pad), np.int32)
  for i, s in enumerate(sets):
    tokens[i, :per_image] = concepts[rng.permutation(s)] + noise * rng.normal(size=(per_image, D)) / np.sqrt(D)
    words[i, :named] = concepts[s[:named]] + noise * rng.normal(size=(named, D)) / np.sqrt(D)
    t_mask[i, :per_image], w_mask[i, :named] = 1, 1
  return words, w_mask, tokens, t_mask


def r_at_1(scores):
  """t2i R@1 (%) where caption q belongs to image q; ties count against (argmax takes the first)."""
  return 100.0 * float(np.mean(np.argmax(scores, axis=1) == np.arange(len(scores))))


def test_late_interaction_beats_mean_pooling_on_concept_sets():
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
  for seed in range(3):
    words, w_mask, tokens, t_mask = concept_sets(seed)
    late = r_at_1(np.asarray(li.mrsw_scores(words, w_mask, tokens, t_mask)))
    # The decomposed model's pooling: the mean of the (unit) token states of each side, then a cosine.
    text = unit((unit(words) * w_mask[..., None]).sum(1) / w_mask.sum(1, keepdims=True))
    image = unit((unit(tokens) * t_mask[..., None]).sum(1) / t_mask.sum(1, keepdims=True))
    mean = r_at_1(text @ image.T)
    # Measured (seeds 0, 1, 2): late 83.1 / 78.8 / 83.8, mean pooling 16.3 / 11.9 / 16.9 (160 captions each,
    # 0.625 points per caption); a 40-point margin is 64 captions, far beyond what rounding can flip.
    assert late > mean + 40, (seed, late, mean)


# ------------------------------------------------------------------------------------------------------
# The encoder's token states (retrieval/encoder.py) on a tiny random model.

def test_encoder_token_states_are_the_decomposed_sequence_output():
  import jax
  from vldeformer_jax.model import inputs
  from vldeformer_jax.model.config import ModelConfig
  from vldeformer_jax.model.vldeformer import VLDeformer
  from vldeformer_jax.retrieval.encoder import Encoder
  from model_helpers import tiny_params
  from tolerances import gamma, transformer_depth

  cfg = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    img_feature_dim=6, max_text_len=8, max_tag_len=5, max_regions=4)
  enc = Encoder(cfg, tiny_params(cfg, 0), inputs.load_tokenizer(), batch_size=4, progress=False)
  caps = ["a dog on a couch", "two men riding horses on a beach at sunset", "cat", "a plate of food", "boat"]
  tags = ["dog couch", "man horse beach kite sand", "cat", "plate", "boat water"]
  rng = np.random.default_rng(0)
  feats = [rng.normal(size=(n, 6)).astype(np.float32) for n in (1, 4, 6, 2, 3)]  # 6 > max_regions: cut to 4
  words, w_mask = enc.text_token_states(caps)
  toks, t_mask = enc.image_token_states(feats, tags)
  assert words.shape == (5, 8, 32) and toks.shape == (5, 5 + 4, 32)
  # Which positions count (rule EXACT, small integers): every wordpiece, no [CLS] / [SEP] / padding;
  # the tag wordpieces and the real regions.
  pieces = lambda t, room: min(len(enc.tokenizer(t, add_special_tokens=False)["input_ids"]), room)  # noqa: E731
  assert w_mask.sum(1).tolist() == [pieces(c, 6) for c in caps]
  assert t_mask.sum(1).tolist() == [pieces(t, 3) + min(len(f), 4) for t, f in zip(tags, feats)]
  assert (w_mask[:, 0] == 0).all() and (t_mask[:, 0] == 0).all()
  # Each row alone through `VLDeformer.encode` (another program), normalised in float64.
  model = VLDeformer(cfg)
  encode = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=VLDeformer.encode)[0])
  for i in range(5):
    x = inputs.text_inputs(enc.tokenizer, [caps[i]], cfg.max_text_len)
    y = enc.image_inputs([feats[i]], [tags[i]])
    for got, h, seq in ((words[i], encode(enc.params, x["input_ids"], x["token_type_ids"], x["attention_mask"]), 8),
                        (toks[i], encode(enc.params, y["input_ids"], y["token_type_ids"], y["attention_mask"],
                                         y["img_feats"]), 9)):
      h = np.asarray(h, np.float64)[0]
      norm = np.linalg.norm(h, axis=-1, keepdims=True)
      # Rule F32-PAIR on h (each entry within 2 gamma(n) max|h| of the other program's), carried through
      # the normalisation: a unit vector moves by at most 2 ||dh|| / ||h||, plus its own rounding.
      dh = 2 * gamma(transformer_depth(hidden=32, intermediate=64, layers=2, seq_len=seq, heads=4)) \
          * np.abs(h).max() * np.sqrt(32)
      bound = 2 * dh / norm + gamma(32 + ELEMENTARY + 2)
      assert_within(got, h / norm, bound, rule="F32-PAIR through the normalisation")


# ------------------------------------------------------------------------------------------------------
# The training term (training/late_interaction_term.py `late_interaction_loss`): sharded over 8 devices = one device.

def test_late_interaction_loss_sharded_equals_single_device():
  import jax
  from vldeformer_jax import parallel
  from vldeformer_jax.training import late_interaction_term

  g, w_len, t_len, h = 16, 6, 7, 8
  rng = np.random.default_rng(7)
  words = rng.normal(size=(g, w_len, h)).astype(np.float32)
  toks = rng.normal(size=(g, t_len, h)).astype(np.float32)
  toks[:, :3] += words[:, :3]  # positives share directions: the hinge sees a mix of active and slack rows
  w_mask = (np.arange(w_len)[None] < rng.integers(1, w_len + 1, g)[:, None]).astype(np.int32)
  t_mask = (np.arange(t_len)[None] < rng.integers(1, t_len + 1, g)[:, None]).astype(np.int32)
  mesh = parallel.make_mesh(8, 1, 1)
  sharded = late_interaction_term.sharded_late_interaction_loss(mesh, margin=0.2)

  def single(w, t):
    return late_interaction_term.late_interaction_loss(w, w_mask, t, t_mask, margin=0.2)[0]

  def split(w, t):
    return sharded(w, w_mask, t, t_mask)[0]

  ref, ref_grads = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(words, toks)
  got, got_grads = jax.jit(jax.value_and_grad(split, argnums=(0, 1)))(words, toks)
  assert 0 < float(ref)
  # Rule F32-PAIR. The loss: each normalised score (CHAIN of this test file with D = h, scale 1), the
  # hinge (2 roundings) and a mean over the G rows, per direction: terms at most 2 + margin, two of them.
  n = 2 * (h + ELEMENTARY + 2) + h + w_len + 1 + 2 + g
  assert_f32(got, ref, n=n, scale=2 * 2.2, pair=True)
  # The gradients run the same chain backwards; an entry of a state sums at most one term per (query of
  # the pool, word) pair, 2 G W of them, each at most the largest entry: scale max|grad| * 2 G W.
  for a, b in zip(got_grads, ref_grads):
    assert max_abs(b) > 0
    assert_f32(a, b, n=2 * n, scale=max_abs(b) * 2 * g * w_len, pair=True)


def test_decomposition_objective_adds_the_weighted_late_term():
  """training/decompose.py with `loss.late_interaction_weight` w: the loss is the contrastive terms plus w
  times the late term of the same pass's token states (w = 0 builds no late term at all)."""
  import jax
  import jax.numpy as jnp
  from vldeformer_jax import parallel
  from vldeformer_jax.model import inputs
  from vldeformer_jax.model.config import ModelConfig
  from vldeformer_jax.model.vldeformer import VLDeformer
  from vldeformer_jax.training import decompose, late_interaction_term
  from vldeformer_jax.training.defaults import base_config
  from model_helpers import tiny_params
  from tolerances import gamma, transformer_depth

  cfg = ModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    img_feature_dim=6, max_text_len=8, max_tag_len=5, max_regions=3, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1)
  tok = inputs.load_tokenizer()
  rng = np.random.default_rng(0)
  words = "a the dog cat car red blue green left right of above small big".split()
  text = inputs.text_inputs(tok, [" ".join(rng.choice(words, 4)) for _ in range(8)], 8)
  image = inputs.image_inputs(tok, [rng.normal(size=(int(rng.integers(1, 4)), 6)).astype(np.float32) for _ in range(8)],
                              [" ".join(rng.choice(words, 2)) for _ in range(8)], 5, 3, 6)
  mesh = parallel.make_mesh(8, 1, 1)
  batch = parallel.global_batch({**{f"text_{k}": v for k, v in text.items()},
                                 **{f"image_{k}": v for k, v in image.items()}}, mesh)
  params = tiny_params(cfg, 0)
  trainable = {"model": params, "log_temperature": jnp.float32(np.log(0.05))}
  model, key = VLDeformer(cfg), jax.random.key(1)

  def loss_with(w):
    c = base_config()
    c.loss.temperature, c.loss.late_interaction_weight = 0.05, w
    return jax.jit(decompose.make_loss_fn(model, c, mesh))(trainable, batch, key)

  lw, mw = loss_with(0.5)
  assert float(mw["late_loss"]) > 0
  emb = jax.jit(lambda p: decompose.embed_all(model, p, batch, decompose.branch_keys(key), with_states=True))(params)
  ref = late_interaction_term.late_interaction_loss(emb["text_states"], emb["text_token_mask"],
                                                    emb["image_states"], emb["image_token_mask"], margin=0.2)[0]
  # Rule F32-PAIR through the states: each entry of h within 2 gamma(depth) max|h| of the other program's;
  # a unit state then moves by at most 2 sqrt(H) that / min ||h||, a cosine by twice that, the loss (two
  # scores per hinge, two directions) by 4 times a cosine's move; plus the loss's own rounding (rule F32 of
  # the sharded-loss test above, generously 200 roundings of terms up to 2.2).
  h = np.concatenate([np.asarray(emb["text_states"]).reshape(-1, 16), np.asarray(emb["image_states"]).reshape(-1, 16)])
  depth = transformer_depth(hidden=16, intermediate=32, layers=1, seq_len=8, heads=2)
  move = 2 * np.sqrt(16) * 2 * gamma(depth) * np.abs(h).max() / np.linalg.norm(h, axis=1).min()
  bound = 4 * 2 * move + 2 * gamma(200) * 4.4
  assert_within(mw["late_loss"], ref, bound, rule="F32-PAIR through the token states")
  # The total: two contrastive directions and the weighted term, 3 additions and a product (rule F32).
  total = float(mw["t2i_loss"]) + float(mw["i2t_loss"]) + 0.5 * float(mw["late_loss"])
  assert_f32(lw, total, n=4, scale=abs(total))
  # The masks are the content positions (no CLS / SEP / padding): rule EXACT, small integers.
  assert_bitwise(np.asarray(emb["image_token_mask"]), np.asarray(li.content_mask(image["attention_mask"], 5)))


def test_config_checks_of_the_late_weight():
  from vldeformer_jax.training import config_checks
  from vldeformer_jax.training.defaults import base_config

  def errors(**fields):
    c = base_config()
    for key, value in fields.items():
      section, name = key.split("__")
      c[section][name] = value
    return [e for e in config_checks.validate(c, device_count=1, process_count=1)
            if e.startswith("config.loss.late_interaction_weight")]

  assert errors() == [] and errors(loss__late_interaction_weight=0.5) == []
  assert errors(loss__late_interaction_weight=-1.0) == [
      "config.loss.late_interaction_weight: must be a finite number >= 0, got -1.0"]
  assert len(errors(loss__late_interaction_weight=0.5, train__micro_batch_size=2)) == 1
  c = base_config()
  c.objective, c.loss.late_interaction_weight = "early_interaction", 0.5
  assert any("objective 'decompose'" in e for e in config_checks.validate(c, device_count=1, process_count=1))
