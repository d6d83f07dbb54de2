"""The topic target (docs/method.md §4.10): the class-word bag of the captions, the KL term against a float64
reference, its wiring into the decomposition, and the noisy-pairs variant of the demo data."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldeformer_jax import parallel
from vldeformer_jax.data import demo_world
from vldeformer_jax.data import noisy_pairs
from vldeformer_jax.data import pipeline
from vldeformer_jax.data import topics
from vldeformer_jax.model import inputs
from vldeformer_jax.training import topic
from tolerances import ELEMENTARY, assert_bitwise, assert_f32

import pipeline_worker as worker


def test_target_is_the_normalised_bag_of_caption_class_words():
  words = ("cat", "dog", "red")  # "red" a topic word too: the bag is over whatever the vocabulary holds
  captions = [["a red dog next to a cat", "the dog, the dog"],  # dog 3, cat 1, red 1 -> /5
              ["a photo of a bird"],                            # no topic word -> zero row
              [b"Cat", "CAT and cats"]]                         # bytes, case; "cats" is not "cat"
  got = topics.topic_targets(captions, words)
  want = np.array([[1 / 5, 3 / 5, 1 / 5], [0, 0, 0], [1, 0, 0]], np.float32)
  assert_bitwise(got, want)
  assert topics.caption_words("a dog, to the left-of 2 cats") == ["a", "dog", "to", "the", "left", "of", "2", "cats"]


def test_pipeline_delivers_targets_and_the_words_inputs():
  source = worker.SyntheticSource(num_images=24)
  words = ("cat", "dog", "horse", "light")  # pipeline_worker.WORDS: its captions name them
  kwargs = dict(worker.PIPELINE, tokenizer=inputs.load_tokenizer(), process_index=0, process_count=1,
                global_batch_size=8, negatives_per_pair=0)
  with pipeline.make_train_iterator(source, topics=topics.TopicTargets(words), **kwargs) as it:
    batch = it.batch_at(1)
  with pipeline.make_train_iterator(source, **kwargs) as it:
    plain = it.batch_at(1)
  for k, v in plain.items():  # the option adds keys, changes none
    assert_bitwise(batch[k], v, k)
  n_caps = 5  # make_train_iterator's default num_captions_per_image
  by_id = {int(source[i]["image_id"]): source[i]["captions"][:n_caps] for i in range(len(source))}
  want = topics.topic_targets([by_id[int(i)] for i in batch["image_id"]], words)
  assert_bitwise(batch[topics.TARGET_KEY], want)
  assert batch[topics.TARGET_KEY].shape == (8, 4) and (want.sum(1) > 0).any()
  ids = batch["topic_word_input_ids"]
  assert ids.shape == (8, 4, worker.PIPELINE["max_text_len"]) and (ids == ids[:1]).all()
  tok = inputs.load_tokenizer()
  for v, w in enumerate(words):
    row = ids[0, v][batch["topic_word_attention_mask"][0, v] == 1]
    assert row.tolist() == [tok.cls_token_id] + tok.encode(w, add_special_tokens=False) + [tok.sep_token_id]


def _reference(img, words, target, temp):
  """Mean over rows with a target of sum_v t log(t / q), q = softmax_v(cos(img, word_v) / T), float64."""
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  words = words / np.linalg.norm(words, axis=1, keepdims=True)
  s = img @ words.T / temp
  top = s.max(1, keepdims=True)
  log_q = s - top - np.log(np.exp(s - top).sum(1, keepdims=True))
  kl = np.array([sum(t * (np.log(t) - lq) for t, lq in zip(tr, lqr) if t > 0) for tr, lqr in zip(target, log_q)])
  has = target.sum(1) > 0
  return kl[has].mean()


def test_kl_term_equals_float64_reference_on_1_and_8_devices():
  rng = np.random.default_rng(0)
  b, v, d, temp = 16, 6, 12, 0.1
  img = rng.normal(size=(b, d)).astype(np.float32)
  words = rng.normal(size=(v, d)).astype(np.float32)
  counts = rng.integers(0, 3, size=(b, v)) * (rng.random((b, v)) < 0.5)
  counts[3] = 0  # a row without a target: left out
  target = (counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)
  ref = _reference(img.astype(np.float64), words.astype(np.float64), target.astype(np.float64), temp)
  # Rule F32: norms (D, rsqrt), cosine (D), / T, log-softmax over V (exp, log), t (log t - log q) summed
  # over V, mean over B; terms up to log V + 2 / T.
  n = 2 * d + d + 2 + v + 3 * ELEMENTARY + v + b + 2
  scale = 2 * (np.log(v) + 2 / temp)
  values = {}
  for devices, shape in ((1, (1, 1, 1)), (8, (2, 2, 2))):
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[:devices])
    x = jax.device_put(img, parallel.batch_sharding(mesh))
    t = jax.device_put(target, parallel.batch_sharding(mesh))
    loss, m = jax.jit(lambda a, w, t: topic.topic_loss(a, w, t, temp))(x, words, t)
    values[devices] = (float(loss), float(m["topic_top1"]))
    assert_f32(loss, ref, n=n, scale=scale)
    assert float(m["topic_loss"]) == float(loss)
  assert_f32(values[8][0], values[1][0], n=n, scale=scale, pair=True)
  s = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (words / np.linalg.norm(words, axis=1, keepdims=True)).T
  has = target.sum(1) > 0
  top1 = np.mean([target[r, np.argmax(s[r])] > 0 for r in np.flatnonzero(has)])
  assert values[1][1] == pytest.approx(top1, abs=1e-6) and values[8][1] == values[1][1]  # counts of 15 rows
  # The gradient pulls the image towards its target's words: one step lowers the loss.
  g = jax.grad(lambda a: topic.topic_loss(a, words, target, temp)[0])(jnp.asarray(img))
  assert float(topic.topic_loss(img - 0.05 * np.asarray(g), words, target, temp)[0]) < values[1][0]
  assert np.all(np.asarray(g)[3] == 0)  # the row without a target has no gradient


def test_topic_weight_zero_is_bitwise_unchanged_and_w_adds_the_term():
  from vldeformer_jax.model.vldeformer import VLDeformer
  from vldeformer_jax.training import decompose
  from vldeformer_jax.training.defaults import base_config
  from model_helpers import random_text_rows, tiny_params, tiny_text_model
  lt, r, f, n, v = 8, 3, 6, 8, 5
  mc = tiny_text_model(lt, r, f)
  rs = np.random.RandomState(0)
  text = functools.partial(random_text_rows, rs, text_len=lt)

  batch = {f"text_{k}": x for k, x in text(n).items()}
  img = text(n)
  batch.update(image_input_ids=img["input_ids"], image_token_type_ids=img["attention_mask"],
               image_attention_mask=np.ones((n, lt + r), np.int32),
               image_img_feats=rs.randn(n, r, f).astype(np.float32))
  plain = dict(batch)
  batch.update({f"topic_word_{k}": np.broadcast_to(x[None], (n,) + x.shape).copy() for k, x in text(v).items()})
  counts = rs.randint(0, 3, size=(n, v))
  counts[0] = 0
  batch["image_topic_target"] = (counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)
  model, params = VLDeformer(mc), tiny_params(mc, 0)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  trainable = {"model": params, "log_temperature": jnp.float32(np.log(0.1))}
  rng = jax.random.key(1)
  out = {}
  for name, w, b in (("absent", None, plain), ("zero", 0.0, batch), ("on", 0.5, batch)):
    c = base_config()
    c.loss.temperature = 0.1
    if w is None:
      del c.loss["topic_weight"]  # a config that predates the term
    else:
      c.loss.topic_weight = w
    out[name] = jax.jit(decompose.make_loss_fn(model, c, mesh))(trainable, b, rng)
  (l_abs, m_abs), (l_zero, m_zero), (l_on, m_on) = out["absent"], out["zero"], out["on"]
  assert_bitwise(l_zero, l_abs)  # rule EXACT, the batch's topic keys ignored
  assert sorted(m_zero) == sorted(m_abs) and "topic_loss" not in m_zero
  for k in m_abs:
    assert_bitwise(m_zero[k], m_abs[k], k)

  # The term is the KL of the image embeddings and the topic words' text embeddings (no dropout: any key).
  @jax.jit
  def term(params):
    image = decompose.embed(model, params, batch, "image_", rng, True)
    emb = decompose.embed_topic_words(model, params, batch, rng)
    return topic.topic_loss(image, emb["topic_words"], emb["topic_target"], 0.1)[0]
  tp = term(params)
  # Rule F32-PAIR: the same forwards and loss as another program (a 1-layer encoder of 8 tokens), then the
  # KL over V = 5 words, mean over 7 rows; then one multiply-add.
  n_tp = 2 * (8 * 32 + 64 + 8) + 3 * 32 + v + n + 3 * ELEMENTARY + 4
  scale = 2 * (np.log(v) + 2 / 0.1)
  assert_f32(m_on["topic_loss"], tp, n=n_tp, scale=scale, pair=True)
  assert_f32(l_on, float(l_abs) + 0.5 * float(m_on["topic_loss"]), n=n_tp + 2,
             scale=abs(float(l_abs)) + scale, pair=True)
  assert float(m_on["topic_loss"]) > 0 and 0 <= float(m_on["topic_top1"]) <= 1


def test_replace_captions_exact_count_never_own_and_seeded():
  rng = np.random.default_rng(3)
  captions = [[f"caption {i} {j}" for j in range(int(rng.integers(1, 6)))] for i in range(40)]
  captions[5] = list(captions[6])  # two images with the same captions: never a donor of the other's text
  n = sum(map(len, captions))
  for p in (0.0, 0.2, 0.5, 1.0):
    new, replaced = noisy_pairs.replace_captions(captions, p, seed=7)
    assert len(replaced) == round(p * n)
    changed = [(i, j) for i, caps in enumerate(new) for j, c in enumerate(caps) if c != captions[i][j]]
    assert changed == [(i, j) for i, j, _, _ in replaced]  # exactly those slots, each to a new text
    for i, j, donor, slot in replaced:
      assert donor != i and new[i][j] == captions[donor][slot] and new[i][j] not in captions[i]
    assert [len(c) for c in new] == [len(c) for c in captions]
    again, _ = noisy_pairs.replace_captions(captions, p, seed=7)
    assert again == new
  assert noisy_pairs.replace_captions(captions, 0.5, seed=8)[0] != noisy_pairs.replace_captions(captions, 0.5, 7)[0]
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    noisy_pairs.replace_captions(captions, 1.5, 0)


def test_demo_writer_noisy_variant_replaces_training_captions_only(tmp_path):
  clean = demo_world.write_demo_vinvl(str(tmp_path / "clean"), seed=1, num_train=12, num_test=4)
  demo_world.write_demo_vinvl(str(tmp_path / "noisy"), seed=1, num_train=12, num_test=4, noisy_captions=0.25,
                              noise_seed=3)
  read = lambda d, s: json.loads((tmp_path / d / f"{s}_captions.json").read_text())  # noqa: E731
  assert read("noisy", "test") == read("clean", "test")
  a, b = read("clean", "train"), read("noisy", "train")
  assert list(a) == list(b) and clean["num_train"] == 12
  n = sum(len(c) for c in a.values())
  differ = sum(x != y for k in a for x, y in zip(a[k], b[k]))
  assert differ == round(0.25 * n)
  for name in ("features.tsv", "predictions.tsv"):
    assert (tmp_path / "noisy" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_topic_config_checks():
  from vldeformer_jax.training import config_checks
  from vldeformer_jax.training.defaults import base_config
  c = base_config()
  c.objective = "decompose"
  assert not [e for e in config_checks.validate(c, device_count=1, process_count=1) if "topic" in e]
  c.loss.topic_weight, c.objective, c.train.micro_batch_size = 1.0, "early_interaction", 2
  errors = [e for e in config_checks.validate(c, device_count=1, process_count=1) if "topic" in e]
  assert len(errors) == 2 and "objective 'decompose' only" in errors[0] and "micro_batch_size" in errors[1]
  c.loss.topic_weight = -1.0
  assert [e for e in config_checks.validate(c, device_count=1, process_count=1) if "topic" in e] == [
      "config.loss.topic_weight: must be >= 0, got -1.0"]
  from repo_configs import get_config
  arms = {arm: get_config("demo_topic", arm) for arm in ("infonce", "hinge", "topic", "topic:0.5")}
  assert [(a.loss.name, a.loss.topic_weight) for a in arms.values()] == [
      ("infonce", 0.0), ("hinge", 0.0), ("infonce", 1.0), ("infonce", 0.5)]
  for a in arms.values():
    errors = config_checks.validate(a, device_count=1, process_count=1)
    assert [e for e in errors if not e.startswith("config.data: dataset")] == []  # data: not prepared here
