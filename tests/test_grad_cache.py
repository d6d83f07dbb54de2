"""Gradient caching (train.micro_batch_size, training/grad_cache.py) and rematerialisation (model.remat).

- the cached loss and gradients equal the one-pass ones (dropout on, composed hard negatives on, learnable
  temperature) on 1 device (8 micro-batches) and on 8 devices over every mesh axis (data=2, fsdp=2,
  model=2; 2 micro-batches), for InfoNCE and, on 8 devices, the sigmoid loss: rule F32-PAIR;
- configs/tiny.py trained 12 steps with micro_batch_size 2 and without it: equal losses at every step and
  equal parameters (rule F32-PAIR through AdamW, summed over the steps: tests/step_bounds.py);
- every remat policy keeps the parameter names and gives the same gradients, and `full` plans less
  memory for the backward pass than `none`.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repo_configs import config_module

tiny = config_module("tiny")
from vldeformer_jax import parallel  # noqa: E402
from vldeformer_jax.model.config import ModelConfig, REMAT_POLICIES  # noqa: E402
from vldeformer_jax.model.vldeformer import VLDeformer, init_params  # noqa: E402
from vldeformer_jax.training import decompose, optim  # noqa: E402
from vldeformer_jax.training import setup as train_setup  # noqa: E402
from vldeformer_jax.training import step as step_lib  # noqa: E402

import step_bounds  # noqa: E402
from model_helpers import embed_depth  # noqa: E402
from tolerances import assert_f32, assert_within, max_abs  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  data_dir = str(tmp_path_factory.getbasetemp() / "tiny_data")
  train_setup.generate_demo(tiny.get_config(), data_dir)  # skipped when another test file made it
  return data_dir


def _batches(c, num):
  data = train_setup.open_data(c, "/nonexistent")
  mc, _, vocab = train_setup.model_config_from(c)
  with train_setup.make_iterator(c, data, vocab, "/nonexistent") as it:
    return [{k: v for k, v in next(it).items() if k != "image_id"} for _ in range(num)]


@pytest.mark.parametrize("devices, loss_name", [(1, "infonce"), (8, "infonce"), (8, "sigmoid")])
def test_cached_loss_and_gradients_equal_one_pass(tiny_data, monkeypatch, devices, loss_name):
  c = tiny.get_config()
  c.data.data_dir = tiny_data
  c.model.num_hidden_layers = 1
  c.data.negatives.num_per_pair = 1
  c.loss.learnable_temperature = True
  c.loss.name = loss_name
  if loss_name == "sigmoid":
    c.loss.temperature, c.loss.bias_init = 0.1, -2.0
  assert c.model.hidden_dropout_prob > 0 and c.model.attention_probs_dropout_prob > 0
  (batch,) = _batches(c, 1)
  g = c.train.global_batch_size
  if devices == 1:
    mesh, micro = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), 2   # 8 micro-batches of 2 rows
  else:
    # Every axis at once; parameters from 1K elements are FSDP-sharded (the default threshold, 16K,
    # would leave this tiny model replicated), the attention and MLP kernels also split over 'model'.
    monkeypatch.setattr(parallel, "param_shardings",
                        functools.partial(parallel.param_shardings, fsdp_min_size=1024))
    mesh, micro = parallel.make_mesh(2, 2, 2, devices=jax.devices()[:8]), 2   # 4 batch shards x 2: 2 micro-batches
  assert g // (micro * parallel.num_batch_shards(mesh)) >= 2
  mc, _, _ = train_setup.model_config_from(c)
  model = VLDeformer(mc)
  init = functools.partial(init_params, mc)
  params = jax.jit(init, out_shardings=parallel.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh))(
      jax.random.key(0))
  if devices == 8:
    spec = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "model"), spec
  trainable = {"model": params, "log_temperature": jnp.float32(np.log(c.loss.temperature))}
  if loss_name == "sigmoid":
    trainable["logit_bias"] = jnp.float32(c.loss.bias_init)
  trainable = {k: v if k == "model" else jax.device_put(v, parallel.replicated(mesh)) for k, v in trainable.items()}
  batch = parallel.global_batch(batch, mesh)
  rng = jax.random.key(3)
  one_pass = jax.jit(jax.value_and_grad(decompose.make_loss_fn(model, c, mesh), has_aux=True),
                     compiler_options=step_bounds.FAST_COMPILE)
  cached = jax.jit(decompose.make_cached_value_and_grad(model, c, mesh, micro), compiler_options=step_bounds.FAST_COMPILE)
  (loss, metrics), grads = jax.device_get(one_pass(trainable, batch, rng))
  (c_loss, c_metrics), c_grads = jax.device_get(cached(trainable, batch, rng))

  # Rule F32-PAIR: the same float32 operations per row, regrouped (micro-batch matmuls, the gradient summed
  # micro-batch by micro-batch). n and the logit bound L as for a train step (tests/step_bounds.py); the
  # gradients' scale is L times each tensor's largest gradient (the key bias: the key kernel's, its exact
  # gradient being 0).
  depth = step_bounds.step_depths(c, mc)
  assert_f32(c_loss, loss, n=depth["loss"], scale=depth["loss_scale"], pair=True)
  assert c_metrics.keys() == metrics.keys()
  for key in ("pos_sim", "neg_sim", "hard_neg_sim"):
    assert_f32(c_metrics[key], metrics[key], n=depth["fwd"] + mc.hidden_size + g * depth["pool"], scale=1.0,
               pair=True, err_msg=key)
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
  worst = 0.0
  for path, got in jax.tree_util.tree_flatten_with_path(c_grads)[0]:
    name = jax.tree_util.keystr(path)
    want = flat[name]
    scale = max_abs(flat[name.replace("['key']['bias']", "['key']['kernel']")])
    assert_f32(got, want, n=depth["grad"], scale=depth["logit"] * scale, pair=True, err_msg=name)
    if "['key']['bias']" not in name and max_abs(want) > 0:
      worst = max(worst, float(np.max(np.abs(np.asarray(got, np.float64) - want))) / max_abs(want))
  # Not vacuous: dropout is on (another key gives another loss), and the gradients reach every branch.
  other = float(one_pass(trainable, batch, jax.random.key(4))[0][0])
  assert other != float(loss)
  assert max_abs(grads["model"]["bert"]["img_embedding"]["kernel"]) > 0
  assert abs(float(grads["log_temperature"])) > 0
  print(f"\n{devices} device(s), {loss_name}: loss {float(loss):.6f} vs {float(c_loss):.6f}; largest gradient "
        f"difference relative to its tensor's largest entry (key biases aside): {worst:.2e}")


def test_tiny_config_12_steps_with_micro_batches_equals_plain(tiny_data):
  """configs/tiny.py as it is (2 layers, dropout 0.1, batch 16, 12 steps), on one device: micro_batch_size 2
  (8 micro-batches) against none."""
  runs = {}
  for micro in (0, 2):
    c = tiny.get_config()
    c.data.data_dir = tiny_data
    c.train.micro_batch_size = micro
    if micro == 0:
      batches = _batches(c, c.train.num_steps)
    mc, _, vocab = train_setup.model_config_from(c)
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = optim.make_optimizer(c.train, c.train.num_steps)

    class NoCheckpoints:
      def latest_step(self):
        return None

    state, _, _ = train_setup.initial_state(c, train_setup.Init(mc, vocab, None, "test"), tx, mesh, NoCheckpoints())
    step = step_lib.jit_train_step(step_lib.make_train_step(VLDeformer(mc), c, mesh, tx, schedule),
                                   jax.tree.map(lambda x: x.sharding, state), mesh, step_bounds.FAST_COMPILE)
    rng = jax.random.fold_in(jax.random.key(c.seed), 1)  # as training/loop.py
    history = []
    for b in batches:
      state, metrics = step(state, parallel.global_batch(b, mesh), rng)
      history.append((jax.device_get(state), jax.device_get(metrics)))
    runs[micro] = history
  plain, cached = runs[0], runs[2]
  depth = step_bounds.step_depths(c, mc)
  for t, ((_, m0), (_, m1)) in enumerate(zip(plain, cached), start=1):
    # The loss of step t: rule F32-PAIR of the loss plus the parameters' difference after t - 1 steps,
    # which the bound below keeps within a few ulps (first order: negligible against the loss bound).
    assert_f32(m1["loss"], m0["loss"], n=depth["loss"], scale=depth["loss_scale"], pair=True,
               err_msg=f"loss of step {t}")
  bound = step_bounds.run_bound([(s, float(m["learning_rate"])) for s, m in plain], c.train, depth["grad"],
                                depth["logit"])
  final0, final1 = plain[-1][0], cached[-1][0]
  assert int(final0.step) == int(final1.step) == 12
  worst = 0.0
  for (path, x), y, e in zip(jax.tree_util.tree_flatten_with_path(final1.trainable())[0],
                             jax.tree.leaves(final0.trainable()), jax.tree.leaves(bound)):
    assert_within(x, y, e, rule="rule F32-PAIR through 12 AdamW steps", err_msg=jax.tree_util.keystr(path))
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - y))))
  moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(final0.params),
                                                            jax.tree.leaves(plain[0][0].params)))
  assert moved > 1e-3  # the runs trained
  print(f"\n12 steps: largest parameter difference (key biases aside) {worst:.2e}; losses "
        f"{[round(float(m['loss']), 6) for _, m in plain][-3:]} vs {[round(float(m['loss']), 6) for _, m in cached][-3:]}")


REMAT_CFG = ModelConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, img_feature_dim=12, max_text_len=16,
                        max_regions=48, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
REMAT_ROWS = 32

# Run in a child process: XLA's CPU pipeline expands the optimisation barriers that keep a rematerialised
# forward from being merged (CSE) with the original one before it optimises, so on CPU remat changes
# nothing unless that pass is off (`--xla_disable_hlo_passes=cse_barrier_expander`, as benchmarks/
# pool_memory.py does); GPU and TPU keep the barriers. The child computes, per policy, the gradient of a
# sum of sin(embedding) over a batch (dropout on) and XLA's planned temporaries.
REMAT_CHILD = """
import functools, json
import jax, jax.numpy as jnp, numpy as np
from test_grad_cache import REMAT_CFG, REMAT_ROWS
from step_bounds import FAST_COMPILE
from vldeformer_jax.model.config import REMAT_POLICIES
from vldeformer_jax.model.vldeformer import VLDeformer, init_params
rng = np.random.default_rng(0)
b, lg, r = REMAT_ROWS, REMAT_CFG.tag_len, REMAT_CFG.max_regions
ids = rng.integers(1, 100, (b, lg)).astype(np.int32)
mask = np.ones((b, lg + r), np.int32)
feats = rng.normal(size=(b, r, REMAT_CFG.img_feature_dim)).astype(np.float32)
params = init_params(REMAT_CFG, jax.random.key(0))
out, temps = {{}}, {{}}
for policy in REMAT_POLICIES:
  cfg = REMAT_CFG.replace(remat=policy)
  def loss(p):
    emb = VLDeformer(cfg).apply({{"params": p}}, ids, np.ones_like(ids), mask, feats, deterministic=False,
                                method=VLDeformer.embed, rngs={{"dropout": jax.random.key(1)}})
    return jnp.sum(jnp.sin(emb))
  compiled = jax.jit(jax.grad(loss)).lower(params).compile(compiler_options=FAST_COMPILE)
  temps[policy] = int(compiled.memory_analysis().temp_size_in_bytes)
  for path, g in jax.tree_util.tree_flatten_with_path(jax.device_get(compiled(params)))[0]:
    out[policy + jax.tree_util.keystr(path)] = g
