"""Training end to end through launch/train.py, and resuming it.

- `launch/train.py --config=configs/tiny.py` trains 12 steps on 8 simulated devices and writes rolling
  checkpoints, the best checkpoint, metrics.jsonl (every step once; the learning rate equal to the
  schedule), TensorBoard events, a PNG, and an export that `Encoder.load` reads; the export holds exactly
  the final checkpoint's parameters, and the logged retrieval numbers equal an independent evaluation of
  the export;
- a run killed with SIGKILL mid-training and restarted equals the uninterrupted run, bitwise on CPU
  (losses and metrics of every step, final parameters);
- a checkpoint written on 8 devices restores on a 1-device mesh with equal values;
- the export of the 8-device run loads in a fresh 1-device process (tests/export_worker.py) with the
  writer's parameters, bit for bit, and its embeddings.

Faults, each with the line printed, the exit status and what is on disk afterwards:
- two runs started at once on one workdir: one trains to the end with the lone run's result, the other
  exits 2 at once naming the holder;
- a damaged latest checkpoint is moved aside and the previous one resumed, ending with the lone run's
  parameters; truncating each file of the latest checkpoint in turn never stops a restore; when no
  checkpoint restores the run stops with one line and moves nothing;
- a run killed during its final export (a temporary export, no best/) heals on restart: the final
  evaluation and best/ redone, the export written, the temporaries removed; a finished run is left alone
  (tests/test_input_workers.py: a killed run's input workers die with it).

The runs go through `launch/train.py` with configs/tiny.py (dropout on), as a user would; they share a
persistent compilation cache so the identical train step compiles once (tests/train_runs.py).
"""
import gc
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from repo_configs import config_module
from tolerances import ELEMENTARY, assert_f32
from train_runs import ROOT, train_command as _cmd, train_env
from vldeformer_jax import parallel
from vldeformer_jax.io import checkpoint
from vldeformer_jax.io.export import read_export
from vldeformer_jax.model.config import ModelConfig
from vldeformer_jax.training import optim
from vldeformer_jax.training import state as state_lib
from vldeformer_jax.training.metric_writers import read_metrics

tiny = config_module("tiny")

TRAIN_KEYS = {"loss", "t2i_accuracy", "i2t_accuracy", "pos_sim", "neg_sim", "grad_norm", "param_norm",
              "learning_rate", "temperature"}
