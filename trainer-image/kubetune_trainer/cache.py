"""Files and directories shared by the threads and processes of one pod (DDP ranks, loader workers): each is
made once, by whoever comes first, and only ever appears complete under its final name."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class KeyLocks:
    """One ``threading.Lock`` per key, kept only while some thread holds or waits for it (a set of a million
    images must not leave a million locks behind)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if absent, never deleted: deleting a lock file lets a waiter hold
    a lock on an unlinked inode while a newcomer locks a fresh one).

    It excludes other processes sharing the directory; threads of one process also need a
    :class:`KeyLocks` first, since where flock is emulated with POSIX record locks (NFS) a process never
    conflicts with itself. A filesystem without locks at all degrades to no exclusion: callers still write through
    unique temporary names and an atomic rename, so the worst case is a duplicate download, never a torn file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.debug("%s: no file locks on this filesystem (%s); fetching without", path, exc)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def write_atomically(target: Path, data: bytes, prefix: str) -> None:
    """Write ``data`` to a unique temporary file next to ``target`` and rename it into place; a failed write
    leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide the cache from another user sharing it
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def shared_dir(target: Path, source: str, fill: Callable[[Path], bool]) -> Path | None:
    """``target``, a directory holding ``source``, filled once however many processes ask at once; None when
    there is nothing at ``source``.

    ``fill(into)`` downloads into an empty private directory and says whether it found anything. The first caller
    fills a temporary directory and renames it into place; the others wait on ``<target>.lock`` and reuse it.
    ``<target>.source`` (the source, written last) says that the directory is complete and whose. A directory left
    by an interrupted fill or for another source is renamed away before it is deleted, so the name only ever
    points at a complete directory.
    """
    parent, stem = target.parent, target.name
    marker = parent / f"{stem}.source"
    parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(parent / f"{stem}.lock"):
        if target.is_dir() and marker.is_file() and marker.read_text() == source:
            return target
        marker.unlink(missing_ok=True)
        for orphan in [*parent.glob(f"{stem}.*.part"), *parent.glob(f"{stem}.*.stale")]:
            # only a lock holder makes these, so any seen now were left by one that crashed
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{stem}.", suffix=".part"))
        try:
            if not fill(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            if target.exists():
                stale = Path(tempfile.mkdtemp(dir=parent, prefix=f"{stem}.", suffix=".stale"))
                target.replace(stale / stem)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.replace(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomically(marker, source.encode(), prefix=f"{stem}.source.")
    return target


class DiskBudget:
    """Keeps a cache directory shared by the processes of one pod under ``max_bytes``, least recently used first.

    Users mark a file used by :meth:`touch` (its mtime) and report what they add with :meth:`added`. Once a process
    has added a 32nd of the budget (at most 64 MiB) since its last look, it scans the directory and deletes the
    files used longest ago until the rest fits in 80 % of the budget, which leaves room for the other processes'
    additions until their next look. Files used in the last ``grace_seconds`` are never deleted, so a path just
    handed out is still there when it is opened (a reader that loses the race fetches again, and a descriptor
    opened on a file survives its deletion, though its blocks stay used until it is closed). One process scans at a
    time; the others skip their turn rather than wait.
    """

    IGNORED_SUFFIXES = (".lock", ".part", ".source")
    SWEEP_EVERY_BYTES = 64 << 20  # a scan of the directory is cheap next to what many processes fetch meanwhile

    def __init__(self, directory: Path, max_bytes: int, grace_seconds: float = 1.0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.grace_seconds = grace_seconds
        self._added = 0
        self._guard = threading.Lock()

    @staticmethod
    def touch(path: Path) -> bool:
        """Mark ``path`` used now; False when it is not there (never fetched, or evicted)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_guard"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._guard = threading.Lock()

    def added(self, size: int) -> None:
        with self._guard:
            self._added += size
            if self._added < min(self.max_bytes // 32, self.SWEEP_EVERY_BYTES):
                return
            added, self._added = self._added, 0
        if self.sweep() < 0:  # another process is sweeping: this one's share is looked at next time
            with self._guard:
                self._added += added

    def sweep(self, now: float | None = None) -> int:
        """Delete least recently used files until the directory fits; returns the bytes it holds afterwards."""
        lock = self.directory / ".sweep.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                return -1  # another process is sweeping
            return self._sweep_locked(now if now is not None else time.time())
        finally:
            os.close(fd)

    def _sweep_locked(self, now: float) -> int:
        entries: list[tuple[float, int, str]] = []
        total = 0
        with os.scandir(self.directory) as listing:
            for entry in listing:
                if entry.name.startswith(".") or entry.name.endswith(self.IGNORED_SUFFIXES):
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                # the blocks a file takes, as the kubelet counts ephemeral storage: small images round up
                size = max(stat.st_size, stat.st_blocks * 512)
                entries.append((stat.st_mtime, size, entry.path))
                total += size
        if total <= self.max_bytes:
            return total
        target = int(self.max_bytes * 0.8)
        for mtime, size, path in sorted(entries):
            if total <= target or now - mtime < self.grace_seconds:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                total -= size
        log.debug("cache %s: %d bytes after eviction (budget %d)", self.directory, total, self.max_bytes)
        return total
