"""Resume: a stage skips an output that is *current*, i.e. exists and was written under the same
key (the settings that decide its content). A killed run therefore redoes only what it had not
finished, and a changed setting redoes exactly the outputs it decides.

Outputs that carry their settings inside (a graph's JSON) compare them with :func:`matches`;
outputs that cannot (parquet tables) get a sidecar ``<file>.key.json`` written *after* the file
(:func:`write_key`), so a file without its sidecar — a run killed between the two writes — is
never taken as current. A stage that rewrites a file deletes the old sidecar first
(:func:`key_path`), so a new file never sits next to an old key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adag.errors import AdagError
from adag.io import write_text

__all__ = ["canonical", "config_hash", "is_current", "key_path", "matches", "read_key", "write_key"]


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data (a JSON round trip with sorted keys: tuples become lists).
    Raises :class:`AdagError` for a value JSON cannot hold (an object, NaN, a non-string key that
    cannot be sorted)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise AdagError(f"a run setting is not plain JSON data ({e})") from None


def config_hash(key: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``key``'s canonical JSON (sorted keys, no
    spaces): equal for equal keys whatever their key order or tuple/list spelling."""
    text = json.dumps(canonical(dict(key)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def matches(recorded: Mapping[str, Any] | None, key: Mapping[str, Any]) -> bool:
    """Whether ``recorded`` (the settings stored with an output, or None) agrees with ``key`` on
    every item of ``key``; extra recorded items are ignored (e.g. a graph's label)."""
    if not isinstance(recorded, Mapping):
        return False
    return all(canonical(recorded.get(k)) == canonical(v) for k, v in key.items())


def key_path(path: Path) -> Path:
    """The sidecar of ``path``: ``<path>.key.json``."""
    path = Path(path)
    return path.with_name(path.name + ".key.json")


def write_key(path: Path, key: Mapping[str, Any]) -> Path:
    """Record ``key`` (and its :func:`config_hash`) in ``path``'s sidecar, atomically; call it
    after ``path`` is written. Returns the sidecar's path."""
    body = {"key": canonical(dict(key)), "hash": config_hash(key)}
    return write_text(key_path(path), json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_key(path: Path) -> dict[str, Any] | None:
    """The key recorded for ``path``, or None when its sidecar is missing, unreadable, malformed
    or its hash does not match its key (edited by hand)."""
    try:
        body = json.loads(key_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(body, dict) or not isinstance(body.get("key"), dict):
        return None
    key: dict[str, Any] = body["key"]
    return key if body.get("hash") == config_hash(key) else None


def is_current(path: Path, key: Mapping[str, Any]) -> bool:
    """Whether ``path`` exists and its sidecar records ``key``."""
    return Path(path).exists() and matches(read_key(path), key)
