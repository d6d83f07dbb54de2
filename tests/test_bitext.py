"""MURAL's text-text task (docs/method.md §4.9): the demo's Spanish translations, the bitext batches, and the
sharded text-text loss against a float64 reference and against one device. Tolerances: tests/tolerances.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import parallel
from vldeformer_jax.data import bitext
from vldeformer_jax.data import demo_world
from vldeformer_jax.model import inputs
from vldeformer_jax.training import text_text_term
from tolerances import ELEMENTARY, assert_f32, f32_bound, max_abs


def test_translation_known_answers_and_grammar():
  # Word order (noun, colour, size), gender agreement of articles and adjectives, del / al.
  cases = {
      "a small red dog to the left of a cat": "un perro rojo pequeño a la izquierda de un gato",
      "the big white cow is above the table": "la vaca blanca grande está encima de la mesa",
      "a photo of a little pink apple right of the bus": "una foto de una manzana rosa pequeña a la derecha del autobús",
      "a blue cup next to the black bed": "una taza azul junto a la cama negra",
      "a kite next to the large horse": "una cometa junto al caballo grande",
      "there is an elephant under a chair and a yellow umbrella":
          "hay un elefante debajo de una silla y un paraguas amarillo",
      "a bag , a hat , a book and a green phone": "un bolso , un sombrero , un libro y un teléfono verde",
      "a picture of a car and a boat": "una imagen de un coche y un barco",
  }
  for en, es in cases.items():
    assert bitext.translate(en) == es, en
  with pytest.raises(bitext.TranslationError, match="unknown word 'near' at position 3"):
    bitext.translate("the dog is near a cat")
  # Every caption the demo generator writes is in the grammar: 200 images' captions translate.
  images = demo_world._images(np.random.default_rng(3), list(range(200)))
  for img in images:
    for c in img.captions:
      es = bitext.translate(c)
      assert es and not set(es.split()) & (set(demo_world.vocabulary()) - {"a", ","}), (c, es)  # no English left


def test_spanish_lexicon_tokenises_without_unknown_pieces():
  """The bundled vocabulary is English (bert-base-uncased): Spanish words split into several wordpieces
  (perro -> per ##ro, accents stripped: autobús -> auto ##bus), but none is [UNK]."""
  tok = inputs.load_tokenizer()
  words = {w for n, _ in bitext.NOUNS.values() for w in [n]}
  words |= {w for pair in list(bitext.COLOURS.values()) + list(bitext.SIZES.values()) for w in pair}
  words |= {w for phrase in list(bitext.RELATIONS.values()) + list(bitext.FIXED.values()) for w in phrase.split()}
  words |= set(bitext.ARTICLES.values()) | {"del", "al"}
  for w in sorted(words):
    pieces = tok.tokenize(w)
    assert pieces and tok.unk_token not in pieces, (w, pieces)
  assert tok.tokenize("perro") == ["per", "##ro"] and tok.tokenize("autobús") == ["auto", "##bus"]


def test_bitext_batches_are_a_function_of_step_and_split_over_processes(tmp_path):
  pairs = [(f"a dog {i}", f"un perro {i}") for i in range(40)]
  path = str(tmp_path / "b.json")
  bitext.write_bitext(path, pairs)
  assert bitext.read_bitext(path) == pairs
  whole = bitext.BitextBatches(pairs, global_batch_size=8, seed=3, max_len=6, process_index=0, process_count=1)
  parts = [bitext.BitextBatches(pairs, global_batch_size=8, seed=3, max_len=6, process_index=p, process_count=2)
           for p in range(2)]
  epoch = [r for s in range(5) for r in whole.rows(s)]
  assert sorted(epoch) == sorted(pairs)  # one epoch = 5 steps of 8: every pair once
  for s in (0, 4, 5, 12):
    assert parts[0].rows(s) + parts[1].rows(s) == whole.rows(s)
  tok = inputs.load_tokenizer()
  batch = whole(2, tok)
  np.testing.assert_array_equal(batch["bitext_b_input_ids"],
                                inputs.text_inputs(tok, [b for _, b in whole.rows(2)], 6)["input_ids"])
  (tmp_path / "bad.json").write_text('{"format": "vldeformer_jax.bitext", "pairs": [["a", ""]]}')
  with pytest.raises(ValueError, match="pair 0 is not two non-empty strings"):
    bitext.read_bitext(str(tmp_path / "bad.json"))


def _reference(a, b, temp):
  """Symmetric InfoNCE over the pairs, float64: mean_r [lse_c(cos(a_r, b_c) / T) - cos(a_r, b_r) / T] + the
  same with a and b swapped."""
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  s = a @ b.T / temp

  def direction(x):
    top = x.max(1, keepdims=True)
    return np.mean(np.log(np.exp(x - top).sum(1)) + top[:, 0] - np.diagonal(x))
  return direction(s) + direction(s.T)


def test_sharded_text_text_loss_equals_one_device_and_float64_reference():
  rng = np.random.default_rng(0)
  n, d, temp = 16, 12, 0.1
  a = rng.normal(size=(n, d)).astype(np.float32)
  b = (a + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
  values = {}
  for devices, shape in ((1, (1, 1, 1)), (8, (2, 2, 2))):
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[:devices])
    fn = text_text_term.sharded_text_text_loss(mesh)
    sharding = parallel.batch_sharding(mesh)
    xa, xb = jax.device_put(a, sharding), jax.device_put(b, sharding)
    (loss, m), grads = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, temp), argnums=(0, 1), has_aux=True))(xa, xb)
    values[devices] = (float(loss), {k: float(v) for k, v in m.items()}, [np.asarray(g) for g in grads])
  ref = _reference(a.astype(np.float64), b.astype(np.float64), temp)
  # Rule F32: inverse norm (D, rsqrt), cosine (D), / T, logsumexp over n (exp, log), minus the positive,
  # mean over n, the two directions; terms up to 1/T + log n.
  n_loss = 2 * d + n + n + 3 * ELEMENTARY + 6
  scale = 2 * (2 / temp + np.log(n))
  assert_f32(values[1][0], ref, n=n_loss, scale=scale)
  # Rule F32-PAIR: 8 devices (gathered columns) against 1, loss, metrics and gradients.
  assert_f32(values[8][0], values[1][0], n=n_loss, scale=scale, pair=True)
  assert values[8][1]["tt_loss"] == values[8][0]
  assert values[8][1]["tt_a2b_accuracy"] == values[1][1]["tt_a2b_accuracy"]  # EXACT: gaps checked below
  s = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
  top2 = np.sort(s, axis=1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 2 * f32_bound(2 * d + 2 * ELEMENTARY, 1.0, pair=True))
  assert 0 < values[1][1]["tt_a2b_accuracy"] < 1
  for g8, g1 in zip(values[8][2], values[1][2]):
    # Gradients: the loss chain back through a softmax over n columns and the normalisation; scale 1/T
    # times the largest gradient component (tests/tolerances.py, softmax of logits up to 1/T).
    assert_f32(g8, g1, n=2 * n_loss + n + d, scale=max_abs(g1) / temp, pair=True)
    assert np.abs(g1).max() > 1e-3


