"""A training run killed with SIGKILL (as the OOM killer does) leaves none of its input worker processes
behind, and a caller reading the run's pipes is not left waiting on them."""
import os
import signal
import subprocess
import sys
import time

import pytest

from train_runs import ROOT, train_command, train_env
from vldeformer_jax.training.metric_writers import read_metrics


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return train_env(tmp_path_factory)


def _children(pid):
  """Every live (not zombie) descendant of `pid`, from /proc."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if stat[0] not in ("Z", "X"):
        parents.setdefault(int(stat[1]), []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    kids = parents.get(todo.pop(), [])
    out += kids
    todo += kids
  return out


def _alive(pid):
  try:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except OSError:
    return False


def _cmdline(pid):
  try:
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
  except OSError:
    return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_input_workers_die_with_a_killed_run(env, tmp_path):
  environ, data_dir = env
  workdir = str(tmp_path / "workers")
  # The tiny run's program, fed by 2 worker processes; killed at its first steps.
  cmd = train_command(workdir, data_dir) + ["--config.data.worker_count=2", "--config.train.checkpoint_every=1000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    workers, deadline = [], time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
      if len(workers) >= 2 and read_metrics(os.path.join(workdir, "metrics.jsonl")):
        break  # training, fed by its workers
      time.sleep(0.1)
    assert proc.poll() is None and len(workers) >= 2, (workers, proc.poll())
    proc.send_signal(signal.SIGKILL)  # as the OOM killer does
    try:
      proc.communicate(timeout=30)  # a caller reading the run's pipes is not left waiting on the workers
      pipes_closed = True
    except subprocess.TimeoutExpired:
      pipes_closed = False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  deadline = time.time() + 5
  while time.time() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.1)
  survivors = [p for p in workers if _alive(p)]
  for p in survivors:  # only ours, by pid, so a failure does not leak them into the next test
    os.kill(p, signal.SIGKILL)
  assert not survivors, f"input workers {survivors} outlived the killed run"
  assert pipes_closed
