"""Named sites: read, overwrite, scale, add to, detach, or differentiate any internal activation.

This is the one hook mechanism of adag. ``install`` puts a fixed set of forward hooks on a Hugging
Face model (and routes its attention through :func:`adag_attention`); each hook hands its tensor to
the *sessions* active on the model — :class:`SiteRun` (reads, patches, gradients) and
``adag.models.linear.Linearization`` — in the order they were entered. With no session active every
hook returns at once, so an installed model runs as fast as a bare one.

Site names follow TransformerLens (``L`` is the layer):

=====================================  ============================  =================================
site                                   shape                         what
=====================================  ============================  =================================
``blocks.L.hook_resid_pre``            ``batch pos d_model``         input of layer L (L=0: embeddings)
``blocks.L.hook_resid_mid``            ``batch pos d_model``         ``resid_pre + attn_out``
``blocks.L.hook_resid_post``           ``batch pos d_model``         output of layer L
``blocks.L.hook_attn_out``             ``batch pos d_model``         what attention adds to the stream
                                                                     (after the post-norm if any)
``blocks.L.hook_mlp_out``              ``batch pos d_model``         what the MLP adds to the stream
``blocks.L.attn.hook_q``               ``batch head pos d_head``     queries, after q-norm and rotary
``blocks.L.attn.hook_k`` / ``hook_v``  ``batch kv_head pos d_head``  keys (post-rotary) and values
``blocks.L.attn.hook_attn_scores``     ``batch head pos k_pos``      scaled, softcapped, masked scores
``blocks.L.attn.hook_pattern``         ``batch head pos k_pos``      softmax of the scores
``blocks.L.attn.hook_z``               ``batch head pos d_head``     pattern @ v, the input of W_O
``blocks.L.mlp.hook_in``               ``batch pos d_model``         the MLP module's input: the
                                                                     residual after ln2 (OLMo-2:
                                                                     resid_mid, it has no ln2)
``blocks.L.mlp.hook_pre``              ``batch pos d_mlp``           gate (or input) pre-activation
``blocks.L.mlp.hook_pre_linear``       ``batch pos d_mlp``           up projection (gated MLPs only)
``blocks.L.mlp.hook_post``             ``batch pos d_mlp``           the neurons: input of W_down
``blocks.L.ln1.hook_scale`` etc.       ``batch pos 1``               norm scale (read/replace)
``ln_final.hook_scale``                ``batch pos 1``               final norm scale
=====================================  ============================  =================================

Norm names: ``ln1`` (before attention), ``ln2`` (before the MLP), ``ln1_post`` / ``ln2_post`` (the
post-norms of Gemma 2/3 and OLMo-2; OLMo-2 has no ``ln1``/``ln2``).

Grouped-query attention: ``hook_k`` and ``hook_v`` have ``n_kv_heads`` heads; query head ``h`` reads
KV head ``h // (n_heads // n_kv_heads)`` (transformers' ``repeat_kv`` layout). ``hook_q``,
``hook_attn_scores``, ``hook_pattern`` and ``hook_z`` have ``n_heads`` heads.

Selections (:class:`Patch` fields ``batch``, ``pos``, ``head``, ``k_pos``, ``index``; ``index`` is
the last axis: d_model, d_head or d_mlp) follow numpy/torch advanced indexing: ``None`` is every
entry, an int or slice selects as usual, and all list/tensor selectors are *zipped*. So
``Patch(site, v, batch=[0, 1, 2], pos=[4, 4, 7], index=[10, 11, 12])`` patches neuron 10 at pos 4
in row 0, neuron 11 at pos 4 in row 1 and neuron 12 at pos 7 in row 2 — many single-node patches
in one forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.attention import attention_scores, repeat_kv
from adag.models.ops import norm_apply, norm_eps, norm_scale, work_dtype
from adag.models.specs import ArchSpec, NormKind

if TYPE_CHECKING:
    from adag.models.model import Model

Selector = int | slice | Sequence[int] | Tensor | None
Op = Literal["replace", "add", "scale", "detach", "fn"]

ATTENTION_NAME = "adag"
"""Name under which :func:`adag_attention` is registered with transformers' AttentionInterface."""

