"""Re-ranking an index query (retrieval/index_rerank.py): token states stored by `build --store_tokens` are
the encoder's (within the quantiser's step), late interaction re-scores the first stage's shortlist from
them as a float64 MrSw reference does, the cross-encoder / mixed scores are the match head's margins and
their documented mix, and an untrained match head or an index without tokens is refused.
Tolerances: tests/tolerances.py (rules named at each comparison)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from vldeformer_jax.io import export
from vldeformer_jax.model import inputs
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.retrieval import index, index_build, index_query, rerank
from vldeformer_jax.retrieval.encoder import Encoder
from model_helpers import embed_depth, logit_bounds, match_depth, tiny_params
from tolerances import ELEMENTARY, U_BF16, assert_f32, assert_within, gamma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_text_len=16,
            max_regions=6)
TEXT = "a small red car to the left of a dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from vldeformer_jax.data import demo_world as demo
  from vldeformer_jax.data import prepare
  d = tmp_path_factory.mktemp("rerank")
  cfg = ModelConfig(**TINY)
  params = tiny_params(cfg, 0)
  export.write_export(str(d / "export"), params, cfg, inputs.BUNDLED_VOCAB)
  export.write_export(str(d / "untrained"), params, cfg, inputs.BUNDLED_VOCAB,
                      metadata={"untrained": ["classifier/kernel", "classifier/bias"]})
  name = demo.prepare_demo(str(d / "data"), seed=0, num_train=2, num_test=12)
  enc = Encoder.load(str(d / "export"), batch_size=8)
  src = prepare.load_split(str(d / "data"), name, "test")
  common = dict(metadata={"data_dir": str(d / "data"), "dataset": name, "split": "test"})
  index_build.build_index(enc, src, str(d / "img_int8"), side="images", store_tokens="int8", **common)
  index_build.build_index(enc, src, str(d / "cap_bf16"), side="captions", store_tokens="bfloat16", **common)
  index_build.build_index(enc, src, str(d / "img_plain"), side="images", **common)
  return d, name, cfg, params, enc, src


def _mrsw64(words, wmask, tokens, tmask):
  """float64 MrSw of one caption against each image: states re-normalised, padded tokens out of the max,
  padded words out of the sum."""
  w = np.asarray(words, np.float64)
  w = w / np.linalg.norm(w, axis=-1, keepdims=True).clip(1e-12)
  t = np.asarray(tokens, np.float64)
  t = t / np.linalg.norm(t, axis=-1, keepdims=True).clip(1e-12)
  out = []
  for g in range(len(t)):
    sims = w @ t[g].T  # [W, T]
    sims = np.where(tmask[g][None, :] > 0, sims, -np.inf)
    out.append(np.sum(np.where(wmask > 0, sims.max(1), 0.0)))
  return np.array(out)


def _dequantized(ix, rows):
  stored, mask = ix.token_rows(rows)
  values = np.asarray(stored["values"]).astype(np.float64)
  return (values * stored["scales"][..., None] if "scales" in stored else values), mask


def test_stored_token_states_are_the_encoders(tiny):
  d, _, cfg, _, enc, src = tiny
  recs = [src[i] for i in range(len(src))]
  fresh, fmask = enc.image_token_states([np.asarray(r["features"], np.float32) for r in recs],
                                        [r["tags"] for r in recs])
  ix = index.Index.load(str(d / "img_int8"))
  deq, mask = _dequantized(ix, np.arange(len(recs)))
  np.testing.assert_array_equal(mask, fmask)  # rule EXACT: the same attention masks
  # The build's states and these are the same computation in other batches (rule F32-PAIR, unit vectors:
  # scale 1; embed_depth bounds the token states' chain, which is the forward plus a normalisation). int8
  # (x ~= code * step, step = max |x| / 127 per token, stored) adds half a step, plus the float32 rounding
  # of x / step and of code * step, each at most 127 steps in magnitude (rule F32).
  steps = ix.token_rows(np.arange(len(recs)))[0]["scales"][..., None]
  bound = steps * (0.5 + 127 * gamma(2)) + 2 * gamma(embed_depth(cfg))
  on = mask[..., None] > 0
  assert_within(np.where(on, deq, 0), np.where(on, fresh, 0), bound, rule="int8 step + rule F32-PAIR")
  cap = index.Index.load(str(d / "cap_bf16"))
  words, wmask = enc.text_token_states(cap.texts)
  deq, mask = _dequantized(cap, np.arange(len(cap.texts)))
  np.testing.assert_array_equal(mask, wmask)
  on = mask[..., None] > 0
  # bfloat16: one rounding, relative 2^-8 (rule BF16), plus rule F32-PAIR as above.
  assert_within(np.where(on, deq, 0), np.where(on, words, 0),
                np.abs(words) * U_BF16 + 2 * gamma(embed_depth(cfg)) * (1 + U_BF16), rule="BF16 + F32-PAIR")


@pytest.mark.parametrize("name,score", [("img_int8", "late"), ("img_int8", "late_normalized"),
                                        ("cap_bf16", "late")])
def test_late_rerank_scores_the_shortlist_from_stored_tokens(tiny, name, score):
  d, _, cfg, _, enc, src = tiny
  ix = index.Index.load(str(d / name))
  k_short = 8
  query = dict(text=TEXT) if name.startswith("img") else dict(image_record=src[3])
  first = index_query.query_index(ix, enc, k=k_short, **query)
  rows = index_query.query_index(ix, enc, k=k_short, rerank_top_k=k_short, rerank_score=score, **query)
  # The re-ranked list is the first stage's shortlist (the same search: rule EXACT), re-ordered.
  assert sorted((r["image_id"], r["text"]) for r in rows) == sorted((r["image_id"], r["text"]) for r in first)
  assert ({(r["image_id"], r["text"]): r["score"] for r in rows}
          == {(r["image_id"], r["text"]): r["score"] for r in first})
  # Reference: float64 MrSw from the query's token states (the same call query_index makes: bitwise the
  # same) and the stored, dequantised states of each returned row.
  found = [int(np.flatnonzero((np.asarray(ix.ids) == r["image_id"]) & (np.array(ix.texts) == r["text"]))[0])
           for r in rows]
  deq, mask = _dequantized(ix, found)
  if name.startswith("img"):
    w, wm = enc.text_token_states([TEXT])
    ref = _mrsw64(w[0], wm[0], deq, mask)
    n_words = int(wm.sum())
    n_words_each = np.full(len(found), n_words)
  else:
    rec = src[3]
    t, tm = enc.image_token_states([np.asarray(rec["features"], np.float32)], [rec["tags"]])
    ref = np.array([_mrsw64(deq[j], mask[j], t, tm)[0] for j in range(len(found))])
    n_words_each = mask.sum(1)
  if score == "late_normalized":
    ref = ref / n_words_each
  # Rule F32: per word, the re-normalisation (H terms, rsqrt, product), a H-term dot product, then a sum
  # over the words (|cos| <= 1: scale = number of words; normalised: divided by it, scale 1, one more op).
  n = (cfg.hidden_size + ELEMENTARY + 2) + cfg.hidden_size + int(np.max(n_words_each)) + 1
  got = np.array([r["rerank_score"] for r in rows])
  scale = np.ones(len(found)) if score == "late_normalized" else n_words_each.astype(np.float64)
  assert_f32(got, ref, n=n, scale=scale)
  # The order is the new score's, descending, where the reference decides it (rule RANKS).
  gaps = -np.diff(ref)
  decided = np.abs(gaps) > 2 * gamma(n) * scale.max()
  assert np.all(gaps[decided] > 0)


def test_cross_and_mixed_rerank_and_refusals(tiny):
  d, name, cfg, params, enc, src = tiny
  ix = index.Index.load(str(d / "img_plain"))
  k_short = 6
  first = index_query.query_index(ix, enc, text=TEXT, k=k_short)
  cross = index_query.query_index(ix, enc, text=TEXT, k=k_short, rerank_top_k=k_short, rerank_score="cross",
                            source=src)
  # The margins are the match head's logit[1] - logit[0] on (query, image) pairs: rule F32-PAIR against the
  # unbatched, untrimmed forward (scale: the logits' bound from the parameters).
  by_id = {int(src[i]["image_id"]): src[i] for i in range(len(src))}
  recs = [by_id[r["image_id"]] for r in cross]
  text_x = inputs.text_inputs(enc.tokenizer, [TEXT] * len(recs), cfg.max_text_len)
  image_x = enc.image_inputs([np.asarray(r["features"], np.float32) for r in recs], [r["tags"] for r in recs])
  ref = enc.match_logit_margin_inputs(text_x, image_x)
  itm, _ = logit_bounds(params)
  assert_f32([r["rerank_score"] for r in cross], ref, n=match_depth(cfg) + 1, scale=2 * itm, pair=True)
  # mixed = rerank.mixed_scores(first-stage cosines, margins, w) over the shortlist (rule EXACT: the same
  # compiled margins on the same inputs, the same numpy function).
  mixed = index_query.query_index(ix, enc, text=TEXT, k=k_short, rerank_top_k=k_short, rerank_score="mixed",
                            rerank_weight=0.3, source=src)
  cos = np.array([r["score"] for r in first], np.float32)
  margin_of = {r["image_id"]: r["rerank_score"] for r in cross}
  want = rerank.mixed_scores(cos[None], np.array([[margin_of[r["image_id"]] for r in first]], np.float32), 0.3)[0]
  want_of = dict(zip([r["image_id"] for r in first], want.tolist()))
  assert all(np.float32(r["rerank_score"]) == np.float32(want_of[r["image_id"]]) for r in mixed)
  assert [r["rerank_score"] for r in mixed] == sorted((r["rerank_score"] for r in mixed), reverse=True)
  # decomposed: the first stage's order and cosines (the control).
  same = index_query.query_index(ix, enc, text=TEXT, k=k_short, rerank_top_k=k_short, rerank_score="decomposed")
  assert [(r["image_id"], r["score"]) for r in same] == [(r["image_id"], r["score"]) for r in first]

  data = dict(data_dir=str(d / "data"), dataset=name, split="test")
  with pytest.raises(export.UntrainedHeadError, match="never trained|untrained"):
    index_query.run_query(str(d / "img_plain"), str(d / "export"), text=TEXT, rerank_top_k=5, rerank_score="cross",
                    rerank_export=str(d / "untrained"), **data)
  rows = index_query.run_query(str(d / "img_plain"), str(d / "export"), text=TEXT, rerank_top_k=5, rerank_score="cross",
                         rerank_export=str(d / "untrained"), allow_untrained_head=True, k=3, **data)
  assert len(rows) == 3 and all(r["rerank_score"] is not None for r in rows)
  with pytest.raises(index.BadIndexError, match="stores no token states.*--store_tokens"):
    index_query.run_query(str(d / "img_plain"), str(d / "export"), text=TEXT, rerank_top_k=5, rerank_score="late")
  with pytest.raises(ValueError, match="a --text query needs an images index"):
    index_query.run_query(str(d / "cap_bf16"), str(d / "export"), text=TEXT, rerank_top_k=5, rerank_score="late")
  with pytest.raises(ValueError, match="does not extend"):
    index.add_items(str(d / "img_int8"), np.zeros((1, cfg.embed_dim), np.float32), [1], ["x"],
                    fingerprint=enc.fingerprint)


def test_cli_query_rerank_late(tiny):
  d, _, _, _, _, _ = tiny
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "launch/index.py", "query", f"--index={d / 'img_int8'}",
                        f"--export={d / 'export'}", f"--text={TEXT}", "--k=3", "--rerank_top_k=6",
                        "--rerank_score=late"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3 and all("(late " in line for line in lines)
  scores = [float(line.split("(late ")[1].split(")")[0]) for line in lines]
  assert scores == sorted(scores, reverse=True)
