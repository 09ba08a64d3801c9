"""The CLI under bad and unusual input (issue 9): one line, exit 2, nothing written.

Every bad input in :data:`BAD` must give exit status 2, exactly one line on stderr starting
``adag: error:``, no traceback, and leave ``--out`` absent. The positive tests pin how user files
are read (format decided explicitly and reported; BOM, pipes and FIFOs read). ``load_model``
returns the session's SmolLM2 here (conftest's ``cached_smollm2_loader``)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adag.cli import app
from adag.errors import AdagError
from adag.models.load import ALIASES, find_alias_gguf
from adag.tasks import load_pairs
from adag.tasks.prompts import PromptSpec, load_prompts

runner = CliRunner()

MARY = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "noise": "When Alice and Bob went to the store, Tom gave a drink to",
    "answer": " Mary",
    "foil": " John",
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """User files, good and bad, under ``tmp_path/in``."""
    d = tmp_path / "in"
    d.mkdir()
    made = {
        # prompts
        "jsonl_then_text": '{"prompt": "The capital of France is"}\nThe capital of Italy is\n',
        "prompts.txt": "The capital of France is\n",
        # pairs
        "same.jsonl": json.dumps(MARY) + "\n" + json.dumps({**MARY, "foil": " Mary"}) + "\n",
        "nofoil.jsonl": json.dumps({k: v for k, v in MARY.items() if k != "foil"}) + "\n",
        "pairs.txt": "a b\tc d\n",
        "long.txt": "The capital of France is\n" + "a " * 9000 + "\n",
        "same.txt": f"{MARY['clean']}\t{MARY['noise']}\t Mary\t Mary\n",
    }
    for name, text in made.items():
        (d / name).write_text(text, encoding="utf-8")
    return {name: d / name for name in made} | {"dir": d}


def cut_gguf(tmp_path: Path, n_bytes: int) -> Path:
    """The first ``n_bytes`` of the real SmolLM2 GGUF: a download cut short."""
    gguf = find_alias_gguf(ALIASES["smollm2-135m"])
    assert gguf is not None
    cut = tmp_path / "in" / f"cut-{n_bytes}.gguf"
    cut.parent.mkdir(exist_ok=True)
    with gguf.open("rb") as f:
        cut.write_bytes(f.read(n_bytes))
    return cut


# (id, arguments given the files and the run directory, needle in the error line).
# Arguments are a function so that every case gets fresh paths under its own tmp_path.
Case = tuple[str, Callable[[dict[str, Path], str], list[str]], str]
BAD: list[Case] = [
    # -- class 4: argument parsing, one line each ------------------------------------------------
    (
        "unknown option",
        lambda f, o: ["predict", "smollm2-135m", "hi", "--bogus"],
        "--bogus (see adag predict --help)",
    ),
    ("unknown top-level option", lambda f, o: ["--bogus"], "(see adag --help)"),
    (
        "missing argument",
        lambda f, o: ["predict"],
        "Missing argument 'model' (see adag predict --help)",
    ),
    (
        "missing option value",
        lambda f, o: ["patch", "smollm2-135m", "--out"],
        "'--out' requires an argument (see adag patch --help)",
    ),
    (
        "bad integer",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--n-pairs", "many"],
        "Invalid value for '--n-pairs'",
    ),
    (
        "bad choice",
        lambda f, o: [
            "trace",
            "smollm2-135m",
            "--prompts",
            str(f["prompts.txt"]),
            "--out",
            o,
            "--format",
            "yaml",
        ],
        "'yaml' is not one of 'auto', 'jsonl', 'text' (see adag trace --help)",
    ),
    ("no such command", lambda f, o: ["trac", "smollm2-135m"], "No such command 'trac'"),
    # -- class 4/5: models -----------------------------------------------------------------------
    ("empty model name", lambda f, o: ["predict", "", "hi"], "model name is empty; give an alias"),
    ("blank model name", lambda f, o: ["patch", "  ", "--out", o], "model name is empty"),
    # -- class 3: prompt and pair files ----------------------------------------------------------
    (
        "jsonl whose later line is text",
        lambda f, o: ["trace", "smollm2-135m", "--prompts", str(f["jsonl_then_text"]), "--out", o],
        ":2: not valid JSON",
    ),
    (
        "text read as jsonl on request",
        lambda f, o: [
            "trace",
            "smollm2-135m",
            "--prompts",
            str(f["prompts.txt"]),
            "--out",
            o,
            "--format",
            "jsonl",
        ],
        "prompts.txt:1: not valid JSON",
    ),
    (
        "--format without --prompts",
        lambda f, o: ["trace", "smollm2-135m", "hi", "--out", o, "--format", "text"],
        "--format says how to read --prompts",
    ),
    (
        "prompt file is a directory",
        lambda f, o: ["trace", "smollm2-135m", "--prompts", str(f["dir"]), "--out", o],
        "is a directory",
    ),
    (
        "pairs: tab-separated line with too few fields",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--pairs", str(f["pairs.txt"])],
        "pairs.txt:1: expected clean<TAB>noise<TAB>answer[<TAB>foil]",
    ),
    # -- class 5: misleading hints ---------------------------------------------------------------
    (
        "pairs without foil under logit_diff",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--pairs", str(f["nofoil.jsonl"])],
        "(adag patch --metric prob)",
    ),
    (
        "unknown metric",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--metric", "kl"],
        "unknown metric 'kl'; choose one of logit_diff, prob",
    ),
    # -- class 2: pairs that say nothing, more pairs than a task can make ------------------------
    (
        "answer equals foil (jsonl)",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--pairs", str(f["same.jsonl"])],
        "same.jsonl:2: answer ' Mary' and foil ' Mary' are the same token",
    ),
    (
        "answer equals foil (text)",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--pairs", str(f["same.txt"])],
        "same.txt:1: answer ' Mary' and foil ' Mary' are the same token",
    ),
    (
        "--n-pairs beyond ioi",
        lambda f, o: ["patch", "smollm2-135m", "--out", o, "--n-pairs", "1000000"],
        "task ioi can make at most",
    ),
    (
        "--n-pairs beyond capitals",
        lambda f, o: [
            "patch",
            "smollm2-135m",
            "--out",
            o,
            "--task",
            "capitals",
            "--n-pairs",
            "100000",
        ],
        "task capitals can make at most",
    ),
    # -- class 2 / 5 in tracing: silently wrong runs and unlocated errors -----------------------
    (
        "--foil equal to --target",
        lambda f, o: [
            "trace",
            "smollm2-135m",
            "p",
            "--out",
            o,
            "--target",
            " Paris",
            "--foil",
            " Paris",
        ],
        "--foil ' Paris' is the --target itself",
    ),
    (
        "-k beyond the vocabulary",
        lambda f, o: [
            "trace",
            "smollm2-135m",
            "The capital of France is",
            "--out",
            o,
            "-k",
            "99999",
        ],
        "k=99999 is more than the 49152 tokens of the vocabulary",
    ),
    (
        "over-long prompt in a prompts file",
        lambda f, o: ["trace", "smollm2-135m", "--prompts", str(f["long.txt"]), "--out", o],
        "long.txt:2: prompt is 9001 tokens, longer than the model's context of 8192",
    ),
    # -- passing before issue 9, kept passing ----------------------------------------------------
    ("unknown model", lambda f, o: ["predict", "no-such-model", "hi"], "unknown model"),
    ("bad dtype", lambda f, o: ["predict", "smollm2-135m", "hi", "--dtype", "int3"], "int3"),
    ("empty prompt", lambda f, o: ["predict", "smollm2-135m", ""], "the prompt is empty"),
]


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def assert_one_line_error(r, needle: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr  # no usage block, no blank line before it
    assert lines[0].startswith("adag: error: "), lines
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, files: dict[str, Path], args, needle: str
):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    r = runner.invoke(app, args(files, str(out)))
    assert_one_line_error(r, needle)
    assert not out.exists()
    assert snapshot(tmp_path) == before


def test_usage_errors_name_the_command_help():
    r = runner.invoke(app, ["patch", "smollm2-135m", "--out", "x", "--n-pairs", "many"])
    assert_one_line_error(r, "(see adag patch --help)")
    r = runner.invoke(app, ["trac"])
    line = assert_one_line_error(r, "(see adag --help)")
    assert "Did you mean 'trace'?" in line


def test_help_still_works():
    for args in (["--help"], ["patch", "--help"], ["trace", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert "Usage" in r.stdout and "--help" in r.stdout
    assert "--metric" in runner.invoke(app, ["patch", "--help"]).stdout
    assert "--format" in runner.invoke(app, ["trace", "--help"]).stdout


@pytest.mark.parametrize("n_bytes", [0, 100, 4096, 40_000_000])
def test_truncated_gguf_is_one_line(tmp_path: Path, monkeypatch, n_bytes: int):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    cut = cut_gguf(tmp_path, n_bytes)
    r = runner.invoke(app, ["predict", str(cut), "The capital of France is"])
    assert_one_line_error(r, f"{cut} is not a complete GGUF file")
    assert not (tmp_path / "cache").exists()


# -- an unknown Hub id offline fails fast ----------------------------------------------------------


def test_offline_flag_hub_id_fails_fast(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    t0 = time.perf_counter()
    r = runner.invoke(
        app, ["predict", "nobody-adag/no-such-model", "hi"], env={"HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - t0
    assert_one_line_error(r, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    assert not [rec for rec in caplog.records if "Retry" in rec.getMessage()]
    assert seconds < 5, seconds  # loose: the issue's ~25 s of retries is what it guards against


def test_unreachable_hub_id_fails_fast(monkeypatch, caplog):
    import adag.models.load as load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)  # no network, deterministically
    caplog.set_level(logging.DEBUG)
    r = runner.invoke(app, ["predict", "nobody-adag/no-such-model", "hi"])
    assert_one_line_error(r, "not in the local Hugging Face cache and the Hub cannot be reached")
    assert not [rec for rec in caplog.records if "Retry" in rec.getMessage()]


def test_real_probe_answers_fast(monkeypatch, caplog):
    """Whatever the network here: the probe answers within its deadline and logs no retries,
    and the unknown id fails with one line (cache miss offline, or the Hub's "not found")."""
    from adag.models.load import _PROBE_SECONDS, hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    caplog.set_level(logging.DEBUG)
    t0 = time.perf_counter()
    hub_reachable()
    assert time.perf_counter() - t0 < _PROBE_SECONDS + 1.0
    t0 = time.perf_counter()
    r = runner.invoke(app, ["predict", "nobody-adag/no-such-model-3f9a", "hi"])
    assert_one_line_error(r, "nobody-adag/no-such-model-3f9a")
    assert time.perf_counter() - t0 < 5
    assert not [rec for rec in caplog.records if "Retry" in rec.getMessage()]


# -- user files: the format decided explicitly and reported ----------------------------------------


def test_bom_jsonl_is_read_as_jsonl(tmp_path: Path):
    p = tmp_path / "prompts"  # no extension: decided by the content, after the BOM
    p.write_text('\ufeff{"prompt": "Q?", "seed": "Answer:"}\n{"prompt": "R?"}\n', encoding="utf-8")
    got = load_prompts(p)
    assert got == [PromptSpec("Q?", "Answer:"), PromptSpec("R?")]
    assert got.format == "jsonl" and got.why == "its first line is a JSON object"
    assert [s.where for s in got] == [f"{p}:1", f"{p}:2"]
    q = tmp_path / "pairs.jsonl"
    q.write_text("\ufeff" + json.dumps(MARY) + "\n", encoding="utf-8")
    assert load_pairs(q).format == "jsonl" and load_pairs(q)[0].clean == MARY["clean"]


def test_text_first_line_then_json_lines_is_text(tmp_path: Path):
    p = tmp_path / "prompts"
    p.write_text('The capital of France is\n{"prompt": "x"}\n', encoding="utf-8")
    got = load_prompts(p)
    assert got.format == "text" and got.why == "its first line is not a JSON object"
    assert got == [PromptSpec("The capital of France is"), PromptSpec('{"prompt": "x"}')]


def test_format_text_reads_a_brace_prompt(tmp_path: Path):
    p = tmp_path / "p.jsonl"  # even against the name
    p.write_text('{"a": 1} is a JSON object; what is its key?\n', encoding="utf-8")
    with pytest.raises(AdagError, match=r"p\.jsonl:1: not valid JSON"):
        load_prompts(p)
    got = load_prompts(p, format="text")
    assert got == [PromptSpec('{"a": 1} is a JSON object; what is its key?')]
    assert got.format == "text" and got.why == "--format text"
    with pytest.raises(AdagError, match="unknown file format 'yaml'"):
        load_prompts(p, format="yaml")


def test_extension_decides(tmp_path: Path):
    p = tmp_path / "p.txt"
    p.write_text('{"prompt": "x"}\n', encoding="utf-8")
    assert load_prompts(p) == [PromptSpec('{"prompt": "x"}')]
    assert load_prompts(p).why == "its name ends in .txt"
    q = tmp_path / "pairs.txt"
    q.write_text(f"{MARY['clean']}\t{MARY['noise']}\t Mary\t John\n", encoding="utf-8")
    got = load_pairs(q)
    assert got.format == "text" and got[0].answer == " Mary" and got[0].foil == " John"


def test_fifo_and_pipe_are_read(tmp_path: Path):
    text = '{"prompt": "The capital of France is"}\n'
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
    writer.start()
    got = load_prompts(fifo)
    writer.join(5)
    assert got == [PromptSpec("The capital of France is")] and got.format == "jsonl"

    r, w = os.pipe()  # what `--prompts <(...)` hands over: /dev/fd/N
    os.write(w, b"The capital of Italy is\n")
    os.close(w)
    try:
        got = load_prompts(f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert got == [PromptSpec("The capital of Italy is")] and got.format == "text"


def test_trace_reads_a_pipe_and_says_the_format(tmp_path: Path):
    """The CLI end to end: a BOM JSONL prompt file through a pipe (no name to go by)."""
    r_fd, w_fd = os.pipe()
    os.write(w_fd, '\ufeff{"prompt": "The capital of France is"}\n'.encode())
    os.close(w_fd)
    try:
        r = runner.invoke(
            app,
            [
                "trace",
                "smollm2-135m",
                "--prompts",
                f"/dev/fd/{r_fd}",
                "--out",
                str(tmp_path / "run"),
                "-k",
                "1",
                "--json",
            ],
        )
    finally:
        os.close(r_fd)
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"read 1 prompt from /dev/fd/{r_fd} (jsonl)" in r.stderr.splitlines()
    assert json.loads(r.stdout)["summaries"][0]["prompt"] == "The capital of France is"


def test_patch_metric_prob_takes_pairs_without_foil(tmp_path: Path, files: dict[str, Path]):
    """The hint of the no-foil error is true: --metric prob runs on the same file."""
    r = runner.invoke(
        app,
        [
            "patch",
            "smollm2-135m",
            "--out",
            str(tmp_path / "run"),
            "--pairs",
            str(files["nofoil.jsonl"]),
            "--metric",
            "prob",
            "--method",
            "atp",
            "--json",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"read 1 pair from {files['nofoil.jsonl']} (jsonl)" in r.stderr.splitlines()
    assert json.loads(r.stdout)["top"]
