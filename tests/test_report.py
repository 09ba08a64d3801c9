"""``write_report`` on a small synthetic run (graphs of a tiny float64 Llama, the real cluster and
steer stages, hand-made descriptions in the contract's layout): the HTML is self-contained and
escaped, shows every cluster's label, scores, baselines and failures; ``summary.json`` holds the
numbers of the input files; two calls give the same bytes; a run with graphs and clusters only
still reports; and the page renders in headless Chromium without errors or network requests."""

from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from adag.clusters import Clusters
from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.graphs.trace import trace
from adag.pipeline.cluster import cluster_stage
from adag.pipeline.report import write_report
from adag.pipeline.steer import steer_stage

from . import browser
from .conftest import VOCAB, tiny_model

NASTY = "<b>&"
"""A token and texts holding HTML's special characters."""
FAILURE = "the simulator's reply had no numbers: <none> & nothing"
TIMINGS = {"trace": 1.5, "cluster": 0.25}
USAGE = {"calls": 12, "cache_hits": 3, "input_tokens": 4000, "cost_usd": 0.0}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def base(tmp_path_factory, model) -> Path:
    """A run directory with graphs (each prompt with a behaviour score) and clusters."""
    run = tmp_path_factory.mktemp("report") / "run"
    gen = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 7, 8, 6, 9, 7)]
    graphs = trace(model, ids, k=3, node_threshold=0.01)
    for i, (g, score) in enumerate(zip(graphs, [0.5, 1.0, 3.0, 2.0, 0.0, 1.5], strict=True)):
        g2 = Graph(**{f: getattr(g, f) for f in g.__dataclass_fields__})
        g2.settings = {**g.settings, "score": score}
        g2.prompt = f"prompt {i} with {NASTY}"
        g2.save(run / "graphs" / f"{i:04d}-p")
    cluster_stage(run, n_clusters=3)
    return run


