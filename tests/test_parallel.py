"""Meshes, parameter sharding rules, global batches and the multi-host guard, on 8 simulated devices.

(The 2-process path of `initialize_distributed`, `process_slice` and `global_batch` runs in
tests/test_losses.py::test_two_processes_equal_one_process.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from vldeformer_jax import parallel
from vldeformer_jax.model.vldeformer import VLDeformer, init_params
from vldeformer_jax.model.config import ModelConfig
from model_helpers import embed_depth
from tolerances import assert_f32

TINY = ModelConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, img_feature_dim=12, max_text_len=8,
                   max_regions=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_make_mesh_sizes_axis_types_and_order():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
  assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
  mesh = parallel.make_mesh(data=2, fsdp=-1, model=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  order = [(d.process_index, d.id) for d in mesh.devices.flat]
  assert order == sorted(order)
  # Devices given in any order come out sorted, 'model' innermost.
  mesh = parallel.make_mesh(4, 1, 2, devices=jax.devices()[::-1])
  assert [d.id for d in mesh.devices[1, 0]] == [2, 3]
  # Auto axes: plain jit of a batch-sharded matmul works (Explicit axes would raise).
  z = np.arange(32, dtype=np.float32).reshape(8, 4)
  out = jax.jit(lambda z: z @ z.T)(jax.device_put(z, parallel.batch_sharding(mesh)))
  np.testing.assert_array_equal(np.asarray(out), z @ z.T)


@pytest.mark.parametrize("sizes, message", [
    ((3, 1, 1), r"multiply to 3, but there are 8 devices"),
    ((-1, 3, 1), r"fixed axes multiply to 3, which does not divide 8"),
    ((-1, -1, 1), r"only one axis may be -1"),
    ((0, 1, 1), r"axis 'data' has size 0"),
])
def test_make_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(*sizes)


def test_detect_multi_process_from_environment():
  detect = parallel.detect_multi_process
  assert detect({}) is None
  assert detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert "4 tasks" in detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
  assert detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert "2 hosts" in detect({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"})
  assert "multi-slice" in detect({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080", "MEGASCALE_NUM_SLICES": "2"})
  assert "3 ranks" in detect({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "3"})


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
  for key in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
              "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(key, raising=False)
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(num_processes=1) is False
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1


def test_global_batch_and_process_slice():
  mesh = parallel.make_mesh(2, 2, 2)
  local = {"ids": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
           "feats": np.random.default_rng(0).normal(size=(16, 3, 4)).astype(np.float32)}
  batch = parallel.global_batch(local, mesh)
  assert parallel.process_slice(16) == slice(0, 16)
  for key, value in local.items():
    x = batch[key]
    assert x.shape == value.shape and x.dtype == value.dtype
    assert x.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(x), value)
    # The device at (data i, fsdp j, any model k) holds rows [(2i + j) * 4, (2i + j + 1) * 4).
    for (i, j, k), device in np.ndenumerate(mesh.devices):
      shard = next(s for s in x.addressable_shards if s.device == device)
      np.testing.assert_array_equal(np.asarray(shard.data), value[(2 * i + j) * 4:(2 * i + j + 1) * 4])
  with pytest.raises(ValueError, match="key 'ids' has 6 local rows, not divisible by the 4 local batch"):
    parallel.global_batch({"ids": np.zeros((6, 2))}, mesh)
  with pytest.raises(ValueError, match="key 'captions' has dtype"):
    parallel.global_batch({"captions": np.array(["a", "b"] * 4)}, mesh)


def _abstract_tiny():
  return jax.eval_shape(lambda k: init_params(TINY, k), jax.random.key(0))


def test_param_shardings_follow_the_rules():
  specs = parallel.param_specs(_abstract_tiny(), parallel.make_mesh(2, 2, 2), fsdp_min_size=256)
  layer = specs["bert"]["encoder"]["layer"]["1"]
  expected = {
      # Megatron column-parallel (output dim over 'model'), FSDP on the remaining dimension.
      "query": (layer["attention"]["self"]["query"]["kernel"], P("fsdp", "model")),
      "value bias": (layer["attention"]["self"]["value"]["bias"], P("model")),
      "intermediate": (layer["intermediate"]["dense"]["kernel"], P("fsdp", "model")),
      "intermediate bias": (layer["intermediate"]["dense"]["bias"], P("model")),
      # Row-parallel (input dim over 'model').
      "attention output": (layer["attention"]["output"]["dense"]["kernel"], P("model", "fsdp")),
      "layer output": (layer["output"]["dense"]["kernel"], P("model", "fsdp")),
      "layer output bias": (layer["output"]["dense"]["bias"], P()),
      # No Megatron rule: FSDP on the largest divisible dimension of big tensors.
      "word embeddings [100, 32]": (specs["bert"]["embeddings"]["word_embeddings"]["embedding"], P("fsdp")),
      "img_embedding [12, 32]": (specs["bert"]["img_embedding"]["kernel"], P(None, "fsdp")),
      "pooler": (specs["bert"]["pooler"]["dense"]["kernel"], P("fsdp")),
      # Small or 1-D: replicated.
      "token types [2, 32]": (specs["bert"]["embeddings"]["token_type_embeddings"]["embedding"], P()),
      "classifier [32, 2]": (specs["classifier"]["kernel"], P()),
      "LayerNorm": (layer["output"]["LayerNorm"]["scale"], P()),
  }
  for what, (got, want) in expected.items():
    assert got == want, (what, got, want)


def test_param_shardings_fall_back_when_not_divisible():
  mesh = parallel.make_mesh(2, 2, 2)
  tree = {"x": {"intermediate": {"dense": {"kernel": jax.ShapeDtypeStruct((32, 63), jnp.float32)}}},
          "odd": jax.ShapeDtypeStruct((33, 63), jnp.float32)}
  specs = parallel.param_specs(tree, mesh, fsdp_min_size=1)
  assert specs["x"]["intermediate"]["dense"]["kernel"] == P("fsdp")  # 63 splits over neither axis
  assert specs["odd"] == P()
  with pytest.raises(ValueError, match=r"rule for 'odd' gives .* \(3 dims\), but the parameter has shape"):
    parallel.param_specs(tree, mesh, rules=((r"odd", P(None, None, "model")),))
  with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
    parallel.param_specs(tree, mesh, rules=((r"odd", P("tensor")),))


def test_pure_data_mesh_replicates_everything():
  shardings = parallel.param_shardings(_abstract_tiny(), parallel.make_mesh(8, 1, 1), fsdp_min_size=1)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def test_sharded_forward_equals_unsharded():
  params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
  rng = np.random.default_rng(0)
  b, lt, r = 16, TINY.max_text_len, TINY.max_regions
  ids = rng.integers(1, TINY.vocab_size, size=(b, lt)).astype(np.int32)
  types = np.ones((b, lt), np.int32)
  mask = np.ones((b, lt + r), np.int32)
  mask[:, lt - 2:lt] = 0
  feats = rng.normal(size=(b, r, TINY.img_feature_dim)).astype(np.float32)
  model = VLDeformer(TINY)

  def embed(p, ids, types, mask, feats):
    return model.apply({"params": p}, ids, types, mask, feats, method=VLDeformer.embed)

  want = jax.jit(embed)(params, ids, types, mask, feats)

  mesh = parallel.make_mesh(2, 2, 2)
  shardings = parallel.param_shardings(jax.eval_shape(lambda: params), mesh, fsdp_min_size=256)
  sharded_params = jax.device_put(params, shardings)
  query = sharded_params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
  assert {s.data.shape for s in query.addressable_shards} == {(16, 16)}
  batch = parallel.global_batch({"ids": ids, "types": types, "mask": mask, "feats": feats}, mesh)
  got = jax.jit(embed)(sharded_params, batch["ids"], batch["types"], batch["mask"], batch["feats"])
  # Rule F32-PAIR: the same float32 forward with its dot products split over 'model' and 'fsdp' (regrouped
  # sums); the pooled outputs are tanh values (scale 1).
  assert_f32(got, want, n=embed_depth(TINY), scale=1.0, pair=True)
