"""The run directory as a whole: is it usable (:func:`check_writable`, before any work), stale temp
files of killed runs (:func:`remove_stale_temps`), and what a stage has kept so far
(:data:`progress`, which the CLI reports when it is interrupted).

Each stage owns some names of the run directory (``trace``: ``graphs/``, ``viewer/``,
``profiles.parquet``; ``patch``: ``patching/``) and keeps them coherent itself: it replaces the
outputs that other settings decide and removes the ones that no longer belong to the run.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from adag.errors import AdagError
from adag.io import file_sha256, remove, shown, temp_target

__all__ = ["Progress", "check_writable", "graphs_key", "progress", "remove_stale_temps"]


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (``access(2)`` also says no on a read-only
    file system, even to root)."""
    return os.access(directory, os.W_OK | os.X_OK)


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False


def _exists(path: Path, bad: str) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:  # e.g. no permission to look inside a parent
        raise AdagError(f"{bad}: cannot look at {shown(path)} ({e.strerror or e})") from None
    return True


def _why_not(directory: Path) -> str | None:
    """Why files cannot be created in the existing directory ``directory``, or None."""
    if _writable(directory):
        return None
    if _read_only_fs(directory):
        return f"{shown(directory)} is on a read-only file system"
    return f"no permission to write in {shown(directory)}"


def check_writable(
    out: str | os.PathLike[str], *, dirs: Sequence[str] = (), files: Sequence[str] = ()
) -> Path:
    """Check, creating nothing, that ``out`` can be (or already is) a run directory a stage can
    write: not empty, not a file, no file on the way to it, on a writable file system with
    permission to write; ``dirs`` and ``files`` (names inside ``out`` that the stage writes)
    must not exist as the other kind, and existing ``dirs`` must be writable. Returns ``out`` as a
    :class:`~pathlib.Path`; raises a one-line :class:`AdagError` naming the path otherwise."""
    text = os.fspath(out)
    if not text.strip():
        raise AdagError("the run directory is empty; give one, e.g. --out runs/x")
    path = Path(text)
    bad = f"cannot use {shown(path)} as a run directory"
    probe = path
    while not _exists(probe, bad):  # False for a path under a regular file
        if probe.is_symlink():
            raise AdagError(f"{bad}: {shown(probe)} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "it" if probe == path else shown(probe)
        raise AdagError(f"{bad}: {where} is a file, not a directory")
    why = _why_not(probe)
    if why is not None:
        raise AdagError(f"{bad}: {why}")
    if probe != path:
        return path  # nothing inside exists yet
    for name in dirs:
        d = path / name
        if d.exists() and not d.is_dir():
            raise AdagError(f"{bad}: {shown(d)} is a file, not a directory; move it away")
        if d.is_dir() and (why := _why_not(d)) is not None:
            raise AdagError(f"{bad}: {why}")
    for name in files:
        f = path / name
        if f.is_dir():
            raise AdagError(f"{bad}: {shown(f)} is a directory, not a file; move it away")
    return path


def remove_stale_temps(
    directory: str | os.PathLike[str], before: float, *, names: Collection[str] | None = None
) -> list[Path]:
    """Delete the temp files that :func:`adag.io.atomic_path` left in ``directory`` (not below it)
    when a run was killed: files named ``.<name>.<random>.tmp``, last modified before ``before``
    (a ``time.time()``; use the start of the run, so that files of this run are never touched),
    and, with ``names``, only those whose ``<name>`` is one of them. Returns what it removed."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise AdagError(f"cannot read {shown(directory)} ({e.strerror or e})") from None
    removed = []
    for entry in entries:
        target = temp_target(entry.name)
        if target is None or (names is not None and target not in names):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= before:
                continue
        except FileNotFoundError:
            continue
        if remove(entry.path):
            removed.append(Path(entry.path))
    return sorted(removed)


@dataclass
class Progress:
    """What the running stage has kept on disk so far; :meth:`interrupted` words it for a user who
    pressed Ctrl-C. One per process (:data:`progress`): the CLI resets it before each command."""

    what: str = ""
    """What the stage writes, plural (``"graphs"``); empty while no stage runs."""
    total: int = 0
    kept: int = 0
    where: str = ""
    resumable: bool = True
    """Whether running the same command again reuses what was kept."""

    def begin(
        self,
        what: str,
        total: int,
        where: str | os.PathLike[str],
        *,
        kept: int = 0,
        resumable: bool = True,
    ) -> None:
        self.what, self.total, self.kept = what, total, kept
        self.where, self.resumable = shown(where), resumable

    def advance(self, n: int = 1) -> None:
        self.kept += n

    def reset(self) -> None:
        self.begin("", 0, "")

    def interrupted(self) -> str:
        """One line: what was kept and how to go on."""
        if not self.what:
            return "interrupted before anything was written"
        kept = f"kept {self.kept} of {self.total} {self.what} in {self.where}"
        if self.resumable:
            return f"interrupted; {kept}; run the same command again to resume"
        return f"interrupted; {kept}; running the same command again redoes them all"


progress = Progress()
"""The process's :class:`Progress` (stages update it; ``adag``'s Ctrl-C handler reads it)."""


def graphs_key(graphs_dir: Path, slugs: Sequence[str]) -> list[list[str]]:
    """The identity of a run's graphs for resume keys: each slug with its JSON's SHA-256 (the
    JSON records its tensors' digest, so this names both files)."""
    return [[s, file_sha256(Path(graphs_dir) / f"{s}.json")] for s in slugs]