def test_decomposition_adds_the_weighted_text_text_term():
  """Wiring: loss(w) = loss(0) + w * tt_loss, tt_loss being the text-text loss of the bitext rows' own text
  embeddings (one pass over both sides)."""
  from vldeformer_jax.model.vldeformer import VLDeformer
  from vldeformer_jax.training import decompose
  from vldeformer_jax.training.defaults import base_config
  from model_helpers import random_text_rows, tiny_params, tiny_text_model
  lt, r, f, n = 8, 3, 6, 8
  mc = tiny_text_model(lt, r, f)
  rs = np.random.RandomState(0)
  text = functools.partial(random_text_rows, rs, text_len=lt)

  batch = {f"text_{k}": v for k, v in text(n).items()}
  batch.update({f"bitext_a_{k}": v for k, v in text(n).items()})
  batch.update({f"bitext_b_{k}": v for k, v in text(n).items()})
  img = text(n)
  batch.update(image_input_ids=img["input_ids"], image_token_type_ids=img["attention_mask"],
               image_attention_mask=np.ones((n, lt + r), np.int32),
               image_img_feats=rs.randn(n, r, f).astype(np.float32))
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model, params = VLDeformer(mc), tiny_params(mc, 0)
  trainable = {"model": params, "log_temperature": jnp.float32(np.log(0.1))}
  out = {}
  for w in (0.0, 0.5):
    c = base_config()
    c.loss.temperature, c.loss.text_text_weight = 0.1, w
    out[w] = jax.jit(decompose.make_loss_fn(model, c, mesh))(trainable, batch, jax.random.key(1))
  (off, m_off), (on, m_on) = out[0.0], out[0.5]
  assert "tt_loss" not in m_off and 0 < float(m_on["tt_a2b_accuracy"]) <= 1
  emb = decompose.embed_bitext(model, params, batch, jax.random.key(2))  # no dropout: any key
  tt, _ = text_text_term.sharded_text_text_loss(mesh)(emb["bitext_a"], emb["bitext_b"], 0.1)
  # Rule F32-PAIR: the same forward and loss as another program (a 1-layer encoder of 8 tokens, the loss
  # over 8 pairs); then one multiply-add.
  n_tt = 2 * (8 * 32 + 64 + 8) + 2 * 32 + 16 + 6 * ELEMENTARY + 6
  assert_f32(m_on["tt_loss"], tt, n=n_tt, scale=2 * (2 / 0.1 + np.log(n)), pair=True)
  assert_f32(on, float(off) + 0.5 * float(m_on["tt_loss"]), n=n_tt + 2,
             scale=abs(float(off)) + abs(float(m_on["tt_loss"])), pair=True)


def test_bitext_config_checks(tmp_path):
  from repo_configs import get_config
  from vldeformer_jax.training import config_checks
  c = get_config("demo_bitext")
  assert c.loss.text_text_weight == 0.3 and get_config("demo_bitext", "off").loss.text_text_weight == 0.0
  errors = config_checks.validate(c, device_count=1, process_count=1)
  assert [e for e in errors if "text_text" in e] == [
      "config.loss.text_text_weight: needs config.data.bitext, a bitext file (data/bitext.py); got ''"]
  bitext.write_bitext(str(tmp_path / "b.json"), [("a dog", "un perro")] * 64)
  c.data.bitext = str(tmp_path / "b.json")
  assert [e for e in config_checks.validate(c, device_count=1, process_count=1) if "bitext" in e or "text_text" in e] == []
  c.objective, c.train.micro_batch_size, c.data.bitext_batch_size = "early_interaction", 2, 6
  errors = [e for e in config_checks.validate(c, device_count=4, process_count=1) if "text_text" in e or "bitext" in e]
  assert len(errors) == 3 and "objective 'decompose' only" in errors[0] and "micro_batch_size" in errors[1]
  assert "bitext_batch_size: 6 pairs" in errors[2]