_RESID_AXES = ("batch", "pos", "d_model")
_HEAD_AXES = ("batch", "head", "pos", "d_head")
_PATTERN_AXES = ("batch", "head", "pos", "k_pos")
_MLP_AXES = ("batch", "pos", "d_mlp")
_SCALE_AXES = ("batch", "pos", "one")

SITE_AXES: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": _RESID_AXES,
    "hook_resid_mid": _RESID_AXES,
    "hook_resid_post": _RESID_AXES,
    "hook_attn_out": _RESID_AXES,
    "hook_mlp_out": _RESID_AXES,
    "attn.hook_q": _HEAD_AXES,
    "attn.hook_k": _HEAD_AXES,
    "attn.hook_v": _HEAD_AXES,
    "attn.hook_z": _HEAD_AXES,
    "attn.hook_attn_scores": _PATTERN_AXES,
    "attn.hook_pattern": _PATTERN_AXES,
    "mlp.hook_in": _RESID_AXES,
    "mlp.hook_pre": _MLP_AXES,
    "mlp.hook_pre_linear": _MLP_AXES,
    "mlp.hook_post": _MLP_AXES,
    "hook_scale": _SCALE_AXES,
}
_SITE_RE = re.compile(r"^(?:blocks\.(\d+)\.)?(?:(ln1|ln2|ln1_post|ln2_post|ln_final)\.)?(.+)$")


_RUNTIME_AXES: dict[str, tuple[str, ...]] = {}
"""Axes of sites registered at run time (:meth:`adag.models.model.Model.register_site`), by full
name: e.g. a transcoder splice publishing its feature activations."""


def register_site_axes(name: str, axes: Sequence[str]) -> None:
    """Declare the axes of a site published at run time (the last axis is ``index``'s)."""
    axes = tuple(axes)
    if not axes or axes[0] != "batch":
        raise AdagError(f"site {name!r}: axes must start with 'batch', got {axes}")
    known = _RUNTIME_AXES.get(name)
    if known is not None and known != axes:
        raise AdagError(f"site {name!r} is already registered with axes {known}, not {axes}")
    _RUNTIME_AXES[name] = axes


def site_axes(name: str) -> tuple[str, ...]:
    """The named axes of a site, e.g. ``("batch", "pos", "d_model")``."""
    if name in _RUNTIME_AXES:
        return _RUNTIME_AXES[name]
    m = _SITE_RE.match(name)
    suffix = m.group(3) if m else name
    if suffix not in SITE_AXES:
        raise AdagError(f"unknown site {name!r}; list the model's sites with Model.site_names()")
    return SITE_AXES[suffix]


@dataclass(frozen=True)
class Patch:
    """One intervention on a site.

    ``op``: ``replace`` (set to ``value``), ``add`` (add ``value``), ``scale`` (multiply by
    ``value``), ``detach`` (same value, no gradient flows back through it), or ``fn``
    (``value(x, cache) -> x``, where ``cache`` maps the sites already read in this forward pass to
    their values). ``value`` broadcasts against the selection. See the module docstring for the
    selection semantics.
    """

    site: str
    value: Tensor | float | Callable[[Tensor, Mapping[str, Tensor]], Tensor] | None = None
    op: Op = "replace"
    batch: Selector = None
    pos: Selector = None
    head: Selector = None
    k_pos: Selector = None
    index: Selector = None

    def __post_init__(self) -> None:
        if self.op not in ("replace", "add", "scale", "detach", "fn"):
            raise AdagError(f"Patch op {self.op!r} is not one of replace, add, scale, detach, fn")
        if self.op == "fn" and not callable(self.value):
            raise AdagError("Patch op 'fn' needs a callable value(x, cache) -> x")
        if self.op in ("replace", "add", "scale") and self.value is None:
            raise AdagError(f"Patch op {self.op!r} on {self.site} needs a value")
        axes = site_axes(self.site)
        for key in ("head", "k_pos"):
            if getattr(self, key) is not None and key not in axes:
                raise AdagError(f"site {self.site} has no {key} axis (its axes: {', '.join(axes)})")

    def _index(self, x: Tensor) -> tuple[Any, ...] | None:
        axes = site_axes(self.site)
        chosen = {"batch": self.batch, "pos": self.pos, "head": self.head, "k_pos": self.k_pos}
        chosen[axes[-1]] = self.index
        if all(chosen.get(a) is None for a in axes):
            return None
        idx: list[Any] = []
        for a in axes:
            sel = chosen.get(a)
            if sel is None:
                idx.append(slice(None))
            elif isinstance(sel, (int, slice)):
                idx.append(sel)
            else:
                idx.append(torch.as_tensor(sel, dtype=torch.long, device=x.device))
        return tuple(idx)

    def apply(self, x: Tensor, cache: Mapping[str, Tensor]) -> Tensor:
        idx = self._index(x)
        if self.op == "detach":
            if idx is None:
                return x.detach()
            mask = torch.zeros_like(x, dtype=torch.bool)
            mask[idx] = True
            return torch.where(mask, x.detach(), x)
        cur = x if idx is None else x[idx]
        if self.op == "fn":
            assert callable(self.value)
            new = self.value(cur, cache)
        else:
            val: Any = self.value
            if isinstance(val, Tensor):
                val = val.to(device=x.device, dtype=x.dtype)
            if self.op == "replace":
                new = (
                    torch.broadcast_to(val, cur.shape) if isinstance(val, Tensor) else cur * 0 + val
                )
            elif self.op == "add":
                new = cur + val
            else:
                new = cur * val
        if idx is None:
            out = torch.broadcast_to(new, x.shape)
            # keep a contiguous site contiguous: some models .view() it (GPT-2's Conv1D)
            return out.contiguous() if x.is_contiguous() else out
        out = x.clone()
        out[idx] = new
        return out


