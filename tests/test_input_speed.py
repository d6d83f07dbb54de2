"""The fast input path (docs/method.md §3.3, BENCHMARKS.md §6): cached wordpieces, storage layouts, batches equal to the old path; the
accelerator benchmark's harness on CPU.

Speed itself is measured by benchmarks/input_pipeline.py and benchmarks/accelerator.py (BENCHMARKS.md),
never here; these tests check that the faster code gives the same bytes.
"""
import glob
import json

import numpy as np
import pytest

from vldeformer_jax.data import negatives, pipeline, prepare, storage, wordpieces
from vldeformer_jax.model import inputs

import test_prepare_data as prep

TOKENIZER = inputs.load_tokenizer()
TEXTS = ["a man riding a horse.", "  two   dogs,(playing) on the  grass!! ", "", "   ", "x" * 130,
         "tennis racket man shirt", "ünïcode café déjà vu", "tab\tand\nnewline", "ctrl\x1cjoined", "中文字 dog",
         b"bytes caption", "it's a dog-friendly place; isn't it?", "UPPER Case WORDS", "supercalifragilistic " * 12]


@pytest.mark.parametrize("max_len,token_type", [(8, 0), (35, 1)])
def test_cached_wordpieces_equal_the_tokenizer_byte_for_byte(max_len, token_type):
  cached = wordpieces.WordpieceTokenizer(TOKENIZER)
  want = inputs.tokenize_segments(TOKENIZER, TEXTS, max_len, token_type)
  for _ in range(2):  # first call fills the word cache, the second reads it
    got = cached.segments(TEXTS, max_len, token_type)
    assert sorted(got) == sorted(want)
    for k in want:
      assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
  assert "riding" in cached._words and not any("\t" in w or "ü" in w for w in cached._words)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """One small VinVL source prepared in three storage layouts."""
  root = tmp_path_factory.mktemp("layouts")
  train, test, images = prep._make_source(seed=3, n_train=12, n_test=2)
  for i in images.values():  # plain ASCII captions too, so the cached-wordpiece path is exercised
    i["captions"] = [c.replace("ünïcode", "unicode") if k % 2 else c for k, c in enumerate(i["captions"])]
  cap_dir, feat_dir, _ = prep._write_vinvl(str(root), train, test, images)
  out = {}
  for dtype, compression in (("float32", "none"), ("bfloat16", "none"), ("float16", "default")):
    name = f"l_{dtype}_{compression}"
    prepare.prepare_vinvl(cap_dir, feat_dir, name, str(root / "data"), feature_dtype=dtype, compression=compression)
    out[dtype] = (str(root / "data"), name, compression)
  return out, images


def test_layouts_store_what_they_say_and_read_back(layouts):
  out, images = layouts
  for dtype, (data_dir, name, compression) in out.items():
    meta = prepare.read_metadata(data_dir, name)
    assert meta["feature_dtype"] == dtype and meta["compression"] == compression
    src = prepare.load_split(data_dir, name, "train")
    for i in range(len(src)):
      rec = src[i]
      want = images[int(rec["image_id"])]["features"].astype(storage.feature_dtype(dtype))
      assert rec["features"].dtype == want.dtype and rec["features"].tobytes() == want.tobytes()
    shards = glob.glob(f"{data_dir}/{name}/1.0.0/*.array_record-*")
    from array_record.python import array_record_module as ar
    options = ar.ArrayRecordReader(shards[0]).writer_options_string()
    assert ("uncompressed" in options) == (compression == "none"), options
  with pytest.raises(ValueError, match="feature_dtype 'int8'"):
    storage.feature_dtype("int8")
  with pytest.raises(ValueError, match="compression 'lz4'"):
    storage.check_compression("lz4")