def description(name: str, side: str, i: int) -> dict:
    """One row of descriptions.jsonl in the contract's layout; C1's output side failed."""
    failed = name == "C1" and side == "output"
    score = None if failed else round(0.9 - 0.2 * i - (0.1 if side == "output" else 0.0), 3)
    tokens = ["The", f" {NASTY}", "\n", " end"]
    return {
        "cluster": name,
        "side": side,
        "status": "failed" if failed else "ok",
        "failure": FAILURE if failed else None,
        "label": f"label {name} {NASTY}",
        "inhibitory": name == "C2",
        "explanation": None if failed else f"fires on {NASTY} in {name} ({side})",
        "sign": None if failed else "positive",
        "score": score,
        "candidates": [
            {
                "explanation": f"candidate of {name}",
                "sign": "positive",
                "sample": 0,
                "score": score,
                "failure": FAILURE if failed else None,
            }
        ],
        "baselines": {
            "shuffled": {"explanation": "another cluster's", "from": "C0", "score": -0.05 * i},
            "top_tokens": {"explanation": f"tokens {NASTY}", "score": 0.1 + 0.1 * i},
        },
        "n_records": 6,
        "n_heldout": 2,
        "heldout": ["0004-p", "0005-p"],
        "top_records": [
            {
                "prompt_id": "0000-p",
                "tokens": tokens,
                "values": [0.0, 0.9, -0.4, 0.1] if side == "input" else [0, 10, -7, 2],
                "highlight": [False, True, False, False],
            }
        ],
        "explainer": "local:tiny",
        "simulator": "local:tiny",
        "prompt_version": "1",
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory, base, model) -> Path:
    """``base`` with descriptions, steering and a config."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(base, run)
    names = Clusters.load(run).names
    rows = [description(n, s, i) for i, n in enumerate(names) for s in ("input", "output")]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (run / "descriptions.jsonl").write_text(text, encoding="utf-8")
    steer_stage(model, run, scale=(0.0, 2.0), k=3)
    (run / "config.yaml").write_text(
        "model: tiny-llama\ndataset: {name: capitals, n: 6}\ncluster: {n_clusters: 3}\n"
        "describe: {llm: {backend: local, model: tiny}, n_samples: 2}\nsteer: {scale: [0.0, 2.0]}\n",
        encoding="utf-8",
    )
    return run


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether the elements nest properly."""

    VOID = frozenset({"meta", "img", "br", "hr", "input", "link", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def assert_self_contained(html: str) -> _Tags:
    p = parse(html)
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href"):
            v = attrs.get(key)
            if v is not None:
                assert not v.startswith(("http://", "https://", "//")), (tag, v[:80])
        if tag == "img":
            assert str(attrs["src"]).startswith("data:image/png;base64,")
    assert "http://" not in html and "https://" not in html
    assert "url(" not in html and "@import" not in html
    return p


def test_full_report(full: Path):
    summary = write_report(full, timings=TIMINGS, usage=USAGE)
    html = (full / "report.html").read_text(encoding="utf-8")
    p = assert_self_contained(html)
    assert sum(1 for t, _ in p.tags if t == "img") == 4  # scores, similarity, by layer, steering
    text = "".join(p.text)

    # escaping: the special characters only ever appear as text
    assert NASTY not in html and "<none>" not in html
    assert "&lt;b&gt;&amp;" in html and FAILURE in text
    assert f"label C0 {NASTY}" in text and "↵" in text

    c = Clusters.load(full)
    assert summary == json.loads((full / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == "tiny-llama" and summary["n_prompts"] == 6
    assert summary["n_clusters"] == c.n_clusters == len(summary["clusters"])
    assert summary["timings"] == TIMINGS and summary["usage"] == USAGE
    assert summary["stages"] == {
        "clusters": True,
        "descriptions": True,
        "steering": True,
        "behaviour": True,
        "judged": False,
        "patching": False,
    }
    steering = pq.read_table(full / "steering-summary.parquet").to_pylist()
    behaviour = {r["cluster"]: r for r in pq.read_table(full / "behaviour.parquet").to_pylist()}
    for i, (cl, name) in enumerate(zip(summary["clusters"], c.names, strict=True)):
        assert cl["name"] == name and cl["label"] == f"label {name} {NASTY}"
        layers = [u[0] for u in c.members(name)]
        assert cl["size"] == len(layers) and cl["layers"] == [min(layers), max(layers)]
        assert cl["inhibitory"] == (name == "C2")
        for side in ("input", "output"):
            want = description(name, side, i)
            got = cl[side]
            assert got["score"] == want["score"] and got["failure"] == want["failure"]
            assert got["status"] == want["status"] and got["explanation"] == want["explanation"]
            assert got["shuffled"] == pytest.approx(want["baselines"]["shuffled"]["score"])
            assert got["top_tokens"] == pytest.approx(want["baselines"]["top_tokens"]["score"])
            if got["score"] is not None:
                assert f"<b>{got['score']:.2f}</b>" in html
        # the steering effect is the ablation's (factor 0 is furthest from 1, ties to 0)
        ablation = next(r for r in steering if r["label"] == name and r["factor"] == 0.0)
        assert cl["steering"]["factor"] == 0.0
        assert cl["steering"]["dprob"] == pytest.approx(ablation["dprob"])
        assert [r["factor"] for r in cl["steering"]["by_factor"]] == [0.0, 2.0]
        r = behaviour[name]["r"]
        assert cl["behaviour_r"] == (None if math.isnan(r) else pytest.approx(r))
        assert f'id="{name}"' in html and f'href="#{name}"' in html
    scores = [description(n, "input", i)["score"] for i, n in enumerate(c.names)]
    assert summary["means"]["input"]["score"] == pytest.approx(np.mean(scores))
    assert summary["means"]["output"]["failed"] == 1 and summary["means"]["output"]["n"] == 2
    assert "Descriptions were not run" not in text and "Steering was not run" not in text


def test_same_inputs_same_bytes(full: Path):
    write_report(full, timings=TIMINGS, usage=USAGE)
    first = {n: (full / n).read_bytes() for n in ("report.html", "summary.json")}
    write_report(full, timings=TIMINGS, usage=USAGE)
    assert {n: (full / n).read_bytes() for n in first} == first
    write_report(full)  # only the timings and usage differ
    assert json.loads((full / "summary.json").read_text())["timings"] is None
    assert not list(full.glob(".*.tmp")) and not (full / "report-scores.png").exists()


def test_graphs_and_clusters_only(base: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for name in ("behaviour.parquet", "behaviour-units.parquet", "cluster-profiles.parquet"):
        (run / name).unlink()
    summary = write_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    text = "".join(assert_self_contained(html).text)
    assert "Descriptions were not run" in text and "Steering was not run" in text
    assert not any(summary["stages"][k] for k in ("descriptions", "steering", "behaviour"))
    for cl in summary["clusters"]:
        assert cl["input"]["status"] == cl["output"]["status"] == "not run"
        assert cl["steering"] is None and cl["behaviour_r"] is None and cl["label"] is None
    assert summary["means"]["input"] == {
        "score": None,
        "shuffled": None,
        "top_tokens": None,
        "n": 0,
        "failed": 0,
    }

    # without descriptions the top records come from the cluster profiles
    shutil.copy(base / "cluster-profiles.parquet", run)
    write_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count('class="rec"') > 0 and "promoted" in html

    # graphs only: the report says clustering was not run
    for name in ("clusters.json", "clusters.parquet"):
        (run / name).unlink()
    summary = write_report(run)
    assert summary["n_clusters"] == 0 and summary["clusters"] == []
    assert "Clustering was not run" in (run / "report.html").read_text(encoding="utf-8")


def test_unreadable_inputs_are_notes_and_no_graphs_is_an_error(full: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / "descriptions.jsonl").write_text("{not json\n", encoding="utf-8")
    (run / "steering-summary.parquet").write_bytes(b"not parquet")
    summary = write_report(run)
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "descriptions.jsonl could not be read" in html
    assert "steering-summary.parquet could not be read" in html
    assert summary["clusters"][0]["steering"] is None
    with pytest.raises(AdagError, match="has no graphs") as e:
        write_report(tmp_path)
    assert "\n" not in str(e.value)


def test_judged_generations_patching_and_label_failures_are_shown(full: Path, tmp_path: Path):
    """A failed label is shown with its reason. Any scalar columns of steering-judged.parquet are shown per cluster (escaped), patching
    tables are listed and their plots embedded."""
    import pyarrow as pa

    run = tmp_path / "run"
    shutil.copytree(full, run)
    judged = pa.table(
        {
            "cluster": ["C0", "C0", "C1"],
            "factor": [0.0, 2.0, 0.0],
            "rate": [0.25, 0.5, 0.75],
            "response": ["<script>alert(1)</script>", "fine", "ok"],
            "tokens": [[1, 2], [3], []],
        }
    )
    pq.write_table(judged, run / "steering-judged.parquet")
    rows = [json.loads(line) for line in (run / "descriptions.jsonl").read_text().splitlines()]
    for row in rows:
        if row["cluster"] == "C0":
            row["label"], row["label_failure"] = None, "malformed label <x>"
    (run / "descriptions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "patching").mkdir()
    pq.write_table(pa.table({"node": ["a", "b"]}), run / "patching" / "atp_star.parquet")
    shutil.copy(run / "steering.png", run / "patching" / "atp_star.png")
    summary = write_report(run)
    assert summary["stages"]["judged"] and summary["stages"]["patching"]
    html = (run / "report.html").read_text(encoding="utf-8")
    p = assert_self_contained(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "0.750" in html
    assert "atp_star" in html and sum(1 for t, _ in p.tags if t == "img") == 5
    assert ">tokens<" not in html  # list columns are left out
    assert summary["clusters"][0]["label"] is None
    assert summary["clusters"][0]["label_failure"] == "malformed label <x>"
    assert "label failed: malformed label &lt;x&gt;" in html


def test_report_renders_in_chromium(full: Path, tmp_path: Path):
    assert browser.available(), "the browser tests need Chromium: make browser"
    write_report(full, timings=TIMINGS, usage=USAGE)
    png = tmp_path / "report.png"
    res = browser.screenshot(full / "report.html", png)
    assert res["title"] == "ADAG report · tiny-llama"
    assert not res["console_errors"] and not res["page_errors"], res
    assert not res["blocked"] and not res["failed_requests"], res
    assert all(u.startswith("file://") for u in res["requests"]), res["requests"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not browser.is_blank(png)
