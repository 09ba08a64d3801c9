"""Resume: canonical keys, sidecar keys, and the patch stage skipping a table that is current (on a
tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import adag.pipeline.patch as patch_stage
from adag.errors import AdagError
from adag.pipeline.resume import (
    canonical,
    config_hash,
    is_current,
    key_path,
    matches,
    read_key,
    write_key,
)

from .conftest import tiny_model
from .test_patching import random_pairs

KEY = {"model": "m", "nodes": ("heads", "qkv"), "threshold": 0.5, "k": None}


def test_canonical_is_plain_json() -> None:
    assert canonical({"b": (1, 2), "a": {"y": 1.5, "x": [None, True]}}) == {
        "a": {"x": [None, True], "y": 1.5},
        "b": [1, 2],
    }
    assert list(canonical({"b": 1, "a": 2})) == ["a", "b"]
    for bad in (object(), {"x": float("nan")}, {"x": {1, 2}}, np.float32(1.0)):
        with pytest.raises(AdagError, match="not plain JSON"):
            canonical(bad)


def test_config_hash_ignores_spelling_not_content() -> None:
    h = config_hash(KEY)
    assert len(h) == 16 and int(h, 16) >= 0
    assert config_hash(dict(reversed(list(KEY.items())))) == h  # key order
    assert config_hash({**KEY, "nodes": ["heads", "qkv"]}) == h  # tuple or list
    assert config_hash({**KEY, "threshold": 0.25}) != h
    assert config_hash({**KEY, "k": 0}) != h


def test_matches() -> None:
    assert matches(canonical(KEY), KEY)
    assert matches({**canonical(KEY), "label": "extra items are ignored"}, KEY)
    assert not matches(None, KEY)
    assert not matches(["not", "a", "mapping"], KEY)  # type: ignore[arg-type]
    assert not matches({**canonical(KEY), "threshold": 0.25}, KEY)
    assert not matches({"model": "m"}, {"model": "m", "nodes": "heads"})  # missing item
    assert matches({"model": "m"}, {"model": "m", "k": None})  # missing reads as None


def test_sidecar_key(tmp_path: Path) -> None:
    table = tmp_path / "patching" / "atp.parquet"
    assert read_key(table) is None and not is_current(table, KEY)
    side = write_key(table, KEY)
    assert side == key_path(table) == tmp_path / "patching" / "atp.parquet.key.json"
    body = json.loads(side.read_text())
    assert body == {"key": canonical(KEY), "hash": config_hash(KEY)}
    assert read_key(table) == canonical(KEY)
    assert not is_current(table, KEY)  # the sidecar alone: the table itself is missing
    table.write_bytes(b"table")
    assert is_current(table, KEY)
    assert not is_current(table, {**KEY, "threshold": 0.25})
    # a key edited by hand no longer matches its hash; garbage and non-objects read as None
    side.write_text(json.dumps({**body, "key": {**body["key"], "threshold": 0.25}}))
    assert read_key(table) is None and not is_current(table, {**KEY, "threshold": 0.25})
    for text in ("{not json", "[1, 2]", '{"key": 3, "hash": "x"}', "\udcff"):
        side.write_text(text, errors="surrogateescape")
        assert read_key(table) is None


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def quick_plots(monkeypatch):
    """The bar chart (tested in test_cli.py) is the slow part of a tiny run; any file will do."""

    def plot(scores, path, **kwargs):
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(patch_stage, "plot_top_nodes", plot)


def _run(tiny, out: Path, pairs, **kw):
    opts = {"method": "atp", "nodes": "heads", **kw}
    return patch_stage.patch_command(tiny, pairs, out, **opts)


def test_patch_reuses_a_current_table(tiny, tmp_path: Path, monkeypatch) -> None:
    pairs = random_pairs(1, seed=3)
    first = _run(tiny, tmp_path, pairs)
    table = Path(first["table"])
    assert first["reused"] is False
    assert sorted(p.name for p in table.parent.iterdir()) == [
        "atp.parquet",
        "atp.parquet.key.json",
        "atp.png",
    ]
    key = read_key(table)
    assert key is not None and key["model"] == "tiny-llama" and key["dtype"] == "float64"
    assert key["metric"] == "logit_diff" and key["nodes"] == "heads" and key["method"] == "atp"

    def no_work(*args, **kwargs):
        raise AssertionError("a current table was recomputed")

    with monkeypatch.context() as m:
        m.setattr(patch_stage, "run_method", no_work)
        again = _run(tiny, tmp_path, pairs, batch_size=5)  # batch size does not decide content
    assert again["reused"] is True and again["top"] == first["top"]

    # what decides the content: each change recomputes (and the key follows)
    for change in ({"nodes": "qkv"}, {"metric": "prob"}):
        out = _run(tiny, tmp_path, pairs, **change)
        assert out["reused"] is False, change
        assert _run(tiny, tmp_path, pairs, **change)["reused"] is True, change
    assert _run(tiny, tmp_path, random_pairs(1, seed=4), metric="prob")["reused"] is False
    assert _run(tiny, tmp_path, pairs, method="atp_qk")["reused"] is False  # another file


def test_patch_never_trusts_a_table_without_its_key(tiny, tmp_path: Path, monkeypatch) -> None:
    pairs = random_pairs(1, seed=3)
    table = Path(_run(tiny, tmp_path, pairs)["table"])
    # a run with other settings killed after writing its table, before the plot and the key
    with monkeypatch.context() as m:
        m.setattr(patch_stage, "plot_top_nodes", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            _run(tiny, tmp_path, pairs, nodes="qkv")
    assert table.exists() and not key_path(table).exists()  # the old key went first
    # so the first settings do not take the other settings' table for theirs
    assert _run(tiny, tmp_path, pairs)["reused"] is False
    # a missing plot is redone too
    (tmp_path / "patching" / "atp.png").unlink()
    assert _run(tiny, tmp_path, pairs)["reused"] is False
    # an unreadable table is recomputed
    table.write_bytes(b"not parquet")
    assert _run(tiny, tmp_path, pairs)["reused"] is False
    assert _run(tiny, tmp_path, pairs)["reused"] is True
