"""One writer at a time: the lock every `StoreWriter` holds from opening a store until it is closed.

Local folders: `STORE/.geostore-lock`, an empty file held with `flock(LOCK_EX)`. The kernel releases it
when the holder exits or is killed, so a crashed writer never leaves a stale lock, and the next writer
can safely treat `.partial` files and an incomplete `_pending/` as debris (nobody else is writing). After
acquiring, the holder checks that the path still names the inode it locked: a store folder removed by a
writer that rolled back its creation (and so its lock file) is never "locked" through a dead inode. The
file stays empty, so a store's bytes do not depend on who wrote it last. Network file systems: `flock`
over NFSv4 works on Linux (it becomes a POSIX lock); over SMB/CIFS or old NFS it may not.

Object stores (`s3://`, ...) have no locks: the writer creates the object `STORE/.geostore-lock` with a
conditional PUT that fails when it exists (S3 `If-None-Match: *`, which AWS S3, MinIO and moto honour),
records who holds it, and refreshes its timestamp every `HEARTBEAT_SECONDS`; releasing deletes it. A
holder that died leaves the object behind: a lock whose heartbeat is older than `STALE_SECONDS` is
reported (one line naming the object to delete), never broken automatically, since two processes breaking
one lock at once could both win. A back-end without conditional writes is refused for writing.

Within one process the lock is shared (counted): several `StoreWriter`s of one store in one process do
not wait for each other, and the lock is released when the last one closes. Waiting is announced once on
stderr; `timeout` (seconds, default `GEOSTORE_LOCK_TIMEOUT` or forever) bounds it, after which the writer
fails with one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid

from geostore.errors import StoreError
from geostore.store.location import LOCK_KEY, Location

POLL_SECONDS = 0.05
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0
TIMEOUT_ENV = "GEOSTORE_LOCK_TIMEOUT"

_held: dict[str, tuple[_Lock, int]] = {}
_registry = threading.Lock()


class StoreLockedError(StoreError):
    """Another writer holds the store's lock (and waiting for it timed out or was not allowed)."""


def default_timeout() -> float | None:
    """`GEOSTORE_LOCK_TIMEOUT` in seconds (0: fail at once), or None (wait as long as it takes)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={text!r}: want a number of seconds") from None
    return max(0.0, value)


def acquire(location: Location, *, timeout: float | None = None) -> str:
    """Take (or share, within this process) the writer lock of `location`; returns the key to `release`."""
    key = _identity(location)
    with _registry:
        if key in _held:
            lock, count = _held[key]
            _held[key] = (lock, count + 1)
            return key
    lock = _LocalLock(location) if location.is_local else _RemoteLock(location)
    lock.acquire(default_timeout() if timeout is None else timeout)
    with _registry:
        if key in _held:  # another thread of this process took it meanwhile: keep one
            lock.release()
            held, count = _held[key]
            _held[key] = (held, count + 1)
        else:
            _held[key] = (lock, 1)
    return key


def release(key: str) -> None:
    """Give back one `acquire` of this process; the lock is released with the last one."""
    with _registry:
        if key not in _held:
            return
        lock, count = _held[key]
        if count > 1:
            _held[key] = (lock, count - 1)
            return
        del _held[key]
    lock.release()


def held(location: Location) -> bool:
    """Whether this process holds the writer lock of `location`."""
    with _registry:
        return _identity(location) in _held


def _identity(location: Location) -> str:
    if location.is_local:
        return os.path.realpath(location.local)
    return location.url


class _Lock:
    def acquire(self, timeout: float | None) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


def _waiting(location: Location, holder: str, timeout: float | None) -> None:
    limit = "" if timeout is None else f" (up to {timeout:g} s)"
    print(f"geostore: {location} is being written by {holder}; waiting for it to finish{limit}",
          file=sys.stderr, flush=True)


def _timed_out(location: Location, holder: str, timeout: float) -> StoreLockedError:
    waited = "" if timeout == 0 else f" after waiting {timeout:g} s"
    return StoreLockedError(f"{location}: is being written by {holder}{waited}; try again when it has finished "
                            f"(set {TIMEOUT_ENV} to wait longer)")


class _LocalLock(_Lock):
    def __init__(self, location: Location) -> None:
        self.location = location
        self.path = location.local / LOCK_KEY
        self.fd: int | None = None

    def acquire(self, timeout: float | None) -> None:
        import fcntl

        start, announced = time.monotonic(), False
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed between mkdir and open: retry
                continue
            except OSError as exc:
                raise StoreError(f"{self.location}: cannot create the writer lock {self.path.name} ({exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"{self.location}: cannot lock {self.path.name} ({exc})") from None
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise _timed_out(self.location, "another process", timeout) from None
                if not announced:
                    _waiting(self.location, "another process", timeout)
                    announced = True
                time.sleep(POLL_SECONDS)
                continue
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # locked a file that was unlinked meanwhile: take the one at the path now

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class _RemoteLock(_Lock):
    def __init__(self, location: Location) -> None:
        self.location = location
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time()}).encode()

    def _holder(self) -> tuple[str, float | None]:
        try:
            record = json.loads(self.location.read_bytes(LOCK_KEY))
            return f"pid {record['pid']} on {record['host']}", float(record["heartbeat"])
        except (OSError, ValueError, KeyError, TypeError):
            return "another process", None

    def acquire(self, timeout: float | None) -> None:
        start, announced = time.monotonic(), False
        while True:
            if self.location.create_exclusive(LOCK_KEY, self._record()):
                self._beat = threading.Thread(target=self._heartbeat, name="geostore-lock-heartbeat", daemon=True)
                self._beat.start()
                return
            holder, beat = self._holder()
            if beat is not None and time.time() - beat > STALE_SECONDS:
                raise StoreLockedError(
                    f"{self.location}: locked by {holder}, whose last sign of life was {time.time() - beat:.0f} s "
                    f"ago: if no writer is running, delete {self.location}/{LOCK_KEY}")
            if timeout is not None and time.monotonic() - start >= timeout:
                raise _timed_out(self.location, holder, timeout)
            if not announced:
                _waiting(self.location, holder, timeout)
                announced = True
            time.sleep(max(POLL_SECONDS, 0.5))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat only makes the lock look older
                if json.loads(self.location.read_bytes(LOCK_KEY)).get("token") == self.token:
                    self.location.write_bytes(LOCK_KEY, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(Exception):  # unreachable storage: the lock ages out (see STALE_SECONDS)
            record = json.loads(self.location.read_bytes(LOCK_KEY))
            if record.get("token") == self.token:
                self.location.remove(LOCK_KEY)
