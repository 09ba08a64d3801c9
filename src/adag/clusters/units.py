"""Clustering units and their per-prompt profiles (ADAG, Arora et al. 2026, §3.2).

ADAG clusters *units*, not graph nodes: a unit is ``(layer, neuron index, sign of the
activation)``. A neuron that fires positively on one prompt and negatively on another is two
units, because its two signs push the logits in opposite directions. On one prompt, a unit's
profiles are the normalised attribution profiles of :mod:`adag.profiles` (input: ``input_attr``
divided by the neuron's activation; output: ``output_attr`` divided by each target's logit),
summed over the positions where that ``(layer, neuron, sign)`` is a node of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adag.errors import AdagError
from adag.graphs.graph import Graph

Unit = tuple[int, int, int]
"""``(layer, neuron index, sign of the activation: +1 or -1)``."""

_SIGNS = {"+": 1, "-": -1}


def unit_name(u: Unit) -> str:
    """``(12, 873, 1)`` -> ``"12:873:+"``."""
    layer, index, sign = u
    return f"{int(layer)}:{int(index)}:{'+' if sign > 0 else '-'}"


def parse_unit(s: str) -> Unit:
    """``"12:873:+"`` -> ``(12, 873, 1)``; a one-line :class:`AdagError` for anything else."""
    parts = str(s).strip().split(":")
    try:
        if len(parts) != 3 or parts[2] not in _SIGNS:
            raise ValueError
        layer, index = int(parts[0]), int(parts[1])
        if layer < 0 or index < 0:
            raise ValueError
    except ValueError:
        raise AdagError(
            f"bad unit name {s!r}; a unit is LAYER:NEURON:SIGN, e.g. 12:873:+ or 3:5:-"
        ) from None
    return (layer, index, _SIGNS[parts[2]])


@dataclass(eq=False)
class PromptUnits:
    """One prompt's units and their summed normalised profiles.

    ``units[i]`` (sorted, unique) has the input profile ``inputs[i]`` (``(T',)``: one entry per
    prompt position the graph kept, i.e. all ``T`` positions except the graph's
    ``settings["excluded_positions"]`` such as a leading BOS — the input side of
    :func:`adag.profile`) and the output profile ``outputs[i]`` (a row of the ``(n, K)`` array,
    one entry per target of the graph, in the graph's target order).
    """

    units: list[Unit]
    inputs: list[np.ndarray]
    """n arrays of shape (T',): Σ over the unit's nodes of ``input_attr / activation``"""
    outputs: np.ndarray
    """(n, K): Σ over the unit's nodes of ``output_attr / target_logits``"""
    prompt_id: str = ""

    def __post_init__(self) -> None:
        n = len(self.units)
        self.outputs = np.asarray(self.outputs, dtype=np.float64)
        if self.outputs.ndim == 1 and n == 0:
            self.outputs = self.outputs.reshape(0, 0)
        if len(self.inputs) != n or self.outputs.ndim != 2 or len(self.outputs) != n:
            raise AdagError(
                f"PromptUnits of prompt {self.prompt_id!r} has {n} units, {len(self.inputs)} "
                f"input profiles and outputs of shape {self.outputs.shape}; they must agree"
            )


def prompt_units(graph: Graph, prompt_id: str = "") -> PromptUnits:
    """The units of ``graph``'s neuron nodes with their profiles summed per unit (see the module
    docstring). A zero activation counts as positive; its input profile is taken as 0 (it has no
    defined ratio), as is the output entry of a target whose logit is exactly 0.

    Transcoder features are not units yet (only ``neuron`` nodes are read).
    """
    rows = np.flatnonzero(graph.mask("neuron"))
    excluded = set(int(p) for p in graph.settings.get("excluded_positions", []))
    pos = np.array([p for p in range(len(graph.prompt_ids)) if p not in excluded], dtype=np.int64)
    K = len(graph.target_ids)
    if not len(rows):
        return PromptUnits([], [], np.zeros((0, K)), prompt_id=prompt_id)
    act = graph.node_activation[rows].astype(np.float64)
    logits = graph.target_logits.astype(np.float64)
    raw_in = graph.input_attr[rows][:, pos].astype(np.float64)  # (n_rows, T')
    raw_out = graph.output_attr[rows].astype(np.float64)  # (n_rows, K)
    # np.divide with `where` keeps 0 where the denominator is 0 instead of inf/nan
    norm_in = np.divide(raw_in, act[:, None], out=np.zeros_like(raw_in), where=act[:, None] != 0)
    norm_out = np.divide(
        raw_out, logits[None, :], out=np.zeros_like(raw_out), where=logits[None, :] != 0
    )
    keys = list(
        zip(
            graph.node_layer[rows].tolist(),
            graph.node_index[rows].tolist(),
            np.where(act < 0, -1, 1).tolist(),
            strict=True,
        )
    )
    units = sorted(set(keys))
    slot = {u: i for i, u in enumerate(units)}
    which = np.array([slot[k] for k in keys], dtype=np.int64)
    inputs = np.zeros((len(units), len(pos)))
    outputs = np.zeros((len(units), K))
    np.add.at(inputs, which, norm_in)
    np.add.at(outputs, which, norm_out)
    return PromptUnits(
        units=[(int(a), int(b), int(c)) for a, b, c in units],
        inputs=list(inputs),
        outputs=outputs,
        prompt_id=prompt_id,
    )


__all__ = ["PromptUnits", "Unit", "parse_unit", "prompt_units", "unit_name"]