class Session:
    """Something that reacts to the model's hook points while it is active (see module docstring).
    Subclasses override what they need; the defaults pass tensors through unchanged."""

    def touches(self, name: str) -> bool:
        return False

    def site(self, name: str, x: Tensor) -> Tensor:
        return x

    def resid_mid(self, name: str, resid_pre: Tensor, attn_out: Tensor) -> Tensor:
        return attn_out

    def norm(
        self, point: str, kind: NormKind, module: torch.nn.Module, x: Tensor, out: Tensor
    ) -> Tensor:
        return out

    def pattern(self, layer: int, pattern: Tensor) -> Tensor:
        return pattern

    def mlp_post(self, layer: int, post: Tensor, g: Tensor, u: Tensor | None) -> Tensor:
        return post

    def logits(self, z: Tensor) -> Tensor:
        return z

    def wants_mlp_inputs(self) -> bool:
        return False


class SiteRun(Session):
    """Reads, patches and differentiates sites during the forward passes run inside it.

    >>> with SiteRun(model, read=["blocks.0.hook_resid_pre"], grad=["blocks.3.hook_resid_post"]) as run:
    ...     logits = model(tokens)
    ...     grads = run.grads(logits[:, -1, 42].sum())
    >>> run.cache["blocks.0.hook_resid_pre"]       # (batch, pos, d_model), detached

    The cache holds the value each site had *after* the patches (what the model used). Gradients
    are taken with respect to that value: a zero tensor is added at each ``grad`` site and
    differentiated, so the forward is unchanged. For gradients, run one forward per session.
    """

    def __init__(
        self,
        model: Model,
        *,
        read: Iterable[str] = (),
        patches: Iterable[Patch] = (),
        grad: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.read = list(dict.fromkeys(read))
        self.grad = list(dict.fromkeys(grad))
        self.patches: dict[str, list[Patch]] = {}
        for p in patches:
            self.patches.setdefault(p.site, []).append(p)
        known = model.site_name_set()
        for name in [*self.read, *self.grad, *self.patches]:
            if name not in known:
                raise AdagError(
                    f"unknown site {name!r} for this {model.spec.model_type} model with "
                    f"{model.n_layers} layers; list them with Model.site_names()"
                )
        for name in self.grad:
            if name.endswith("hook_scale"):
                raise AdagError(f"gradients with respect to {name} are not supported")
        self._touched = set(self.read) | set(self.grad) | set(self.patches)
        self._read = set(self.read)
        self._grad = set(self.grad)
        self.cache: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}
        self._live: dict[str, Tensor] = {}

    def __enter__(self) -> SiteRun:
        self.model._dispatch.push(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.model._dispatch.pop(self)
        self._live = {}

    def touches(self, name: str) -> bool:
        return name in self._touched

    def _finish(self, name: str, x: Tensor) -> Tensor:
        if name in self._grad:
            leaf = torch.zeros_like(x, requires_grad=True)
            self.leaves[name] = leaf
            x = x + leaf
        if name in self._read:
            self.cache[name] = x.detach()
        self._live[name] = x
        return x

    def site(self, name: str, x: Tensor) -> Tensor:
        if name not in self._touched:
            return x
        for p in self.patches.get(name, ()):
            x = p.apply(x, self._live)
        return self._finish(name, x)

    def resid_mid(self, name: str, resid_pre: Tensor, attn_out: Tensor) -> Tensor:
        if name not in self._touched:
            return attn_out
        if name in self.patches:
            mid = resid_pre + attn_out
            for p in self.patches[name]:
                mid = p.apply(mid, self._live)
            attn_out = mid - resid_pre
        if name in self._grad:
            # d(metric)/d(resid_mid) == d(metric)/d(attn_out): resid_mid = resid_pre + attn_out.
            leaf = torch.zeros_like(attn_out, requires_grad=True)
            self.leaves[name] = leaf
            attn_out = attn_out + leaf
        mid = resid_pre + attn_out
        if name in self._read:
            self.cache[name] = mid.detach()
        self._live[name] = mid
        return attn_out

    def norm(
        self, point: str, kind: NormKind, module: torch.nn.Module, x: Tensor, out: Tensor
    ) -> Tensor:
        name = f"{point}.hook_scale"
        if name not in self._touched:
            return out
        scale = norm_scale(kind, x, norm_eps(module))
        if name in self.patches:
            for p in self.patches[name]:
                scale = p.apply(scale, self._live)
            out = norm_apply(kind, module, x, scale)
        if name in self._read:
            self.cache[name] = scale.detach()
        self._live[name] = scale
        return out

    def value(self, name: str) -> Tensor:
        """The live (differentiable) value of a site read, patched or differentiated in the
        forward pass just run; valid until the session exits. Seed backward passes with it."""
        if name not in self._live:
            raise AdagError(f"site {name} was not read in this session; add it to read=")
        return self._live[name]

    def vjp(
        self,
        outputs: Sequence[Tensor],
        grad_outputs: Sequence[Tensor],
        *,
        retain_graph: bool = False,
        sites: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Vector–Jacobian products: the gradient of ``Σ_i <outputs[i], grad_outputs[i]>`` with
        respect to every ``grad`` site (zeros where there is no path), or to ``sites`` only (a
        subset of them). With a batch of identical rows and seeds in different rows, one call
        gives one gradient per row."""
        wanted = self.grad if sites is None else sites
        names = [n for n in wanted if n in self.leaves]
        leaves = [self.leaves[n] for n in names]
        live = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        if not live:
            return {n: torch.zeros_like(leaf) for n, leaf in zip(names, leaves, strict=True)}
        gs = torch.autograd.grad(
            [o for o, _ in live],
            leaves,
            grad_outputs=[g for _, g in live],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return {
            n: (torch.zeros_like(leaf) if g is None else g)
            for n, g, leaf in zip(names, gs, leaves, strict=True)
        }

    def grads(self, metric: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """Gradient of the scalar ``metric`` with respect to every ``grad`` site (zeros where the
        metric does not depend on a site)."""
        if not self.leaves:
            return {}
        names = [n for n in self.grad if n in self.leaves]
        leaves = [self.leaves[n] for n in names]
        if not metric.requires_grad:  # every path to the metric was cut
            return {n: torch.zeros_like(leaf) for n, leaf in zip(names, leaves, strict=True)}
        gs = torch.autograd.grad(metric, leaves, retain_graph=retain_graph, allow_unused=True)
        return {
            n: (torch.zeros_like(leaf) if g is None else g)
            for n, g, leaf in zip(names, gs, leaves, strict=True)
        }


# ----------------------------------------------------------------------------------------------
# Installation: the hooks themselves.


class Dispatch:
    """The per-model hub the installed hooks call into. Holds the active sessions and the
    per-forward scratch (each layer's resid_pre, each MLP's gate/up values)."""

    def __init__(self, spec: ArchSpec, act: str) -> None:
        self.spec = spec
        self.act = act
        self.sessions: list[Session] = []
        self.resid_pre: dict[int, Tensor] = {}
        self.mlp_g: dict[int, Tensor] = {}
        self.mlp_u: dict[int, Tensor] = {}
        self.handles: list[Any] = []
        self.masks: dict[int, Tensor | None] | None = None
        """When a dict, each attention records its mask here (:meth:`Model.capture`)."""
        self.prefix: Prefix | None = None
        """When set, attention prepends these cached keys and values (:meth:`Model.forward_from`)."""

    def push(self, s: Session) -> None:
        self.sessions.append(s)

    def pop(self, s: Session) -> None:
        if s in self.sessions:
            self.sessions.remove(s)
        if not self.sessions:
            self.resid_pre.clear()
            self.mlp_g.clear()
            self.mlp_u.clear()

    def site(self, name: str, x: Tensor) -> Tensor:
        for s in self.sessions:
            x = s.site(name, x)
        return x

    def pattern(self, layer: int, p: Tensor) -> Tensor:
        for s in self.sessions:
            p = s.pattern(layer, p)
        return p

    # -- hooks -------------------------------------------------------------------------------

    def _layer_pre(self, layer: int) -> Callable[..., Any]:
        name = f"blocks.{layer}.hook_resid_pre"

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.sessions:
                return None
            if args:
                x = self.site(name, args[0])
                self.resid_pre[layer] = x
                return (x, *args[1:]), kwargs
            x = self.site(name, kwargs["hidden_states"])
            self.resid_pre[layer] = x
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _output_hook(self, actions: list[tuple[str, Any]]) -> Callable[..., Any]:
        is_norm = any(kind in ("norm", "exact_norm") for kind, _ in actions)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if not self.sessions:
                if is_norm and args[0].dtype == torch.float64:
                    return self._exact_norm(module, args[0])
                return None
            x = out[0] if isinstance(out, tuple) else out
            for kind, arg in actions:
                x = self._act(kind, arg, module, args, x)
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return hook

    def _exact_norm(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        """HF norms compute in float32 even for float64 inputs; float64 models get exact norms."""
        kind = self.spec.norm
        return norm_apply(kind, module, x, norm_scale(kind, x, norm_eps(module)))

    def _act(
        self, kind: str, arg: Any, module: torch.nn.Module, args: tuple[Any, ...], x: Tensor
    ) -> Tensor:
        if kind == "site":
            return self.site(arg, x)
        if kind == "norm":
            inp = args[0]
            if inp.dtype == torch.float64:
                x = self._exact_norm(module, inp)
            for s in self.sessions:
                x = s.norm(arg, self.spec.norm, module, inp, x)
            return x
        if kind == "exact_norm":
            return self._exact_norm(module, args[0]) if args[0].dtype == torch.float64 else x
        if kind == "attn_out":
            layer = arg
            x = self.site(f"blocks.{layer}.hook_attn_out", x)
            mid = f"blocks.{layer}.hook_resid_mid"
            if any(s.touches(mid) for s in self.sessions):
                r = self.resid_pre[layer]
                for s in self.sessions:
                    x = s.resid_mid(mid, r, x)
            return x
        if kind == "stash_g" or kind == "stash_u":
            x = self.site(
                f"blocks.{arg}.mlp.{'hook_pre' if kind == 'stash_g' else 'hook_pre_linear'}", x
            )
            if any(s.wants_mlp_inputs() for s in self.sessions):
                (self.mlp_g if kind == "stash_g" else self.mlp_u)[arg] = x
            return x
        if kind == "logits":
            for s in self.sessions:
                x = s.logits(x)
            self.resid_pre.clear()
            return x
        raise AssertionError(kind)

    def _mlp_in_pre(self, layer: int) -> Callable[..., Any]:
        name = f"blocks.{layer}.mlp.hook_in"

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.sessions:
                return None
            if args:
                return (self.site(name, args[0]), *args[1:]), kwargs
            # every supported MLP takes one tensor; find it if it came by keyword
            key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
            return args, {**kwargs, key: self.site(name, kwargs[key])}

        return hook

    def _mlp_post_pre(self, layer: int) -> Callable[..., Any]:
        name = f"blocks.{layer}.mlp.hook_post"

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
            if not self.sessions:
                return None
            post = args[0]
            g = self.mlp_g.pop(layer, None)
            u = self.mlp_u.pop(layer, None)
            if g is not None:
                for s in self.sessions:
                    post = s.mlp_post(layer, post, g, u)
            return (self.site(name, post), *args[1:])

        return hook


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule of ``root`` at a dotted attribute path."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def layer_modules(hf: torch.nn.Module, spec: ArchSpec) -> list[torch.nn.Module]:
    layers = get_module(hf, spec.layers)
    assert isinstance(layers, torch.nn.ModuleList)
    return list(layers)


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def install(hf: Any, spec: ArchSpec, act: str) -> Dispatch:
    """Put adag's hooks on ``hf`` (once) and route its attention through :func:`adag_attention`."""
    existing = getattr(hf, "_adag_dispatch", None)
    if isinstance(existing, Dispatch):
        return existing
    register_attention()
    d = Dispatch(spec, act)
    outputs: dict[int, tuple[torch.nn.Module, list[tuple[str, Any]]]] = {}

    def on_output(mod: torch.nn.Module, action: tuple[str, Any]) -> None:
        outputs.setdefault(id(mod), (mod, []))[1].append(action)

    for layer, block in enumerate(layer_modules(hf, spec)):
        d.handles.append(block.register_forward_pre_hook(d._layer_pre(layer), with_kwargs=True))
        attn = get_module(block, spec.attn)
        attn._adag_dispatch = d  # type: ignore[assignment]
        attn._adag_layer = layer  # type: ignore[assignment]
        for point in ("ln1", "ln2", "ln1_post", "ln2_post"):
            path = getattr(spec, point)
            if path is not None:
                on_output(get_module(block, path), ("norm", f"blocks.{layer}.{point}"))
        if spec.qk_norm:
            for path in (f"{spec.attn}.q_norm", f"{spec.attn}.k_norm"):
                on_output(get_module(block, path), ("exact_norm", None))
        on_output(get_module(block, spec.attn_out_module), ("attn_out", layer))
        # the MLP module's own input: after ln2 where there is one, the residual itself in
        # post-norm blocks (OLMo-2), whose residual branch keeps the unpatched value
        d.handles.append(
            get_module(block, spec.mlp).register_forward_pre_hook(
                d._mlp_in_pre(layer), with_kwargs=True
            )
        )
        on_output(get_module(block, spec.mlp_in), ("stash_g", layer))
        if spec.mlp_in_linear is not None:
            on_output(get_module(block, spec.mlp_in_linear), ("stash_u", layer))
        d.handles.append(
            get_module(block, spec.mlp_down).register_forward_pre_hook(d._mlp_post_pre(layer))
        )
        on_output(get_module(block, spec.mlp_out_module), ("site", f"blocks.{layer}.hook_mlp_out"))
        on_output(block, ("site", f"blocks.{layer}.hook_resid_post"))
    # transformers slices the last position (``logits_to_keep``) into a non-contiguous
    # (batch, 1, d_model) view; with autograd on, matmul then runs the unembedding as a batched
    # product over an expanded weight (10x slower on CPU): hand it a contiguous input
    d.handles.append(get_module(hf, spec.unembed).register_forward_pre_hook(_contiguous_input))
    on_output(get_module(hf, spec.final_norm), ("norm", "ln_final"))
    on_output(get_module(hf, spec.unembed), ("logits", None))
    for mod, actions in outputs.values():
        d.handles.append(mod.register_forward_hook(d._output_hook(actions)))
    hf._adag_dispatch = d
    hf.config._attn_implementation = ATTENTION_NAME
    return d


def site_names(spec: ArchSpec, n_layers: int) -> list[str]:
    """Every site of a model of this architecture, in forward order."""
    names: list[str] = []
    for layer in range(n_layers):
        b = f"blocks.{layer}."
        names.append(b + "hook_resid_pre")
        if spec.ln1:
            names.append(b + "ln1.hook_scale")
        names += [b + f"attn.hook_{s}" for s in ("q", "k", "v", "attn_scores", "pattern", "z")]
        if spec.ln1_post:
            names.append(b + "ln1_post.hook_scale")
        names += [b + "hook_attn_out", b + "hook_resid_mid"]
        if spec.ln2:
            names.append(b + "ln2.hook_scale")
        names += [b + "mlp.hook_in", b + "mlp.hook_pre"]
        if spec.gated:
            names.append(b + "mlp.hook_pre_linear")
        names.append(b + "mlp.hook_post")
        if spec.ln2_post:
            names.append(b + "ln2_post.hook_scale")
        names += [b + "hook_mlp_out", b + "hook_resid_post"]
    names.append("ln_final.hook_scale")
    return names


# ----------------------------------------------------------------------------------------------
# Attention.


def adag_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention with hook points, registered with transformers as ``"adag"``.

    The same operations in the same order as transformers' eager attention (the scores by
    :func:`adag.models.attention.attention_scores`; float32 and bf16 outputs are bit-identical to
    ``attn_implementation="eager"``), except that the softmax runs in
    ``promote(dtype, float32)``: eager forces float32 even for float64 models. The causal or
    sliding-window mask arrives in ``attention_mask`` (see :func:`register_attention`).
    """
    d: Dispatch | None = getattr(module, "_adag_dispatch", None)
    active = d is not None and bool(d.sessions)
    layer: int = getattr(module, "_adag_layer", 0)
    pre = f"blocks.{layer}.attn."
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if active:
        assert d is not None
        query = d.site(pre + "hook_q", query)
        key = d.site(pre + "hook_k", key)
        value = d.site(pre + "hook_v", value)
    if d is not None and d.prefix is not None:
        key, value, attention_mask = d.prefix.extend(layer, key, value)
    if d is not None and d.masks is not None:
        d.masks[layer] = attention_mask
    v = repeat_kv(value, query.shape[1] // value.shape[1])
    # (B, H, T, S)
    scores = attention_scores(query, key, scaling=scaling, softcap=softcap, mask=attention_mask)
    if active:
        assert d is not None
        scores = d.site(pre + "hook_attn_scores", scores)
    pattern = torch.softmax(scores, dim=-1, dtype=work_dtype(query.dtype)).to(query.dtype)
    if active:
        assert d is not None
        pattern = d.pattern(layer, pattern)
        pattern = d.site(pre + "hook_pattern", pattern)
    pattern = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = torch.matmul(pattern, v)  # (B, H, T, d_head)
    if active:
        assert d is not None
        z = d.site(pre + "hook_z", z)
    return z.transpose(1, 2).contiguous(), pattern


@dataclass
class Prefix:
    """Cached keys, values and masks of positions ``< start`` of one batch-1 forward, prepended by
    :func:`adag_attention` to the keys and values of a forward that computes positions
    ``start..T-1`` only (:meth:`adag.models.model.Model.forward_from`)."""

    start: int
    end: int
    """The new positions are ``start..end-1``."""
    keys: Sequence[Tensor]
    """Per layer ``1 kv_head T d_head`` (the values the attention used: after hooks, post-rotary)."""
    values: Sequence[Tensor]
    masks: Sequence[Tensor | None]
    """Per layer the additive mask ``1 1 T T`` of the full forward (None: causal)."""

    def extend(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values of positions ``0..end-1`` for the new rows, and the mask rows of the
        new queries (``1 1 end-start end``)."""
        b = key.shape[0]
        k0 = self.keys[layer][:, :, : self.start].to(key.dtype)
        v0 = self.values[layer][:, :, : self.start].to(value.dtype)
        key = torch.cat([k0.expand(b, -1, -1, -1), key], 2)
        value = torch.cat([v0.expand(b, -1, -1, -1), value], 2)
        t = key.shape[2]
        mask = self.masks[layer]
        if mask is None:
            q = torch.arange(self.start, t, device=key.device)[:, None]
            k = torch.arange(t, device=key.device)[None]
            mask = torch.zeros(t - self.start, t, dtype=key.dtype, device=key.device)
            mask = mask.masked_fill(k > q, torch.finfo(key.dtype).min)[None, None]
        else:
            mask = mask[..., self.start : t, :t]
        return key, value, mask


_registered = False


def register_attention() -> None:
    """Register :func:`adag_attention` and, under the same name, transformers' eager mask builder.

    Without the mask registration a custom attention function receives no causal mask and attends
    to the future (the trap the ADAG release code fell into)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, adag_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    _registered = True
