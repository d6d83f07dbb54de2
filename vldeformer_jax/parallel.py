"""Devices, meshes and shardings: the one place that knows how arrays are laid out across hosts.

Why a module of its own: the train step, the evaluator and the loss all need the same answers to "which
device holds which rows" and "where does this parameter live". Keeping them here means the rest of the
code only asks for `batch_sharding(mesh)` or `param_shardings(...)` and stays the same on one CPU, eight
simulated devices, or a multi-host TPU pod.

Layout (contracts in ARCHITECTURE.md):
- The mesh has three axes `('data', 'fsdp', 'model')` with Auto axis types, so plain `jax.jit` partitions
  freely (`jax.make_mesh` defaults to Explicit axes, which break plain jit; `make_mesh` builds Auto axes on purpose).
- The batch (leading) axis is split over `BATCH_AXES = ('data', 'fsdp')`. Devices are ordered by process,
  so process `p` holds the contiguous global rows `[p*B, (p+1)*B)` (`process_slice`), which is what
  `global_batch` assumes when it stitches process-local numpy batches into global `jax.Array`s.
- Parameters follow regex rules over their '/'-joined paths (`param_shardings`): Megatron-style splits
  over 'model', and the largest divisible dimension of big kernels/embeddings over 'fsdp'. Any dimension
  that does not divide falls back to replicated, and a pure data mesh replicates everything.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the '/'-joined parameter path, PartitionSpec over the parameter's dimensions).
# The first match wins; no match means replicated. Specs name 'model' (and may name 'fsdp' explicitly);
# on top of them `param_shardings` adds 'fsdp' on the largest free divisible dimension of big tensors.
# Megatron-style: the column-parallel layers (query/key/value, intermediate) split their output
# dimension, the row-parallel ones (attention output, layer output) their input dimension, so one
# attention block or MLP needs a single reduction over 'model'.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"attention/self/(query|key|value)/kernel$", P(None, "model")),
    (r"attention/self/(query|key|value)/bias$", P("model")),
    (r"intermediate/dense/kernel$", P(None, "model")),
    (r"intermediate/dense/bias$", P("model")),
    (r"attention/output/dense/kernel$", P("model", None)),
    (r"layer/[^/]+/output/dense/kernel$", P("model", None)),
)

# Tensors with fewer elements than this stay replicated over 'fsdp': sharding a LayerNorm scale saves
# nothing and costs an all-gather.
DEFAULT_FSDP_MIN_SIZE = 2**14


# ------------------------------------------------------------------------------------------------------
# Multi-host start-up.


def _int_env(environ: Mapping[str, str], key: str) -> int:
  try:
    return int(environ.get(key, "0") or 0)
  except ValueError:
    return 0


def detect_multi_process(environ: Mapping[str, str] | None = None) -> str | None:
  """Why this looks like a multi-process launch (a short reason), or None on a plain single host.

  Checks the launchers whose variables jax's own cluster detection reads: SLURM with several tasks,
  a multi-host TPU slice (several worker hostnames) or a multi-slice TPU job (MEGASCALE), Open MPI
  with several ranks.
  """
  env = os.environ if environ is None else environ
  if "SLURM_JOB_ID" in env:
    ntasks = max(_int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_STEP_NUM_TASKS"))
    if ntasks > 1:
      return f"SLURM job {env['SLURM_JOB_ID']} with {ntasks} tasks"
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in env.get(key, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"TPU slice with {len(hosts)} hosts ({key})"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") and _int_env(env, "MEGASCALE_NUM_SLICES") != 1:
    return "multi-slice TPU job (MEGASCALE_COORDINATOR_ADDRESS)"
  if "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI job with {_int_env(env, 'OMPI_COMM_WORLD_SIZE')} ranks"
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when several processes are configured; returns whether it is running.

  Call it first thing in an entry point, before any other JAX call. Explicit arguments win (all three
  are then needed unless the cluster can fill in the rest); otherwise a SLURM / TPU-pod / Open MPI
  launch is detected from the environment and jax's own cluster detection is used
  (`jax.distributed.initialize()` with no arguments). On a plain single host nothing is called, since
  `jax.distributed.initialize()` raises there. On CPU, cross-process collectives need an
  implementation: gloo (jax's default today) is set if the configured one is 'none', and an explicit
  choice such as 'mpi' is left alone.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if num_processes == 1:
      logging.info("initialize_distributed: num_processes=1, running as a single process")
      return False
    reason = f"explicit coordinator {coordinator_address}, {num_processes} processes, id {process_id}"
  else:
    reason = detect_multi_process()
    if reason is None:
      logging.info("initialize_distributed: single host, jax.distributed not started")
      return False
  logging.info("initialize_distributed: %s", reason)
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ------------------------------------------------------------------------------------------------------
# Mesh and batch layout.


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp', 'model')` mesh with Auto axes; one size may be -1 (the rest of the devices).

  Devices are sorted by (process, id) before the reshape, with 'model' innermost, so each process's
  devices form one contiguous block of the batch axes: process-local rows land on local devices. (The
  order within a process is the device id order; on large TPU slices a topology-aware order could make
  the 'model' and 'fsdp' collectives cheaper, but never changes results.)
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "model": model}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"make_mesh: axis '{name}' has size {size}; sizes must be positive or -1")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {free} in {sizes}")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if n % known:
      raise ValueError(f"make_mesh: {n} devices cannot be split into {sizes}: the fixed axes multiply "
                       f"to {known}, which does not divide {n}")
    sizes[free[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f"make_mesh: mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there "
                     f"are {n} devices")
  devices.sort(key=lambda d: (d.process_index, d.id))
  per_process = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  if len(per_process) > 1 and any(c % sizes["model"] for c in per_process.values()):
    raise ValueError(f"make_mesh: model axis {sizes['model']} does not divide the devices per process "
                     f"{per_process}; a model-parallel group must not straddle processes")
  grid = np.array(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"], sizes["model"])
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `BATCH_AXES`, every other axis replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _num_local_batch_shards(mesh: Mesh) -> int:
  """How many distinct batch shards this process's devices hold."""
  me = jax.process_index()
  dims = [mesh.axis_names.index(a) for a in BATCH_AXES]
  return len({tuple(idx[i] for i in dims) for idx, d in np.ndenumerate(mesh.devices)
              if d.process_index == me})


