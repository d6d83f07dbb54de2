"""The training configs, their validation (one line per problem, before any compile) and the optimiser rules.

- every config file loads, and the paper configs hold the settings of docs/method.md §6.1;
- `config_validation.validate` reports each kind of error as exactly one line naming the field;
- `launch/train.py` with a bad config exits with status 2, one `config error:` line per problem on stderr,
  no compile (JAX_LOG_COMPILES=1 shows none) and no workdir created;
- the learning-rate schedule equals the reference `WarmupCosineSchedule` formula, and weight decay skips
  exactly the biases and LayerNorm scales.
"""
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from repo_configs import config_module

common, demo, tiny, vinvl_base_coco, vinvl_base_flickr = (
    config_module(n) for n in ("common", "demo", "tiny", "vinvl_base_coco", "vinvl_base_flickr"))
from vldeformer_jax.training import config_checks as config_validation
from vldeformer_jax.training import data_checks
from vldeformer_jax.training import optim
from vldeformer_jax.training import setup as train_setup
from vldeformer_jax.model.vldeformer import init_params
from vldeformer_jax.model.config import ModelConfig
from tolerances import ELEMENTARY, assert_f32


def test_paper_configs_hold_spec_settings():
  for c in (vinvl_base_coco.get_config(), vinvl_base_flickr.get_config()):
    assert c.objective == "decompose"
    assert c.train.global_batch_size == 1800
    assert c.train.learning_rate == 7.5e-6
    assert c.train.warmup_steps == 200
    assert c.train.weight_decay == 0.05
    assert c.train.max_grad_norm == 1.0
    assert (c.train.adam_b1, c.train.adam_b2, c.train.adam_eps) == (0.9, 0.999, 1e-8)
    assert c.model.dtype == "bfloat16"
    assert (c.data.max_text_len, c.data.max_regions) == (35, 70)
    assert c.loss.name == "infonce" and c.loss.temperature == 0.005 and not c.loss.learnable_temperature
    assert c.model.hidden_dropout_prob == 0.1 and c.model.pooling == "mean"
    assert c.seed == 88 and c.train.num_epochs == 200
  coco = vinvl_base_coco.get_config("/exports/vinvl,/data")
  assert (coco.init_export, coco.data.data_dir) == ("/exports/vinvl", "/data")
  assert vinvl_base_flickr.get_config().eval.protocol == "flickr1k"


def test_every_config_builds_a_model_config():
  for c in (common.get_config(), tiny.get_config(), tiny.get_config("early_interaction"), demo.get_config(),
            demo.get_config("negatives"), vinvl_base_coco.get_config()):
    mc, _, _ = train_setup.model_config_from(c)  # config.model with the lengths of config.data
    assert (mc.max_text_len, mc.max_tag_len, mc.max_regions) == (
        c.data.max_text_len, c.data.max_tag_len, c.data.max_regions)
  assert demo.get_config("negatives").data.negatives.num_per_pair == 1
  assert tiny.get_config("early_interaction").objective == "early_interaction"


def _valid(tmp_path):
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path / "data")
  return c


def test_valid_config_has_no_errors(tmp_path):
  assert config_validation.validate(_valid(tmp_path), device_count=8, process_count=1) == []
  assert config_validation.validate(_valid(tmp_path), device_count=1, process_count=1) == []


