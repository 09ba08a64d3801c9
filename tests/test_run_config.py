"""``RunConfig`` and ``adag run``'s config errors: a bad or unknown field is one line naming it,
exit 2, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adag.cli import app
from adag.errors import AdagError
from adag.graphs.config import TraceConfig
from adag.pipeline.config import DEMO, RunConfig, dump_config, load_config, parse_config

runner = CliRunner()


def test_defaults_and_round_trip(tmp_path: Path):
    cfg = parse_config(DEMO)
    assert isinstance(cfg.trace, TraceConfig) and cfg.trace.node_threshold == 0.01
    assert cfg.cluster.n_clusters == 8 and cfg.describe.n_samples == 2
    assert cfg.describe.llm.backend == "local" and cfg.dataset.name == "capitals"
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    data = yaml.safe_load(dump_config(cfg))
    assert data["trace"]["k"] == 5 and data["describe"]["llm"]["model"] == "smollm2-135m"


def test_trace_config_is_the_stage_config():
    cfg = parse_config({"dataset": {"file": "p.txt"}, "trace": {"k": 2, "targets": " Paris"}})
    assert cfg.trace == TraceConfig(k=2, targets=[" Paris"])


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"modle": "x"}, "modle: unknown field"),
        ({"trace": {"kk": 3}}, "trace: unknown field 'kk'"),
        ({"trace": {"k": 0}}, "trace: k must be at least 1"),
        ({"cluster": {"n_clusters": 1}}, "cluster.n_clusters"),
        ({"cluster": {"method": "dbscan"}}, "cluster.method"),
        ({"describe": {"llm": {"backend": "gpt"}}}, "describe.llm.backend"),
        ({"describe": {"llm": {"api_key": "sk-123"}}}, "describe.llm.api_key: unknown field"),
        ({"dataset": {"name": "capitals", "file": "p.txt"}}, "exactly one of dataset.name"),
        ({"steer": {"scale": []}}, "steer.scale"),
        ({"describe": {"heldout": 1.5}}, "describe.heldout"),
    ],
)
def test_bad_fields_are_one_line(data, needle):
    with pytest.raises(AdagError) as e:
        parse_config(data, source="c.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("c.yaml: ") and needle in msg, msg


def test_cli_run_bad_config_exits_2_and_writes_nothing(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "run"
    cases = {
        "model: x\nclusterr: {}\n": "clusterr: unknown field",
        "model: [unclosed\n": "not valid YAML",
        "- a\n- b\n": "expected a mapping",
    }
    for text, needle in cases.items():
        cfg.write_text(text, encoding="utf-8")
        r = runner.invoke(app, ["run", str(cfg), "--out", str(out)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    r = runner.invoke(app, ["run", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    cfg.write_text("dataset: {file: p.txt}\n", encoding="utf-8")
    r = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--force", "everything"])
    assert r.exit_code == 2 and "unknown stage 'everything'" in r.stderr, r.output
    assert not out.exists()


def test_model_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):  # noqa: B017 (pydantic's frozen-instance error)
        cfg.model = "other"  # type: ignore[misc]
