"""``RunConfig``: everything ``adag run CONFIG.yaml`` does, validated with pydantic.

A config names the model, the prompts (a built-in dataset or a prompts file), optional prompt
pairs for localisation, and the settings of each stage. The trace settings are
:class:`adag.graphs.config.TraceConfig` itself (validated by it), the explainer and simulator are
:class:`adag.describe.llm.LLMConfig`. A bad or unknown field is one line naming it
(:func:`load_config`); the resolved config written to ``RUN_DIR/config.yaml`` holds no secret
(API keys are read from the environment variable a config names, never from the config).

Example (``adag demo`` runs this, on SmolLM2 and the local explainer)::

    model: smollm2-135m
    dataset: {name: capitals, n: 16}
    cluster: {n_clusters: 8}
    describe: {n_samples: 2}
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from adag.describe.llm import LLMConfig
from adag.errors import AdagError
from adag.graphs.config import TraceConfig

STAGES = ("dataset", "trace", "patch", "cluster", "describe", "steer", "report")
"""The stages of ``adag run`` in order (``--force STAGE`` takes one of these names)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    """The prompts: a built-in dataset (``name``) or a prompts file (``file``: JSONL or text)."""

    name: str | None = Field(None, description="built-in dataset (adag dataset --help lists them)")
    file: str | None = Field(None, description="prompts file (JSONL or one prompt a line)")
    n: int | None = Field(None, ge=1, description="at most this many prompts")
    seed: int = Field(0, description="the order in which candidates are drawn")
    check: bool = Field(True, description="keep only prompts the model answers right")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.name is None) == (self.file is None):
            raise ValueError("give exactly one of dataset.name and dataset.file")
        return self


class PairsConfig(_Section):
    """Prompt pairs for the patch stage (AtP* by default): a built-in task or a pairs file."""

    task: str | None = Field("ioi", description="built-in task: ioi or capitals")
    file: str | None = Field(None, description="JSONL prompt pairs (replaces task)")
    n_pairs: int = Field(8, ge=1)
    seed: int = 0
    method: str = "atp_star"
    nodes: str = "heads"
    metric: str | None = None
    batch_size: int = Field(32, ge=1)


class ClusterConfig(_Section):
    n_clusters: int = Field(16, ge=2)
    method: Literal["multiview", "kmeans", "agglomerative", "random"] = "multiview"
    seed: int = 42
    top_m: int | None = Field(None, ge=1)


class DescribeConfig(_Section):
    """The explainer–simulator (ADAG §3.3): ``llm`` explains, ``simulator`` (default: the same
    client) predicts held-out profiles from the text."""

    enabled: bool = True
    llm: LLMConfig = Field(default_factory=LLMConfig)
    simulator: LLMConfig | None = None
    n_samples: int = Field(5, ge=1, description="explanations per side and sign")
    min_highlights: int = Field(1, ge=1)
    heldout: float = Field(0.3, gt=0, lt=1)
    sides: tuple[Literal["input", "output"], ...] = ("input", "output")
    seed: int = 0


class SteerConfig(_Section):
    """Steering validation; ``generate`` > 0 also samples that many steered generations per
    cluster and factor and asks ``judge`` (a yes/no rubric) of each."""

    enabled: bool = True
    scale: tuple[float, ...] = (0.0, 2.0)
    k: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    generate: int = Field(0, ge=0)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    judge: str | None = None
    incoherence: str | None = (
        "Is this text incoherent: broken grammar, repetition, or unrelated fragments?"
    )

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("give at least one steering factor")
        return v


class RunConfig(_Section):
    """One ``adag run``: the model, the prompts and every stage's settings."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    gpus_per_model: int | None = Field(
        None,
        ge=1,
        description="under torchrun with device auto: GPUs per data-parallel worker "
        "(default: the machine's GPUs split evenly)",
    )
    out: str | None = Field(None, description="run directory (adag run --out overrides it)")
    dataset: DatasetConfig = Field(default_factory=lambda: DatasetConfig(name="capitals", n=16))
    pairs: PairsConfig | None = None
    trace: TraceConfig = Field(default_factory=TraceConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    steer: SteerConfig = Field(default_factory=SteerConfig)
    seed_response: str | None = Field(
        None, description='e.g. "Answer:" (prompts may set their own)'
    )

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("trace", mode="before")
    @classmethod
    def _trace(cls, v: Any) -> Any:
        if isinstance(v, TraceConfig):
            return v
        if v is None:
            return TraceConfig()
        if not isinstance(v, dict):
            raise ValueError("trace must be a mapping of trace settings")
        known = [f.name for f in dataclasses.fields(TraceConfig)]
        bad = sorted(set(v) - set(known))
        if bad:
            raise ValueError(f"unknown field {bad[0]!r}; trace fields: {', '.join(known)}")
        try:
            return TraceConfig(**v)
        except AdagError as e:
            raise ValueError(str(e)) from None

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, every default filled in (what ``config.yaml`` records)."""
        data = self.model_dump(mode="json", exclude={"trace"})
        data["trace"] = {
            f.name: _plain(getattr(self.trace, f.name)) for f in dataclasses.fields(TraceConfig)
        }
        return data


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "config"


def parse_config(data: Any, *, source: str = "config") -> RunConfig:
    """A :class:`RunConfig` from plain data; a bad or unknown field is a one-line
    :class:`AdagError` naming it (and how many other problems there are)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AdagError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        where = _where(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise AdagError(f"{source}: {where}: {msg}{more}") from None


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a YAML (or JSON) run config."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise AdagError(f"config file {p} does not exist; give a YAML file (see adag demo)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise AdagError(f"{p}: not valid YAML{at}; fix the syntax") from None
    return parse_config(data, source=str(p))


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (no secrets: keys live in the environment)."""
    import yaml

    return str(yaml.safe_dump(config.resolved(), sort_keys=False, allow_unicode=True))


DEMO = {
    "model": "smollm2-135m",
    "dataset": {"name": "capitals", "n": 16},
    "trace": {"node_threshold": 0.01},
    "cluster": {"n_clusters": 8},
    "describe": {"n_samples": 2},
    "steer": {"scale": [0.0, 2.0]},
}
"""``adag demo``'s config: 16 capitals prompts, 8 clusters, 2 explanations per side and sign."""

__all__ = [
    "DEMO",
    "STAGES",
    "ClusterConfig",
    "DatasetConfig",
    "DescribeConfig",
    "PairsConfig",
    "RunConfig",
    "SteerConfig",
    "dump_config",
    "load_config",
    "parse_config",
]