@pytest.mark.parametrize("change, devices, processes, field", [
    (lambda c: setattr(c.train, "global_batch_size", 12), 8, 1, "config.train.global_batch_size: 12 is not divisible by the 8 batch shards"),
    (lambda c: setattr(c.train, "global_batch_size", 16), 8, 3, "config.train.global_batch_size: 16 is not divisible by the 3 processes"),
    (lambda c: (setattr(c, "objective", "early_interaction"), setattr(c.train, "grad_accum_steps", 4)), 8, 1, "config.train.global_batch_size: 16 is not divisible by the 8 batch shards (mesh data x fsdp) x 4 micro-batches"),
    (lambda c: setattr(c.train, "grad_accum_steps", 2), 8, 1, "config.train.grad_accum_steps: 2 would change the objective: the decomposition's contrastive pool would be each micro-batch, not the global batch; it is for non-contrastive objectives only; use train.micro_batch_size (gradient caching keeps the whole pool)"),
    (lambda c: setattr(c.train, "micro_batch_size", 3), 8, 1, "config.train.micro_batch_size: 3 rows per device x 8 batch shards (mesh data x fsdp) = 24 does not divide config.train.global_batch_size 16"),
    (lambda c: (setattr(c, "objective", "early_interaction"), setattr(c.train, "micro_batch_size", 1)), 8, 1, "config.train.micro_batch_size: 1: gradient caching applies to objective 'decompose' only"),
    (lambda c: setattr(c.model, "remat", "some"), 8, 1, "config.model.remat: must be one of ('none', 'full', 'dots', 'dots_no_batch')"),
    (lambda c: (setattr(c.loss, "name", "sigmoid"), setattr(c.loss, "chunk_size", 4)), 8, 1, "config.loss.chunk_size: 4 has no effect on the sigmoid loss"),
    (lambda c: (setattr(c, "objective", "early_interaction"), setattr(c.early_interaction, "itc_weight", 1.0), setattr(c.train, "grad_accum_steps", 2)), 8, 1, "config.train.grad_accum_steps: 2 would change the objective: the ITC term's in-batch pool"),
    (lambda c: setattr(c, "init_export", "/nonexistent/export"), 8, 1, "config.init_export: export directory not found: /nonexistent/export"),
    (lambda c: (setattr(c.data, "generate", ""), setattr(c.data, "data_dir", "/nonexistent/data")), 8, 1, "config.data: dataset 'tiny_demo' not found in /nonexistent/data"),
    (lambda c: setattr(c.loss, "name", "triplet"), 8, 1, "config.loss.name: unknown loss 'triplet'"),
    (lambda c: setattr(c, "objective", "distill"), 8, 1, "config.objective: unknown objective 'distill'"),
    (lambda c: setattr(c.mesh, "data", 3), 8, 1, "config.mesh: sizes {'data': 3, 'fsdp': 1, 'model': 1} multiply to 3, but there are 8 devices"),
    (lambda c: (setattr(c.mesh, "fsdp", 3)), 8, 1, "config.mesh: the fixed axes"),
    (lambda c: (setattr(c.mesh, "data", -1), setattr(c.mesh, "model", -1)), 8, 1, "config.mesh: only one axis may be -1"),
    (lambda c: setattr(c.model, "pooling", "max"), 8, 1, "config.model.pooling: must be one of"),
    (lambda c: setattr(c.model, "num_attention_heads", 5), 8, 1, "config.model: hidden_size 32 is not divisible by num_attention_heads 5"),
    (lambda c: setattr(c.loss, "temperature", 0.0), 8, 1, "config.loss.temperature: must be positive"),
    (lambda c: setattr(c.eval, "best_metric", "R@1"), 8, 1, "config.eval.best_metric: unknown metric 'R@1'"),
    (lambda c: setattr(c.data, "max_tag_len", 2), 8, 1, "config.data.max_tag_len: 2 leaves no room for [CLS] tags [SEP]"),
    (lambda c: (setattr(c, "objective", "early_interaction"), setattr(c.data, "max_tag_len", 60)), 8, 1, "config.data: an early-interaction pair has max_text_len + max_tag_len - 1 = 75"),
])
def test_each_error_is_one_line_naming_the_field(tmp_path, change, devices, processes, field):
  c = _valid(tmp_path)
  change(c)
  errors = config_validation.validate(c, device_count=devices, process_count=processes)
  assert len(errors) == 1, errors
  assert errors[0].startswith(field) or field in errors[0], errors
  assert "\n" not in errors[0]
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.check(c, device_count=devices, process_count=processes)
  assert e.value.errors == errors


