"""Memory the passes will need, known before they run (issue 15, item 5): a clear one-line error
naming the knob to turn instead of an out-of-memory crash.

A backward pass of ``rows`` rows over a ``T``-token prompt keeps, for autograd, per row, token
and layer about ``ACTS_PER_TOKEN_LAYER(d_model, d_mlp) = 8·d_model + 4·d_mlp`` values (the norm
inputs and scales, queries, keys, values, the attention output and the residual stream; the
MLP's gate, up, activation and product) plus ``n_heads · T`` attention weights, and the logits
of the last position: :func:`pass_bytes`. Measured on SmolLM2 (float32, CPU, the peak resident
memory of one attribution pass in a fresh process, rows × T = 1024): 0.85, 0.91, 1.79 and 1.00
times the estimate at T = 32, 64, 128 and 256. The check refuses only when the estimate exceeds
what is free, so it errs on the side of running; an out-of-memory error that happens anyway
becomes the same kind of line (:func:`oom_error`).

:func:`available_bytes` is the free memory of the device (``torch.cuda.mem_get_info``), or of the
machine for the CPU (``MemAvailable`` of ``/proc/meminfo``, None where there is none).
:func:`check_pass` raises :class:`~adag.errors.AdagError` naming ``--max-batch-tokens`` with a
value that fits; :func:`oom_error` turns an out-of-memory error raised anyway into the same kind
of line.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from adag.errors import AdagError

GiB = 1 << 30
HEADROOM = 0.9
"""Share of the free memory a pass may plan to use."""


def acts_per_token_layer(d_model: int, d_mlp: int, n_heads: int, T: int) -> int:
    """Values autograd keeps per row, token and layer (module docstring)."""
    return 8 * d_model + 4 * d_mlp + n_heads * T


def pass_bytes(model: Any, rows: int, T: int) -> int:
    """Estimated peak bytes of one linearised backward pass of ``rows`` rows over ``T``
    tokens of ``model`` (module docstring)."""
    elem = torch.empty((), dtype=model.dtype).element_size()
    per = acts_per_token_layer(model.d_model, model.d_mlp, model.n_heads, T)
    return int(elem * (rows * T * model.n_layers * per + 2 * rows * model.d_vocab))


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the machine's available memory for the
    CPU (None when it cannot be read)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    override = os.environ.get("ADAG_AVAILABLE_MEMORY")  # bytes: for tests and shared machines
    if override:
        return int(override)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_pass(model: Any, rows: int, T: int, *, max_batch_tokens: int) -> None:
    """Raise :class:`AdagError` when one pass of ``rows`` rows (``rows = max_batch_tokens // T``
    at most) over ``T`` tokens needs more than the device has free, naming a
    ``--max-batch-tokens`` that fits, or saying that even one row does not fit."""
    free = available_bytes(model.device)
    if free is None:
        return
    need = pass_bytes(model, rows, T)
    budget = HEADROOM * free
    if need <= budget:
        return
    one = pass_bytes(model, 1, T)
    where = f"{model.device}" + (" memory" if model.device.type == "cuda" else " RAM")
    if one > budget:
        raise AdagError(
            f"a {T}-token prompt needs about {one / GiB:.1f} GiB per backward row and {where} has "
            f"{free / GiB:.1f} GiB free: shorten the prompt, use a smaller dtype (--dtype "
            f"bfloat16) or spread the model over more devices (device_map)"
        )
    fit = max(1, int(budget // one))
    raise AdagError(
        f"a backward pass of {rows} rows x {T} tokens needs about {need / GiB:.1f} GiB and "
        f"{where} has {free / GiB:.1f} GiB free: lower --max-batch-tokens (now "
        f"{max_batch_tokens}) to {fit * T} or less"
    )


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA's, or the CPU allocator's)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def oom_error(T: int, max_batch_tokens: int, batch_size: int) -> AdagError:
    """The one line for an out-of-memory error raised while tracing a ``T``-token prompt."""
    return AdagError(
        f"out of memory tracing a {T}-token prompt with max_batch_tokens={max_batch_tokens} and "
        f"batch_size={batch_size}: lower --max-batch-tokens (e.g. to {max(T, max_batch_tokens // 2)})"
        f" or --batch-size"
    )


__all__ = ["available_bytes", "check_pass", "is_oom", "oom_error", "pass_bytes"]