np.savez({out!r}, **out)
print(json.dumps(temps))
"""


def test_remat_keeps_names_and_gradients_and_saves_memory(tmp_path):
  params = jax.eval_shape(functools.partial(init_params, REMAT_CFG), jax.random.key(0))
  for policy in REMAT_POLICIES[1:]:  # the parameter tree (names, shapes) does not depend on the policy
    other = jax.eval_shape(functools.partial(init_params, REMAT_CFG.replace(remat=policy)), jax.random.key(0))
    assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, other, params))
  tests = os.path.dirname(os.path.abspath(__file__))
  out = str(tmp_path / "grads.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_disable_hlo_passes=cse_barrier_expander", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", REMAT_CHILD.format(out=out)], env=env, cwd=os.path.dirname(tests),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  temps = json.loads(r.stdout.strip().splitlines()[-1])
  grads = dict(np.load(out))
  names = [k[len("none"):] for k in grads if k.startswith("none[")]
  key_kernel = "['bert']['encoder']['layer']['0']['attention']['self']['key']['kernel']"
  n = 2 * embed_depth(REMAT_CFG) + REMAT_ROWS * (REMAT_CFG.tag_len + REMAT_CFG.max_regions)
  for policy in REMAT_POLICIES[1:]:
    for name in names:
      # Rule F32-PAIR: the same forward recomputed (same dropout masks) and the same backward; the gradient
      # of a sum of sin(embedding) (|terms| <= 1) over the batch's rows and positions: n = the forward
      # twice plus that sum, scale = the tensor's largest gradient (the key bias: the key kernel's).
      ref = grads["none" + name]
      scale = max_abs(grads["none" + (key_kernel if "['key']['bias']" in name else name)])
      assert_f32(grads[policy + name], ref, n=n, scale=scale, pair=True, err_msg=f"{policy} {name}")
  # What each policy keeps: `full` only the layers' inputs, the `dots` policies the matmul outputs.
  assert temps["full"] < temps["dots_no_batch"] <= temps["dots"] < temps["none"], temps
  print(f"\nXLA temporaries of the embedding gradient by remat policy: "
        f"{ {k: f'{v / 2**20:.1f} MiB' for k, v in temps.items()} }")