def _launch(args, tmp_path):
  env = dict(os.environ, JAX_LOG_COMPILES="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_launch_rejects_bad_config_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  r = _launch(["--config=configs/tiny.py", f"--workdir={workdir}", "--config.train.global_batch_size=12",
               "--config.loss.name=triplet", "--config.init_export=/nonexistent/export",
               f"--config.data.data_dir={tmp_path / 'nodata'}", "--config.data.generate="], tmp_path)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("config error: ")]
  assert [l.split(":")[1].strip() for l in lines] == [
      "config.loss.name", "config.init_export", "config.data", "config.train.global_batch_size"], r.stderr[-3000:]
  assert "8 batch shards" in lines[-1]
  assert "Compiling" not in r.stderr  # JAX_LOG_COMPILES=1 would log every compile
  assert not workdir.exists()


def test_launch_rejects_unknown_config_field(tmp_path):
  """One line naming the field and the closest existing ones, status 2 (not a 50-line ml_collections trace)."""
  cases = {
      "--config.train.nope=1": "config error: --config.train.nope: config.train has no field 'nope'; closest: "
                               "--config.train.num_steps, --config.train.log_every, --config.train.num_epochs",
      "--config.train.temperature=0.1": "config error: --config.train.temperature: config.train has no field "
                                        "'temperature'; closest: --config.loss.temperature",
      "--config.trian.num_steps=3": "config error: --config.trian.num_steps: config has no field 'trian'; "
                                    "closest: --config.train",
      "--config.train.num_steps=abc": "usage error: flag --config.train.num_steps=abc: invalid literal for int() "
                                      "with base 10: 'abc'",
  }
  for arg, line in cases.items():
    r = _launch(["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", arg], tmp_path)
    assert r.returncode == 2, (arg, r.stderr[-3000:])
    assert r.stderr.splitlines() == [line], (arg, r.stderr[-3000:])
  r = _launch(["--config=configs/nope.py", f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert (r.returncode, r.stderr.splitlines()) == (
      2, ["config error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"]), r.stderr[-3000:]
  assert not (tmp_path / "run").exists()
  # launch/demo.py's config flags have defaults, parsed with their overrides when the flag is defined.
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "demo.py"), f"--workdir={tmp_path / 'demo'}",
                      "--stage2_config.loss.temprature=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert (r.returncode, r.stderr.splitlines()) == (2, [
      "config error: --stage2_config.loss.temprature: stage2_config.loss has no field 'temprature'; closest: "
      "--stage2_config.loss.temperature, --stage2_config.loss.learnable_temperature"]), r.stderr[-3000:]


def test_unknown_field_names_the_closest(tmp_path):
  from vldeformer_jax import cli
  c = tiny.get_config()
  assert cli.unknown_field(c, "config", "loss.temperature") is None
  assert cli.unknown_field(c, "config", "data.negatives.num_per_pair") is None
  assert cli.unknown_field(c, "config", "data.negatives.num_per_pairs") == (
      "--config.data.negatives.num_per_pairs: config.data.negatives has no field 'num_per_pairs'; closest: "
      "--config.data.negatives.num_per_pair")
  assert cli.unknown_field(c, "config", "train.num_steps.x") == (
      "--config.train.num_steps.x: config.train.num_steps is a value, not a group of fields")


def _fake_prepared(data_dir, name, splits):
  """A prepared dataset as far as the config checks look: its dataset_info.json."""
  import json
  os.makedirs(os.path.join(data_dir, name, "1.0.0"))
  with open(os.path.join(data_dir, name, "1.0.0", "dataset_info.json"), "w") as f:
    json.dump({"name": name, "splits": [{"name": s, "shardLengths": [str(n)]} for s, n in splits.items()]}, f)


