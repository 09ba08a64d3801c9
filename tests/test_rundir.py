"""Run directories: an ``--out`` that cannot be written is refused before any work (one line, exit
2, nothing new on disk); a rerun replaces what other settings or prompts decide and removes what
no longer belongs (graphs, viewer files, index, profiles); ``--force``; a graph's two files are one
unit; stale temp files of killed runs go; Ctrl-C says what was kept (exit 130); and a real
``python -m adag trace`` killed (SIGKILL, SIGINT) resumes to the uninterrupted result.

Real SmolLM2 with high thresholds; ``load_model("smollm2-135m")`` returns the session's model
(conftest's ``cached_smollm2_loader``), only the subprocesses load their own."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import adag.io
import adag.models.load
import adag.pipeline.patch
import adag.pipeline.rundir as rundir
import adag.pipeline.trace
from adag.cli import app
from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.io import atomic_path, temp_target, write_text
from adag.pipeline.rundir import check_writable, remove_stale_temps

runner = CliRunner()
FAST = ["--node-threshold", "0.03", "--edge-threshold", "0.05", "-k", "2"]
CAPITALS = ["France", "Italy", "Spain", "Japan", "Germany"]


def capitals(*countries: str) -> list[str]:
    return [f"The capital of {c} is" for c in countries]


def prompts_file(path: Path, *countries: str) -> Path:
    path.write_text("".join(p + "\n" for p in capitals(*countries)), encoding="utf-8")
    return path


def trace_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["trace", "smollm2-135m", "--prompts", str(prompts), "--out", str(out), *FAST, *extra]


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its mtime: equal snapshots mean nothing new on disk."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")}


def one_error_line(r, code: int = 2) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- class 1: an output that cannot be written ---------------------------------------------------


def test_unusable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(adag.models.load, "load_model", no_model)
    (tmp_path / "a-file").write_text("x")
    for name in ("graphs-file", "viewer-file", "patching-file"):
        (tmp_path / name).mkdir()
    (tmp_path / "graphs-file" / "graphs").write_text("x")
    (tmp_path / "viewer-file" / "viewer").write_text("x")
    (tmp_path / "patching-file" / "patching").write_text("x")
    (tmp_path / "profiles-dir" / "profiles.parquet").mkdir(parents=True)
    (tmp_path / "locked").mkdir()
    (tmp_path / "read-only").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    prompts = prompts_file(tmp_path / "prompts.txt", "France")
    locked, ro = (tmp_path / "locked").resolve(), (tmp_path / "read-only").resolve()
    # root may write anywhere: simulate a directory without permission and a read-only mount
    monkeypatch.setattr(rundir, "_writable", lambda d: Path(d).resolve() not in (locked, ro))
    monkeypatch.setattr(rundir, "_read_only_fs", lambda d: Path(d).resolve() == ro)
    both = ("trace", "patch")
    cases = [
        ("", both, "the run directory is empty"),
        ("   ", both, "the run directory is empty"),
        ("a-file", both, "a-file as a run directory: it is a file, not a directory"),
        ("a-file/sub", both, "a-file is a file, not a directory"),
        ("a-file/sub/deeper", both, "a-file is a file, not a directory"),
        ("dangling/run", both, "dangling is a broken symbolic link"),
        ("locked", both, "no permission to write in"),
        ("locked/run/deeper", both, "no permission to write in"),
        ("read-only/run", both, "read-only is on a read-only file system"),
        ("graphs-file", ("trace",), "graphs-file/graphs is a file, not a directory"),
        ("viewer-file", ("trace",), "viewer-file/viewer is a file, not a directory"),
        ("profiles-dir", ("trace",), "profiles.parquet is a directory, not a file"),
        ("patching-file", ("patch",), "patching-file/patching is a file, not a directory"),
    ]
    before = snapshot(tmp_path)
    for out, commands, msg in cases:
        target = str(tmp_path / out) if out.strip() else out
        for command in commands:
            if command == "trace":
                args = trace_args(prompts, Path(target))
            else:
                args = ["patch", "smollm2-135m", "--out", target, "--n-pairs", "1"]
            if not out.strip():
                args[args.index("--out") + 1] = out  # str(Path("")) would be "."
            line = one_error_line(runner.invoke(app, args))
            assert line.startswith("adag: error: ") and msg in line, (out, command, line)
            assert snapshot(tmp_path) == before, (out, command)


def test_check_writable_creates_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b", dirs=("graphs",)) == tmp_path / "a" / "b"
    assert check_writable(tmp_path, dirs=("graphs",), files=("profiles.parquet",)) == tmp_path
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AdagError, match="is empty"):
        check_writable("")


def test_write_errors_are_one_line_naming_the_path(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(AdagError, match=r"cannot write .*a-file/x\.json: .*a-file is not a dir"):
        write_text(tmp_path / "a-file" / "x.json", "{}")
    # a full disk while a stage writes: one line, exit 2, no temp file left behind
    real = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(adag.io.os, "replace", full)
    out = tmp_path / "run"
    prompt = ["trace", "smollm2-135m", "The capital of France is", "--out", str(out), *FAST]
    line = one_error_line(runner.invoke(app, prompt))
    assert re.fullmatch(
        r"adag: error: cannot write \S+/run/graphs/the-capital-of-france-is\.safetensors "
        r"\(No space left on device\)",
        line,
    ), line
    assert not out.exists()  # the directories it made are gone too


def test_atomic_path_removes_the_directories_it_made_when_interrupted(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "run" / "a" / "b" / "x"):
        raise KeyboardInterrupt
    assert list(tmp_path.rglob("*")) == [tmp_path / "run"]


# -- class 3: a graph's two files are one unit ----------------------------------------------------


def small_graph(v: float) -> Graph:
    one = np.array([1.0])
    return Graph(
        node_ids=["embed:0", "logit:5"],
        node_kinds=["embed", "logit"],
        node_layer=np.array([-1, 1]),
        node_position=np.array([0, 0]),
        node_index=np.array([3, 5]),
        node_activation=np.array([1.0, v]),
        node_attribution=np.array([v, v]),
        node_tokens=["a", " b"],
        edge_source=np.array([0]),
        edge_target=np.array([1]),
        edge_weight=one,
        edge_flow=one,
        input_attr=np.full((2, 1), v),
        output_attr=np.full((2, 1), v),
        target_ids=np.array([5]),
        target_tokens=[" b"],
        target_coef=one,
        target_logits=np.array([v]),
        target_probs=np.array([0.5]),
        prompt_ids=np.array([3]),
        prompt_tokens=["a"],
        prompt="a",
        metric=v,
        settings={"k": 1},
    )


def test_graph_files_are_one_unit(tmp_path, monkeypatch):
    import adag.graphs.graph as graph_module

    g1, g2 = small_graph(1.0), small_graph(2.0)
    path = g1.save(tmp_path / "g")
    meta = json.loads(path.read_text())
    data = (tmp_path / "g.safetensors").read_bytes()
    assert meta["version"] == 2 and meta["tensors"]["size"] == len(data)
    assert Graph.load(tmp_path / "g") == g1
    # a save killed between its two writes: new tensors beside the old JSON
    with monkeypatch.context() as m:
        m.setattr(graph_module, "write_text", lambda *a: 1 / 0)  # killed before the JSON
        with pytest.raises(ZeroDivisionError):
            g2.save(tmp_path / "g")
    with pytest.raises(AdagError, match=r"is not the tensor file g\.json was saved with") as e:
        Graph.load(tmp_path / "g")
    assert "\n" not in str(e.value)
    assert Graph.load(g2.save(tmp_path / "g")) == g2
    # tensors without their JSON, and a version-1 JSON (no record of its tensors)
    path.unlink()
    with pytest.raises(AdagError, match=r"g\.json does not exist"):
        Graph.load(tmp_path / "g")
    g1.save(tmp_path / "g")
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 1}))
    with pytest.raises(AdagError, match="version 1; this adag reads version 2"):
        Graph.load(tmp_path / "g")


# -- class 4: stale temp files ------------------------------------------------------------------


def test_remove_stale_temps(tmp_path):
    start = time.time()
    old, new = start - 60, start + 60
    names = {
        ".a.json.abcd_123.tmp": old,  # stale
        ".a.safetensors.x1y2z3w4.tmp": old,  # stale
        ".profiles.parquet.q9w8e7r6.tmp": old,  # stale, but filtered by names below
        ".b.json.abcd1234.tmp": new,  # a temp of this run: kept
        ".hidden.tmp": old,  # not ours
        "a.json.abcd1234.tmp": old,  # not ours
        ".a.json.ABCD1234.tmp": old,  # not ours (mkstemp uses lower case)
    }
    for name, mtime in names.items():
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / ".d.json.abcd1234.tmp").mkdir()  # a directory: kept
    assert temp_target(".a.json.abcd_123.tmp") == "a.json" and temp_target(".x.tmp") is None
    assert remove_stale_temps(tmp_path, start, names={"a.json"}) == [
        tmp_path / ".a.json.abcd_123.tmp"
    ]
    assert remove_stale_temps(tmp_path, start) == [
        tmp_path / ".a.safetensors.x1y2z3w4.tmp",
        tmp_path / ".profiles.parquet.q9w8e7r6.tmp",
    ]
    assert remove_stale_temps(tmp_path / "missing", start) == []
    left = sorted(p.name for p in tmp_path.iterdir())
    kept = [".b.json.abcd1234.tmp", ".hidden.tmp", "a.json.abcd1234.tmp", ".a.json.ABCD1234.tmp"]
    assert left == sorted([*kept, ".d.json.abcd1234.tmp"])


# -- class 6: reruns replace what other prompts and settings decide -----------------------------


def graph_slugs(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "graphs").glob("*.json"))


def assert_coherent(run: Path, slugs: list[str]) -> None:
    """graphs/, viewer/, the index and the profiles cover exactly ``slugs``."""
    files = sorted(p.name for p in (run / "graphs").iterdir())
    assert files == sorted(f"{s}{x}" for s in slugs for x in (".json", ".safetensors"))
    viewer = sorted(p.name for p in (run / "viewer").iterdir())
    assert viewer == sorted([*(f"{s}.json" for s in slugs), "graph-metadata.json"])
    index = json.loads((run / "viewer" / "graph-metadata.json").read_text(encoding="utf-8"))
    assert [e["slug"] for e in index["graphs"]] == slugs
    table = pq.read_table(run / "profiles.parquet")
    assert sorted(set(table.column("prompt_id").to_pylist())) == slugs
    from adag.graphs.prune import cumulative_influence, node_influence

    for s in slugs:
        g = Graph.load(run / "graphs" / s)
        # the viewer file is the pruned graph with circuit-tracer's meanings: influence over the
        # unpruned graph, links' weight the raw direct effect
        view = json.loads((run / "viewer" / f"{s}.json").read_text(encoding="utf-8"))
        cum = cumulative_influence(node_influence(g))
        for n in view["nodes"]:
            if n["adag_kind"] != "logit":
                assert n["influence"] == cum[g.index_of(n["adag_id"])]
        act = {n["node_id"]: n["adag_activation"] for n in view["nodes"]}
        for link in view["links"]:
            assert link["weight"] == link["adag_weight"] * act[link["target"]]


def test_rerun_replaces_what_other_prompts_and_settings_decide(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = prompts_file(tmp_path / "a.txt", "France", "Italy", "Spain")
    r = runner.invoke(app, [*trace_args(first, run), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["traced"]) == 3
    # other prompts: the common one is reused, the new one traced, the others removed; files a
    # user keeps in the run's folders are not the stage's and stay
    mine = [run / "graphs" / "notes.json", run / "viewer" / "config.json"]
    for f in mine:
        f.write_text('{"mine": true}', encoding="utf-8")
    second = prompts_file(tmp_path / "b.txt", "France", "Japan")
    r = runner.invoke(app, trace_args(second, run))
    assert r.exit_code == 0, r.output
    assert all(f.read_text(encoding="utf-8") == '{"mine": true}' for f in mine)
    for f in mine:
        f.unlink()
    slugs = ["0000-the-capital-of-france-is", "0001-the-capital-of-japan-is"]
    line = next(x for x in r.stdout.splitlines() if x.startswith("graphs in "))
    assert line == (
        f"graphs in {run}: 1 traced, 1 reused, 2 removed (not in this prompt list: "
        "0001-the-capital-of-italy-is, 0002-the-capital-of-spain-is)"
    )
    assert_coherent(run, slugs)
    profiles = run / "profiles.parquet"
    # the same again: everything reused, the profiles too
    mtime = profiles.stat().st_mtime_ns
    r = runner.invoke(app, [*trace_args(second, run), "--json"])
    res = json.loads(r.stdout)
    assert (res["reused"], res["traced"], res["removed"]) == (slugs, [], [])
    assert profiles.stat().st_mtime_ns == mtime
    # other settings: every graph traced again, the profiles rewritten
    r = runner.invoke(app, [*trace_args(second, run, "--edge-threshold", "0.06"), "--json"])
    res = json.loads(r.stdout)
    assert (res["reused"], res["traced"], res["removed"]) == ([], slugs, [])
    assert_coherent(run, slugs)
    assert {Graph.load(run / "graphs" / s).settings["edge_threshold"] for s in slugs} == {0.06}
    assert profiles.stat().st_mtime_ns != mtime
    # --force: traced again although current
    r = runner.invoke(app, [*trace_args(second, run, "--edge-threshold", "0.06"), "--force"])
    assert f"graphs in {run}: 2 traced, 0 reused" in r.stdout
    assert_coherent(run, slugs)

    # Ctrl-C while a longer list is traced: one line, exit 130; the index and profiles (which
    # would list graphs that are not there) are gone, the graphs kept
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adag.pipeline.trace, "trace_tokens", interrupt)
    third = prompts_file(tmp_path / "c.txt", "France", "Japan", "Germany")
    r = runner.invoke(app, trace_args(third, run, "--edge-threshold", "0.06"))
    assert one_error_line(r, 130) == (
        f"adag: interrupted; kept 2 of 3 graphs in {run}; run the same command again to resume"
    )
    assert graph_slugs(run) == slugs
    assert not profiles.exists() and not (run / "viewer" / "graph-metadata.json").exists()


def test_patch_force_and_ctrl_c_leave_no_empty_directory(tmp_path, monkeypatch):
    args = ["patch", "smollm2-135m", "--out", str(tmp_path / "run"), "--n-pairs", "1"]
    args += ["--method", "atp", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reused"] is False
    assert json.loads(runner.invoke(app, args).stdout)["reused"] is True
    assert json.loads(runner.invoke(app, [*args, "--force"]).stdout)["reused"] is False

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adag.pipeline.patch, "run_method", interrupt)
    out = tmp_path / "other"
    r = runner.invoke(app, ["patch", "smollm2-135m", "--out", str(out), "--n-pairs", "1"])
    assert one_error_line(r, 130) == (
        f"adag: interrupted; kept 0 of 1 tables in {out / 'patching'}; run the same command "
        "again to resume"
    )
    assert not out.exists()


# -- kills: a real `python -m adag trace` killed, then resumed -----------------------------------


def _wait_until(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"adag exited ({proc.returncode}) before it could be killed")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for adag")
        time.sleep(0.02)


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(tmp_path):
    import torch

    prompts = prompts_file(tmp_path / "p.txt", *CAPITALS[:4])
    run, ref = tmp_path / "run", tmp_path / "ref"
    cmd = [sys.executable, "-m", "adag", *trace_args(prompts, run)]
    # the same thread count as this process, so that the graphs can be bit-identical
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def start() -> subprocess.Popen:
        # Ctrl-C's default action in the child, however this test was started: a shell starts a
        # background job with SIGINT ignored, and Python keeps an inherited SIG_IGN
        return subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    # 1. SIGKILL as soon as the first graph is committed (its JSON, written last, exists)
    proc = start()
    _wait_until(lambda: len(graph_slugs(run)) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # keep one graph whatever the kill's timing (a killed run may leave any subset): the next run
    # then has three left, so a SIGINT after its first lands before it finishes
    for s in graph_slugs(run)[1:]:
        for x in (".json", ".safetensors"):
            (run / "graphs" / f"{s}{x}").unlink(missing_ok=True)
    # 2. SIGINT once this run has committed one more graph: one line, exit 130
    n = len(graph_slugs(run))
    assert n < 4
    proc = start()
    _wait_until(lambda: len(graph_slugs(run)) > n, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"adag: interrupted; kept [1-4] of 4 graphs in {re.escape(str(run))}; "
        r"run the same command again to resume",
        lines[0],
    ), err
    kept = graph_slugs(run)
    assert len(kept) >= 2
    # 3. what a SIGKILL between a graph's two writes leaves: tensors without their JSON, and new
    # tensors beside an old JSON; and the temp files a killed run leaves
    graphs = run / "graphs"
    (graphs / f"{kept[0]}.json").unlink()
    shutil.copy(graphs / f"{kept[0]}.safetensors", graphs / f"{kept[1]}.safetensors")
    stale = [
        graphs / f".{kept[0]}.json.abcd1234.tmp",
        run / "viewer" / f".{kept[0]}.json.abcd1234.tmp",
        run / ".profiles.parquet.abcd1234.tmp",
    ]
    foreign = run / ".config.yaml.abcd1234.tmp"  # not the trace stage's: kept
    for p in [*stale, foreign]:
        p.parent.mkdir(exist_ok=True)
        p.write_text("partial")
        os.utime(p, (time.time() - 60, time.time() - 60))
    # 4. the same command again resumes; an uninterrupted run gives the same directory
    r = runner.invoke(app, [*trace_args(prompts, run), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {str(p) for p in stale} <= set(res["stale_temps"])
    assert res["reused"] == kept[2:] and res["traced"][:2] == kept[:2] and res["removed"] == []
    r = runner.invoke(app, [*trace_args(prompts, ref), "--json"])
    assert r.exit_code == 0, r.output
    slugs = json.loads(r.stdout)["traced"]
    assert len(slugs) == 4
    assert_coherent(run, slugs)
    for s in slugs:
        assert Graph.load(graphs / s) == Graph.load(ref / "graphs" / s), s
    assert pq.read_table(run / "profiles.parquet").equals(pq.read_table(ref / "profiles.parquet"))
    for p in (run / "viewer").iterdir():
        assert p.read_bytes() == (ref / "viewer" / p.name).read_bytes(), p.name
    assert [p.name for p in run.rglob(".*.tmp")] == [foreign.name]