TIMING_KEYS = ("examples_per_sec", "first_step_seconds")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return train_env(tmp_path_factory)


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _train_losses(workdir):
  return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
          for m in read_metrics(os.path.join(workdir, "metrics.jsonl")) if m["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
  environ, data_dir = env
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir


def test_tiny_trains_end_to_end_through_launch(env, uninterrupted):
  _, data_dir = env
  workdir = pathlib.Path(uninterrupted)
  c = tiny.get_config()
  steps = c.train.num_steps
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [9, 12]
  assert os.listdir(workdir / "best") == ["12"]

  records = read_metrics(str(workdir / "metrics.jsonl"))
  train_records = [m for m in records if m["split"] == "train"]
  assert [m["step"] for m in train_records] == list(range(1, steps + 1))
  for m in train_records:
    assert TRAIN_KEYS <= set(m), sorted(m)
    assert np.isfinite(m["loss"])
  schedule = optim.learning_rate_schedule(c.train.learning_rate, c.train.warmup_steps, steps)
  for m in train_records:  # the update of step s uses the schedule at s - 1 (0 first, as in PyTorch)
    # Rule F32-PAIR: the float32 schedule inside the jitted step and here (another program); n and scale
    # as in test_configs.py's schedule test.
    assert_f32(m["learning_rate"], float(schedule(m["step"] - 1)), n=13 + ELEMENTARY, scale=c.train.learning_rate,
               pair=True)
  assert "first_step_seconds" in train_records[0] and "examples_per_sec" in train_records[1]
  # Rule F32: exp of float32(log T) against T: log T rounded (|log T| u), then exp (ELEMENTARY u), relative to T.
  temp = c.loss.temperature
  assert_f32([m["temperature"] for m in train_records], temp, n=1 + ELEMENTARY, scale=temp * (1 + abs(np.log(temp))))
  (eval_record,) = [m for m in records if m["split"] == "eval"]
  assert eval_record["step"] == steps
  for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"):
    assert key in eval_record

  with open(workdir / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))

  # The export: Encoder.load reads it, it holds exactly the last checkpoint's parameters (rule EXACT: stored
  # bytes), and the logged retrieval numbers are those of an independent evaluation of it.
  from vldeformer_jax.retrieval.encoder import Encoder
  from vldeformer_jax.io.export import read_export
  from vldeformer_jax.data import prepare
  from vldeformer_jax.retrieval.evaluate import evaluate
  ex = read_export(str(workdir / "export"))
  assert ex.metadata["step"] == steps
  saved = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(steps) / "state"))
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved["params"])[0])
  flat_export = dict(jax.tree_util.tree_flatten_with_path(ex.params)[0])
  assert len(flat_export) == len(flat_saved) > 0
  for path, value in flat_export.items():
    np.testing.assert_array_equal(np.asarray(flat_saved[path]), value)
  encoder = Encoder.load(str(workdir / "export"))
  assert encoder.fingerprint == ex.fingerprint
  emb = encoder.embed_texts(["a small red dog left of a blue car"])
  assert emb.shape == (1, c.model.hidden_size)
  # Rule F32: normalised in float32 (a sum of D squares, sqrt, divide), then its norm again here.
  assert_f32(np.linalg.norm(emb, axis=1), 1.0, n=2 * c.model.hidden_size + 4, scale=1.0)
  source = prepare.load_split(data_dir, c.data.name, c.data.eval_split)
  results = evaluate(encoder, source, protocol=c.eval.protocol, batch_size=c.eval.batch_size,
                     mesh=parallel.make_mesh())  # as the trainer's evaluator: same programs, same numbers
  for direction in ("i2t", "t2i"):
    for k in ("R@1", "R@5", "R@10"):
      # Rule EXACT: the same compiled forwards on the same mesh and parameters, the same float64 formula.
      assert eval_record[f"{direction}_{k}"] == results[direction][k], (direction, k)


def test_sigkill_then_resume_equals_uninterrupted_run(env, uninterrupted, tmp_path):
  environ, data_dir = env
  total = tiny.get_config().train.num_steps
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=environ, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not _finished_steps(workdir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  resume_from = _finished_steps(workdir)[-1]
  assert 0 < resume_from < total, _finished_steps(workdir)

  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"resumed step {resume_from}" in r.stderr

  # Same losses and metrics at every step (metrics.jsonl holds each step once), same final parameters:
  # rule EXACT, the resumed steps run the same programs on the same devices and restored state.
  resumed, straight = _train_losses(workdir), _train_losses(uninterrupted)
  assert [m["step"] for m in resumed] == [m["step"] for m in straight] == list(range(1, total + 1))
  assert resumed == straight
  a, b = read_export(os.path.join(workdir, "export")), read_export(os.path.join(uninterrupted, "export"))
  assert a.metadata["step"] == b.metadata["step"] == total
  leaves_a = jax.tree_util.tree_flatten_with_path(a.params)[0]
  leaves_b = jax.tree.leaves(b.params)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    assert np.array_equal(x, y), jax.tree_util.keystr(path)
  assert a.fingerprint == b.fingerprint


def test_checkpoint_from_8_devices_restores_on_1(uninterrupted):
  c = tiny.get_config()
  mc = ModelConfig.from_json(os.path.join(uninterrupted, "model_config.json"))
  tx, _ = optim.make_optimizer(c.train, c.train.num_steps)
  ckpts = checkpoint.Checkpoints(os.path.join(uninterrupted, "checkpoints"), max_to_keep=None)
  step = ckpts.latest_step()
  mesh8 = parallel.make_mesh(devices=jax.devices()[:8])
  mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
  on8, data8, _ = ckpts.restore(step, state_lib.abstract_state(mc, tx, mesh8))
  on1, data1, _ = ckpts.restore(step, state_lib.abstract_state(mc, tx, mesh1))
  ckpts.close()
  assert data8 == data1 and data1["step"] == step
  for x in jax.tree.leaves(on1):
    assert len(x.sharding.device_set) == 1
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(on8))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(on8)[0], jax.tree.leaves(on1)):  # rule EXACT
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  exported = read_export(os.path.join(uninterrupted, "export")).params
  for x, y in zip(jax.tree.leaves(on1.params), jax.tree.leaves(exported)):
    assert np.array_equal(np.asarray(x), y)