def test_dataset_names_and_splits_are_checked_against_the_data_dir(tmp_path):
  data_dir = str(tmp_path / "data")
  _fake_prepared(data_dir, "tiny_demo", {"train": 64, "test": 16, "test_1k": 16})
  c = tiny.get_config()
  c.data.data_dir, c.data.name = data_dir, "typo"  # generate still names tiny_demo: nothing is generated
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      "config.data.generate: 'tiny_demo' writes the demo dataset under that name, but config.data.name is 'typo'; "
      "demo data is generated only for the dataset the config names: set both to the same name, or "
      "config.data.generate='' to use a prepared dataset"]
  c.data.generate = ""
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      f"config.data: dataset 'typo' not found in {data_dir} (it holds: tiny_demo); prepare it with "
      "launch/prepare_data.py"]
  c.data.name = "tiny_dmeo"
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      f"config.data: dataset 'tiny_dmeo' not found in {data_dir} (it holds: tiny_demo; did you mean 'tiny_demo'?); "
      "prepare it with launch/prepare_data.py"]
  c.data.name, c.data.eval_split = "tiny_demo", "tset"
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      "config.data.eval_split: dataset 'tiny_demo' has no split 'tset' (it has: test, test_1k, train)"]
  c.train.eval_every = -1  # no evaluation: the eval split is not needed
  assert config_validation.validate(c, device_count=8, process_count=1) == []
  # Through the launcher: one line, status 2, nothing generated under the mistyped name.
  r = _launch(["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}",
               "--config.data.name=typo"], tmp_path)
  assert r.returncode == 2 and [l for l in r.stderr.splitlines() if l.startswith("config error:")] == [
      "config error: config.data.generate: 'tiny_demo' writes the demo dataset under that name, but "
      "config.data.name is 'typo'; demo data is generated only for the dataset the config names: set both to the "
      "same name, or config.data.generate='' to use a prepared dataset"], r.stderr[-3000:]
  assert os.listdir(data_dir) == ["tiny_demo"] and not (tmp_path / "run").exists()


