"""The linearised backward: one context manager that keeps the forward bit-identical and makes the
backward linear in the chosen way.

Used by attribution graphs and profiles (ADAG, Arora et al. 2026, §2: RelP-style rules; circuit
tracing, Ameisen et al. 2025: frozen attention and norms). AtP uses the plain backward instead.

Rules:

* **norms** — the scale ``s`` of every LayerNorm / RMSNorm (incl. Gemma's ``(1 + w)`` form) is a
  constant, so a norm is the linear map ``x -> w * (x * s)`` (LayerNorm keeps its mean-centring,
  which is linear).
* **attention** — the pattern is a constant; gradient flows through the values and ``W_O`` only.
* **final-logit softcap** (Gemma 2) — ``c * tanh(z / c)`` is ``z`` times its frozen ratio.
* **MLP**, per layer:

  - ``relp`` — the activation is its input times the frozen ratio ``r = act(g) / g``. A gated MLP's
    ``post = r * g * u`` is bilinear in (g, u), so the *half rule* splits it: each branch gets half
    the gradient, ``d post = ½ r u dg + ½ r g du``. That makes the linearised model complete:
    for inputs ``x`` (embeddings and biases), ``x · ∇post = post`` (Euler), so a target logit equals
    the sum of input × gradient. Non-gated MLPs: ``d post = r dg``.
  - ``frozen_gate`` — ``act(g)`` is a constant: ``d post = act(g) du`` (non-gated: same as relp).
  - ``stop`` — no gradient through this MLP (used for direct-effect edges).

Every rule is implemented as ``value.detach() + (T - T.detach())``: the forward value is exactly
the original one (``T - T.detach()`` is exactly zero), and the gradient is that of the surrogate
``T``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.ops import act_ratio, norm_apply, norm_eps, norm_scale
from adag.models.sites import Session
from adag.models.specs import ActKind, NormKind

if TYPE_CHECKING:
    from adag.models.model import Model

MlpRule = Literal["relp", "frozen_gate", "stop"]
MLP_RULES: tuple[str, ...] = ("relp", "frozen_gate", "stop")


def _swap_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward, the gradient of ``surrogate`` in the backward."""
    return value.detach() + (surrogate - surrogate.detach())


class Linearization(Session):
    """The session behind :func:`linearize`; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        mlp_rules: Sequence[str],
        act: ActKind,
        gated: bool,
        final_softcap: float | None,
        norms: bool = True,
        attention: bool = True,
    ) -> None:
        self.mlp_rules = list(mlp_rules)
        self.act = act
        self.gated = gated
        self.final_softcap = final_softcap
        self.norms = norms
        self.attention = attention

    def wants_mlp_inputs(self) -> bool:
        return True

    def norm(
        self, point: str, kind: NormKind, module: torch.nn.Module, x: Tensor, out: Tensor
    ) -> Tensor:
        if not self.norms:
            return out
        scale = norm_scale(kind, x, norm_eps(module)).detach()
        return _swap_grad(out, norm_apply(kind, module, x, scale))

    def pattern(self, layer: int, pattern: Tensor) -> Tensor:
        return pattern.detach() if self.attention else pattern

    def mlp_post(self, layer: int, post: Tensor, g: Tensor, u: Tensor | None) -> Tensor:
        rule = self.mlp_rules[layer]
        if rule == "stop":
            return post.detach()
        # The surrogate is linear in (g, u) with the rule's partials as constant coefficients, so
        # its gradient is exactly (pg, pu): the rule is written once, in post_partials.
        pg, pu = post_partials(
            rule, self.act, self.gated, g.detach(), None if u is None else u.detach()
        )
        if pu is None or u is None:
            return _swap_grad(post, pg * g)
        return _swap_grad(post, pg * g + pu * u)

    def logits(self, z: Tensor) -> Tensor:
        c = self.final_softcap
        if c is None:
            return z
        # The model applies c * tanh(z / c) after this point; its derivative there is
        # 1 - tanh²(z / c). Scale the gradient so that d(final)/dz = tanh(z / c) / (z / c).
        t = (z / c).detach()
        th = torch.tanh(t)
        ratio = torch.where(
            t == 0, torch.ones_like(t), th / torch.where(t == 0, torch.ones_like(t), t)
        )
        # Where tanh saturates, 1 - tanh² rounds to 0 and no finite factor can undo the model's
        # zero derivative; the clamp keeps the surrogate finite, so the forward stays exact
        # (an infinite factor made it inf - inf = NaN) and those logits get gradient ~0.
        factor = ratio / (1.0 - th * th).clamp_min(torch.finfo(th.dtype).eps)
        return _swap_grad(z, z * factor)


def post_partials(
    rule: str, act: ActKind, gated: bool, g: Tensor, u: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The linearised neuron's partial derivatives ``(d post/d g, d post/d u)`` under ``rule``,
    elementwise at the values ``g`` (gate / input pre-activation) and ``u`` (up projection; None
    for non-gated MLPs). The one statement of the rules: :meth:`Linearization.mlp_post` builds
    its surrogate ``pg * g + pu * u`` from them, so seeding a backward pass at ``g`` and ``u``
    with these values is the same as seeding it at ``post`` with 1, without needing the MLP's own
    rule to be active (graph edges stop every MLP but the target's, several target layers per
    pass)."""
    if rule == "stop":
        return torch.zeros_like(g), None if u is None else torch.zeros_like(u)
    ratio = act_ratio(act, g)
    if u is None or not gated:
        return ratio, None
    if rule == "frozen_gate":
        return torch.zeros_like(g), ratio * g
    return 0.5 * ratio * u, 0.5 * ratio * g


