"""Atomic file writing: every file adag writes appears whole or not at all (temp file in the same
directory + rename), so a killed run leaves nothing half-written.

A run killed by SIGKILL can leave a temp file behind, named ``.<name>.<8 random chars>.tmp``
beside its target (:func:`temp_target` recognises them; stages remove their stale ones). Any
``OSError`` while writing or removing a file (a full disk, a read-only file system, no
permission) becomes a one-line :class:`~adag.errors.AdagError` naming the path.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adag.errors import AdagError

# tempfile.mkstemp's names: prefix + 8 characters of [a-z0-9_] + suffix
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` for a one-line message: as is, or quoted with escapes when it holds a line break
    or another character that does not print."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def temp_target(name: str) -> str | None:
    """The target name of a temp file name made by :func:`atomic_path` (``.<name>.<random>.tmp``
    → ``<name>``), or None for any other name."""
    m = _TEMP.fullmatch(name)
    return m.group("name") if m else None


def _write_error(target: Path, e: OSError) -> AdagError:
    if isinstance(e, (NotADirectoryError, FileExistsError)) and e.filename is not None:
        return AdagError(f"cannot write {shown(target)}: {shown(e.filename)} is not a directory")
    return AdagError(f"cannot write {shown(target)} ({e.strerror or e})")


def _make_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns the ones created, outermost first."""
    missing = []
    d = directory
    while not d.is_dir():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(d)) from None
        else:
            created.append(d)
    return created


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed to ``path``,
    otherwise deleted. Creates the parent directory on the first write into it (and removes the
    directories it created again if that write fails or is interrupted, so a Ctrl-C leaves no
    empty directories). An ``OSError`` becomes an :class:`AdagError` naming ``path``."""
    target = Path(path)
    created: list[Path] = []
    tmp = ""
    done = False
    try:
        try:
            created = _make_dirs(target.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            yield tmp
            # mkstemp creates 0600; give the file the mode a plain open() would (umask applied)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
            done = True
        except OSError as e:
            raise _write_error(target, e) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if not done:
            for d in reversed(created):
                try:
                    d.rmdir()  # only if still empty
                except OSError:
                    break


def remove(path: str | os.PathLike[str]) -> bool:
    """Delete the file ``path`` if it exists; returns whether it did. An ``OSError`` becomes an
    :class:`AdagError` naming ``path``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise AdagError(f"cannot remove {shown(path)} ({e.strerror or e})") from None
    return True


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_parquet(table: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pyarrow table."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kwargs)
    return Path(path)


def digest(data: bytes) -> dict[str, Any]:
    """The record a JSON file keeps of the binary file written beside it (a graph's tensors, a
    clusters unit table), checked on load: ``{"size", "sha256"}``."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (resume keys name the exact files they were computed
    from)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