def test_input_lengths_are_checked_against_an_export_positions(tmp_path):
  from model_helpers import tiny_params
  from vldeformer_jax.io import export
  from vldeformer_jax.model import inputs
  mc = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=40, max_text_len=16, max_regions=8)
  export.write_export(str(tmp_path / "ex"), tiny_params(mc, 0), mc, inputs.BUNDLED_VOCAB)
  c = _valid(tmp_path)
  c.init_export = str(tmp_path / "ex")
  c.data.max_tag_len = 48
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      f"config.data.max_tag_len: 48 tag tokens, more than the 40 position embeddings of init_export {tmp_path / 'ex'}"]
  c.data.max_tag_len, c.objective = 30, "early_interaction"
  assert config_validation.validate(c, device_count=8, process_count=1) == [
      "config.data: an early-interaction pair has max_text_len + max_tag_len - 1 = 45 token positions, more than "
      f"the 40 position embeddings of init_export {tmp_path / 'ex'}"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  data_dir = str(tmp_path_factory.getbasetemp() / "tiny_data")
  train_setup.generate_demo(tiny.get_config(), data_dir)  # skipped when another test file made it
  return data_dir


def test_what_fails_later_against_the_data_is_checked_before_compiling(tmp_path, tiny_data):
  c = tiny.get_config()
  c.data.data_dir, c.eval.protocol = tiny_data, "coco1k"
  data = train_setup.open_data(c, str(tmp_path))
  mc, _, _ = train_setup.model_config_from(c)
  coco1k = ("config.eval.protocol: 'coco1k' averages folds of 1000 images, but split 'test' of dataset 'tiny_demo' "
            "has 16 images; use 'full' (or 'all': coco1k is added when there are enough images)")
  with pytest.raises(config_validation.ConfigError) as e:
    data_checks.check_against_data(c, mc, data)
  assert e.value.errors == [coco1k]
  c.eval.protocol = "full"
  data_checks.check_against_data(c, mc, data)  # the tiny config itself fits its data

  # Records as another tool might have written them, and a tag length beyond the model's positions.
  good = {"image_id": 7, "features": np.zeros((3, data.feature_dim), np.float32), "tags": b"dog",
          "captions": [b"a dog"]}
  bad = train_setup.Data(train=[{k: v for k, v in good.items() if k != "tags"}] * 16,
                         eval=[{**good, "captions": []}], feature_dim=data.feature_dim, data_dir=str(tmp_path / "x"))
  with pytest.raises(config_validation.ConfigError) as e:
    data_checks.check_against_data(c, mc.replace(max_tag_len=70), bad)
  assert e.value.errors == [
      "config.data.max_tag_len: 70 tag tokens, more than the 64 position embeddings of the model",
      "config.data.train_split: record 0 of split 'train' of dataset 'tiny_demo' lacks tags (has: captions, "
      "features, image_id); prepare the dataset with launch/prepare_data.py",
      "config.data.eval_split: record 0 (image_id 7) of split 'test' of dataset 'tiny_demo' has no captions"]

  # Through the launcher: status 2 before anything compiles or is written (no model files, no checkpoints).
  workdir = tmp_path / "run"
  r = _launch(["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.data_dir={tiny_data}",
               "--config.eval.protocol=coco1k"], tmp_path)
  assert r.returncode == 2, r.stderr[-3000:]
  assert [l for l in r.stderr.splitlines() if l.startswith("config error:")] == [f"config error: {coco1k}"]
  assert "Compiling" not in r.stderr and "Traceback" not in r.stderr
  assert os.listdir(workdir) == []


def _torch_warmup_cosine(step, warmup, total):
  """pytorch_transformers WarmupCosineSchedule(cycles=0.5) multiplier, as in the reference code."""
  if step < warmup:
    return step / max(1.0, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def test_schedule_matches_reference_warmup_cosine():
  lr, warmup, total = 7.5e-6, 200, 12400
  schedule = optim.learning_rate_schedule(lr, warmup, total)
  for step in [0, 1, 50, 199, 200, 201, 1000, 6300, 12000, 12399, 12400]:
    # Rule F32 (tests/tolerances.py) against the float64 formula: the progress division, pi times it (an
    # argument error of up to 3 pi u, hence 10), the cos, 1 + cos, times lr; absolute, scale lr.
    assert_f32(schedule(step), lr * _torch_warmup_cosine(step, warmup, total), n=13 + ELEMENTARY, scale=lr)


def test_weight_decay_skips_exactly_biases_and_layernorm_scales():
  mc = ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=100, img_feature_dim=10, max_position_embeddings=40)
  params = jax.eval_shape(lambda: init_params(mc, jax.random.key(0)))
  mask = optim.weight_decay_mask({"model": params, "log_temperature": 0.0})
  assert mask["log_temperature"] is False
  flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask["model"])[0]}
  no_decay = sorted(k for k, v in flat.items() if not v)
  assert all(k.endswith("/bias") or (k.endswith("/scale") and "LayerNorm" in k) for k in no_decay)
  assert all(k.endswith("/kernel") or k.endswith("/embedding") for k, v in flat.items() if v)
  assert "bert/LayerNorm/scale" in no_decay and "bert/img_embedding/bias" in no_decay  # the image LayerNorm
  assert flat["bert/embeddings/word_embeddings/embedding"] and flat["bert/encoder/layer/0/attention/self/query/kernel"]
  # Every leaf is one or the other: 2 LayerNorm scales + 1 bias per LayerNorm / Dense; kernels and embeddings.
  n_ln = sum(1 for k in flat if k.endswith("/scale"))
  n_bias = sum(1 for k in flat if k.endswith("/bias"))
  assert len(no_decay) == n_ln + n_bias
