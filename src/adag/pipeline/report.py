"""The ``report`` stage: one self-contained ``RUN_DIR/report.html`` a person reads first, and
``RUN_DIR/summary.json`` with the same numbers (issue 11, item 5).

It reads whatever the run has; only ``graphs/`` is required. Each of ``config.yaml``,
``clusters.json``, ``cluster-profiles.parquet``, ``descriptions.jsonl``,
``steering-summary.parquet``, ``steering-judged.parquet``, ``behaviour.parquet``,
``patching/*.parquet`` and the stage plots is optional: a missing one is said in the report
("descriptions were not run"), an unreadable one is a note in the report rather than an error.

The HTML makes no network request: inline CSS, system fonts, the plots as base64 PNG data URIs,
no script. Every token and text is HTML-escaped. Nothing in either file depends on the time or
the machine, so the same run directory gives the same bytes (except the ``timings`` and ``usage``
the caller passes), which the resume tests compare.

``summary.json`` layout (NaN, infinities and missing values are ``null``)::

    {"model": str | null, "n_prompts": int, "n_clusters": int,
     "stages": {"clusters", "descriptions", "steering", "behaviour", "judged", "patching": bool},
     "clusters": [{"name": "C0", "label": str | null, "label_failure": str | null,
                   "inhibitory": bool, "size": int,
                   "layers": [lo, hi] | null,
                   "input":  {"score", "shuffled", "top_tokens": float | null,
                              "explanation": str | null, "sign": str | null,
                              "status": "ok" | "failed" | "not run", "failure": str | null},
                   "output": {...the same...},
                   "steering": {"factor", "n", "prob_base", "prob", "dprob", "dprob_lo",
                                "dprob_hi", "share_down", "down_lo", "down_hi", "kl",
                                "by_factor": [{...the same, one per factor...}]} | null,
                   "behaviour_r": float | null, "behaviour_p": float | null}],
     "means": {"input": {"score", "shuffled", "top_tokens": float | null, "n": int,
                         "failed": int},
               "output": {...}},
     "timings": {stage: seconds} | null, "usage": {...} | null}

A cluster's steering effect is the one of the factor furthest from 1 (the ablation, factor 0,
when the factors are 0 and 2). Means are over the clusters that have the number.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.io import write_text

REPORT = "report.html"
SUMMARY = "summary.json"
SIDES = ("input", "output")
PLOTS = (
    ("clusters-similarity.png", "Similarity matrix, units ordered by cluster"),
    ("clusters-by-layer.png", "Cluster sizes by layer"),
    ("steering.png", "Steering effects (Δ mean target probability, 95% CI)"),
)
N_RECORDS = 5
"""Top records shown per cluster and side."""
N_TARGETS = 8
"""Promoted and suppressed target tokens shown per cluster."""
N_UNITS = 24
"""Units listed per cluster."""
N_JUDGED = 12
"""Rows of the judged-generations table shown per cluster."""
_STEER_FIELDS = (
    "factor",
    "n",
    "prob_base",
    "prob",
    "dprob",
    "dprob_lo",
    "dprob_hi",
    "share_down",
    "down_lo",
    "down_hi",
    "kl",
)


# -- reading the run ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What the report reads from a run directory; every part but the graphs may be empty."""

    slugs: list[str]
    prompts: list[str]
    prompt_tokens: dict[str, list[str]]
    model: str | None
    config: dict[str, Any] | None = None
    clusters: Any = None  # adag.clusters.Clusters
    profiles: Any = None  # pyarrow.Table
    descriptions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    has_descriptions: bool = False
    steering: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    behaviour: dict[str, dict[str, Any]] = field(default_factory=dict)
    judged: Any = None  # pyarrow.Table
    patching: list[tuple[str, int]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _float(x: Any) -> float | None:
    """A finite float, or None (for None, NaN, infinities and anything not a number)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _plain(x: Any) -> Any:
    """``x`` as JSON-ready data: numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return _float(x)
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _read_parquet(path: Path, run: _Run) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        run.notes.append(f"{path.name} could not be read ({e}); it is left out")
        return None


def _read(run_dir: Path) -> _Run:
    from adag.pipeline.cluster import run_graphs

    slugs, graphs = run_graphs(run_dir)
    models = [g.settings.get("model") for g in graphs]
    run = _Run(
        slugs=slugs,
        prompts=[g.prompt for g in graphs],
        prompt_tokens={s: list(g.prompt_tokens) for s, g in zip(slugs, graphs, strict=True)},
        model=next((str(m) for m in models if m), None),
    )
    _read_config(run_dir, run)
    if run.model is None and run.config and run.config.get("model"):
        run.model = str(run.config["model"])
    if (run_dir / "clusters.json").exists():
        from adag.clusters import Clusters

        try:
            run.clusters = Clusters.load(run_dir)
        except AdagError as e:
            run.notes.append(f"the clusters could not be read ({e})")
    if run.clusters is None:
        return run
    names = set(run.clusters.names)
    if (run_dir / "cluster-profiles.parquet").exists():
        run.profiles = _read_parquet(run_dir / "cluster-profiles.parquet", run)
    _read_descriptions(run_dir / "descriptions.jsonl", names, run)
    if (run_dir / "steering-summary.parquet").exists():
        table = _read_parquet(run_dir / "steering-summary.parquet", run)
        if table is not None:
            for row in table.to_pylist():
                if row.get("label") in names:
                    run.steering.setdefault(row["label"], []).append(row)
    if (run_dir / "behaviour.parquet").exists():
        table = _read_parquet(run_dir / "behaviour.parquet", run)
        if table is not None:
            run.behaviour = {r["cluster"]: r for r in table.to_pylist() if r.get("cluster")}
    # judged generations: the per-condition rates (with the unsteered model's, "none") when the
    # summary is there, else the generations themselves
    for judged in ("steering-judged-summary.parquet", "steering-judged.parquet"):
        if (run_dir / judged).exists():
            run.judged = _read_parquet(run_dir / judged, run)
            break
    pdir = run_dir / "patching"
    if pdir.is_dir():
        for p in sorted(pdir.glob("*.parquet")):
            if not p.name.startswith("."):
                table = _read_parquet(p, run)
                if table is not None:
                    run.patching.append((p.stem, table.num_rows))
        for p in sorted(pdir.glob("*.png")):
            if not p.name.startswith("."):
                run.images[f"patching/{p.name}"] = p.read_bytes()
    for name, _ in PLOTS:
        if (run_dir / name).is_file():
            run.images[name] = (run_dir / name).read_bytes()
    return run


def _read_config(run_dir: Path, run: _Run) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        run.notes.append(f"config.yaml could not be read ({type(e).__name__}); it is left out")
        return
    if isinstance(data, dict):
        run.config = data


def _read_descriptions(path: Path, names: set[str], run: _Run) -> None:
    """The rows of ``descriptions.jsonl`` (the layout of :class:`adag.describe.Descriptions`),
    read as plain JSON lines so the report does not depend on the describe package."""
    if not path.is_file():
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        run.notes.append(f"descriptions.jsonl could not be read ({e}); descriptions are left out")
        return
    run.has_descriptions = True
    for row in rows:
        if isinstance(row, dict) and row.get("cluster") in names and row.get("side") in SIDES:
            run.descriptions[(str(row["cluster"]), str(row["side"]))] = row


# -- the numbers -------------------------------------------------------------------------------


def _side(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {
            "score": None,
            "shuffled": None,
            "top_tokens": None,
            "explanation": None,
            "sign": None,
            "status": "not run",
            "failure": None,
        }
    baselines = row.get("baselines") or {}
    shuffled = baselines.get("shuffled") or {}
    top = baselines.get("top_tokens") or {}
    status = row.get("status")
    return {
        "score": _float(row.get("score")),
        "shuffled": _float(shuffled.get("score")),
        "top_tokens": _float(top.get("score")),
        "explanation": row.get("explanation"),
        "sign": row.get("sign"),
        "status": status if status in ("ok", "failed") else "failed",
        "failure": row.get("failure"),
    }


def _steering(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [r for r in rows if _float(r.get("factor")) is not None]
    if not rows:
        return None
    by_factor = [
        {k: _plain(r.get(k)) for k in _STEER_FIELDS}
        for r in sorted(rows, key=lambda r: float(r["factor"]))
    ]
    # furthest from 1 (no change); on a tie the smaller factor, so 0 (ablation) beats 2
    main = min(by_factor, key=lambda r: (-abs(r["factor"] - 1.0), r["factor"]))
    return {**main, "by_factor": by_factor}


def _summary(
    run: _Run, timings: Mapping[str, float] | None, usage: Mapping[str, Any] | None
) -> dict[str, Any]:
    c = run.clusters
    clusters = []
    if c is not None:
        sizes = c.sizes
        for i, name in enumerate(c.names):
            layers = [u[0] for u in c.members(name)]
            rows = [run.descriptions.get((name, side)) for side in SIDES]
            label = next((r.get("label") for r in rows if r and r.get("label")), None)
            label_failure = next(
                (r.get("label_failure") for r in rows if r and r.get("label_failure")), None
            )
            beh = run.behaviour.get(name) or {}
            clusters.append(
                {
                    "name": name,
                    "label": label,
                    "label_failure": None if label else label_failure,
                    "inhibitory": any(bool(r.get("inhibitory")) for r in rows if r),
                    "size": int(sizes[i]),
                    "layers": [min(layers), max(layers)] if layers else None,
                    "input": _side(rows[0]),
                    "output": _side(rows[1]),
                    "steering": _steering(run.steering.get(name, [])),
                    "behaviour_r": _float(beh.get("r")),
                    "behaviour_p": _float(beh.get("p")),
                }
            )
    means: dict[str, Any] = {}
    for side in SIDES:
        entries = [cl[side] for cl in clusters]
        m: dict[str, Any] = {}
        for key in ("score", "shuffled", "top_tokens"):
            vals = [e[key] for e in entries if e[key] is not None]
            m[key] = float(np.mean(vals)) if vals else None
        m["n"] = sum(1 for e in entries if e["score"] is not None)
        m["failed"] = sum(1 for e in entries if e["status"] == "failed")
        means[side] = m
    return _plain(
        {
            "model": run.model,
            "n_prompts": len(run.slugs),
            "n_clusters": 0 if c is None else int(c.n_clusters),
            "stages": {
                "clusters": c is not None,
                "descriptions": run.has_descriptions,
                "steering": bool(run.steering),
                "behaviour": bool(run.behaviour),
                "judged": run.judged is not None,
                "patching": bool(run.patching),
            },
            "clusters": clusters,
            "means": means,
            "timings": None if timings is None else dict(timings),
            "usage": None if usage is None else dict(usage),
        }
    )


# -- records and target tables -----------------------------------------------------------------


def profile_records(
    profiles: Any, prompt_tokens: Mapping[str, Sequence[str]]
) -> dict[str, list[dict[str, Any]]]:
    """Per cluster, its input-side top records from ``cluster-profiles.parquet`` (the pyarrow
    table ``profiles``, or None): the :data:`N_RECORDS` prompts where its summed profile is
    largest in absolute value, each ``{"prompt_id", "tokens", "values", "highlight": None}`` over
    the whole prompt (``prompt_tokens[prompt_id]``; 0 at positions the profile does not cover),
    or over the covered positions only for a prompt id not in ``prompt_tokens``. Used by the
    report (when the descriptions are missing) and by the viewer server."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = profiles
    need = {"cluster", "prompt_id", "side", "position", "token", "value"}
    if t is None or not need <= set(t.column_names):
        return {}
    t = t.filter(pc.equal(t["side"], "input"))
    if t.num_rows == 0:
        return {}
    t = t.append_column("abs", pc.abs(t["value"].cast(pa.float64())))
    peak = t.group_by(["cluster", "prompt_id"], use_threads=False).aggregate([("abs", "max")])
    best: dict[str, list[tuple[float, str]]] = {}
    for cl, pid, v in zip(
        peak["cluster"].to_pylist(),
        peak["prompt_id"].to_pylist(),
        peak["abs_max"].to_pylist(),
        strict=True,
    ):
        if v is not None and v > 0:
            best.setdefault(cl, []).append((-float(v), str(pid)))
    chosen = {(cl, pid) for cl, items in best.items() for _, pid in sorted(items)[:N_RECORDS]}
    values: dict[tuple[str, str], dict[int, tuple[str, float]]] = {}
    d = t.select(["cluster", "prompt_id", "position", "token", "value"]).to_pydict()
    for cl, pid, pos, tok, v in zip(*d.values(), strict=True):
        if (cl, str(pid)) in chosen:
            values.setdefault((cl, str(pid)), {})[int(pos)] = (str(tok), float(v or 0.0))
    out: dict[str, list[dict[str, Any]]] = {}
    for cl, items in best.items():
        for _, pid in sorted(items)[:N_RECORDS]:
            at = values.get((cl, pid), {})
            known = prompt_tokens.get(pid)
            if known is None:  # a prompt id that is no graph's slug: the covered positions only
                tokens = [at[p][0] for p in sorted(at)]
                vals = [at[p][1] for p in sorted(at)]
            else:
                tokens = list(known)
                vals = [at[p][1] if p in at else 0.0 for p in range(len(tokens))]
            out.setdefault(cl, []).append(
                {"prompt_id": pid, "tokens": tokens, "values": vals, "highlight": None}
            )
    return out


_Targets = list[tuple[str, float, int]]
"""(token, summed value, number of prompts) per target token."""


def _target_tables(run: _Run) -> dict[str, tuple[_Targets, _Targets]]:
    """Per cluster, its most promoted and most suppressed target tokens: the output profile
    summed over prompts, with the number of prompts the target occurs in; from
    ``cluster-profiles.parquet``, else from the output side's top records (values −10..10)."""
    sums: dict[str, dict[str, list[float]]] = {}
    t = run.profiles
    if t is not None and {"cluster", "side", "token", "value"} <= set(t.column_names):
        import pyarrow.compute as pc

        o = t.filter(pc.equal(t["side"], "output")).select(["cluster", "token", "value"])
        for cl, tok, v in zip(*o.to_pydict().values(), strict=True):
            if v is not None and math.isfinite(v):
                acc = sums.setdefault(cl, {}).setdefault(str(tok), [0.0, 0])
                acc[0] += float(v)
                acc[1] += 1
    else:
        for (cl, side), row in sorted(run.descriptions.items()):
            if side != "output":
                continue
            for rec in row.get("top_records") or []:
                for tok, v in zip(rec.get("tokens") or [], rec.get("values") or [], strict=False):
                    if _float(v) is not None:
                        acc = sums.setdefault(cl, {}).setdefault(str(tok), [0.0, 0])
                        acc[0] += float(v)
                        acc[1] += 1
    out = {}
    for cl, per in sums.items():
        items = sorted(((tok, s, int(n)) for tok, (s, n) in per.items()), key=lambda x: x[0])
        up = sorted((x for x in items if x[1] > 0), key=lambda x: -x[1])[:N_TARGETS]
        down = sorted((x for x in items if x[1] < 0), key=lambda x: x[1])[:N_TARGETS]
        out[cl] = (up, down)
    return out


# -- the score plot ----------------------------------------------------------------------------


def _score_plot(clusters: list[dict[str, Any]]) -> bytes | None:
    """Each cluster's description score next to its two baselines, per side: a box per
    category, the clusters as points, a grey line joining one cluster's three scores. PNG bytes,
    or None when nothing was scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = (("score", "description"), ("shuffled", "shuffled"), ("top_tokens", "top tokens"))
    colours = ("#2563eb", "#9ca3af", "#d97706")
    if not any(cl[s][k] is not None for cl in clusters for s in SIDES for k, _ in keys):
        return None
    fig = Figure(figsize=(9.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    n = len(clusters)
    # deterministic spread of the points around each category
    offsets = np.linspace(-0.14, 0.14, n) if n > 1 else np.zeros(1)
    for ax, side in zip(axes, SIDES, strict=True):
        for j, cl in enumerate(clusters):
            scores = [cl[side][k] for k, _ in keys]
            pts = [(x + offsets[j], y) for x, y in enumerate(scores) if y is not None]
            if len(pts) > 1:
                ax.plot(*zip(*pts, strict=True), color="#d1d5db", linewidth=0.8, zorder=1)
        for x, ((k, _), colour) in enumerate(zip(keys, colours, strict=True)):
            pairs = [(offsets[j], cl[side][k]) for j, cl in enumerate(clusters)]
            vals = np.array([y for _, y in pairs if y is not None], dtype=np.float64)
            if len(vals) == 0:
                continue
            if len(vals) > 1:
                ax.boxplot(
                    vals,
                    positions=[x],
                    widths=0.5,
                    showfliers=False,
                    patch_artist=True,
                    boxprops={"facecolor": "none", "edgecolor": colour},
                    medianprops={"color": colour, "linewidth": 2},
                    whiskerprops={"color": colour},
                    capprops={"color": colour},
                )
            at = np.array([x + o for o, y in pairs if y is not None])
            ax.scatter(at, vals, s=22, color=colour, zorder=3, edgecolors="white", linewidths=0.5)
        ax.axhline(0.0, color="#6b7280", linewidth=0.8, linestyle="--", zorder=0)
        ax.set_xticks(range(3), [name for _, name in keys])
        ax.set_xlim(-0.6, 2.6)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"{side} descriptions")
        ax.grid(True, axis="y", alpha=0.3)
        if all(cl[side]["score"] is None for cl in clusters):
            ax.text(1, 0.5, "no scores", ha="center", color="#6b7280")
    axes[0].set_ylabel("simulation score (Pearson r)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- HTML --------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _n(x: Any, digits: int = 2) -> str:
    v = _float(x)
    if v is None:
        return "—"
    return f"{0.0 if round(v, digits) == 0 else v:.{digits}f}"  # never "-0.00"


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'


def _shown_token(tok: str) -> str:
    """A token as it reads in a record: line breaks and tabs made visible, escaped."""
    text = tok.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")
    return _e(text if text else "∅")


def _record(rec: Mapping[str, Any], scale: float, marks: bool) -> str:
    """One record as token spans shaded by value: blue positive, red negative."""
    tokens = [str(t) for t in rec.get("tokens") or []]
    values = list(rec.get("values") or [])
    highlight = list(rec.get("highlight") or []) if marks else []
    spans = []
    for i, tok in enumerate(tokens):
        v = _float(values[i]) if i < len(values) else None
        v = 0.0 if v is None else v
        a = min(1.0, abs(v) / scale) * 0.85 if scale > 0 else 0.0
        rgb = "37,99,235" if v > 0 else "220,38,38"
        style = f"background:rgba({rgb},{a:.3f})" + (";color:#fff" if a > 0.5 else "")
        cls = "t hl" if i < len(highlight) and highlight[i] else "t"
        spans.append(
            f'<span class="{cls}" style="{style}" title="{v:.4g}">{_shown_token(tok)}</span>'
        )
    pid = rec.get("prompt_id")
    title = f' title="{_e(pid)}"' if pid is not None else ""
    return f'<div class="rec"{title}>{"".join(spans)}</div>'


def _records(recs: Sequence[Mapping[str, Any]], *, marks: bool = True) -> str:
    """Records shaded on one scale (the largest absolute value shown); ``marks``: underline the
    highlighted tokens (the explainer's highlights of an input record)."""
    vals = [abs(v) for r in recs for x in (r.get("values") or []) if (v := _float(x)) is not None]
    scale = max(vals) if vals else 0.0
    return "".join(_record(r, scale, marks) for r in recs)


def _score_line(s: Mapping[str, Any]) -> str:
    return (
        f'<div class="scores"><span class="score">score <b>{_n(s["score"])}</b></span>'
        f'<span class="base">shuffled {_n(s["shuffled"])}</span>'
        f'<span class="base">top tokens {_n(s["top_tokens"])}</span></div>'
    )


def _candidates(row: Mapping[str, Any]) -> str:
    cands = [c for c in row.get("candidates") or [] if isinstance(c, Mapping)]
    baselines = row.get("baselines") or {}
    items = []
    for c in cands:
        fail = c.get("failure")
        tail = f' <span class="fail">failed: {_e(fail)}</span>' if fail else ""
        items.append(
            f"<tr><td class=num>{_n(c.get('score'))}</td><td>{_e(c.get('sign') or '')}</td>"
            f"<td>{_e(c.get('explanation') or '')}{tail}</td></tr>"
        )
    for key, name in (("shuffled", "shuffled baseline"), ("top_tokens", "top-tokens baseline")):
        b = baselines.get(key) or {}
        if b.get("explanation"):
            src = f" (from {_e(b['from'])})" if b.get("from") else ""
            fail = b.get("failure")
            tail = f' <span class="fail">failed: {_e(fail)}</span>' if fail else ""
            items.append(
                f"<tr class=muted><td class=num>{_n(b.get('score'))}</td><td>{name}{src}</td>"
                f"<td>{_e(b['explanation'])}{tail}</td></tr>"
            )
    if not items:
        return ""
    return (
        f"<details><summary>{len(cands)} candidate explanations and the baselines</summary>"
        "<table class=small><tr><th>score</th><th>sign</th><th>explanation</th></tr>"
        f"{''.join(items)}</table></details>"
    )


def _side_html(
    side: str, s: Mapping[str, Any], row: Mapping[str, Any] | None, described: bool
) -> str:
    parts = [f"<h4>{side.capitalize()}</h4>"]
    if row is None:
        why = "no description of this side" if described else "descriptions were not run"
        parts.append(f'<p class="muted">{why}</p>')
        return "".join(parts)
    sign = f' <span class="badge">{_e(s["sign"])}</span>' if s.get("sign") else ""
    if s["explanation"]:
        parts.append(f'<p class="expl">{_e(s["explanation"])}{sign}</p>')
    if s["status"] == "failed":
        reason = s.get("failure") or "no reason recorded"
        parts.append(f'<p class="failure"><b>failed:</b> {_e(reason)}</p>')
    parts.append(_score_line(s))
    if row.get("note"):
        parts.append(f'<p class="note">{_e(row["note"])}</p>')
    parts.append(_candidates(row))
    return "".join(parts)


def _target_table(title: str, items: Sequence[tuple[str, float, int]]) -> str:
    if not items:
        return ""
    rows = "".join(
        f'<tr><td><span class="tok">{_shown_token(tok)}</span></td>'
        f"<td class=num>{v:.3g}</td><td class=num>{n}</td></tr>"
        for tok, v, n in items
    )
    return (
        f'<table class="small targets"><tr><th>{title}</th><th>value</th><th>prompts</th></tr>'
        f"{rows}</table>"
    )


def _steer_table(st: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class=num>×{_n(r['factor'], 3).rstrip('0').rstrip('.')}</td>"
        f"<td class=num>{_n(r['dprob'], 4)}</td>"
        f"<td class=num>[{_n(r['dprob_lo'], 4)}, {_n(r['dprob_hi'], 4)}]</td>"
        f"<td class=num>{_n(r['share_down'])} [{_n(r['down_lo'])}, {_n(r['down_hi'])}]</td>"
        f"<td class=num>{_n(r['kl'], 4)}</td><td class=num>{r['n']}</td></tr>"
        for r in st["by_factor"]
    )
    return (
        '<table class="small"><tr><th>factor</th><th>Δ p(target)</th><th>95% CI</th>'
        "<th>share down [95%]</th><th>KL</th><th>prompts</th></tr>"
        f"{rows}</table>"
    )


def _factor(x: Any) -> str:
    return "×" + _n(x, 3).rstrip("0").rstrip(".")


def _judged_html(run: _Run, name: str) -> str:
    """The judged generations' rows of cluster ``name`` (scalar columns only), as a table."""
    import pyarrow as pa

    t = run.judged
    if t is None:
        return ""
    col = "cluster" if "cluster" in t.column_names else "label"
    if col not in t.column_names:
        return ""
    keep = [
        f.name
        for f in t.schema
        if not (pa.types.is_nested(f.type) or pa.types.is_binary(f.type)) and f.name != col
    ]
    rows = [r for r in t.select([col, *keep]).to_pylist() if r[col] == name]
    if not rows:
        return ""
    if "rate" in t.column_names:  # the summary: the unsteered model's rates first, to compare
        keep = [col, *keep]
        rows = [r for r in t.select(keep).to_pylist() if r[col] == "none"] + rows

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"<td class=num>{_n(v, 3)}</td>"
        text = str(v) if v is not None else "—"
        return f"<td>{_e(text[:160] + ('…' if len(text) > 160 else ''))}</td>"

    head = "".join(f"<th>{_e(k)}</th>" for k in keep)
    body = "".join("<tr>" + "".join(cell(r[k]) for k in keep) + "</tr>" for r in rows[:N_JUDGED])
    more = (
        f'<p class="muted">… {len(rows) - N_JUDGED} more rows in steering-judged.parquet</p>'
        if len(rows) > N_JUDGED
        else ""
    )
    return f"<h4>Judged generations</h4><table class=small><tr>{head}</tr>{body}</table>{more}"


def _cluster_html(
    run: _Run,
    cl: Mapping[str, Any],
    records: Mapping[str, list[dict[str, Any]]],
    targets: Mapping[str, tuple[_Targets, _Targets]],
) -> str:
    from adag.clusters.units import unit_name

    name = cl["name"]
    label = cl["label"]
    head = f"{_e(name)}" + (f' · <span class="label">{_e(label)}</span>' if label else "")
    if cl["inhibitory"]:
        head += ' <span class="badge inh">inhibitory</span>'
    if cl["label_failure"]:
        head += f' <span class="fail small">label failed: {_e(cl["label_failure"])}</span>'
    facts = [f"{cl['size']} units"]
    if cl["layers"] is not None:
        lo, hi = cl["layers"]
        facts.append(f"{'layer' if lo == hi else 'layers'} {_layers(cl['layers'])}")
    st = cl["steering"]
    if st is not None:
        facts.append(
            f"steering {_factor(st['factor'])}: Δp {_n(st['dprob'], 4)} "
            f"[{_n(st['dprob_lo'], 4)}, {_n(st['dprob_hi'], 4)}]"
        )
    if cl["behaviour_r"] is not None:
        facts.append(f"behaviour r {_n(cl['behaviour_r'])} (p {_n(cl['behaviour_p'], 3)})")
    out = [
        f'<section class="card cluster" id="{_e(name)}"><h3>{head}</h3>',
        f'<p class="facts">{" · ".join(facts)}</p><div class="sides">',
    ]
    for side in SIDES:
        row = run.descriptions.get((name, side))
        out.append(f'<div class="side">{_side_html(side, cl[side], row, run.has_descriptions)}')
        if side == "input":
            recs = list((row or {}).get("top_records") or []) or records.get(name, [])
            if recs:
                out.append(f'<div class="sub">Top records</div>{_records(recs[:N_RECORDS])}')
        else:
            up, down = targets.get(name, ([], []))
            if up or down:
                out.append(
                    '<div class="tables">'
                    f"{_target_table('promoted', up)}{_target_table('suppressed', down)}</div>"
                )
            recs = list((row or {}).get("top_records") or [])
            if recs:
                out.append(
                    f'<div class="sub">Targets per prompt</div>{_records(recs[:N_RECORDS], marks=False)}'
                )
        out.append("</div>")
    out.append("</div>")
    if st is not None:
        out.append(f"<h4>Steering</h4>{_steer_table(st)}")
    out.append(_judged_html(run, name))
    members = run.clusters.members(name)
    shown = ", ".join(unit_name(u) for u in members[:N_UNITS])
    more = f", … {len(members) - N_UNITS} more" if len(members) > N_UNITS else ""
    out.append(f'<p class="units">units (layer:neuron:sign): {_e(shown)}{more}</p></section>')
    return "".join(out)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(data, Mapping):
        out = []
        for k, v in data.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, list | tuple):
        text = json.dumps(_plain(data), ensure_ascii=False)
    elif data is None:
        text = "—"
    else:
        text = str(data)
    return [(prefix, text)]


def _config_line(cfg: Mapping[str, Any]) -> str:
    """The settings a reader wants first, from ``config.yaml`` (whatever of them it has)."""

    def get(*path: str) -> Any:
        x: Any = cfg
        for p in path:
            x = x.get(p) if isinstance(x, Mapping) else None
        return x

    parts = []
    ds = get("dataset")
    if isinstance(ds, Mapping):
        src = ds.get("name") or ds.get("file")
        if src:
            n = f", n = {ds['n']}" if ds.get("n") is not None else ""
            parts.append(f"dataset <b>{_e(src)}</b>{_e(n)}")
    if get("cluster", "n_clusters") is not None:
        method = f" ({_e(get('cluster', 'method'))})" if get("cluster", "method") else ""
        parts.append(f"{_e(get('cluster', 'n_clusters'))} clusters{method}")
    if get("describe", "enabled") is not False and isinstance(get("describe", "llm"), Mapping):
        llm = get("describe", "llm")
        parts.append(f"explainer {_e(llm.get('backend'))}:{_e(llm.get('model'))}")
        if get("describe", "n_samples") is not None:
            parts.append(f"{_e(get('describe', 'n_samples'))} samples per side")
    if get("steer", "enabled") is not False and get("steer", "scale") is not None:
        scale = get("steer", "scale")
        if isinstance(scale, list | tuple):
            parts.append("steering " + ", ".join(_e(_factor(x)) for x in scale))
    return " · ".join(parts)


def _kv_table(rows: Sequence[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _header_html(run: _Run, summary: Mapping[str, Any]) -> str:
    c = run.clusters
    stats = [
        ("model", summary["model"] or "unknown"),
        ("prompts", summary["n_prompts"]),
        ("clusters", summary["n_clusters"] if c is not None else "—"),
        ("units", len(c.units) if c is not None else "—"),
    ]
    cards = "".join(
        f'<div class="stat"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
        for k, v in stats
    )
    out = [
        "<header><h1>ADAG report</h1>",
        f'<div class="stats">{cards}</div>',
    ]
    if run.config:
        line = _config_line(run.config)
        if line:
            out.append(f'<p class="config">{line}</p>')
    out.append("</header>")
    return "".join(out)


def _notes(run: _Run, summary: Mapping[str, Any]) -> list[str]:
    st = summary["stages"]
    notes = []
    if not st["clusters"]:
        notes.append("Clustering was not run (no clusters.json): run adag cluster RUN_DIR.")
    else:
        if not st["descriptions"]:
            notes.append("Descriptions were not run (no descriptions.jsonl).")
        if not st["steering"]:
            notes.append("Steering was not run (no steering-summary.parquet).")
        if not st["behaviour"]:
            notes.append("No behaviour correlation (the prompts carry no scores).")
    return notes + run.notes


def _means_html(summary: Mapping[str, Any]) -> str:
    rows = []
    for side in SIDES:
        m = summary["means"][side]
        fail = f"{m['failed']}" if m["failed"] else "0"
        rows.append(
            f"<tr><th>{side}</th><td class=num><b>{_n(m['score'])}</b></td>"
            f"<td class=num>{_n(m['shuffled'])}</td><td class=num>{_n(m['top_tokens'])}</td>"
            f"<td class=num>{m['n']}</td><td class=num>{fail}</td></tr>"
        )
    return (
        '<table class="means"><tr><th>mean score</th><th>description</th><th>shuffled</th>'
        f"<th>top tokens</th><th>scored</th><th>failed</th></tr>{''.join(rows)}</table>"
    )


def _layers(layers: Sequence[int] | None) -> str:
    if layers is None:
        return "—"
    lo, hi = layers
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _overview_table(summary: Mapping[str, Any]) -> str:
    """All clusters in one table; the columns of stages that were not run are left out."""
    st = summary["stages"]
    two = (
        "<th rowspan=2>cluster</th><th rowspan=2>label</th><th rowspan=2>units</th>"
        "<th rowspan=2>layers</th>"
    )
    sub = ""
    if st["descriptions"]:
        two += "<th colspan=3 class=grp>input</th><th colspan=3 class=grp>output</th>"
        sub = "<th>score</th><th>shuf.</th><th>top tok.</th>" * 2
    if st["steering"]:
        two += "<th rowspan=2>steering Δp</th>"
    if st["behaviour"]:
        two += "<th rowspan=2>behaviour r</th>"
    head = f"<thead><tr>{two}</tr><tr>{sub}</tr></thead>"
    rows = []
    for cl in summary["clusters"]:
        inh = ' <span class="badge inh">inh.</span>' if cl["inhibitory"] else ""
        cells = [
            f'<td><a href="#{_e(cl["name"])}">{_e(cl["name"])}</a></td>',
            f"<td>{_e(cl['label'] or '—')}{inh}</td>",
            f"<td class=num>{cl['size']}</td>",
            f"<td class=num>{_layers(cl['layers'])}</td>",
        ]
        if st["descriptions"]:
            for side in SIDES:
                s = cl[side]
                score = (
                    f'<span class="fail" title="{_e(s["failure"] or "")}">failed</span>'
                    if s["status"] == "failed"
                    else f"<b>{_n(s['score'])}</b>"
                )
                cells.append(f"<td class='num sc'>{score}</td>")
                cells.append(f"<td class='num muted'>{_n(s['shuffled'])}</td>")
                cells.append(f"<td class='num muted'>{_n(s['top_tokens'])}</td>")
        if st["steering"]:
            steer = cl["steering"]
            cells.append(
                "<td class=num>—</td>"
                if steer is None
                else f"<td class=num>{_n(steer['dprob'], 4)} "
                f"<span class=muted>{_factor(steer['factor'])}</span></td>"
            )
        if st["behaviour"]:
            cells.append(f"<td class=num>{_n(cl['behaviour_r'])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cls = "overview" if st["descriptions"] else "overview narrow"  # 4 columns need no width
    return f'<table class="{cls}">{head}<tbody>{"".join(rows)}</tbody></table>'


CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f3f4f6;--blue:#2563eb;--red:#b91c1c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:24px 24px 48px}
h1{font-size:26px;margin:0 0 12px}h2{font-size:19px;margin:0 0 12px}
h3{font-size:17px;margin:0 0 4px}h4{font-size:14px;margin:12px 0 6px;color:#374151}
a{color:var(--blue);text-decoration:none}a:hover{text-decoration:underline}
header{margin-bottom:8px}
.stats{display:flex;gap:12px;flex-wrap:wrap}
.stat{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 16px;min-width:120px}
.stat .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.stat .v{font-size:18px;font-weight:600;overflow-wrap:anywhere}
.config{color:#374151;margin:12px 0 0}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;
margin:16px 0;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.notes{background:#fffbeb;border-color:#fde68a}.notes ul{margin:0;padding-left:20px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-weight:600;color:#374151;background:#f9fafb}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.overview th.grp{text-align:center;border-left:1px solid var(--line)}
.overview td.sc{border-left:1px solid var(--line)}
.overview tbody tr:hover{background:#f9fafb}
.overview.narrow{width:auto;min-width:50%}
table.small{font-size:13px;width:auto;min-width:50%}
table.kv th{width:30%;background:none;font-weight:500;color:var(--muted)}
table.means{width:auto}table.means td,table.means th{padding:5px 14px}
.muted{color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:24px 16px;align-items:end}
.plots .wide{grid-column:1/-1}
figure{margin:0}
figure img{max-width:100%;max-height:460px;width:auto;height:auto;display:block;margin:0 auto}
figcaption{font-size:13px;color:var(--muted);text-align:center;margin-top:4px}
.label{color:var(--blue)}
.facts{color:var(--muted);margin:0 0 8px}
.sides{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:24px}
.side h4{margin-top:4px;border-bottom:1px solid var(--line);padding-bottom:2px}
.expl{margin:4px 0;font-size:15px}
.failure{margin:4px 0;padding:6px 10px;background:#fef2f2;border:1px solid #fecaca;
border-radius:6px;color:var(--red);overflow-wrap:anywhere}
.fail{color:var(--red);font-weight:600}
.scores{display:flex;gap:14px;flex-wrap:wrap;margin:4px 0 8px;font-variant-numeric:tabular-nums}
.scores .base{color:var(--muted)}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:9px;background:#e5e7eb;
color:#374151;vertical-align:middle}
.badge.inh{background:#fee2e2;color:var(--red)}
.sub{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em;margin:10px 0 4px}
.rec,.tok{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;
font-size:12.5px;white-space:pre-wrap;overflow-wrap:anywhere}
.rec{padding:3px 6px;margin:2px 0;background:#f9fafb;border:1px solid #f3f4f6;border-radius:4px;
line-height:1.8}
.t{border-radius:2px;padding:1px 0}.t+.t{box-shadow:inset 1px 0 rgba(0,0,0,.07)}
.t.hl,.t+.t.hl{box-shadow:inset 0 -2px 0 #111827}
.tok{background:#f3f4f6;border-radius:3px;padding:0 3px;line-height:1.4}
table.targets td{padding:3px 8px}
.tables{display:flex;gap:16px;flex-wrap:wrap}.tables table{min-width:0;width:auto}
details{margin:6px 0}summary{cursor:pointer;color:var(--muted);font-size:13px}
.note{font-size:13px;color:var(--muted);margin:2px 0}.fail.small{font-size:12px;font-weight:500}
.units{font-size:12px;color:var(--muted);margin:10px 0 0;overflow-wrap:anywhere}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
"""


def _html(run: _Run, summary: Mapping[str, Any], timings: Any, usage: Any) -> str:
    model = summary["model"] or "unknown model"
    parts = [
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width, initial-scale=1">',
        f"<title>ADAG report · {_e(model)}</title><style>{CSS}</style></head><body><main>",
        _header_html(run, summary),
    ]
    notes = _notes(run, summary)
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        parts.append(f'<section class="card notes"><ul>{items}</ul></section>')
    clusters = summary["clusters"]
    if clusters:
        if run.has_descriptions:
            parts.append(f'<section class="card"><h2>Description scores</h2>{_means_html(summary)}')
            parts.append(
                '<p class="muted">Pearson r between the simulator\'s predictions from the text '
                "and the real profiles on held-out prompts, next to a shuffled explanation (another "
                "cluster's) and a top-tokens explanation made without an LLM.</p></section>"
            )
        parts.append(f'<section class="card"><h2>Clusters</h2>{_overview_table(summary)}</section>')
    figures = []
    score_png = _score_plot(clusters) if run.has_descriptions and clusters else None
    if score_png is not None:
        caption = "Description scores against both baselines, per side"
        figures.append(_figure(score_png, caption, wide=True))
    shown = [(name, caption) for name, caption in PLOTS if name in run.images]
    for i, (name, caption) in enumerate(shown):
        # two plots a row; an odd one out at the end gets the row to itself
        last_alone = i == len(shown) - 1 and len(shown) % 2 == 1
        figures.append(_figure(run.images[name], caption, wide=last_alone))
    if figures:
        parts.append(f'<section class="card"><h2>Plots</h2><div class="plots">{"".join(figures)}')
        parts.append("</div></section>")
    if clusters:
        records = profile_records(run.profiles, run.prompt_tokens)
        targets = _target_tables(run)
        parts.append("<h2>Clusters in detail</h2>")
        parts += [_cluster_html(run, cl, records, targets) for cl in clusters]
    parts.append(_run_html(run, timings, usage))
    parts.append(
        "<footer>written by adag · one self-contained file</footer></main></body></html>\n"
    )
    return "".join(parts)


def _figure(data: bytes, caption: str, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f"<figure{cls}>{_img(data, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _run_html(run: _Run, timings: Any, usage: Any) -> str:
    blocks = []
    if timings:
        rows = [(k, f"{float(v):.1f} s") for k, v in timings.items() if _float(v) is not None]
        total = sum(float(v) for v in timings.values() if _float(v) is not None)
        rows.append(("total", f"{total:.1f} s"))
        blocks.append(f"<div><h4>Timings</h4>{_kv_table(rows)}</div>")
    if usage:
        blocks.append(f"<div><h4>LLM usage</h4>{_kv_table(_flatten(_plain(usage)))}</div>")
    c = run.clusters
    if c is not None and c.diagnostics:
        rows = [
            (k, str(int(v)) if _float(v) is not None and float(v).is_integer() else _n(v, 3))
            for k, v in sorted(c.diagnostics.items())
        ]
        blocks.append(f"<div><h4>Clustering ({_e(c.method)})</h4>{_kv_table(rows)}</div>")
    if run.patching:
        rows = [(name, f"{n} rows") for name, n in run.patching]
        figs = "".join(
            _figure(data, name) for name, data in run.images.items() if name.startswith("patching/")
        )
        blocks.append(f"<div><h4>Patching tables</h4>{_kv_table(rows)}{figs}</div>")
    out = ['<section class="card"><h2>Run</h2>']
    if blocks:
        out.append(f'<div class="grid2">{"".join(blocks)}</div>')
    prompts = "".join(
        f"<tr><td class=muted>{_e(slug)}</td><td>{_e(p)}</td></tr>"
        for slug, p in zip(run.slugs, run.prompts, strict=True)
    )
    out.append(
        f"<details><summary>{len(run.slugs)} prompts</summary>"
        f'<table class="small">{prompts}</table></details>'
    )
    if run.config:
        out.append(
            f"<details><summary>config.yaml</summary>{_kv_table(_flatten(run.config))}</details>"
        )
    out.append("</section>")
    return "".join(out)


# -- the stage ---------------------------------------------------------------------------------


def write_report(
    run_dir: str | Path,
    *,
    timings: Mapping[str, float] | None = None,
    usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/summary.json`` (module docstring) from what
    the run directory holds, each atomically, and return the summary.

    ``timings`` (seconds per stage) and ``usage`` (LLM call, token and cost counters, possibly
    nested) are shown as given and copied into the summary. Raises a one-line
    :class:`AdagError` for a run directory without graphs."""
    run_dir = Path(run_dir)
    run = _read(run_dir)
    summary = _summary(run, timings, usage)
    text = json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    write_text(run_dir / SUMMARY, text)
    write_text(run_dir / REPORT, _html(run, summary, summary["timings"], summary["usage"]))
    return summary


__all__ = ["REPORT", "SUMMARY", "profile_records", "write_report"]
