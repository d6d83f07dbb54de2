"""FSDP and tensor-parallel training for real: the decomposition train step (configs/tiny.py, 1 layer,
dropout on, one composed hard negative per pair) on the meshes `data=8`, `fsdp=8`, `data=2,fsdp=4` and
`data=2,model=4` of the 8 simulated devices equals the step on one device (`data=1`); a checkpoint written
on one mesh restores on another (`fsdp=8` -> `data=1`, `data=2,model=4` -> `fsdp=8`) bit for bit and the
run continues as it would have on the first mesh.

The tiny model's tensors are below the default FSDP threshold (16K elements), so the tests lower it to 1K:
then every kernel and embedding is split over 'fsdp' (checked), and on 'model' the attention and MLP
kernels are split Megatron-style (checked). Tolerances: rule F32-PAIR through AdamW (tests/step_bounds.py).
"""
import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from repo_configs import config_module

tiny = config_module("tiny")
from vldeformer_jax import parallel  # noqa: E402
from vldeformer_jax.io import checkpoint as ckpt_lib  # noqa: E402
from vldeformer_jax.model.vldeformer import VLDeformer  # noqa: E402
from vldeformer_jax.training import optim  # noqa: E402
from vldeformer_jax.training import setup as train_setup  # noqa: E402
from vldeformer_jax.training import state as state_lib  # noqa: E402
from vldeformer_jax.training import step as step_lib  # noqa: E402

import step_bounds  # noqa: E402
from tolerances import assert_bitwise, assert_f32, assert_within  # noqa: E402

MESHES = {"data=1": (1, 1, 1), "data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=2,fsdp=4": (2, 4, 1),
          "data=2,model=4": (2, 1, 4)}
FSDP_MIN_SIZE = 1024
QUERY = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")


class NoCheckpoints:
  def latest_step(self):
    return None


