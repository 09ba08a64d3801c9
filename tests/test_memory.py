"""Memory knobs (issue 15, item 5): the memory a pass needs is estimated before it runs and a
pass that would not fit is a one-line error naming ``--max-batch-tokens`` with a value that
fits; an out-of-memory error raised anyway becomes the same kind of line."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import adag.graphs.trace as trace_mod
from adag.cli import app
from adag.errors import AdagError
from adag.graphs.trace import trace
from adag.models import memory
from adag.models.model import Model

from .conftest import tiny_model


@pytest.fixture
def model() -> Model:
    return tiny_model("llama", dtype=torch.float32)


def test_pass_bytes_is_the_documented_formula(model: Model) -> None:
    d, f, h, L, V = model.d_model, model.d_mlp, model.n_heads, model.n_layers, model.d_vocab
    rows, T = 5, 7
    want = 4 * (rows * T * L * (8 * d + 4 * f + h * T) + 2 * rows * V)
    assert memory.pass_bytes(model, rows, T) == want
    half = tiny_model("llama", dtype=torch.bfloat16)
    assert memory.pass_bytes(half, rows, T) == want // 2


def test_available_memory_is_read() -> None:
    free = memory.available_bytes("cpu")
    assert free is None or free > 0


def test_a_pass_that_does_not_fit_names_the_knob(model: Model, monkeypatch) -> None:
    ids = torch.arange(10)
    T = len(ids)
    one = memory.pass_bytes(model, 1, T)
    # room for 3 rows of this prompt: the default max_batch_tokens (1,024) asks for more
    monkeypatch.setenv("ADAG_AVAILABLE_MEMORY", str(int(3.5 * one / memory.HEADROOM)))
    with pytest.raises(AdagError, match=r"lower --max-batch-tokens \(now 1024\) to 30 or less"):
        trace(model, ids, k=2, batch_size=8)
    g = trace(model, ids, k=2, batch_size=8, max_batch_tokens=30)[0]  # the suggested value runs
    assert g.n_nodes > 0
    monkeypatch.setenv("ADAG_AVAILABLE_MEMORY", str(one // 2))
    with pytest.raises(AdagError, match=r"per backward row .* shorten the prompt"):
        trace(model, ids, k=2)


def test_out_of_memory_becomes_one_line(model: Model, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trace_mod, "attribute_nodes", boom)
    with pytest.raises(AdagError, match=r"out of memory tracing a 6-token prompt .*--max-batch"):
        trace(model, torch.arange(6), k=2, max_batch_tokens=512)

    def cpu_boom(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr(trace_mod, "attribute_nodes", cpu_boom)
    with pytest.raises(AdagError, match="out of memory"):
        trace(model, torch.arange(6), k=2)

    def other(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(trace_mod, "attribute_nodes", other)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not swallowed
        trace(model, torch.arange(6), k=2)


def test_cli_exits_2_and_writes_nothing(tiny_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAG_AVAILABLE_MEMORY", "1000")
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["trace", str(tiny_dir), "The capital of France is", "--out", str(out)]
    )
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "GiB" in lines[0]
    assert not (out / "graphs").exists() or not any((out / "graphs").iterdir())