def _old_batch(src, vocab, step, **kw):
  """The batch as data/pipeline.py built it before it was sped up (7fa18cc): negative_image + image_inputs/text_inputs."""
  b = pipeline.BatchBuilder(src, **kw)
  epoch, idx = b.image_indices(step)
  recs = [b._record(i) for i in idx]
  recs = [dict(r, features=np.asarray(r["features"], np.float32)) for r in recs]
  caps = [b._caption(r, i, epoch) for r, i in zip(recs, idx)]
  out = {f"text_{k}": v for k, v in inputs.text_inputs(TOKENIZER, caps, kw["max_text_len"]).items()}
  out.update({f"image_{k}": v for k, v in inputs.image_inputs(
      TOKENIZER, [r["features"] for r in recs], [r["tags"] for r in recs], kw["max_text_len"], kw["max_regions"],
      prep.F).items()})
  nc, nf, nt = [], [], []
  for r, c, i in zip(recs, caps, idx):
    rng = np.random.default_rng([kw["seed"], pipeline._STREAM_NEGATIVES, epoch, int(i)])
    other = b._record(negatives.draw_other_index(rng, len(src), int(i)))
    nc.append(negatives.negative_caption(c, vocab, rng, 0.3))
    f, t = negatives.negative_image(r["features"], r["tags"], np.asarray(other["features"], np.float32),
                                    other["tags"], rng)
    nf.append(f)
    nt.append(t)
  out.update({f"neg_text_{k}": v[:, None] for k, v in inputs.text_inputs(TOKENIZER, nc, kw["max_text_len"]).items()})
  out.update({f"neg_image_{k}": v[:, None] for k, v in inputs.image_inputs(
      TOKENIZER, nf, nt, kw["max_text_len"], kw["max_regions"], prep.F).items()})
  return out


def test_batches_equal_the_old_path_and_the_dtype_option_only_rounds_features(layouts):
  out, _ = layouts
  kw = dict(tokenizer=TOKENIZER, global_batch_size=4, seed=5, max_text_len=12, max_regions=4, feature_dim=prep.F,
            num_captions_per_image=5, negatives_per_pair=1, replace_ratio=0.3, process_index=0, process_count=1)
  sources = {d: prepare.load_split(*out[d][:2], "train") for d in out}
  vocab = negatives.build_tag_vocabulary(sources["float32"], progress=False)
  kw["tag_vocabulary"] = vocab
  for step in range(3):
    ref = pipeline.BatchBuilder(sources["float32"], **kw)(step)
    old = _old_batch(sources["float32"], vocab, step, **kw)
    for k in old:
      assert ref[k].dtype == old[k].dtype and ref[k].tobytes() == old[k].tobytes(), k
    for dtype in ("bfloat16", "float16"):
      got = pipeline.BatchBuilder(sources[dtype], **kw)(step)
      assert sorted(got) == sorted(ref)
      for k in ref:
        if k.endswith("img_feats"):  # float32, the stored values widened: ref rounded once to the dtype
          want = ref[k].astype(storage.feature_dtype(dtype)).astype(np.float32)
          assert got[k].dtype == np.float32 and got[k].tobytes() == want.tobytes(), (dtype, k)
        else:
          assert got[k].tobytes() == ref[k].tobytes(), (dtype, k)


def test_accelerator_harness_on_cpu_tiny(tmp_path):
  from benchmarks import accelerator, train_step as ts
  assert accelerator.stated_peak("NVIDIA H200") == 989.0 and accelerator.stated_peak("NVIDIA A100-SXM4-80GB") == 312
  assert accelerator.stated_peak("TPU v5 lite") == 197 and accelerator.stated_peak("TPU v4") == 275
  assert accelerator.stated_peak("cpu") is None
  r = accelerator.run(tiny=True, demo_mode="none", repeats=1, batch_size=4, search_size=3000, encoder_n=8)
  assert r["platform"] == "cpu" and r["peak"]["source"].startswith("measured") and r["peak"]["tflops"] > 0
  step = r["train_step"]
  from vldeformer_jax.model.config import ModelConfig
  cfg = ModelConfig(**accelerator.TINY)
  assert step["analytic_tflop"] == pytest.approx(ts.analytic_flops(cfg, 4)["train_step"] / 1e12)
  assert 0 < step["mfu"] < 2 and step["pairs_per_s"] == pytest.approx(4 / step["seconds"]["median"])
  assert r["encoder"]["images_per_s"] > 0 and r["encoder"]["captions_per_s"] > 0
  assert r["search"]["gallery"] == 3000 and r["search"]["spot_check_exact"] is True
  assert r["demo"] == {"mode": "none"}
  json.dumps(r)  # the results file is JSON