def test_export_from_8_devices_loads_in_a_1_device_process(uninterrupted, tmp_path):
  """The export of the 8-device run, read by a fresh 1-device process: the writer's parameters (the final
  checkpoint's, restored here on the writer's 8 devices), bit for bit, and the embeddings the 8-device
  writer computes."""
  import export_worker
  from vldeformer_jax.io import convert
  from vldeformer_jax.retrieval.encoder import Encoder
  steps = tiny.get_config().train.num_steps
  saved = ocp.StandardCheckpointer().restore(os.path.join(uninterrupted, "checkpoints", str(steps), "state"))
  writer_params = {k: np.asarray(v) for k, v in convert.flatten(saved["params"]).items()}
  np.savez(tmp_path / "writer_params.npz", **writer_params)
  export_dir = os.path.join(uninterrupted, "export")
  reader = export_worker.start_reader(export_dir, str(tmp_path / "writer_params.npz"), str(tmp_path / "read.npz"))
  mc = ModelConfig.from_json(os.path.join(export_dir, "model_config.json"))
  from vldeformer_jax.model import inputs
  on8 = Encoder(mc, saved["params"], inputs.load_tokenizer(os.path.join(export_dir, "vocab.txt")),
                mesh=parallel.make_mesh(devices=jax.devices()[:8]), batch_size=8, progress=False)
  assert len(jax.devices()) == 8
  writer_embeddings = export_worker.embeddings(on8)
  export_worker.wait_all([reader])
  export_worker.check_read(dict(np.load(tmp_path / "read.npz")), writer_params, writer_embeddings, mc)


# ------------------------------------------------------------------------------------------------------
# Faults: one run per workdir, damaged checkpoints, a killed export, orphaned input workers.


def _copy_run(src, dst):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
  return str(dst)


