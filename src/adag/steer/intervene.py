"""Interventions on transcoder features: set, scale or zero features at positions and watch the
next-token distribution move (Ameisen et al. 2025, "Circuit Tracing", §2.5 and the
"constrained" interventions of circuit-tracer's ``ReplacementModel.feature_intervention``).

Interventions are ``{node id: value}`` with node ids ``feature:L:P:I`` (:mod:`adag.nodes`; ``P``
``*`` = every position of the prompt, and in :func:`generate_with_features` every generated
position too). A value is

- a number ``v``: set the activation to ``v`` (``0`` zeroes the feature);
- ``("scale", s)``: multiply the activation the feature has at that point of the intervened run;
- ``("set", v)`` / ``("add", v)``: set it / add ``v`` to it.

Entries are applied in the mapping's order, each to the value the previous ones left (``*`` with
a scale, then ``P`` set, sets at ``P``).

**Modes** (``x_l`` is layer ``l``'s MLP input, ``a_l`` its features, ``err_l`` the error of
:mod:`adag.graphs.features`, taken from the clean run):

- ``constrained=True`` — the local replacement model of the feature graphs: attention patterns
  and norm scales frozen at their clean values, every layer's MLP output replaced by
  ``Σ_s decode_{s→l}(a_s) + b_dec_l (+ W_skip x_l) + err_l`` with the clean ``err_l`` (a layer
  without transcoders keeps its clean MLP output). The intervened features hold their values;
  every other feature is recomputed from its live MLP input (``act(W_enc x + b_enc)``), so
  features downstream respond through the transcoders. The final-logit softcap, where the model
  has one, is live.
- ``constrained=True, freeze_features=True`` — as above with every non-intervened feature held at
  its clean activation: only direct effects (through the residual stream, attention's OV circuit
  and skip weights) reach the logits. This is circuit-tracer's
  ``feature_intervention(..., constrained_layers=range(n_layers))`` (which freezes the MLP outputs
  and adds the decoded change), and it is the setting in which a feature graph's edge into a logit
  is exact: zeroing feature ``s`` changes the (pre-softcap) logit ``t`` by ``-A[t, s]`` with
  ``A = Graph.adjacency("raw")``.
- ``constrained=False`` (free) — the real model, everything live (attention, norms, MLPs); at each
  intervened source layer ``s`` the features are encoded from the live ``x_s`` and the change
  ``δ_s = a_s(intervened) − a_s(live)`` is decoded into the MLP output of every layer ``s``
  writes to: ``mlp_out_l = real mlp_out_l + Σ_s δ_s W_dec[s→l]`` (``b_dec``, the skip term and
  the error cancel). With ``freeze_attention=True`` the attention patterns are held at their
  clean values (circuit-tracer's unconstrained ``feature_intervention`` default,
  ``freeze_attention=True``); norms and MLPs stay live.

>>> out = intervene(model, "The capital of France is", tc, {"feature:3:*:17": 0.0})
>>> out["target_dlogit"]                      # change of each target logit
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.ops import norm_apply
from adag.models.sites import Session
from adag.nodes import parse

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.models.specs import NormKind
    from adag.steer import Prompt
    from adag.transcoders import Transcoders

Value = float | tuple[str, float]
"""A number (set the activation) or ``(op, number)`` with op ``set``, ``scale`` or ``add``."""

Mode = Literal["constrained", "frozen", "free"]
OPS = ("set", "scale", "add")


@dataclass(frozen=True)
class FeatureEdit:
    """One parsed intervention: feature ``index`` of ``layer`` at ``pos`` (None: every
    position) gets ``op`` with ``value``."""

    node: str
    layer: int
    pos: int | None
    index: int
    op: str
    value: float

    def apply(self, a: Tensor) -> None:
        """Edit ``a`` (``batch pos d_features``) in place."""
        sel = (slice(None), slice(None) if self.pos is None else self.pos, self.index)
        if self.op == "set":
            a[sel] = self.value
        elif self.op == "scale":
            a[sel] = a[sel] * self.value
        else:
            a[sel] = a[sel] + self.value


def _number(x: object, node: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise AdagError(f"intervention on {node!r}: the value must be a finite number, got {x!r}")
    return float(x)


def parse_interventions(
    model: Model, transcoders: Transcoders, interventions: Mapping[str, Value]
) -> list[FeatureEdit]:
    """The :class:`FeatureEdit` s of ``interventions`` in order; every id, layer, feature and
    value checked (one-line :class:`AdagError`). Positions are checked against a prompt by
    :func:`check_positions`."""
    if not isinstance(interventions, Mapping) or not interventions:
        raise AdagError("no interventions; give {node id: value} such as {'feature:3:*:17': 0.0}")
    out = []
    for node_id, value in interventions.items():
        node = parse(node_id)
        if node.kind != "feature":
            raise AdagError(
                f"intervention on {node_id!r}: only transcoder features can be intervened on; "
                "give feature:LAYER:POS:INDEX"
            )
        assert node.layer is not None and node.index is not None
        if node.layer >= model.n_layers:
            raise AdagError(
                f"intervention on {node_id!r}: layer {node.layer} is out of range; the model has "
                f"{model.n_layers} layers (0..{model.n_layers - 1})"
            )
        if node.layer not in transcoders.layers:
            raise AdagError(
                f"intervention on {node_id!r}: the transcoders have no layer {node.layer} (they "
                f"cover layers {transcoders.layers})"
            )
        if node.index >= transcoders.d_features:
            raise AdagError(
                f"intervention on {node_id!r}: feature {node.index} is out of range; layers have "
                f"{transcoders.d_features} features (0..{transcoders.d_features - 1})"
            )
        if isinstance(value, tuple):
            if len(value) != 2 or value[0] not in OPS:
                raise AdagError(
                    f"intervention on {node_id!r}: {value!r} is not (op, number) with op one of "
                    f"{', '.join(OPS)}"
                )
            op, v = value[0], _number(value[1], node_id)
        else:
            op, v = "set", _number(value, node_id)
        out.append(FeatureEdit(node_id, node.layer, node.pos, node.index, op, v))
    return out


def check_positions(edits: Sequence[FeatureEdit], n_pos: int) -> None:
    for e in edits:
        if e.pos is not None and e.pos >= n_pos:
            raise AdagError(
                f"intervention on {e.node!r}: position {e.pos} is past the prompt's {n_pos} "
                "tokens; use a position the prompt has, or '*'"
            )


class FeatureSplice(Session):
    """The intervened forward pass of one mode (see the module docstring). ``clean`` holds the
    clean run's ``hook_scale`` sites, ``blocks.L.attn.hook_pattern`` and, per layer, ``act:L``
    (features, ``1 pos d_features``) and ``err:L`` (the error; the whole MLP output of a layer
    without transcoders); the free mode needs none of it."""

    def __init__(
        self,
        tc: Transcoders,
        edits: Sequence[FeatureEdit],
        mode: Mode,
        clean: Mapping[str, Tensor] | None = None,
        *,
        freeze_attention: bool = False,
    ) -> None:
        self.tc, self.mode, self.clean = tc, mode, clean
        self.freeze_attention = freeze_attention or mode != "free"
        self.edits: dict[int, list[FeatureEdit]] = {}
        for e in edits:
            self.edits.setdefault(e.layer, []).append(e)
        self.inputs: dict[int, Tensor] = {}
        self.acts: dict[int, Tensor] = {}
        self.live: dict[int, Tensor] = {}
        self.delta: dict[int, Tensor] = {}

    def _clean(self, key: str, like: Tensor) -> Tensor:
        assert self.clean is not None
        v = self.clean[key].to(like.dtype)
        return v.expand(like.shape[0], *v.shape[1:])

    def site(self, name: str, x: Tensor) -> Tensor:
        if not name.startswith("blocks."):
            return x
        _, layer_s, rest = name.split(".", 2)
        if rest == "mlp.hook_in":
            self._encode(int(layer_s), x)
        elif rest == "hook_mlp_out":
            return self._replace(int(layer_s), x)
        return x

    def _encode(self, layer: int, x: Tensor) -> None:
        self.inputs[layer] = x
        if layer not in self.tc.layers or (self.mode == "free" and layer not in self.edits):
            return
        # (B, T, F): the features as the run would have them
        frozen = self.mode == "frozen"
        live = self._clean(f"act:{layer}", x) if frozen else self.tc.encode(layer, x)
        a = live.clone()
        for e in self.edits.get(layer, []):
            e.apply(a)
        self.live[layer], self.acts[layer] = live, a
        if self.mode == "free":
            self.delta[layer] = a - live

    def _replace(self, layer: int, x: Tensor) -> Tensor:
        tc = self.tc
        if self.mode == "free":
            for s, d in self.delta.items():
                if layer in tc.targets(s):
                    x = x + d @ tc.decoder(s, layer)
            return x
        err = self._clean(f"err:{layer}", x)
        if layer not in tc.layers:
            return err
        return tc.decode(self.acts, layer, x=self.inputs.get(layer)) + err

    def pattern(self, layer: int, pattern: Tensor) -> Tensor:
        if not self.freeze_attention:
            return pattern
        return self._clean(f"blocks.{layer}.attn.hook_pattern", pattern).expand_as(pattern)

    def norm(
        self, point: str, kind: NormKind, module: torch.nn.Module, x: Tensor, out: Tensor
    ) -> Tensor:
        if self.mode == "free":
            return out
        assert self.clean is not None
        return norm_apply(kind, module, x, self.clean[f"{point}.hook_scale"])


def clean_state(
    model: Model, transcoders: Transcoders, tokens: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """One clean forward of ``tokens`` (``1 pos``): the last position's logits ``(d_vocab,)`` and
    what :class:`FeatureSplice` freezes (``hook_scale`` sites, attention patterns, ``act:L``,
    ``err:L``)."""
    n = model.n_layers
    scales = [s for s in model.site_names() if s.endswith("hook_scale")]
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n)]
    ins = [f"blocks.{layer}.mlp.hook_in" for layer in transcoders.layers]
    outs = [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]
    logits, cache = model.run_with_cache(tokens, [*scales, *patterns, *ins, *outs])
    clean = {name: cache[name] for name in [*scales, *patterns]}
    acts: dict[int, Tensor] = {}
    with torch.no_grad():
        for layer in transcoders.layers:
            acts[layer] = transcoders.encode(layer, cache[f"blocks.{layer}.mlp.hook_in"])
            clean[f"act:{layer}"] = acts[layer]
        for layer in range(n):
            out = cache[f"blocks.{layer}.hook_mlp_out"]
            if layer in transcoders.layers:
                x = cache[f"blocks.{layer}.mlp.hook_in"]
                out = out - transcoders.decode(acts, layer, x=x)
            clean[f"err:{layer}"] = out
    return logits[0, -1], clean


def _tokens_info(model: Model, ids: Sequence[int], logits: Tensor) -> list[dict[str, Any]]:
    from adag.steer import _decoder

    decode = _decoder(model)
    lp = logits.double().log_softmax(-1)
    return [
        {"id": i, "token": decode(i), "prob": float(lp[i].exp()), "logit": float(logits[i])}
        for i in ids
    ]


def intervene(
    model: Model,
    prompt: Prompt,
    transcoders: Transcoders,
    interventions: Mapping[str, Value],
    *,
    constrained: bool = True,
    freeze_features: bool = False,
    freeze_attention: bool = False,
    targets: Sequence[int] | None = None,
    k: int = 5,
    chat: bool = False,
) -> dict[str, Any]:
    """Run ``prompt`` with ``interventions`` on transcoder features (see the module docstring
    for ids, values and modes) and compare the last position's next-token distribution with the
    clean run's (the model's own logits, which the replacement model reproduces).

    ``prompt``: token ids, a text (assembled with ``chat``) or a ``PromptSpec``. ``targets``:
    token ids to report (a feature graph's ``target_ids``); default the clean top-``k``.
    ``freeze_features`` (constrained only): hold every other feature at its clean value.
    ``freeze_attention`` (free mode; the constrained modes always freeze): hold the attention
    patterns at their clean values, as circuit-tracer's unconstrained interventions do.

    Returns a dict:

    ====================  ====================================================================
    ``mode``              ``"constrained"``, ``"frozen"`` (``freeze_features``) or ``"free"``
    ``ids``               the prompt's token ids
    ``logits_before``     clean last-position logits ``(d_vocab,)``
    ``logits_after``      intervened last-position logits ``(d_vocab,)``
    ``top_before``        the clean top-``k``: dicts ``id, token, prob, logit``
    ``top_after``         the intervened top-``k``
    ``target_ids``        the targets
    ``target_logit_before``, ``target_dlogit``, ``target_prob_before``, ``target_dprob``:
                          float64 arrays, one entry per target (``d``: after minus before)
    ``kl``                ``KL(before || after)`` in nats
    ``features``          per intervention: ``node``, ``op``, ``value``, ``before`` and
                          ``after`` (the feature's activation at its positions, ``(pos,)``
                          float64 arrays; ``before`` is the clean value)
    ====================  ====================================================================
    """
    from adag.steer import _as_prompts, _int, _prompt_ids

    transcoders.check(model, all_layers=False)
    edits = parse_interventions(model, transcoders, interventions)
    k = _int(k, "k")
    if not 1 <= k <= model.d_vocab:
        raise AdagError(f"k must be between 1 and the vocabulary size {model.d_vocab}, got {k}")
    if freeze_features and not constrained:
        raise AdagError("freeze_features needs constrained=True (features are live in free mode)")
    items = _as_prompts(prompt)
    if len(items) != 1:
        raise AdagError(f"intervene takes one prompt, got {len(items)}")
    ids, _ = _prompt_ids(model, items[0], chat)
    check_positions(edits, len(ids))
    tokens = torch.tensor([ids], device=model.device)
    mode: Mode = ("frozen" if freeze_features else "constrained") if constrained else "free"
    with torch.no_grad():
        before, clean = clean_state(model, transcoders, tokens)
        splice = FeatureSplice(
            transcoders,
            edits,
            mode,
            None if mode == "free" and not freeze_attention else clean,
            freeze_attention=freeze_attention,
        )
        with model.session(splice):
            after = model(tokens, last_only=True)[0, -1]
    if targets is None:
        tgt = [int(i) for i in before.topk(k).indices.tolist()]
    else:
        tgt = [_int(t, "target id") for t in targets]
        bad = [t for t in tgt if not 0 <= t < model.d_vocab]
        if bad:
            raise AdagError(
                f"target id {bad[0]} is outside the vocabulary (0..{model.d_vocab - 1})"
            )
    lp0, lp1 = before.double().log_softmax(-1), after.double().log_softmax(-1)
    t = torch.tensor(tgt, dtype=torch.long, device=before.device)
    feats = []
    for e in edits:
        sel = slice(None) if e.pos is None else slice(e.pos, e.pos + 1)
        feats.append(
            {
                "node": e.node,
                "op": e.op,
                "value": e.value,
                "before": clean[f"act:{e.layer}"][0, sel, e.index].double().cpu().numpy(),
                "after": splice.acts[e.layer][0, sel, e.index].double().cpu().numpy(),
            }
        )
    return {
        "mode": mode,
        "ids": ids,
        "logits_before": before,
        "logits_after": after,
        "top_before": _tokens_info(model, before.topk(k).indices.tolist(), before),
        "top_after": _tokens_info(model, after.topk(k).indices.tolist(), after),
        "target_ids": tgt,
        "target_logit_before": before[t].double().cpu().numpy(),
        "target_dlogit": (after[t].double() - before[t].double()).cpu().numpy(),
        "target_prob_before": lp0[t].exp().cpu().numpy(),
        "target_dprob": (lp1[t].exp() - lp0[t].exp()).cpu().numpy(),
        "kl": float((lp0.exp() * (lp0 - lp1)).sum()),
        "features": feats,
    }


def generate_with_features(
    model: Model,
    prompt: Prompt,
    transcoders: Transcoders,
    interventions: Mapping[str, Value],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> list[int]:
    """Generate from ``prompt`` with ``interventions`` held (free mode: the real model with the
    decoded feature change added at the intervened layers, see the module docstring) and return
    the new token ids (prompt excluded; stops early at an EOS id or the model's context).

    An explicit position ``P`` is intervened on at that prompt position in every step; ``*`` at
    every position, generated ones included. Each step reruns the whole sequence (no KV cache),
    so earlier positions see the intervention exactly as in :func:`intervene` with
    ``constrained=False``. ``temperature`` 0 is greedy; above 0 samples from
    ``softmax(logits / temperature)`` with a ``torch.Generator`` seeded by ``seed``.

    Constrained generation is not offered: the frozen patterns and errors exist only for the
    prompt's positions."""
    from adag.steer import _as_prompts, _eos_ids, _int, _prompt_ids

    transcoders.check(model, all_layers=False)
    edits = parse_interventions(model, transcoders, interventions)
    max_new_tokens = _int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise AdagError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(float(temperature))
        or temperature < 0
    ):
        raise AdagError(f"temperature must be a finite number >= 0, got {temperature!r}")
    items = _as_prompts(prompt)
    if len(items) != 1:
        raise AdagError(f"generate_with_features takes one prompt, got {len(items)}")
    ids, _ = _prompt_ids(model, items[0], chat)
    check_positions(edits, len(ids))
    eos = _eos_ids(model)
    gen = torch.Generator().manual_seed(_int(seed, "seed"))
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if model.n_ctx is not None and len(ids) >= model.n_ctx:
                break
            tokens = torch.tensor([ids], device=model.device)
            with model.session(FeatureSplice(transcoders, edits, "free")):
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


__all__ = [
    "FeatureEdit",
    "FeatureSplice",
    "Value",
    "check_positions",
    "clean_state",
    "generate_with_features",
    "intervene",
    "parse_interventions",
]