class Replica(Session):
    """The session behind :func:`linear_replica`."""

    def __init__(
        self,
        *,
        scales: Mapping[str, Tensor],
        patterns: Mapping[int, Tensor],
        partials: Mapping[int, tuple[Tensor, Tensor | None]],
    ) -> None:
        self.scales = scales
        self.patterns = patterns
        self.partials = partials

    def wants_mlp_inputs(self) -> bool:
        return True

    def norm(
        self, point: str, kind: NormKind, module: torch.nn.Module, x: Tensor, out: Tensor
    ) -> Tensor:
        return norm_apply(kind, module, x, self.scales[f"{point}.hook_scale"])

    def pattern(self, layer: int, pattern: Tensor) -> Tensor:
        return self.patterns[layer].expand_as(pattern)

    def mlp_post(self, layer: int, post: Tensor, g: Tensor, u: Tensor | None) -> Tensor:
        pg, pu = self.partials[layer]
        return pg * g if pu is None or u is None else pg * g + pu * u


def replica_sites(model: Model) -> list[str]:
    """The sites a clean forward pass must read for :func:`linear_replica`."""
    names = model.site_name_set()
    out = [n for n in model.site_names() if n.endswith("hook_scale")]
    for layer in range(model.n_layers):
        out += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.mlp.hook_pre"]
        lin = f"blocks.{layer}.mlp.hook_pre_linear"
        if model.spec.gated and lin in names:
            out.append(lin)
    return out


@contextmanager
def linear_replica(
    model: Model,
    clean: Mapping[str, Tensor],
    *,
    mlp: str | Sequence[str] | Mapping[int, str] = "relp",
) -> Iterator[Replica]:
    """Run the model as the *affine map* that the linearised backward differentiates: every norm
    scale and attention pattern replaced by its value in a clean batch-1 forward pass (``clean``,
    read with :func:`replica_sites`), every MLP's neurons by ``∂post/∂g · g + ∂post/∂u · u`` with
    the partials of ``mlp`` (:func:`post_partials`) at the clean ``g, u``.

    Feeding it ``δ`` at the embeddings (with the biases' constant row subtracted) gives the
    Jacobian–vector products of the linearised model in a plain forward pass: forward-mode
    attribution without dual numbers. The final softcap is not replicated (read sites, not
    logits, of a replica run)."""
    rules = resolve_mlp_rules(mlp, model.n_layers)
    partials = {}
    for layer in range(model.n_layers):
        g = clean[f"blocks.{layer}.mlp.hook_pre"]
        u = clean.get(f"blocks.{layer}.mlp.hook_pre_linear")
        partials[layer] = post_partials(rules[layer], model.act, model.spec.gated, g, u)
    rep = Replica(
        scales={n: v for n, v in clean.items() if n.endswith("hook_scale")},
        patterns={
            layer: clean[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.n_layers)
        },
        partials=partials,
    )
    with model.session(rep):
        yield rep


def resolve_mlp_rules(mlp: str | Sequence[str] | Mapping[int, str], n_layers: int) -> list[str]:
    """One rule per layer from a single rule, a per-layer list, or ``{layer: rule}`` overrides
    of ``relp``."""
    if isinstance(mlp, str):
        rules = [mlp] * n_layers
    elif isinstance(mlp, Mapping):
        rules = ["relp"] * n_layers
        for layer, rule in mlp.items():
            if not (isinstance(layer, int) and 0 <= layer < n_layers):
                raise AdagError(f"MLP rule for layer {layer!r}: layers are 0..{n_layers - 1}")
            rules[layer] = rule
    else:
        rules = list(mlp)
        if len(rules) != n_layers:
            raise AdagError(f"got {len(rules)} MLP rules for a model with {n_layers} layers")
    for r in rules:
        if r not in MLP_RULES:
            raise AdagError(f"unknown MLP rule {r!r}; choose one of {', '.join(MLP_RULES)}")
    return rules


@contextmanager
def linearize(
    model: Model,
    *,
    mlp: str | Sequence[str] | Mapping[int, str] = "relp",
    norms: bool = True,
    attention: bool = True,
) -> Iterator[Linearization]:
    """Make backward passes through ``model`` linear (frozen norms, frozen attention patterns and
    the chosen MLP rule per layer) while leaving every forward value bit-identical.

    >>> with linearize(model, mlp={5: "stop"}), SiteRun(model, grad=["blocks.0.hook_resid_pre"]) as run:
    ...     logit = model(tokens)[0, -1, target]
    ...     g = run.grads(logit)["blocks.0.hook_resid_pre"]
    """
    lin = Linearization(
        mlp_rules=resolve_mlp_rules(mlp, model.n_layers),
        act=model.act,
        gated=model.spec.gated,
        final_softcap=model.final_softcap,
        norms=norms,
        attention=attention,
    )
    with model.session(lin):
        yield lin


__all__ = [
    "MLP_RULES",
    "Linearization",
    "Replica",
    "linear_replica",
    "linearize",
    "post_partials",
    "replica_sites",
]