def _records(workdir):
  return [(m["step"], m["split"]) for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _assert_same_export(workdir, reference):
  """The export holds the reference run's parameters, bit for bit (rule EXACT: same programs, same state)."""
  a, b = read_export(os.path.join(workdir, "export")), read_export(os.path.join(reference, "export"))
  assert a.metadata["step"] == b.metadata["step"]
  assert a.fingerprint == b.fingerprint
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    assert np.array_equal(x, y)


def _leftovers(workdir):
  return sorted(str(p.relative_to(workdir)) for p in pathlib.Path(workdir).rglob("*")
                if ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name or p.name == "LOCK")


def test_two_runs_on_one_workdir_one_trains_the_other_exits_2(env, uninterrupted, tmp_path):
  environ, data_dir = env
  workdir = str(tmp_path / "dup")
  t0 = time.time()
  procs = [subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  ended = {}
  while len(ended) < 2 and time.time() - t0 < 600:
    for p in procs:
      if p.pid not in ended and p.poll() is not None:
        ended[p.pid] = time.time() - t0
    time.sleep(0.05)
  outs = {p.pid: p.communicate(timeout=60) for p in procs}
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], [outs[p.pid][1][-3000:] for p in procs]
  (winner,) = [p for p in procs if p.returncode == 0]
  (loser,) = [p for p in procs if p.returncode == 2]
  errors = [l for l in outs[loser.pid][1].splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in outs[loser.pid][1], outs[loser.pid][1][-3000:]
  assert re.fullmatch(
      rf"error: workdir {re.escape(workdir)} is in use by pid {winner.pid} on host {re.escape(socket.gethostname())} "
      rf"since \S+ \(lock file {re.escape(workdir)}/LOCK\); a second run would overwrite its checkpoints and "
      r"metrics: wait for it to finish or stop it first", errors[0]), errors[0]
  assert ended[loser.pid] < ended[winner.pid]  # refused at start, not after a crash
  # The winner's run is the lone run's: each step once, the same losses, the same parameters; no leftovers.
  assert _records(workdir) == _records(uninterrupted)
  assert _train_losses(workdir) == _train_losses(uninterrupted)
  _assert_same_export(workdir, uninterrupted)
  assert _leftovers(workdir) == []
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]


def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_resumed(env, uninterrupted, tmp_path):
  environ, data_dir = env
  workdir = _copy_run(uninterrupted, tmp_path / "corrupt")
  d = pathlib.Path(workdir, "checkpoints", "12", "state", "ocdbt.process_0", "d")
  largest = max(d.iterdir(), key=lambda f: f.stat().st_size)
  os.truncate(largest, 1000)  # as `truncate -s 1000` on the largest file
  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  moved = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith("12.corrupt-")]
  assert len(moved) == 1, os.listdir(os.path.join(workdir, "checkpoints"))
  (line,) = [l for l in r.stderr.splitlines() if "cannot be restored" in l]
  ckdir = os.path.join(workdir, "checkpoints")
  assert re.search(rf"checkpoint {re.escape(ckdir)}/12 cannot be restored \(.+\): moved to {re.escape(ckdir)}/"
                   rf"{re.escape(moved[0])}; resuming from step 9$", line), line
  assert "resumed step 9" in r.stderr and "Traceback" not in r.stderr
  # Nothing lost: the damaged checkpoint kept as it was, aside; step 9 intact and used; 12 written again.
  assert os.path.getsize(os.path.join(ckdir, moved[0], "state", "ocdbt.process_0", "d", largest.name)) == 1000
  assert sorted(n for n in os.listdir(ckdir) if n.isdigit()) == ["12", "9"]
  assert _records(workdir) == _records(uninterrupted)  # each step once
  assert _train_losses(workdir) == _train_losses(uninterrupted)
  _assert_same_export(workdir, uninterrupted)


def test_no_checkpoint_restores_stops_with_one_line_and_moves_nothing(env, uninterrupted, tmp_path):
  environ, data_dir = env
  workdir = _copy_run(uninterrupted, tmp_path / "all_bad")
  ckdir = os.path.join(workdir, "checkpoints")
  for step in ("9", "12"):
    os.truncate(os.path.join(ckdir, step, "data", "metadata"), 10)  # the data iterator's JSON, torn
  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-4000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-4000:]
  assert re.fullmatch(
      rf"error: {re.escape(ckdir)}: no checkpoint restores \(step 12: .+; step 9: .+\); if the config changed since "
      rf"they were written, restore it, else move {re.escape(ckdir)} aside to start over", errors[0]), errors[0]
  assert sorted(os.listdir(ckdir)) == ["12", "9"]  # nothing moved: it may be the config that changed
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_truncating_each_file_of_the_latest_checkpoint_never_stops_a_restore(uninterrupted, tmp_path):
  """Fault injection over checkpoints/12: each file in turn cut to half its size. The restore either falls
  back to step 9 (the file was needed) with step 9's exact state and data position, the damaged step moved
  aside, or (a file a restore does not read) returns step 12's exact state. Continuing from an exact state
  and data position gives the uninterrupted run's parameters (test_sigkill_then_resume_equals_uninterrupted_run
  and test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_resumed show it through launch/train.py)."""
  c = tiny.get_config()
  mc = ModelConfig.from_json(os.path.join(uninterrupted, "model_config.json"))
  tx, _ = optim.make_optimizer(c.train, c.train.num_steps)
  abstract = state_lib.abstract_state(mc, tx, parallel.make_mesh())
  src = os.path.join(uninterrupted, "checkpoints")
  pristine = checkpoint.Checkpoints(src, max_to_keep=None)
  ref = {s: pristine.restore(s, abstract) for s in (9, 12)}
  pristine.close()
  files = sorted(str(p.relative_to(src)) for p in pathlib.Path(src, "12").rglob("*") if p.is_file())
  assert len(files) > 10
  outcome = {}
  for i, rel in enumerate(files):
    ckdir = str(tmp_path / f"ck{i}")
    shutil.copytree(src, ckdir)
    path = os.path.join(ckdir, rel)
    os.truncate(path, os.path.getsize(path) // 2)
    ckpts = checkpoint.Checkpoints(ckdir, max_to_keep=None)
    step, state, data_state, _ = ckpts.restore_latest(abstract)
    ckpts.close()
    want_state, want_data, _ = ref[step]
    assert data_state == want_data, rel
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):  # rule EXACT: stored bytes
      assert np.array_equal(np.asarray(x), np.asarray(y)), rel
    names = sorted(os.listdir(ckdir))
    if step == 9:
      moved = [n for n in names if n.startswith("12.corrupt-")]
      assert "12" not in names and "9" in names and len(moved) == 1, (rel, names)
      kept = os.path.join(ckdir, moved[0], rel.split("/", 1)[1])  # moved aside as it was, not deleted
      assert os.path.getsize(kept) == os.path.getsize(os.path.join(src, rel)) // 2, rel
    else:
      assert step == 12 and names == ["12", "9"], (rel, names)
    outcome[rel] = step
    shutil.rmtree(ckdir)
    gc.collect()  # orbax's abandoned reads of the damaged file (tests/conftest.py)
  fell_back = sorted(r for r, s in outcome.items() if s == 9)
  # The files every restore reads fall back, and so does the largest array data file.
  arrays = pathlib.Path(src, "12", "state", "ocdbt.process_0", "d")
  largest = max(arrays.iterdir(), key=lambda f: f.stat().st_size)
  for needed in ("12/data/metadata", "12/meta/metadata", "12/state/_METADATA", "12/state/manifest.ocdbt",
                 str(largest.relative_to(src))):
    assert outcome[needed] == 9, (needed, fell_back)
  print(f"{len(fell_back)} of {len(files)} truncations fell back to step 9; the others are files a restore "
        f"does not read: {sorted(r for r, s in outcome.items() if s == 12)}")