def process_slice(global_batch_size: int) -> slice:
  """This process's rows of a global batch: `[p*B, (p+1)*B)` with `B = global // process_count`."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch_size % count:
    raise ValueError(f"process_slice: global batch size {global_batch_size} is not divisible by the "
                     f"{count} processes")
  b = global_batch_size // count
  return slice(index * b, (index + 1) * b)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global `jax.Array`s split over `BATCH_AXES` (leading axis = batch).

  Every process passes its own rows (`process_slice`) with the same keys and shapes; the global batch
  has `local rows * process_count` rows.
  """
  sharding = batch_sharding(mesh)
  local_shards = _num_local_batch_shards(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"global_batch: key '{key}' is a scalar; every entry needs a leading batch axis")
    if value.dtype.kind in "OUS":
      raise ValueError(f"global_batch: key '{key}' has dtype {value.dtype}; only numeric arrays can go to "
                       "devices (drop strings before calling)")
    if local_shards and value.shape[0] % local_shards:
      raise ValueError(f"global_batch: key '{key}' has {value.shape[0]} local rows, not divisible by the "
                       f"{local_shards} local batch shards of the mesh {dict(mesh.shape)}")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


# ------------------------------------------------------------------------------------------------------
# Parameter shardings.


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules, fsdp_min_size: int) -> P:
  spec = P()
  for pattern, rule_spec in rules:
    if re.search(pattern, path):
      spec = rule_spec
      break
  if len(spec) > len(shape):
    raise ValueError(f"param_shardings: rule for '{path}' gives {spec} ({len(spec)} dims), but the "
                     f"parameter has shape {shape}")
  entries = [_axes_of(e) for e in spec] + [()] * (len(shape) - len(spec))
  for axes in entries:
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"param_shardings: rule for '{path}' names mesh axis '{a}', not in {mesh.axis_names}")
  # Drop size-1 axes, and any axis whose dimension does not divide (replicated there instead).
  for i, axes in enumerate(entries):
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
      logging.info("param_shardings: '%s' dim %d (%d) not divisible by %s: replicated there", path, i,
                   shape[i], axes)
      axes = ()
    entries[i] = axes
  fsdp = mesh.shape.get("fsdp", 1)
  used = {a for axes in entries for a in axes}
  if fsdp > 1 and "fsdp" not in used and len(shape) >= 2 and math.prod(shape) >= fsdp_min_size:
    free = [i for i, axes in enumerate(entries) if not axes and shape[i] % fsdp == 0]
    if free:
      i = max(free, key=lambda j: (shape[j], -j))
      entries[i] = ("fsdp",)
  while entries and not entries[-1]:
    entries.pop()
  return P(*[None if not axes else axes[0] if len(axes) == 1 else axes for axes in entries])


def param_specs(abstract_params: Any, mesh: Mesh, rules=DEFAULT_RULES,
                fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """The PartitionSpec tree of `param_shardings` (useful for logging and for shard_map specs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _spec_for(_path_str(path), tuple(leaf.shape), mesh, rules, fsdp_min_size),
      abstract_params)


def param_shardings(abstract_params: Any, mesh: Mesh, rules=DEFAULT_RULES,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """A NamedSharding per parameter, from `rules` plus automatic FSDP of big tensors.

  `abstract_params` is any tree of objects with `.shape` (e.g. `jax.eval_shape(init_params, ...)`).
  Each leaf's spec comes from the first rule whose regex is found in its '/'-joined path (replicated if
  none). Then, when the mesh has fsdp > 1 and the spec does not already use 'fsdp', tensors with at least
  two dimensions and `fsdp_min_size` elements get their largest free dimension divisible by the fsdp
  size sharded over 'fsdp'. A dimension that its axes do not divide is replicated, and axes of size 1
  are dropped, so a pure data mesh replicates every parameter.
  """
  specs = param_specs(abstract_params, mesh, rules, fsdp_min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