def _config(data_dir):
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.model.num_hidden_layers = 1
  c.data.negatives.num_per_pair = 1
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Per mesh: the state after each of 2 steps (host copies), the compiled step and the shardings."""
  patch = pytest.MonkeyPatch()
  patch.setattr(parallel, "param_shardings",
                functools.partial(parallel.param_shardings, fsdp_min_size=FSDP_MIN_SIZE))
  data_dir = str(tmp_path_factory.getbasetemp() / "tiny_data")
  train_setup.generate_demo(tiny.get_config(), data_dir)  # skipped when another test file made it
  c = _config(data_dir)
  data = train_setup.open_data(c, "/nonexistent")
  mc, _, vocab = train_setup.model_config_from(c)
  with train_setup.make_iterator(c, data, vocab, "/nonexistent") as it:
    batches = [{k: v for k, v in next(it).items() if k != "image_id"} for _ in range(3)]
  tx, schedule = optim.make_optimizer(c.train, 10)
  out = {"config": c, "model_config": mc, "tx": tx, "batches": batches}
  for name, shape in MESHES.items():
    mesh = parallel.make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])
    state, _, _ = train_setup.initial_state(c, train_setup.Init(mc, vocab, None, "test"), tx, mesh, NoCheckpoints())
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = step_lib.jit_train_step(step_lib.make_train_step(VLDeformer(mc), c, mesh, tx, schedule), shardings, mesh,
                                   step_bounds.FAST_COMPILE)
    history = []
    for b in batches[:2]:
      state, metrics = step(state, parallel.global_batch(b, mesh), jax.random.key(7))
      history.append((jax.device_get(state), jax.device_get(metrics)))
    out[name] = {"mesh": mesh, "step": step, "shardings": shardings, "history": history}
  yield out
  patch.undo()


def _assert_steps_equal(runs, got, want, t0=1):
  """`got`, `want`: [(state, metrics)] of the same steps t0, t0 + 1, ... on two meshes, from equal states."""
  c, mc = runs["config"], runs["model_config"]
  depth = step_bounds.step_depths(c, mc)
  for t, ((s1, m1), (s0, m0)) in enumerate(zip(got, want), start=t0):
    assert int(s1.step) == int(s0.step) == t
    assert_f32(m1["loss"], m0["loss"], n=depth["loss"], scale=depth["loss_scale"], pair=True, err_msg=f"loss {t}")
  history = [(s, float(m["learning_rate"])) for s, m in want]
  # The per-step bounds from the first compared step on (the states before it are equal); t counts the
  # run's steps (Adam's bias correction).
  bound = None
  for t, (state, lr) in enumerate(history, start=t0):
    _, nu = step_bounds.adam_moments(state)
    err = step_bounds.gradient_error(nu, t, c.train.adam_b2, depth["grad"], depth["logit"])
    b = step_bounds.adamw_step_bound(err, nu, state.trainable(), lr, c.train, t)
    bound = b if bound is None else jax.tree.map(np.add, bound, b)
  final1, final0 = got[-1][0], want[-1][0]
  worst = 0.0
  for (path, x), y, e in zip(jax.tree_util.tree_flatten_with_path(final1.trainable())[0],
                             jax.tree.leaves(final0.trainable()), jax.tree.leaves(bound)):
    assert_within(x, y, e, rule="rule F32-PAIR through AdamW", err_msg=jax.tree_util.keystr(path))
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - y))))
  return worst


@pytest.mark.parametrize("name", [m for m in MESHES if m != "data=1"])
def test_train_steps_on_each_mesh_equal_one_device(runs, name):
  run, ref = runs[name], runs["data=1"]
  # The layout is the mesh's: FSDP splits the query kernel over 'fsdp', tensor parallelism over 'model'.
  spec = run["shardings"].params
  for k in QUERY:
    spec = spec[k]
  expected = {"data=8": P(), "fsdp=8": P("fsdp"), "data=2,fsdp=4": P("fsdp"), "data=2,model=4": P(None, "model")}
  assert spec.spec == expected[name], spec.spec
  if name != "data=8":
    sharded = [s for s in jax.tree.leaves(run["shardings"].params) if s.spec != P()]
    assert len(sharded) >= 6, len(sharded)  # every kernel (q, k, v, dense layers) and embedding, or the TP ones
  worst = _assert_steps_equal(runs, run["history"], ref["history"])
  m1, m0 = run["history"][-1][1], ref["history"][-1][1]
  assert m1["loss"] != run["history"][0][1]["loss"]  # the step trained
  print(f"\n{name}: losses {float(m1['loss']):.7f} vs {float(m0['loss']):.7f} (one device); largest parameter "
        f"difference after 2 steps (key biases aside) {worst:.2e}")


@pytest.mark.parametrize("source, target", [("fsdp=8", "data=1"), ("data=2,model=4", "fsdp=8")])
def test_checkpoint_restores_on_another_mesh_and_continues(runs, tmp_path, source, target):
  mc, tx = runs["model_config"], runs["tx"]
  src, dst = runs[source], runs[target]
  saved = src["history"][-1][0]
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=None)
  ckpts.save(2, state_lib.put_sharded(saved, src["shardings"]), {"step": 2}, {"mesh": source})
  ckpts.wait()
  restored, data_state, meta = ckpts.restore(2, state_lib.abstract_state(mc, tx, dst["mesh"]))
  ckpts.close()
  assert data_state == {"step": 2} and meta == {"mesh": source}
  # Rule EXACT: the values are the saved ones, laid out as the target mesh lays them out.
  for (path, x), y, s in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(saved),
                             jax.tree.leaves(dst["shardings"])):
    assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)
    assert_bitwise(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  # Step 3 on the target mesh from the restored state, and on the source mesh from its own state.
  batch = runs["batches"][2]
  on_target = dst["step"](restored, parallel.global_batch(batch, dst["mesh"]), jax.random.key(7))
  on_source = src["step"](state_lib.put_sharded(saved, src["shardings"]), parallel.global_batch(batch, src["mesh"]),
                          jax.random.key(7))
  worst = _assert_steps_equal(runs, [jax.device_get(on_target)], [jax.device_get(on_source)], t0=3)
  print(f"\n{source} -> {target}: step 3 largest parameter difference (key biases aside) {worst:.2e}")
