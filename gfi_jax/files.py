"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every writer puts its bytes in a temporary file next to the target (same folder, so the
rename stays on one file system), gives it the permissions a plain `open` would (mkstemp
makes 0600), and renames it over the target. `durable=True` also fsyncs the data before
the rename, for files a crash must not leave empty (the run's records and settings).

    atomic_write_json(out / "summary.json", records)
    with atomic_writer(out / "mask.npy") as f:     # for writers that want a file object
        np.save(f, mask)
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"   # temporary files start with this (a glob for leftovers: ".tmp-*")


def _umask() -> int:
    umask = os.umask(0)   # the only way to read it is to set it
    os.umask(umask)
    return umask


def make_public(path: str | os.PathLike, folder: bool = False) -> None:
    """Gives a file (0666) or folder (0777) made by mkstemp / mkdtemp the permissions the
    umask allows, as if made by `open` / `mkdir`."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False,
                  encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object whose contents replace `path` when the block ends without an error;
    on an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"-{path.name}", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        make_public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    with atomic_writer(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False,
                      encoding: str = "utf-8") -> Path:
    with atomic_writer(path, "w", durable=durable, encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1,
                      durable: bool = False) -> Path:
    """`json.dump(obj, indent=indent)`, written atomically."""
    with atomic_writer(path, "w", durable=durable, encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    return Path(path)


def check_writable(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and proves a file can be made there (OSError if not), so a
    long run fails at once instead of at its first write."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder
