"""``TraceConfig``: how attribution graphs are traced. Kept free of torch so that the command line,
whose ``adag trace`` options mirror these fields, imports it cheaply."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adag.errors import AdagError

if TYPE_CHECKING:
    from adag.models.model import Model

Targets = Sequence[str | int] | Mapping[str | int, float] | None


@dataclass(frozen=True)
class TraceConfig:
    """How graphs are traced: one object for :func:`trace`, the ``adag trace`` command (whose
    options mirror these fields, help text included) and the run directory, where the
    content-deciding fields (:meth:`content`) are the resume key."""

    k: int = field(default=5, metadata={"help": "trace the top-k next tokens", "content": True})
    targets: Targets = field(
        default=None,
        metadata={
            "help": "token strings or ids (metric: the sum of their logits), or {token: coef} "
            "(e.g. a logit difference); None traces the top-k",
            "content": True,
        },
    )
    node_threshold: float = field(
        default=0.005,
        metadata={
            "help": "keep nodes with |attribution| >= this fraction of |metric|",
            "content": True,
        },
    )
    edge_threshold: float = field(
        default=0.01, metadata={"help": "keep edges with |weight| >= this", "content": True}
    )
    desired_logit_prob: float | None = field(
        default=None,
        metadata={
            "help": "trace the smallest set of top tokens whose probabilities sum to at least "
            "this, at most max_n_logits (circuit-tracer's rule); None: transcoder graphs use "
            "0.95, neuron graphs the top-k",
            "content": True,
        },
    )
    max_n_logits: int = field(
        default=10,
        metadata={"help": "cap on the targets chosen by desired_logit_prob", "content": True},
    )
    max_feature_nodes: int | None = field(
        default=None,
        metadata={
            "help": "transcoder graphs: keep at most this many features (largest |attribution|)",
            "content": True,
        },
    )
    chat: bool = field(
        default=False,
        metadata={"help": "wrap prompts in the chat template (user turn)", "content": True},
    )
    exclude_bos: bool = field(
        default=True,
        metadata={"help": "leave a leading BOS position out of the nodes", "content": True},
    )
    batch_size: int = field(
        default=32, metadata={"help": "target nodes per backward pass", "content": False}
    )
    max_batch_tokens: int = field(
        default=1024,
        metadata={"help": "cap on rows x prompt length per pass (memory)", "content": False},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str | int):  # one target, not the characters of a string
            object.__setattr__(self, "targets", [self.targets])
        if self.targets is not None and not isinstance(self.targets, Mapping | list | tuple):
            raise AdagError(
                f"targets must be token strings or ids in a list, or {{token: coefficient}}, "
                f"got {type(self.targets).__name__}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise AdagError(f"k must be at least 1, got {self.k!r}")
        if self.desired_logit_prob is not None and not 0 < self.desired_logit_prob <= 1:
            raise AdagError(
                f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob!r}"
            )
        if (
            isinstance(self.max_n_logits, bool)
            or not isinstance(self.max_n_logits, int)
            or (self.max_n_logits < 1)
        ):
            raise AdagError(f"max_n_logits must be at least 1, got {self.max_n_logits!r}")
        if self.max_feature_nodes is not None and (
            isinstance(self.max_feature_nodes, bool)
            or not isinstance(self.max_feature_nodes, int)
            or self.max_feature_nodes < 1
        ):
            raise AdagError(
                f"max_feature_nodes must be at least 1 or None, got {self.max_feature_nodes!r}"
            )
        if not (self.node_threshold >= 0 and self.edge_threshold >= 0):
            raise AdagError(
                f"thresholds must be >= 0, got node_threshold={self.node_threshold}, "
                f"edge_threshold={self.edge_threshold}"
            )
        if self.batch_size < 1:
            raise AdagError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_batch_tokens < 1:
            raise AdagError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` (the CLI's option help)."""
        return str(cls.__dataclass_fields__[name].metadata["help"])

    def updated(self, **options: Any) -> TraceConfig:
        """A copy with ``options`` (field names) replaced; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(options) - known)
        if bad:
            raise AdagError(
                f"unknown trace option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **options) if options else self

    def content(self, model: Model) -> dict[str, Any]:
        """The settings that decide a graph's content (recorded in ``Graph.settings``; a run
        directory reuses a graph whose recorded settings match)."""
        out = {
            "model": model.name,
            "architecture": model.spec.model_type,
            "dtype": str(model.dtype).removeprefix("torch."),
            "k": self.k if self.targets is None else None,
            "targets": None if self.targets is None else targets_json(self.targets),
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "exclude_bos": self.exclude_bos,
            "chat": self.chat,
        }
        # recorded only when set, so that the neuron graphs' settings (and run-directory resume
        # keys) stay as they were before these options existed
        if self.targets is None and self.desired_logit_prob is not None:
            out["k"] = None
            out["desired_logit_prob"] = self.desired_logit_prob
            out["max_n_logits"] = self.max_n_logits
        if self.max_feature_nodes is not None:
            out["max_feature_nodes"] = self.max_feature_nodes
        return out


def targets_json(targets: Targets) -> Any:
    """``targets`` as JSON (for settings)."""
    if isinstance(targets, Mapping):
        return [[t, float(c)] for t, c in targets.items()]
    return list(targets or [])


__all__ = ["Targets", "TraceConfig", "targets_json"]