def test_killed_during_the_final_export_heals_on_restart(env, uninterrupted, tmp_path):
  """The state `kill -9` during the final export leaves: checkpoints 9 and 12 complete, the eval record of
  step 12 written, best/ only an orbax temporary (its save was asynchronous), a temporary export."""
  environ, data_dir = env
  workdir = _copy_run(uninterrupted, tmp_path / "killed_export")
  shutil.rmtree(os.path.join(workdir, "best", "12"))
  os.makedirs(os.path.join(workdir, "best", "12.orbax-checkpoint-tmp-1764000000", "state"))
  os.rename(os.path.join(workdir, "export"), os.path.join(workdir, ".export.tmp-e0d84ab8"))
  os.remove(os.path.join(workdir, ".export.tmp-e0d84ab8", "export.json"))
  r = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert re.search(rf"workdir {re.escape(workdir)}: removed what an interrupted run left: "
                   r"best/12\.orbax-checkpoint-tmp-1764000000, \.export\.tmp-e0d84ab8$", r.stderr,
                   re.M), r.stderr[-3000:]
  assert "resumed step 12" in r.stderr
  assert "resumed at the final step 12: the final evaluation is missing; running it" in r.stderr
  assert _leftovers(workdir) == []
  assert os.listdir(os.path.join(workdir, "best")) == ["12"]
  best_meta = json.load(open(os.path.join(workdir, "best", "12", "meta", "metadata")))
  want_meta = json.load(open(os.path.join(uninterrupted, "best", "12", "meta", "metadata")))
  assert best_meta["score"] == want_meta["score"]
  assert _records(workdir) == _records(uninterrupted)  # the eval record of step 12 once
  _assert_same_export(workdir, uninterrupted)

  # A finished run started again: nothing to redo, the export left as it is.
  export_json = open(os.path.join(workdir, "export", "export.json")).read()
  again = subprocess.run(_cmd(workdir, data_dir), cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  assert "final evaluation is missing" not in again.stderr and "wrote export" not in again.stderr
  assert open(os.path.join(workdir, "export", "export.json")).read() == export_json
  assert _records(workdir) == _records(uninterrupted)
