"""One run per workdir (io/workdir.py) and what keeps a workdir consistent after a fault, in-process and fast.

- a held lock refuses a second holder with one line naming the holder's pid and host (the same message
  `launch/train.py` prints before exiting with status 2; the two-process run is in test_resume.py);
- a stale lock (its holder dead) is taken over and reported, with flock and with the pid fallback for
  filesystems without flock; a released lock leaves no file;
- `clean_stale` removes exactly what an interrupted run leaves (orbax and export temporaries);
- `move_aside` never overwrites; `truncate_after` keeps each (step, split) once, as a restart after two
  interleaved writers needs.
"""
import errno
import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from vldeformer_jax.io import workdir as workdir_lib
from vldeformer_jax.training import metric_writers


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
  wd = str(tmp_path / "run")
  first = workdir_lib.WorkdirLock(wd).acquire()
  holder = json.load(open(os.path.join(wd, "LOCK")))
  assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
  with pytest.raises(workdir_lib.WorkdirLocked) as e:
    workdir_lib.WorkdirLock(wd).acquire()  # flock is per open file: refused in the same process too
  msg = str(e.value)
  assert re.fullmatch(
      rf"workdir {re.escape(wd)} is in use by pid {os.getpid()} on host {re.escape(socket.gethostname())} since "
      rf"\S+ \(lock file {re.escape(wd)}/LOCK\); a second run would overwrite its checkpoints and metrics: wait for "
      r"it to finish or stop it first", msg), msg
  # From another process as well (what a second `launch/train.py` sees).
  script = f"from vldeformer_jax.io import workdir as w; w.WorkdirLock({wd!r}).acquire()"
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
  assert r.returncode == 1 and f"WorkdirLocked: workdir {wd} is in use by pid {os.getpid()}" in r.stderr
  first.release()
  assert not os.path.exists(os.path.join(wd, "LOCK"))
  with workdir_lib.WorkdirLock(wd) as again:  # free again
    assert again.held and again.stale is None


def test_stale_lock_is_taken_over_and_reported(tmp_path, caplog):
  wd = tmp_path / "run"
  wd.mkdir()
  dead = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2020-01-01T00:00:00+00:00"}
  (wd / "LOCK").write_text(json.dumps(dead))  # a holder killed with SIGKILL leaves its file, not its flock
  with caplog.at_level(logging.WARNING, logger="vldeformer_jax.io.workdir"):
    lock = workdir_lib.WorkdirLock(str(wd)).acquire()
  assert lock.stale == dead
  assert f"workdir {wd}: stale lock of pid {dead['pid']} on host {dead['host']} since 2020-01-01T00:00:00+00:00 " \
         "(no longer running) taken over" in caplog.text
  assert json.loads((wd / "LOCK").read_text())["pid"] == os.getpid()
  lock.release()


def test_without_flock_the_holder_pid_decides(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  wd = tmp_path / "run"
  wd.mkdir()
  alive = {"host": socket.gethostname(), "pid": os.getppid()}  # a live process that is not us
  (wd / "LOCK").write_text(json.dumps(alive))
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"in use by pid {os.getppid()} on host"):
    workdir_lib.WorkdirLock(str(wd)).acquire()
  elsewhere = {"host": "another-host", "pid": 1}
  (wd / "LOCK").write_text(json.dumps(elsewhere))  # cannot be checked from here: trusted
  with pytest.raises(workdir_lib.WorkdirLocked, match="in use by pid 1 on host another-host"):
    workdir_lib.WorkdirLock(str(wd)).acquire()
  dead = {"host": socket.gethostname(), "pid": _dead_pid()}
  (wd / "LOCK").write_text(json.dumps(dead))
  lock = workdir_lib.WorkdirLock(str(wd)).acquire()
  assert lock.stale == dead
  lock.release()


def test_clean_stale_removes_only_what_an_interrupted_run_leaves(tmp_path):
  wd = tmp_path
  stale_dirs = ["checkpoints/12.orbax-checkpoint-tmp-1701", "best/12.orbax-checkpoint-tmp-1702", ".export.tmp-e0d84ab8"]
  stale_files = [".model_config.json.tmp-1a2b3c4d", "metrics.jsonl.tmp", "curves.png.tmp.png"]
  kept = ["checkpoints/9/state/x", "checkpoints/12.corrupt-20250101T000000Z/x", "best/12/x", "export/export.json",
          "metrics.jsonl", "model_config.json", "data/.incomplete-1.0.0-aa/x"]
  for rel in stale_dirs:
    (wd / rel / "params").mkdir(parents=True)
  for rel in stale_files + kept:
    (wd / rel).parent.mkdir(parents=True, exist_ok=True)
    (wd / rel).write_text("x")
  removed = workdir_lib.clean_stale(str(wd))
  assert sorted(os.path.relpath(p, wd) for p in removed) == sorted(stale_dirs + stale_files)
  for rel in stale_dirs + stale_files:
    assert not (wd / rel).exists(), rel
  for rel in kept:
    assert (wd / rel).exists(), rel


def test_move_aside_never_overwrites(tmp_path):
  (tmp_path / "12").mkdir()
  first = workdir_lib.move_aside(str(tmp_path / "12"))
  (tmp_path / "12").mkdir()
  second = workdir_lib.move_aside(str(tmp_path / "12"))
  assert re.fullmatch(r".*/12\.corrupt-\d{8}T\d{6}Z(-2)?", first) and first != second
  assert os.path.isdir(first) and os.path.isdir(second) and not (tmp_path / "12").exists()


def test_truncate_after_keeps_each_step_once(tmp_path):
  """Two runs that wrote one metrics.jsonl interleaved (before the lock), then a restart from step 9."""
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for step in range(1, 13):
      for run in ("a", "b"):
        f.write(json.dumps({"step": step, "split": "train", "loss": 1.0 / step, "run": run}) + "\n")
    f.write(json.dumps({"step": 12, "split": "eval", "rsum": 1.0}) + "\n")
    f.write('{"step": 13, "spl')  # a torn last line
  metric_writers.truncate_after(path, 9)
  records = metric_writers.read_metrics(path)
  assert [(r["step"], r["split"], r["run"]) for r in records] == [(s, "train", "a") for s in range(1, 10)]
