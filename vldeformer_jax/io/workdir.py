"""One run per workdir: an advisory lock file, and what a killed run leaves behind cleaned under it.

Why: a scheduler that starts a job twice, or a person who re-runs a command while the first is still going,
puts two writers on one workdir. Orbax then deletes the other run's temporary checkpoint directories, both
runs append to `metrics.jsonl`, and both rename exports over each other. `WorkdirLock` makes the second
run stop at once with one line naming the holder.

The lock is `fcntl.flock` on `<workdir>/LOCK` (the kernel releases it when its holder dies, however it
dies), and the file holds the holder's host, pid and start time for the message. A lock file whose holder
is gone is stale: its content is reported and it is taken over. Where `flock` is not supported (some
network filesystems), the holder's pid is checked instead: a holder on this host that no longer runs is
stale; one on another host is trusted until the file is removed by hand.

Only process 0 of a multi-process run takes the lock (`hold_workdir`); the others learn the outcome
from it, so every process stops together.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import sys

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
# What an interrupted run leaves: orbax's temporary step directories, the export's and fileio's
# temporary siblings (`.<name>.tmp-<hex>`), and the metrics file's rewrite.
STALE_PATTERNS = ("checkpoints/*.orbax-checkpoint-tmp*", "best/*.orbax-checkpoint-tmp*", ".*.tmp-*",
                  "metrics.jsonl.tmp", "curves.png.tmp.png")


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir; the message is one line naming it."""

  def __init__(self, workdir: str, holder: dict, lock_path: str):
    self.workdir, self.holder, self.lock_path = workdir, holder, lock_path
    super().__init__(
        f"workdir {workdir} is in use by {describe(holder)} (lock file {lock_path}); a second run would "
        "overwrite its checkpoints and metrics: wait for it to finish or stop it first")


def describe(holder: dict) -> str:
  if not holder:
    return "another process (its lock file is empty)"
  what = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
  return what + (f" since {holder['started']}" if holder.get("started") else "")


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 4096):
    raw += chunk
  try:
    holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
  except (UnicodeDecodeError, json.JSONDecodeError):
    holder = {"unreadable": raw[:80].decode("utf-8", "replace")}
  return holder if isinstance(holder, dict) else {}


def _pid_running(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def _this_holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "argv": " ".join(sys.argv)[:500]}


class WorkdirLock:
  """`acquire()` takes `<workdir>/LOCK` or raises `WorkdirLocked`; `release()` removes it."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None
    self.stale: dict | None = None  # the previous holder when a stale lock was taken over

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "WorkdirLock":
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(10):  # retried only when the file was replaced between open and lock
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLocked(self.workdir, holder, self.path) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          os.close(fd)
          raise
        self._check_pid_holder(fd)  # no flock here: judge the holder by its pid
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if not same:  # a releasing holder unlinked the file after we opened it: lock the new one
        os.close(fd)
        continue
      previous = _read_holder(fd)
      if previous:
        self.stale = previous
        log.warning("workdir %s: stale lock of %s (no longer running) taken over", self.workdir, describe(previous))
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (json.dumps(_this_holder()) + "\n").encode("utf-8"))
      os.fsync(fd)
      self._fd = fd
      return self
    raise RuntimeError(f"workdir {self.workdir}: could not take {self.path} (it keeps being replaced)")

  def _check_pid_holder(self, fd: int) -> None:
    holder = _read_holder(fd)
    if not holder:
      return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      return
    if holder.get("host") != socket.gethostname() or _pid_running(holder.get("pid")):
      os.close(fd)
      raise WorkdirLocked(self.workdir, holder, self.path)

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)  # still holding the lock: a waiting opener sees a different file and retries
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """Holds `workdir`'s lock for the block. With several processes, process 0 takes it and every process
  raises `WorkdirLocked` when it could not."""
  import jax
  lock = WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = WorkdirLocked(os.path.abspath(workdir), {"host": "(see process 0)"}, lock.path)
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


def clean_stale(workdir: str) -> list[str]:
  """Removes what an interrupted run left (STALE_PATTERNS); returns the removed paths. Call it only while
  holding the workdir's lock: these are another live run's files otherwise."""
  removed = []
  for pattern in STALE_PATTERNS:
    for path in sorted(glob.glob(os.path.join(workdir, pattern))):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
      removed.append(path)
  if removed:
    log.info("workdir %s: removed what an interrupted run left: %s", workdir,
             ", ".join(os.path.relpath(p, workdir) for p in removed))
  return removed


def move_aside(path: str, why: str = "corrupt") -> str:
  """Renames `path` to `<path>.<why>-<UTC time>` (never over an existing name); returns the new path."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  target, n = f"{path}.{why}-{stamp}", 1
  while os.path.exists(target):
    n += 1
    target = f"{path}.{why}-{stamp}-{n}"
  os.rename(path, target)
  return target
