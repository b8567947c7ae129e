"""One training run per workdir: an exclusive `flock` on `<workdir>/train.lock`.

`WorkdirLock(workdir).acquire()` takes the lock without waiting; if another process holds it,
`WorkdirLockedError` names the holder (host, pid, start time, command) that the holder wrote
into the file. The lock lasts as long as the process holds the open file: the kernel (or, on
a network filesystem, the lock manager of the server) releases it when the process exits in
any way, `kill -9` included, so a lock left behind by a dead process is never an obstacle; the
next run takes it over and logs a warning naming the previous holder. `release()` empties the
file and unlocks it. The file itself is never deleted (deleting it would let two processes
lock two different files of the same name).

What is guaranteed where:
- Local filesystems (ext4, xfs, tmpfs, ...): two processes on one machine never both hold it.
- NFS: Linux implements `flock` there with whole-file POSIX locks through the server's lock
  manager (NFSv4 locking, or NLM/lockd for NFSv3), so processes on different clients exclude
  each other too, provided the mount has working locks: not with `nolock`, and not with
  `local_lock=flock` or `local_lock=all` (then the lock only excludes processes on the same
  client). After a client crashes, the server keeps its lock until the client's lease (NFSv4,
  typically 90 s) or lockd state expires: a restart may be refused for that long.
- Filesystems without locks (some FUSE and object-store mounts; Lustre without `-o flock`)
  fail the lock call: `WorkdirLockedError` says so. `DENSEFLOW_JAX_NO_WORKDIR_LOCK=1` skips the
  lock for such storage, at the cost of this protection.
- The lock protects the workdir against a second *training* run; evaluation and sampling only
  read it and do not take the lock.
In a multi-host run only process 0 takes the lock (the other hosts would otherwise conflict
with it on shared storage); `train.train_and_evaluate` makes all processes stop together if it
fails.
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from absl import logging

from denseflow_jax.checkpoint import CheckpointError

LOCK_FILE = 'train.lock'
NO_LOCK_ENV = 'DENSEFLOW_JAX_NO_WORKDIR_LOCK'
_HELD = set()  # lock files held by this process (flock does not stop one process twice)


class WorkdirLockedError(CheckpointError):
  """The workdir is in use by another training run (or cannot be locked)."""


def _describe(holder: dict) -> str:
  parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
  if holder.get('started'):
    parts.append(f"since {holder['started']}")
  if holder.get('command'):
    parts.append(f"({holder['command'][:200]})")
  return ' '.join(parts)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Exclusive, non-blocking lock of one workdir for one training run (see the module doc)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd: Optional[int] = None

  def _read_holder(self, fd: int) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 65536).decode('utf-8', 'replace').strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises `WorkdirLockedError` at once (never waits)."""
    if os.environ.get(NO_LOCK_ENV, '') not in ('', '0'):
      logging.warning('%s is set: not locking %s', NO_LOCK_ENV, self.path)
      return self
    if self.path in _HELD:
      raise WorkdirLockedError(f'{os.path.dirname(self.path)} is already in use by a training '
                               f'run of this process (lock {self.path})')
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirLockedError(f'cannot open the workdir lock {self.path}: '
                               f'{e.strerror or e}') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        who = _describe(holder) if holder else 'another process'
        raise WorkdirLockedError(
            f'{os.path.dirname(self.path)} is in use by another training run: {who} holds '
            f'{self.path}; wait for it to finish or use another --workdir') from e
      raise WorkdirLockedError(
          f'cannot lock {self.path} ({e.strerror or e}): the filesystem may not support '
          f'locks; set {NO_LOCK_ENV}=1 to train without the workdir lock') from e
    previous = self._read_holder(fd)
    if previous:
      state = ''
      if previous.get('host') == socket.gethostname() and isinstance(previous.get('pid'), int):
        state = (' (no longer running)' if not _pid_alive(previous['pid'])
                 else ' (that pid is running but no longer holds the lock)')
      logging.warning('taking over the workdir lock %s left by %s%s', self.path,
                      _describe(previous), state)
    holder = {'host': socket.gethostname(), 'pid': os.getpid(),
              'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'command': ' '.join(sys.argv)}
    try:
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (json.dumps(holder) + '\n').encode())
    except OSError as e:  # e.g. a full disk: the lock itself still holds
      logging.warning('could not write the holder into %s: %s', self.path, e.strerror or e)
    self._fd = fd
    _HELD.add(self.path)
    return self

  def release(self) -> None:
    """Empties the lock file and unlocks it (idempotent)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    _HELD.discard(self.path)
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False
