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
from vldeformer_jax.training import optim
from vldeformer_jax.training import setup as train_setup
from vldeformer_jax.model.vldeformer import init_params
from vldeformer_jax.model.config import ModelConfig


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
    (lambda c: setattr(c.train, "grad_accum_steps", 2), 8, 1, "config.train.grad_accum_steps: 2 would change the objective: the decomposition's InfoNCE pool would be each micro-batch, not the global batch; use 1 and a global batch that fits"),
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
  r = _launch(["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", "--config.train.batch_size=4"], tmp_path)
  assert r.returncode != 0
  assert "batch_size" in r.stderr and "Compiling" not in r.stderr


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
    np.testing.assert_allclose(float(schedule(step)), lr * _torch_warmup_cosine(step, warmup, total),
                               rtol=1e-5, atol=1e-12)


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
