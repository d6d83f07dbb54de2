"""Conversion rules, merge_params, the export format, and the converter CLI's refusals.

A tiny model's parameters are written back into the Oscar PyTorch key layout (`convert.to_state_dict`), so
every conversion here has an exact known answer: the original tree, bit for bit.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from vldeformer_jax.io import convert
from vldeformer_jax.io import export
from vldeformer_jax.model.inputs import BUNDLED_VOCAB
from vldeformer_jax.model.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40, img_feature_dim=6, max_text_len=8, max_regions=4)


def random_params(config, seed=0):
  """Every leaf of the model's tree (shapes from jax.eval_shape of init_params) random normal: nothing
  compiles, and no two leaves are alike, so any mix-up of names or layouts shows."""
  rng = np.random.default_rng(seed)
  return convert.unflatten({k: rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in sorted(convert.expected_shapes(config).items())})


@pytest.fixture(scope="module")
def params():
  return random_params(CFG)


def assert_trees_equal(a, b):
  fa, fb = convert.flatten(a), convert.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def write_checkpoint(path, state_dict, config=CFG, weights="pytorch_model.bin"):
  os.makedirs(path, exist_ok=True)
  if weights.endswith(".safetensors"):  # the CLI then never imports torch: cheaper subprocesses
    save_file({k: np.array(v) for k, v in state_dict.items()}, os.path.join(path, weights))
  else:
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, os.path.join(path, weights))
  hf = {k: v for k, v in config.to_dict().items() if k not in ("max_text_len", "max_regions", "dtype", "pooling")}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**hf, "hidden_act": "gelu", "model_type": "bert"}, f)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]) + "\n")
  return str(path)


def test_rename_rules():
  assert convert.rename("bert.encoder.layer.1.attention.self.query.weight") == (
      "bert/encoder/layer/1/attention/self/query/kernel", "T")
  assert convert.rename("bert.embeddings.word_embeddings.weight") == ("bert/embeddings/word_embeddings/embedding", None)
  assert convert.rename("bert.embeddings.LayerNorm.gamma") == ("bert/embeddings/LayerNorm/scale", None)
  assert convert.rename("bert.LayerNorm.beta") == ("bert/LayerNorm/bias", None)
  assert convert.rename("cls.predictions.bias") == ("cls/predictions/bias", None)
  assert convert.rename("classifier.weight") == ("classifier/kernel", "T")


def test_round_trip_is_exact(params):
  sd = convert.to_state_dict(params)
  assert sd["bert.img_embedding.weight"].shape == (32, 6)  # PyTorch Linear layout [out, in]
  assert sd["bert.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
  assert "bert.LayerNorm.weight" in sd and "classifier.weight" in sd and "cls.predictions.bias" in sd
  got, report = convert.convert_state_dict(sd, CFG)
  assert_trees_equal(got, params)
  assert report.layout == "oscar" and report.fresh == [] and report.converted == len(sd)


def test_cpkt_wrapped_prefixed_legacy_names(params, tmp_path):
  """A VLDeformer model.cpkt: {"state_dict": ...}, DataParallel `module.` keys, legacy gamma/beta."""
  sd = {}
  for k, v in convert.to_state_dict(params).items():
    if k.startswith("bert."):
      k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
      sd["module." + k] = v
  write_checkpoint(tmp_path, {}, weights="unused.bin")
  torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, "epoch": 3},
             tmp_path / "model.cpkt")
  os.remove(tmp_path / "unused.bin")
  loaded, files = convert.load_state_dict(str(tmp_path))
  assert files.endswith("model.cpkt")
  got, report = convert.convert_state_dict(loaded, CFG)
  assert report.fresh == ["classifier/bias", "classifier/kernel", "cls/predictions/bias",
                          "cls/predictions/transform/LayerNorm/bias", "cls/predictions/transform/LayerNorm/scale",
                          "cls/predictions/transform/dense/bias", "cls/predictions/transform/dense/kernel"]
  assert_trees_equal(got["bert"], params["bert"])


def test_plain_bert_without_prefix_gets_fresh_region_embedding(params):
  sd = {k[len("bert."):]: v for k, v in convert.to_state_dict(params).items()
        if k.startswith("bert.") and "img_embedding" not in k and not k.startswith("bert.LayerNorm")}
  sd["embeddings.position_ids"] = np.arange(40)[None]  # HF buffer: dropped
  got, report = convert.convert_state_dict(sd, CFG, seed=3)
  assert report.layout == "bert"
  assert "bert/img_embedding/kernel" in report.fresh and "bert/LayerNorm/scale" in report.fresh
  np.testing.assert_array_equal(got["bert"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                params["bert"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"])
  fresh = got["bert"]["img_embedding"]["kernel"]
  assert fresh.shape == (6, 32) and fresh.dtype == np.float32 and abs(fresh.std() - 0.02) < 0.01
  np.testing.assert_array_equal(got["bert"]["LayerNorm"]["scale"], np.ones(32, np.float32))
  again, _ = convert.convert_state_dict(sd, CFG, seed=3)
  np.testing.assert_array_equal(again["bert"]["img_embedding"]["kernel"], fresh)  # seeded


def test_untied_decoder_is_refused(params):
  sd = convert.to_state_dict(params)
  sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"] + 1.0
  with pytest.raises(convert.ConversionError, match=r"cls\.predictions\.decoder\.weight is not tied"):
    convert.convert_state_dict(sd, CFG)


def test_merge_params(params):
  cfg = CFG.replace(projection_dim=8)
  init = random_params(cfg, seed=1)
  merged = convert.merge_params(params, init, allow_missing=[r"^projection/"])
  assert_trees_equal({k: v for k, v in merged.items() if k != "projection"}, params)
  np.testing.assert_array_equal(merged["projection"]["kernel"], init["projection"]["kernel"])
  with pytest.raises(convert.ConversionError, match=r"missing 2 parameter\(s\).*projection/bias, projection/kernel"):
    convert.merge_params(params, init)
  with pytest.raises(convert.ConversionError, match=r"unexpected parameter\(s\).*projection/kernel"):
    convert.merge_params(merged, params)
  assert "projection" not in convert.merge_params(merged, params, allow_unexpected=[r"^projection/"])
  bad = convert.flatten(params)
  bad["classifier/kernel"] = np.zeros((32, 3), np.float32)
  with pytest.raises(convert.ConversionError, match=r"classifier/kernel is \[32, 3\] but the model expects \[32, 2\]"):
    convert.merge_params(bad, params)
  as_bf16 = convert.merge_params(jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), params), params)
  assert convert.flatten(as_bf16)["classifier/kernel"].dtype == np.float32


def test_export_round_trip_and_fingerprint(params, tmp_path):
  path = str(tmp_path / "export")
  fp = export.write_export(path, params, CFG, BUNDLED_VOCAB, metadata={"source": "unit test", "step": 7})
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary sibling left
  ex = export.read_export(path)
  assert_trees_equal(ex.params, params)
  assert ex.model_config == CFG and ex.fingerprint == fp == export.export_fingerprint(params)
  assert ex.metadata["source"] == "unit test" and ex.metadata["step"] == 7 and ex.metadata["version"] == 1
  assert open(ex.vocab_file).read() == open(BUNDLED_VOCAB).read()
  changed = jax.tree.map(np.copy, params)
  changed["classifier"]["bias"][0] += 1e-7
  assert export.export_fingerprint(changed) != fp
  assert export.read_export(path, dtype="bfloat16").params["classifier"]["kernel"].dtype == jax.numpy.bfloat16
  with pytest.raises(FileExistsError, match="already exists"):
    export.write_export(path, changed, CFG, BUNDLED_VOCAB)
  assert export.write_export(path, changed, CFG, BUNDLED_VOCAB, overwrite=True) != fp
  assert export.read_export(path).params["classifier"]["bias"][0] == changed["classifier"]["bias"][0]
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_export_failures_leave_nothing(params, tmp_path, monkeypatch):
  path = str(tmp_path / "export")
  with pytest.raises(TypeError, match="not JSON-serialisable"):
    export.write_export(path, params, CFG, BUNDLED_VOCAB, metadata={"x": object()})

  def broken_copy(*args):
    raise OSError("disk full")
  monkeypatch.setattr(export.shutil, "copyfile", broken_copy)
  with pytest.raises(OSError, match="disk full"):
    export.write_export(path, params, CFG, BUNDLED_VOCAB)
  assert os.listdir(tmp_path) == []


def test_read_export_errors(params, tmp_path):
  with pytest.raises(FileNotFoundError, match="export directory not found: .*nowhere"):
    export.read_export(str(tmp_path / "nowhere"))
  path = str(tmp_path / "export")
  export.write_export(path, params, CFG, BUNDLED_VOCAB)
  meta = json.load(open(os.path.join(path, "export.json")))
  json.dump({**meta, "fingerprint": "0" * 64}, open(os.path.join(path, "export.json"), "w"))
  with pytest.raises(ValueError, match="does not match export.json"):
    export.read_export(path)
  json.dump({**meta, "format": "something else"}, open(os.path.join(path, "export.json"), "w"))
  with pytest.raises(ValueError, match="field 'format'"):
    export.read_export(path)
  json.dump(meta, open(os.path.join(path, "export.json"), "w"))
  export.read_export(path)
  for root, _, files in os.walk(os.path.join(path, "params")):  # damage every stored parameter file
    for f in files:
      if f not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        open(os.path.join(root, f), "wb").write(b"garbage")
  with pytest.raises(ValueError, match="cannot restore the parameters|does not match"):
    export.read_export(path)
  os.remove(os.path.join(path, "model_config.json"))
  with pytest.raises(FileNotFoundError, match="missing model_config.json"):
    export.read_export(path)


@pytest.fixture(scope="module")
def cli_failures(params, tmp_path_factory):
  """The converter CLI on five broken checkpoints, run as parallel subprocesses (safetensors, and one
  truncated pytorch_model.bin)."""
  root = tmp_path_factory.mktemp("cli")
  good = convert.to_state_dict(params)
  st = "model.safetensors"
  cases = {}
  sd = dict(good)
  del sd["bert.encoder.layer.1.output.dense.weight"]
  cases["missing"] = write_checkpoint(root / "missing", sd, weights=st)
  sd = dict(good)
  sd["bert.encoder.layer.2.attention.self.query.weight"] = np.zeros((32, 32), np.float32)
  cases["unexpected"] = write_checkpoint(root / "unexpected", sd, weights=st)
  sd = dict(good)
  sd["bert.img_embedding.weight"] = np.zeros((32, 7), np.float32)
  cases["shape"] = write_checkpoint(root / "shape", sd, weights=st)
  cases["no_config"] = write_checkpoint(root / "no_config", good, weights=st)
  os.remove(os.path.join(cases["no_config"], "config.json"))
  cases["corrupt"] = write_checkpoint(root / "corrupt", good)
  weights = os.path.join(cases["corrupt"], "pytorch_model.bin")
  data = open(weights, "rb").read()
  open(weights, "wb").write(data[:len(data) // 2])
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  procs = {name: subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "convert_checkpoint.py"), f"--checkpoint={src}",
       f"--output={root / 'out' / name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name, src in cases.items()}
  results = {}
  for name, p in procs.items():
    out, err = p.communicate(timeout=300)
    results[name] = (p.returncode, err)
  return root, results


@pytest.mark.parametrize("case,message", [
    ("missing", "missing 1 key(s) the model needs: bert.encoder.layer.1.output.dense.weight "
                "(-> bert/encoder/layer/1/output/dense/kernel [64, 32])"),
    ("unexpected", "1 unexpected key(s) the model does not have: bert.encoder.layer.2.attention.self.query.weight"),
    ("shape", "bert.img_embedding.weight has shape [7, 32], the model (config.json) expects [6, 32]"),
    ("no_config", "no config.json"),
    ("corrupt", "pytorch_model.bin: cannot read the weights file"),
])
def test_cli_refuses_bad_checkpoints(cli_failures, case, message):
  root, results = cli_failures
  code, err = results[case]
  assert code != 0
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1, err[-2000:]
  assert errors[0].startswith("convert_checkpoint: error: ") and message in errors[0], errors[0]
  assert not os.path.exists(root / "out" / case)
  assert not os.path.exists(root / "out") or os.listdir(root / "out") == []  # no temporary directory left


def test_convert_checkpoint_writes_export_and_refuses_overwrite(params, tmp_path):
  src = write_checkpoint(tmp_path / "src", convert.to_state_dict(params))
  out = str(tmp_path / "export")
  report = convert.convert_checkpoint(src, out, config_overrides={"max_text_len": 8, "max_regions": 4})
  assert report.fresh == []
  ex = export.read_export(out)
  assert_trees_equal(ex.params, params)
  assert ex.model_config == CFG and ex.metadata["layout"] == "oscar" and ex.metadata["source"] == src
  with pytest.raises(convert.ConversionError, match="output already exists"):
    convert.convert_checkpoint(src, out)


def test_corrupt_safetensors_and_missing_vocab(params, tmp_path):
  src = write_checkpoint(tmp_path / "src", convert.to_state_dict(params), weights="model.safetensors")
  weights = os.path.join(src, "model.safetensors")
  np.testing.assert_array_equal(convert.load_state_dict(src)[0]["classifier.bias"], params["classifier"]["bias"])
  data = open(weights, "rb").read()
  open(weights, "wb").write(data[:-100])
  with pytest.raises(convert.ConversionError, match=r"model.safetensors: cannot read the weights file"):
    convert.convert_checkpoint(src, str(tmp_path / "out"))
  os.remove(os.path.join(src, "vocab.txt"))
  with pytest.raises(convert.ConversionError, match="no vocab.txt"):
    convert.convert_checkpoint(src, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["src"]


def test_bert_base_backbone_size_matches_spec():
  """docs/method.md §1.3: the VinVL BERT-base backbone (`bert.*`, image Linear + LayerNorm included) has 111,062,016
  parameters; the Oscar key count is 5 embedding tensors + 16 per layer + pooler 2 + regions 4."""
  shapes = convert.expected_shapes(ModelConfig())
  backbone = {k: v for k, v in shapes.items() if k.startswith("bert/")}
  assert sum(int(np.prod(v.shape)) for v in backbone.values()) == 111_062_016
  assert len(backbone) == 5 + 16 * 12 + 2 + 4
  assert shapes["bert/img_embedding/kernel"].shape == (2054, 768)
  assert shapes["classifier/kernel"].shape == (768, 2)
