"""ADAG's steering validation (Arora et al. 2026, §4.3): does a cluster of neurons do what its
description says? Multiply the cluster's neurons by a factor at every position and watch the
next-token distribution move.

- :func:`steering_patches` turns units (MLP neurons as ``(layer, neuron[, sign])``, node ids, or
  ready :class:`~adag.models.sites.Patch` selections) into ``scale`` Patches — the one hook
  mechanism of ``adag.models.sites``; nothing here installs hooks of its own.
- :func:`steer` runs every prompt unsteered and under every factor in batched ``last_only``
  forward passes and reports, per prompt and factor, how the target and top-k tokens' probabilities
  and logits moved and ``KL(unsteered || steered)``.
- :func:`summarise` turns that into ADAG's steering table: per label and factor, the change in the
  mean target probability with a bootstrap 95% CI, the share of prompts whose top target went down
  with a Wilson 95% interval, the mean KL.
- :func:`generate` / :func:`generate_ids`: greedy or sampled generation with the intervention held
  on every position, generated tokens included.

As in ADAG, a neuron is multiplied at all positions whatever the sign of its activation there, so
the sign of a ``(layer, neuron, sign)`` cluster unit is ignored: a cluster holding both signs of
one neuron scales it once.

>>> table = steer(model, ["The capital of France is"], [(3, 17), (5, 2, -1)], scale=(0, 2))
>>> summarise(table)                                   # one row per (label, factor)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.sites import Patch
from adag.nodes import parse, to_patch
from adag.tasks.prompts import PromptSpec, assemble_prompt

if TYPE_CHECKING:
    import pyarrow as pa

    from adag.models.model import Model

Unit = tuple[int, int] | tuple[int, int, int] | str | Patch
Units = Sequence[Unit]
"""MLP neurons as ``(layer, neuron)`` or ``(layer, neuron, sign)`` (a cluster's units; the sign is
ignored), node ids (``neuron:3:*:17``, ``neuron:3:5:17``, ``head:2:*:1:z``, ...; see
``adag.nodes``), or ``scale`` Patches on any site. A lone id, Patch or tuple is one unit."""

Prompt = str | PromptSpec | Sequence[int] | Tensor | np.ndarray
"""Token ids (as traced: ``Graph.prompt_ids``), a text (assembled by
:func:`adag.graphs.trace.assemble_prompt`) or a :class:`PromptSpec` (assembled with its seed)."""

Z95 = 1.959963984540054
"""The 97.5% quantile of the standard normal (two-sided 95% intervals)."""

_LIST_COLUMNS = {  # name -> element type ("i" int64, "s" string, "f" float64), in table order
    "target_ids": "i",
    "target_tokens": "s",
    "target_prob_base": "f",
    "target_dprob": "f",
    "target_logit_base": "f",
    "target_dlogit": "f",
    "top_ids_base": "i",
    "top_tokens_base": "s",
    "top_prob_base": "f",
    "top_dprob": "f",
    "top_dlogit": "f",
    "steered_top_ids": "i",
    "steered_top_tokens": "s",
    "steered_top_probs": "f",
}
_SCALAR_F64 = ("target_mean_prob_base", "target_mean_prob", "target_mean_dprob", "kl")


# ----------------------------------------------------------------------------------------------
# Units -> Patches


def _int(x: object, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise AdagError(f"{what} must be an integer, got {x!r}")
    return int(x)


def _is_unit_tuple(u: object) -> bool:
    return (
        isinstance(u, tuple)
        and len(u) in (2, 3)
        and all(isinstance(x, numbers.Integral) for x in u)
    )


def _as_units(units: Units | Unit) -> list[Unit]:
    if isinstance(units, (str, Patch)) or _is_unit_tuple(units):
        return [units]  # type: ignore[list-item]
    if not isinstance(units, Sequence) and not hasattr(units, "__iter__"):
        raise AdagError(
            f"units must be a list of (layer, neuron), node ids or Patches, got {units!r}"
        )
    out: list[Any] = list(units)  # type: ignore[arg-type]
    if not out:
        raise AdagError("no units to steer; give at least one (layer, neuron), node id or Patch")
    return out


def _check_node(model: Model, node_id: str) -> None:
    node = parse(node_id)
    if node.layer is not None and not 0 <= node.layer < model.n_layers:
        raise AdagError(
            f"node {node_id!r}: layer {node.layer} is out of range; the model has "
            f"{model.n_layers} layers (0..{model.n_layers - 1})"
        )
    if node.kind == "neuron" and node.index is not None and node.index >= model.d_mlp:
        raise AdagError(
            f"node {node_id!r}: neuron {node.index} is out of range; layers have {model.d_mlp} "
            f"neurons (0..{model.d_mlp - 1})"
        )
    if node.kind == "head" and node.index is not None:
        n = model.n_kv_heads if node.sub in ("k", "v") else model.n_heads
        if node.index >= n:
            raise AdagError(
                f"node {node_id!r}: head {node.index} is out of range; hook_{node.sub} has {n} "
                f"heads (0..{n - 1})"
            )


def steering_patches(model: Model, units: Units | Unit, factor: float) -> list[Patch]:
    """``scale`` Patches multiplying ``units`` by ``factor`` in every batch row.

    - ``(layer, neuron[, sign])`` tuples become node ids ``neuron:L:*:I`` (every position, the
      sign ignored) and go with the string ids through :func:`adag.nodes.to_patch`: one
      ``Patch(blocks.L.mlp.hook_post, factor, op="scale", index=[...])`` per layer (and per kind
      of position), each neuron once.
    - A ``Patch`` is a selection: it must have op ``"scale"`` and no ``batch`` selector (steering
      acts on every row); its value is replaced by ``factor`` (``dataclasses.replace``).

    Layers, neurons, heads and sites are checked against the model (one-line
    :class:`AdagError`)."""
    f = _factor(factor)
    ids: list[str] = []
    given: list[Patch] = []
    for u in _as_units(units):
        if isinstance(u, Patch):
            if u.op != "scale":
                raise AdagError(
                    f"steering Patch on {u.site} has op {u.op!r}; give op 'scale' Patches "
                    "(their value is replaced by each factor)"
                )
            if u.batch is not None:
                raise AdagError(
                    f"steering Patch on {u.site} selects batch rows; steering acts on every row, "
                    "drop batch="
                )
            if u.site not in model.site_name_set():
                raise AdagError(
                    f"unknown site {u.site!r} for this model; list them with Model.site_names()"
                )
            given.append(dataclasses.replace(u, value=f))
        elif isinstance(u, str):
            _check_node(model, u)
            ids.append(u)
        elif isinstance(u, tuple) and len(u) in (2, 3):
            layer = _int(u[0], f"unit {u!r}: the layer")
            neuron = _int(u[1], f"unit {u!r}: the neuron")
            if len(u) == 3:
                _int(u[2], f"unit {u!r}: the sign")
            if layer < 0 or neuron < 0:
                raise AdagError(f"unit {u!r}: layer and neuron must be non-negative")
            node_id = f"neuron:{layer}:*:{neuron}"
            _check_node(model, node_id)
            ids.append(node_id)
        else:
            raise AdagError(
                f"bad unit {u!r}: give (layer, neuron), (layer, neuron, sign), a node id such as "
                "'neuron:3:*:17', or a scale Patch"
            )
    return (to_patch(ids, "scale", f) if ids else []) + given


def _factor(x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise AdagError(f"steering factor must be a finite number, got {x!r}")
    return float(x)


def _positions(sel: Any) -> list[int]:
    if sel is None or isinstance(sel, slice):
        return []
    if isinstance(sel, numbers.Integral):
        return [int(sel)]
    return [int(v) for v in torch.as_tensor(sel).reshape(-1).tolist()]


def _check_positions(patches: Sequence[Patch], length: int, where: str) -> None:
    """Explicit positions must exist in a prompt of ``length`` tokens (else the forward would
    fail deep inside indexing)."""
    for p in patches:
        for v in _positions(p.pos) + _positions(p.k_pos):
            if not -length <= v < length:
                raise AdagError(
                    f"steering selects position {v} on {p.site}, but {where} has {length} tokens; "
                    "steer positions the prompt has, or every position ('*')"
                )


# ----------------------------------------------------------------------------------------------
# Prompts and targets


def _prompt_ids(model: Model, p: Prompt, chat: bool) -> tuple[list[int], str]:
    if isinstance(p, PromptSpec):
        text, ids = assemble_prompt(model, p.prompt, chat=chat, seed=p.seed)
        return list(ids), text
    if isinstance(p, str):
        text, ids = assemble_prompt(model, p, chat=chat)
        return list(ids), text
    row: Tensor = torch.as_tensor(p if isinstance(p, Tensor) else np.asarray(p)).reshape(-1)
    if row.numel() == 0:
        raise AdagError("a prompt has no tokens; give non-empty token ids")
    if row.is_floating_point() or row.dtype == torch.bool:
        raise AdagError(f"token ids must be integers, got dtype {row.dtype}")
    lo, hi = int(row.min()), int(row.max())
    if lo < 0 or hi >= model.d_vocab:
        raise AdagError(
            f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{model.d_vocab - 1})"
        )
    model.check_tokens(row[None])
    return [int(i) for i in row.tolist()], ""


def _as_prompts(prompts: Sequence[Prompt] | Prompt) -> list[Prompt]:
    if isinstance(prompts, (Tensor, np.ndarray)) and prompts.ndim == 2:
        return list(prompts)  # a (batch, pos) block of token ids: one prompt a row
    if isinstance(prompts, (str, PromptSpec, Tensor, np.ndarray)):
        return [prompts]
    out: list[Any] = list(prompts)
    if out and all(isinstance(x, numbers.Integral) for x in out):
        return [out]  # one prompt given as a flat list of token ids
    if not out:
        raise AdagError("no prompts given; pass a prompt or a non-empty list of prompts")
    return out


def _decoder(model: Model) -> Any:
    tok = model.tokenizer
    if tok is None:
        return str
    return lambda i: tok.decode([i])


# ----------------------------------------------------------------------------------------------
# steer


def steer(
    model: Model,
    prompts: Sequence[Prompt] | Prompt,
    units: Units | Unit,
    *,
    scale: Sequence[float] | float = (0.0, 2.0),
    targets: Sequence[Sequence[int]] | None = None,
    k: int = 5,
    chat: bool = False,
    batch_size: int = 16,
    label: str = "",
) -> pa.Table:
    """Multiply ``units`` (see :data:`Units`) by each factor of ``scale`` at every position and
    compare the next-token distribution at each prompt's last position with the unsteered one.

    ``prompts``: token ids (a ``batch pos`` tensor is one prompt a row), texts (assembled with
    ``chat``) or :class:`PromptSpec` s (with their seed); a lone prompt is a list of one.
    ``chat`` applies to texts only (token ids are taken as already assembled). ``targets``: one list of token ids per prompt (a graph's ``target_ids``); default each
    prompt's unsteered top-``k``. Prompts of equal length run together, ``batch_size`` rows per
    forward pass, one pass per factor plus one unsteered (``last_only``, no gradients). A factor of
    1 reproduces the unsteered logits bit for bit.

    Returns a pyarrow table with **one row per (prompt, factor)**, in prompt order then ``scale``
    order; list columns hold one entry per token. Probabilities come from a float64
    ``log_softmax`` of the logits; ``d`` columns are steered minus unsteered.

    ======================  ==============  ==================================================
    column                  type            meaning
    ======================  ==============  ==================================================
    ``label``               string          ``label`` (e.g. the cluster's name)
    ``prompt``              int64           index of the prompt in ``prompts``
    ``text``                string          the assembled text ("" for token ids)
    ``n_tokens``            int64           prompt length
    ``factor``              float64         the steering factor
    ``target_ids``          list<int64>     the targets (first = "top target")
    ``target_tokens``       list<string>    their decoded text (the id without a tokenizer)
    ``target_prob_base``    list<float64>   unsteered probability of each target
    ``target_dprob``        list<float64>   its change under steering
    ``target_logit_base``   list<float64>   unsteered logit of each target
    ``target_dlogit``       list<float64>   its change
    ``top_ids_base``        list<int64>     the unsteered top-``k`` tokens
    ``top_tokens_base``     list<string>    their text
    ``top_prob_base``       list<float64>   their unsteered probabilities
    ``top_dprob``           list<float64>   the change of their probabilities
    ``top_dlogit``          list<float64>   the change of their logits
    ``steered_top_ids``     list<int64>     the steered top-``k`` tokens
    ``steered_top_tokens``  list<string>    their text
    ``steered_top_probs``   list<float64>   their steered probabilities
    ``target_mean_prob_base``  float64      mean unsteered probability of the targets
    ``target_mean_prob``    float64         mean steered probability of the targets
    ``target_mean_dprob``   float64         the difference (what :func:`summarise` averages)
    ``kl``                  float64         ``KL(unsteered || steered)`` in nats
    ======================  ==============  ==================================================
    """
    scales: list[Any] = [scale] if isinstance(scale, numbers.Real) else list(scale)  # type: ignore[arg-type]
    factors = [_factor(s) for s in scales]
    if not factors:
        raise AdagError("no steering factors; give a non-empty scale list such as 0,2")
    k = _int(k, "k")
    if not 1 <= k <= model.d_vocab:
        raise AdagError(f"k must be between 1 and the vocabulary size {model.d_vocab}, got {k}")
    batch_size = _int(batch_size, "batch_size")
    if batch_size < 1:
        raise AdagError(f"batch_size must be at least 1, got {batch_size}")
    items = _as_prompts(prompts)
    prepared = [_prompt_ids(model, p, chat) for p in items]
    if targets is not None:
        targets = list(targets)
        if len(targets) != len(items):
            raise AdagError(f"got {len(targets)} target lists for {len(items)} prompts")
        tgt: list[list[int] | None] = []
        for i, t in enumerate(targets):
            ids = [int(x) for x in torch.as_tensor(np.asarray(t)).reshape(-1).tolist()]
            if not ids:
                raise AdagError(f"prompt {i}: the target list is empty; give at least one token id")
            bad = [x for x in ids if not 0 <= x < model.d_vocab]
            if bad:
                raise AdagError(
                    f"prompt {i}: target id {bad[0]} is outside the vocabulary "
                    f"(0..{model.d_vocab - 1})"
                )
            tgt.append(ids)
    else:
        tgt = [None] * len(items)
    per_factor = [steering_patches(model, units, f) for f in factors]
    for i, (ids, _) in enumerate(prepared):
        _check_positions(per_factor[0], len(ids), f"prompt {i}")

    by_len: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(prepared):
        by_len.setdefault(len(ids), []).append(i)
    decode = _decoder(model)
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    with torch.no_grad():
        for members in by_len.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                tokens = torch.tensor([prepared[i][0] for i in chunk], device=model.device)
                base = model(tokens, last_only=True)[:, -1]  # (B, V)
                for fi, patches in enumerate(per_factor):
                    with model.sites(patches=patches):
                        steered = model(tokens, last_only=True)[:, -1]  # (B, V)
                    for r, i in enumerate(chunk):
                        rows[i, fi] = _compare(base[r], steered[r], tgt[i], k, decode)
                        rows[i, fi].update(
                            prompt=i,
                            text=prepared[i][1],
                            n_tokens=len(prepared[i][0]),
                            factor=factors[fi],
                        )
    order = [rows[i, fi] for i in range(len(items)) for fi in range(len(factors))]
    return _table([dict(r, label=label) for r in order])


def _compare(
    base: Tensor, steered: Tensor, targets: list[int] | None, k: int, decode: Any
) -> dict[str, Any]:
    """The comparison of one row's unsteered and steered logits (``d_vocab``), in float64."""
    lb, ls = base.double().cpu(), steered.double().cpu()
    logp_b, logp_s = lb.log_softmax(-1), ls.log_softmax(-1)
    p_b, p_s = logp_b.exp(), logp_s.exp()
    # KL(p_b || p_s) = Σ p_b (log p_b − log p_s); tokens with p_b = 0 add nothing
    kl = torch.where(p_b > 0, p_b * (logp_b - logp_s), torch.zeros_like(p_b)).sum()
    top = p_b.topk(k).indices
    s_top = p_s.topk(k)
    t = torch.tensor(targets, dtype=torch.long) if targets is not None else top
    ids, top_ids, s_ids = t.tolist(), top.tolist(), s_top.indices.tolist()
    return {
        "target_ids": ids,
        "target_tokens": [decode(i) for i in ids],
        "target_prob_base": p_b[t].tolist(),
        "target_dprob": (p_s[t] - p_b[t]).tolist(),
        "target_logit_base": lb[t].tolist(),
        "target_dlogit": (ls[t] - lb[t]).tolist(),
        "top_ids_base": top_ids,
        "top_tokens_base": [decode(i) for i in top_ids],
        "top_prob_base": p_b[top].tolist(),
        "top_dprob": (p_s[top] - p_b[top]).tolist(),
        "top_dlogit": (ls[top] - lb[top]).tolist(),
        "steered_top_ids": s_ids,
        "steered_top_tokens": [decode(i) for i in s_ids],
        "steered_top_probs": s_top.values.tolist(),
        "target_mean_prob_base": float(p_b[t].mean()),
        "target_mean_prob": float(p_s[t].mean()),
        "target_mean_dprob": float(p_s[t].mean() - p_b[t].mean()),
        "kl": float(kl),
    }


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    def col(name: str) -> list[Any]:
        return [r[name] for r in rows]

    cols: dict[str, pa.Array] = {
        "label": pa.array(col("label"), type=pa.string()),
        "prompt": pa.array(col("prompt"), type=pa.int64()),
        "text": pa.array(col("text"), type=pa.string()),
        "n_tokens": pa.array(col("n_tokens"), type=pa.int64()),
        "factor": pa.array(col("factor"), type=pa.float64()),
    }
    kinds = {"i": pa.int64(), "s": pa.string(), "f": pa.float64()}
    for name, kind in _LIST_COLUMNS.items():
        cols[name] = pa.array(col(name), type=pa.list_(kinds[kind]))
    for name in _SCALAR_F64:
        cols[name] = pa.array(col(name), type=pa.float64())
    return pa.table(cols)


# ----------------------------------------------------------------------------------------------
# summarise


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / n`` (``(nan, nan)`` for
    ``n = 0``): ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(table: pa.Table, *, n_boot: int = 1000, seed: int = 0) -> pa.Table:
    """ADAG's steering table from a :func:`steer` table (several may be concatenated, one
    ``label`` each): one row per (label, factor), in order of first appearance.

    ==================  =======  ==============================================================
    column              type     meaning
    ==================  =======  ==============================================================
    ``label``           string   the steering label (e.g. the cluster)
    ``factor``          float64  the factor
    ``n``               int64    number of prompts
    ``prob_base``       float64  mean over prompts of the unsteered mean target probability
    ``prob``            float64  the same under steering
    ``dprob``           float64  mean over prompts of the change in mean target probability
    ``dprob_lo/_hi``    float64  its 95% percentile-bootstrap CI (``n_boot`` resamples of the
                                 prompts, ``numpy.random.default_rng(seed)``)
    ``n_down``          int64    prompts whose top target's (first target's) probability went
                                 down
    ``share_down``      float64  ``n_down / n``
    ``down_lo/_hi``     float64  its Wilson 95% interval (:func:`wilson`)
    ``kl``              float64  mean ``KL(unsteered || steered)``
    ==================  =======  ==============================================================
    """
    import pyarrow as pa

    n_boot = _int(n_boot, "n_boot")
    if n_boot < 1:
        raise AdagError(f"n_boot must be at least 1, got {n_boot}")
    need = {"label", "factor", "target_dprob", "target_mean_prob_base", "target_mean_prob"}
    need |= {"target_mean_dprob", "kl"}
    missing = sorted(need - set(table.column_names))
    if missing:
        raise AdagError(
            f"not a steering table (missing columns {missing}); pass what steer returns"
        )
    if table.num_rows == 0:
        raise AdagError("the steering table is empty; steer some prompts first")
    d = table.to_pydict()
    groups: dict[tuple[str, float], list[int]] = {}
    for r, key in enumerate(zip(d["label"], d["factor"], strict=True)):
        groups.setdefault(key, []).append(r)
    rng = np.random.default_rng(seed)
    out: dict[str, list[Any]] = {
        c: []
        for c in (
            "label",
            "factor",
            "n",
            "prob_base",
            "prob",
            "dprob",
            "dprob_lo",
            "dprob_hi",
            "n_down",
            "share_down",
            "down_lo",
            "down_hi",
            "kl",
        )
    }
    for (label, factor), rs in groups.items():
        delta = np.array([d["target_mean_dprob"][r] for r in rs], dtype=np.float64)
        n = len(rs)
        boot = delta[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        down = sum(1 for r in rs if d["target_dprob"][r][0] < 0)
        w_lo, w_hi = wilson(down, n)
        out["label"].append(label)
        out["factor"].append(factor)
        out["n"].append(n)
        out["prob_base"].append(float(np.mean([d["target_mean_prob_base"][r] for r in rs])))
        out["prob"].append(float(np.mean([d["target_mean_prob"][r] for r in rs])))
        out["dprob"].append(float(delta.mean()))
        out["dprob_lo"].append(float(lo))
        out["dprob_hi"].append(float(hi))
        out["n_down"].append(down)
        out["share_down"].append(down / n)
        out["down_lo"].append(w_lo)
        out["down_hi"].append(w_hi)
        out["kl"].append(float(np.mean([d["kl"][r] for r in rs])))
    types_ = {"label": pa.string(), "n": pa.int64(), "n_down": pa.int64()}
    return pa.table({c: pa.array(v, type=types_.get(c, pa.float64())) for c, v in out.items()})


# ----------------------------------------------------------------------------------------------
# Steered generation

Steer = tuple[Units | Unit, float] | Sequence[Patch]


def _generation_patches(model: Model, steer: Steer | None) -> list[Patch]:
    if steer is None:
        return []
    if isinstance(steer, Patch):
        return [steer]
    if (
        isinstance(steer, tuple)
        and len(steer) == 2
        and not isinstance(steer[0], Patch)
        and isinstance(steer[1], numbers.Real)
        and not _is_unit_tuple(steer)
    ):
        return steering_patches(model, steer[0], steer[1])
    given: list[Any] = list(steer)  # type: ignore[arg-type]
    patches = [p for p in given if isinstance(p, Patch)]
    if len(patches) != len(given) or not patches:
        raise AdagError(
            "steer= takes (units, factor), e.g. ([(3, 17)], 0.0), or a non-empty list of Patches"
        )
    for p in patches:
        if p.site not in model.site_name_set():
            raise AdagError(
                f"unknown site {p.site!r} for this model; list them with Model.site_names()"
            )
    return patches


def _eos_ids(model: Model) -> set[int]:
    out: set[int] = set()
    cands = [
        getattr(model.tokenizer, "eos_token_id", None),
        getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None),
    ]
    for c in cands:
        if isinstance(c, numbers.Integral):
            out.add(int(c))
        elif isinstance(c, (list, tuple)):
            out.update(int(x) for x in c)
    return out


def generate_ids(
    model: Model,
    prompt: Prompt,
    *,
    steer: Steer | None = None,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> list[int]:
    """The new token ids of :func:`generate` (works without a tokenizer, from token ids).

    Each step re-runs the whole sequence under the patches (``last_only``, no KV cache), so the
    intervention acts on every position — the prompt's and every generated token's — exactly as
    in :func:`steer`. Stops after ``max_new_tokens``, at an EOS token (not returned) or when the
    model's context is full."""
    max_new_tokens = _int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise AdagError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(float(temperature))
        or temperature < 0
    ):
        raise AdagError(f"temperature must be a finite number >= 0, got {temperature!r}")
    seed = _int(seed, "seed")
    patches = _generation_patches(model, steer)
    items = _as_prompts(prompt)
    if len(items) != 1:
        raise AdagError(f"generate takes one prompt, got {len(items)}")
    ids, _ = _prompt_ids(model, items[0], chat)
    _check_positions(patches, len(ids), "the prompt")
    eos = _eos_ids(model)
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if model.n_ctx is not None and len(ids) >= model.n_ctx:
                break
            tokens = torch.tensor([ids], device=model.device)
            with model.sites(patches=patches):
                logits = model(tokens, last_only=True)[0, -1]  # (V,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = (logits.double().cpu() / float(temperature)).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt in eos:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


def generate(
    model: Model,
    prompt: Prompt,
    *,
    steer: Steer | None = None,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """Generate from ``prompt`` (a text assembled with ``chat``, a :class:`PromptSpec`, or token
    ids) with ``steer`` held on every position, and return the new text (prompt excluded).

    ``steer``: ``(units, factor)`` (as :func:`steering_patches`) or a list of Patches used as
    given; None generates plainly. ``temperature`` 0 is greedy (argmax); above 0 samples from
    ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded by ``seed``."""
    tok = model.tok()
    new = generate_ids(
        model,
        prompt,
        steer=steer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        chat=chat,
    )
    return str(tok.decode(new))


# ``adag.steer`` is both this package and its verb (DESIGN.md's front door): once the package is
# imported, the attribute ``adag.steer`` is the module, so the module is made callable as
# :func:`steer` and ``adag.steer(model, prompts, units)`` works either way.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> pa.Table:
        return steer(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

# feature interventions (transcoders); the name ``intervene`` is the function, not the submodule
from adag.steer.intervene import generate_with_features, intervene  # noqa: E402

__all__ = [
    "Prompt",
    "Unit",
    "Units",
    "generate",
    "generate_ids",
    "generate_with_features",
    "intervene",
    "steer",
    "steering_patches",
    "summarise",
    "wilson",
]
