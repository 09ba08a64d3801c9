"""``adag run CONFIG`` / :func:`run`: the whole job into one run directory.

dataset → trace → (patch, when the config has pairs) → cluster → describe → steer → report, each
stage a function of the config and the earlier stages' files (see each stage's module), each
skipped when its outputs are current under the settings that decide them, so a killed run
resumes where it stopped and a changed setting redoes only what it decides (a new explainer:
describe, the judged generations and the report). ``force`` redoes the named stages.

Files of its own: ``config.yaml`` (the resolved config, no secrets), ``prompts.jsonl`` (the
dataset, with a key sidecar), and the report's ``report.html`` / ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adag.errors import AdagError
from adag.io import remove, write_text
from adag.pipeline import rundir
from adag.pipeline.config import STAGES, RunConfig, dump_config
from adag.pipeline.dist import Dist
from adag.pipeline.resume import is_current, key_path, write_key

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.prompts import PromptSpec

PROMPTS = "prompts.jsonl"
CONFIG = "config.yaml"

Say = Callable[[str, str], None]
"""``say(stage, message)``: how :func:`run` reports progress (the CLI prints it)."""


def _quiet(stage: str, message: str) -> None:
    pass


def dataset_stage(
    model: Model, config: RunConfig, run_dir: Path, *, force: bool = False
) -> dict[str, Any]:
    """The run's prompts (``"prompts"``): made from the built-in dataset (checked against the
    model) or read from the config's file, and written to ``prompts.jsonl``; reused when
    current (``"reused"``)."""
    from adag.tasks.datasets import make_dataset
    from adag.tasks.prompts import PromptSpec, load_prompts, write_prompts

    ds = config.dataset
    path = run_dir / PROMPTS
    key: dict[str, Any] = {"stage": "dataset", **ds.model_dump(mode="json"), "model": model.name}
    if ds.file is not None:
        src = Path(ds.file)
        if not src.is_file():
            raise AdagError(f"dataset.file {src} does not exist; give a prompts file")
        from adag.io import file_sha256

        key["file_sha256"] = file_sha256(src)
    if not force and is_current(path, key):
        return {"prompts": list(load_prompts(path)), "reused": True}
    if ds.file is not None:
        specs: list[PromptSpec] = list(load_prompts(ds.file))
        if ds.n is not None:
            specs = specs[: ds.n]
    else:
        assert ds.name is not None
        specs = list(make_dataset(ds.name, model, ds.n, seed=ds.seed, check=ds.check))
    if not specs:
        raise AdagError("the dataset has no prompts; give a non-empty prompts file")
    if config.seed_response is not None:
        specs = [
            s
            if s.seed is not None
            else PromptSpec(s.prompt, config.seed_response, s.label, s.score)
            for s in specs
        ]
    remove(key_path(path))  # new prompts must never sit beside an old key
    write_prompts(specs, path)
    write_key(path, key)
    return {"prompts": specs, "reused": False}


def run(
    config: RunConfig,
    *,
    out: str | Path | None = None,
    force: Collection[str] = (),
    model: Model | None = None,
    say: Say = _quiet,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Run every stage of ``config`` into ``out`` (default ``config.out``); returns the report's
    summary with ``"run_dir"``, ``"timings"`` (seconds per stage) and ``"reused"`` (stages whose
    outputs were current).

    ``dist`` (:func:`adag.pipeline.dist.context` under ``torchrun``): every rank loads the model
    (a bare ``cuda`` device becomes its own GPU) and traces its shard of the prompts; rank 0
    then merges and runs the remaining stages alone, as one process would, and returns the
    summary; the other ranks return ``{"run_dir", "rank", "world", "timings", "trace"}`` after
    the trace, patch and steer stages (the patch stage splits the pairs, steer the clusters;
    they wait while rank 0 clusters and describes)."""
    from adag.models.load import load_model
    from adag.pipeline.cluster import cluster_stage
    from adag.pipeline.describe import describe_stage
    from adag.pipeline.report import write_report
    from adag.pipeline.steer import judge_stage, steer_stage
    from adag.pipeline.trace import trace_stage

    bad = sorted(set(force) - set(STAGES))
    if bad:
        raise AdagError(f"unknown stage {bad[0]!r} for --force; stages: {', '.join(STAGES)}")
    target = out if out is not None else config.out
    if target is None:
        raise AdagError("no run directory; give --out RUN_DIR or set out: in the config")
    run_dir = rundir.check_writable(target)
    for f in (config.dataset.file, config.pairs.file if config.pairs else None):
        if f is not None and not Path(f).is_file():
            raise AdagError(f"{f} (named in the config) does not exist; give an existing file")

    timings: dict[str, float] = {}
    reused: list[str] = []
    usage: dict[str, Any] = {}
    # everything that can fail on bad input fails before the first file is written
    t0 = time.perf_counter()
    dp = dist or Dist()
    m = model or load_model(
        config.model,
        dtype=config.dtype,
        device=dp.device(config.device, gpus_per_model=config.gpus_per_model),
    )
    timings["load"] = round(time.perf_counter() - t0, 3)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = dump_config(config)
    if dp.main and (
        not (run_dir / CONFIG).exists() or (run_dir / CONFIG).read_text(encoding="utf-8") != text
    ):
        write_text(run_dir / CONFIG, text)

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        say(stage, "running")
        t0 = time.perf_counter()
        result = fn()
        timings[stage] = round(time.perf_counter() - t0, 3)
        if isinstance(result, dict) and (
            result.get("reused") is True
            or (stage == "trace" and not result["traced"] and not result["removed"])
        ):
            reused.append(stage)
        say(stage, f"done in {timings[stage]:.1f} s")
        return result

    # rank 0 writes the prompt list; the others then find it current and read it
    if dp.main:
        specs = timed(
            "dataset", lambda: dataset_stage(m, config, run_dir, force="dataset" in force)
        )["prompts"]
    dp.barrier()
    if not dp.main:
        specs = timed("dataset", lambda: dataset_stage(m, config, run_dir, force=False))["prompts"]
    traced = timed(
        "trace",
        lambda: trace_stage(m, specs, run_dir, config.trace, force="trace" in force, dist=dp),
    )
    if config.pairs is not None:  # the ranks split the pairs (adag.pipeline.patch.SHARDABLE)
        timed("patch", lambda: _patch(m, config, run_dir, force="patch" in force, dist=dp))
    d = config.describe
    if dp.main:  # the other ranks wait at the barrier below for the clusters
        cl = config.cluster
        timed(
            "cluster",
            lambda: cluster_stage(
                run_dir,
                n_clusters=cl.n_clusters,
                method=cl.method,
                seed=cl.seed,
                top_m=cl.top_m,
                force="cluster" in force,
            ),
        )
        if d.enabled:
            result = timed(
                "describe",
                lambda: describe_stage(
                    run_dir,
                    llm=d.llm,
                    simulator=d.simulator,
                    n_samples=d.n_samples,
                    min_highlights=d.min_highlights,
                    heldout=d.heldout,
                    sides=d.sides,
                    seed=d.seed,
                    model=m,
                    force="describe" in force,
                    progress=lambda name: say("describe", name),
                ),
            )
            usage.update(result.get("usage") or {})
    dp.barrier()
    s = config.steer
    if s.enabled:  # under torchrun the ranks split the clusters
        timed(
            "steer",
            lambda: steer_stage(
                m,
                run_dir,
                scale=s.scale,
                k=s.k,
                batch_size=s.batch_size,
                force="steer" in force,
                dist=dp,
            ),
        )
    if not dp.main:
        return {
            "run_dir": str(run_dir),
            "rank": dp.rank,
            "world": dp.world,
            "timings": timings,
            "trace": {k: traced[k] for k in ("reused", "traced")},
        }
    if s.enabled and s.generate > 0 and s.judge:
        result = timed(
            "judge",
            lambda: judge_stage(
                m,
                run_dir,
                llm=d.llm,
                rubric=s.judge or "",
                incoherence=s.incoherence,
                n=s.generate,
                scale=s.scale,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                force="steer" in force,
            ),
        )
        usage["judge"] = result.get("usage") or {}
    summary = timed("report", lambda: write_report(run_dir, timings=timings, usage=usage))
    return {**summary, "run_dir": str(run_dir), "timings": timings, "reused": reused}


def _patch(
    model: Model, config: RunConfig, run_dir: Path, *, force: bool, dist: Dist | None = None
) -> dict[str, Any]:
    from adag.pipeline.patch import patch_command
    from adag.tasks import load_pairs, make_task

    p = config.pairs
    assert p is not None
    pairs = (
        list(load_pairs(p.file))
        if p.file is not None
        else make_task(p.task or "ioi", model, p.n_pairs, seed=p.seed)
    )
    return patch_command(
        model,
        pairs,
        run_dir,
        method=p.method,
        nodes=p.nodes,
        metric=p.metric,
        batch_size=p.batch_size,
        force=force,
        dist=dist,
    )


__all__ = ["CONFIG", "PROMPTS", "dataset_stage", "run"]
