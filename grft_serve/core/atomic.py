"""Atomic file publication: readers of a path see the old file or the whole new one, never a part."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_write", "default_file_mode"]

TMP_SUFFIX = ".tmp"  # temp files: .<name>.<random>.tmp, in the target's directory


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (0644 under umask 022).

    ``mkstemp`` creates 0600 files, unreadable by another service sharing a store; published files
    get this mode instead. The umask is read from /proc (no process-wide umask flip) where it can be."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part:
    a temp file ``.<name>.<random>.tmp`` in the same directory, fsync, then publish it.

    ``replace=False`` publishes only if ``path`` does not exist yet, atomically (a hard link of the temp
    file, which fails if the name is taken): of two writers of one new path exactly one succeeds, the
    other gets ``FileExistsError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path, data)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(path.parent)
    return path


def _publish_new(tmp: str, path: Path, data: bytes) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:  # a filesystem without hard links: exclusive create (visible while written)
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(path)
            raise


def _fsync_dir(directory: Path) -> None:
    """Make a rename/link in ``directory`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
