"""Transcoders: sparse replacements of a model's MLPs (the type; formats in ``formats``).

A transcoder (Dunefsky, Chlenski & Nanda 2024) reads an MLP's input and predicts the MLP's output
through a wide, sparsely active feature layer. "Circuit Tracing" (Ameisen et al., 2025) uses two
kinds:

- **PLT** (per-layer transcoders): the features of layer ``l`` read layer ``l``'s MLP input and
  write to layer ``l``'s MLP output only.
- **CLT** (cross-layer transcoder): the features of layer ``l`` read layer ``l``'s MLP input and
  write to the MLP output of *every* covered layer ``l' >= l`` (one decoder per target layer).

For a source layer ``l`` with MLP input ``x`` (``... d_model``)::

    pre_l  = x @ W_enc[l].T + b_enc[l]                                   (... d_features)
    a_l    = act(pre_l)
    ŷ_t    = Σ_{l writes to t} a_l @ W_dec[l→t] + b_dec[t] (+ x_t @ W_skip[t].T)   (... d_model)

with ``act`` one of ``relu`` (``max(pre, 0)``), ``jumprelu`` (``pre · [pre > threshold]``, Rajamanoharan
et al. 2024) or ``topk`` (the ``k`` largest pre-activations of each token kept, after a ReLU; every
other feature 0 — note circuit-tracer's TopK keeps negative values among the k, ours does not).

Where the transcoders read and write is fixed by adag's sites: the encoder reads
``blocks.l.mlp.hook_in`` (the MLP module's input: the residual after ln2; OLMo-2, which has no ln2,
feeds the residual itself) and the decoder writes to ``blocks.l.hook_mlp_out`` (what the MLP adds to
the residual, after the post-norm on Gemma 2/3 and OLMo-2). Transcoders trained elsewhere may name
other hooks (``input_hook`` / ``output_hook``; see :data:`INPUT_HOOKS`, :data:`OUTPUT_HOOKS`);
:func:`load_transcoders` with the model converts what can be converted exactly and
:meth:`Transcoders.check` refuses the rest.

>>> tc = load_transcoders("path/to/transcoders", model)     # any supported format, checked
>>> acts = tc.encode(3, mlp_in)                              # (batch, pos, d_features)
>>> mlp_out_hat = tc.decode({3: acts}, 3)                     # (batch, pos, d_model)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from adag.errors import AdagError

if TYPE_CHECKING:
    from adag.models.model import Model

Kind = Literal["plt", "clt"]
Activation = Literal["relu", "jumprelu", "topk"]
KINDS: tuple[str, ...] = ("plt", "clt")
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")

INPUT_HOOKS: dict[str, str] = {
    "mlp.hook_in": "the MLP module's input, after ln2 (adag's blocks.L.mlp.hook_in)",
    "ln2.hook_normalized": (
        "ln2's output before its elementwise weight (and bias); load with the model to fold the "
        "weight into the encoders"
    ),
    "hook_resid_mid": (
        "the residual before ln2: the MLP input only in models without a pre-MLP norm (OLMo-2)"
    ),
    "hook_mlp_in": "TransformerLens's copy of hook_resid_mid fed to ln2 (same rule)",
}
"""Input hooks (TransformerLens names, as circuit-tracer and SAELens configs write them) that adag
accepts, and what each is."""

OUTPUT_HOOKS: dict[str, str] = {
    "hook_mlp_out": "what the MLP adds to the residual (after the post-norm, if any)",
    "mlp.hook_out": (
        "the MLP module's output: hook_mlp_out only in models without a post-MLP norm "
        "(not Gemma 2/3, OLMo-2)"
    ),
}
"""Output hooks adag accepts."""


def _ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    items = sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(out)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@dataclass(eq=False)
class Transcoders:
    """Per-layer (PLT) or cross-layer (CLT) transcoders of one model (see the module docstring for
    the formulas and the sites they read and write).

    All per-layer lists are aligned with :attr:`layers` (entry ``i`` belongs to ``layers[i]``).
    Constructing one validates every shape; a wrong one is a one-line :class:`AdagError`.
    """

    kind: Kind
    """``"plt"`` (each layer's features write to their own layer) or ``"clt"`` (to every covered
    layer at or after their own)."""
    layers: list[int]
    """The layers that have an encoder, strictly ascending (usually every layer of the model)."""
    W_enc: list[Tensor]
    """Per layer: ``(d_features, d_model)``; ``pre = x @ W_enc.T + b_enc``."""
    b_enc: list[Tensor]
    """Per layer: ``(d_features,)``."""
    W_dec: list[Tensor]
    """PLT: per layer ``(d_features, d_model)``. CLT: per source layer ``layers[i]``:
    ``(n_later, d_features, d_model)`` with ``n_later = len(layers) - i``, row ``j`` writing to
    ``layers[i + j]``."""
    b_dec: list[Tensor]
    """Per (target) layer: ``(d_model,)``."""
    activation: Activation
    """``relu``, ``jumprelu`` (needs :attr:`threshold`) or ``topk`` (needs :attr:`k`)."""
    threshold: list[Tensor] | None = None
    """JumpReLU: per layer ``(d_features,)``; a feature is active where ``pre > threshold``."""
    k: int | None = None
    """TopK: the number of features kept per token."""
    W_skip: list[Tensor] | None = None
    """Optional per-layer linear skip ``(d_model, d_model)``: the output of layer ``l`` gains
    ``x_l @ W_skip.T`` (circuit-tracer's and SAELens's skip transcoders)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Where the transcoders came from (``format``, ``path``), what was converted on loading
    (``transposed``, ``folded``), anything informative. JSON-serialisable to be saved."""
    input_hook: str = "mlp.hook_in"
    """The hook the encoders were trained on (a key of :data:`INPUT_HOOKS`). Only
    ``mlp.hook_in`` (or its equal in the model at hand) passes :meth:`check`."""
    output_hook: str = "hook_mlp_out"
    """The hook the decoders write to (a key of :data:`OUTPUT_HOOKS`)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AdagError(f"transcoder kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise AdagError(
                f"transcoder activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.input_hook not in INPUT_HOOKS:
            raise AdagError(
                f"transcoder input hook {self.input_hook!r} is not supported; adag reads "
                f"{', '.join(INPUT_HOOKS)}"
            )
        if self.output_hook not in OUTPUT_HOOKS:
            raise AdagError(
                f"transcoder output hook {self.output_hook!r} is not supported; adag writes "
                f"{', '.join(OUTPUT_HOOKS)}"
            )
        self.layers = [int(x) for x in self.layers]
        n = len(self.layers)
        if n == 0:
            raise AdagError("transcoders cover no layer; give at least one")
        if any(x < 0 for x in self.layers) or any(
            b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)
        ):
            raise AdagError(
                f"transcoder layers {self.layers} must be distinct, non-negative and ascending"
            )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            got = len(getattr(self, name))
            if got != n:
                raise AdagError(f"transcoders have {got} {name} tensors for {n} layers")
        if self.W_enc[0].dim() != 2:
            raise AdagError(
                f"W_enc of layer {self.layers[0]} has shape {_shape(self.W_enc[0])}; expected "
                "(d_features, d_model)"
            )
        d_f, d_m = _shape(self.W_enc[0])

        def expect(name: str, i: int, t: Tensor, shape: tuple[int, ...], axes: str) -> None:
            if _shape(t) != shape:
                raise AdagError(
                    f"{name} of layer {self.layers[i]} has shape {_shape(t)}; expected {shape} "
                    f"{axes} (d_features {d_f}, d_model {d_m} from W_enc of layer "
                    f"{self.layers[0]})"
                )

        for i in range(n):
            expect("W_enc", i, self.W_enc[i], (d_f, d_m), "(d_features, d_model)")
            expect("b_enc", i, self.b_enc[i], (d_f,), "(d_features,)")
            expect("b_dec", i, self.b_dec[i], (d_m,), "(d_model,)")
            if self.kind == "plt":
                expect("W_dec", i, self.W_dec[i], (d_f, d_m), "(d_features, d_model)")
            else:
                expect(
                    "W_dec", i, self.W_dec[i], (n - i, d_f, d_m), "(n_later, d_features, d_model)"
                )
        if self.activation == "jumprelu":
            if self.threshold is None or len(self.threshold) != n:
                raise AdagError(f"JumpReLU transcoders need one threshold tensor per layer ({n})")
            for i, t in enumerate(self.threshold):
                expect("threshold", i, t, (d_f,), "(d_features,)")
        elif self.threshold is not None:
            raise AdagError(
                f"{self.activation} transcoders take no threshold; use activation='jumprelu'"
            )
        if self.activation == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= d_f:
                raise AdagError(f"TopK transcoders need an integer k in 1..{d_f}, got {self.k!r}")
        elif self.k is not None:
            raise AdagError(f"{self.activation} transcoders take no k; use activation='topk'")
        if self.W_skip is not None:
            if len(self.W_skip) != n:
                raise AdagError(
                    f"transcoders have {len(self.W_skip)} W_skip tensors for {n} layers"
                )
            for i, t in enumerate(self.W_skip):
                expect("W_skip", i, t, (d_m, d_m), "(d_model, d_model)")
        self._index = {layer: i for i, layer in enumerate(self.layers)}

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        skip = ", skip" if self.W_skip is not None else ""
        return (
            f"Transcoders({self.kind}, layers={_ranges(self.layers)}, d_model={self.d_model}, "
            f"d_features={self.d_features}, {self.activation}{extra}{skip}, dtype={self.dtype})"
        )

    # -- sizes -------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return int(self.W_enc[0].shape[1])

    @property
    def d_features(self) -> int:
        """Features per layer."""
        return int(self.W_enc[0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc[0].dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc[0].device

    def index(self, layer: int) -> int:
        """The position of ``layer`` in :attr:`layers`; a one-line error if it has no encoder."""
        i = self._index.get(layer)
        if i is None:
            raise AdagError(
                f"the transcoders have no layer {layer} (they cover {_ranges(self.layers)})"
            )
        return i

    def targets(self, layer: int) -> list[int]:
        """The layers whose MLP output the features of ``layer`` write to (ascending)."""
        i = self.index(layer)
        return [layer] if self.kind == "plt" else self.layers[i:]

    def sources(self, layer: int) -> list[int]:
        """The layers whose features write to the MLP output of ``layer`` (ascending)."""
        i = self.index(layer)
        return [layer] if self.kind == "plt" else self.layers[: i + 1]

    # -- the computation ---------------------------------------------------------------------

    def pre_activation(self, layer: int, x: Tensor) -> Tensor:
        """``x @ W_enc.T + b_enc``: ``(..., d_model)`` → ``(..., d_features)``."""
        i = self.index(layer)
        return torch.nn.functional.linear(x, self.W_enc[i], self.b_enc[i])

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """The activation function of ``layer`` applied to pre-activations ``(..., d_features)``."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold[self.index(layer)])
        assert self.k is not None
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations ``(..., d_features)`` of ``layer`` for MLP inputs ``(..., d_model)``
        (differentiable in ``x`` wherever the activation is)."""
        return self.activate(layer, self.pre_activation(layer, x))

    def decoder(self, source: int, target: int) -> Tensor:
        """The decoder ``(d_features, d_model)`` from the features of ``source`` to the MLP
        output of ``target`` (PLT: ``source == target``; CLT: ``target >= source``)."""
        i, t = self.index(source), self.index(target)
        if self.kind == "plt":
            if source != target:
                raise AdagError(
                    f"per-layer transcoders write to their own layer only: layer {source} has no "
                    f"decoder to layer {target}"
                )
            return self.W_dec[i]
        if t < i:
            raise AdagError(
                f"cross-layer transcoder features of layer {source} write to layers "
                f"{_ranges(self.layers[i:])}, not to layer {target}"
            )
        return self.W_dec[i][t - i]

    def skip(self, layer: int, x: Tensor) -> Tensor:
        """The skip term ``x @ W_skip.T`` of ``layer`` for its MLP input ``x`` (``... d_model``);
        zeros when the transcoders have no skip weights."""
        i = self.index(layer)
        if self.W_skip is None:
            return torch.zeros_like(x)
        return x @ self.W_skip[i].T

    def decode(
        self,
        acts: Mapping[int, Tensor],
        layer: int,
        *,
        x: Tensor | None = None,
        skip: bool = True,
    ) -> Tensor:
        """The reconstruction ``(..., d_model)`` of ``layer``'s MLP output from feature activations
        ``{source layer: (..., d_features)}``: the sum of every given source's decoded features
        that writes to ``layer`` (entries of other layers are ignored, absent sources contribute
        nothing), plus ``b_dec[layer]``, plus the skip term of ``x`` (``layer``'s MLP input),
        which transcoders with skip weights require unless ``skip=False`` (the decoded part
        only)."""
        t = self.index(layer)
        if skip and self.W_skip is not None and x is None:
            raise AdagError(
                "these transcoders have skip weights: pass x= (the layer's MLP input) to decode"
            )
        out: Tensor | None = None
        for source in self.sources(layer):
            a = acts.get(source)
            if a is None:
                continue
            term = a @ self.decoder(source, layer)
            out = term if out is None else out + term
        out = self.b_dec[t] if out is None else out + self.b_dec[t]
        if skip and x is not None and self.W_skip is not None:
            out = out + self.skip(layer, x)
        return out

    # -- conversion and checks -----------------------------------------------------------------

    def tensors(self) -> dict[str, list[Tensor] | None]:
        """Every tensor list field by name (``W_enc``, ..., ``threshold``, ``W_skip``)."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")
        return {n: getattr(self, n) for n in names}

    def fingerprint(self) -> str:
        """The first 16 hex digits of a SHA-256 over the kind, activation, layers, hooks, ``k``
        and every tensor's dtype, shape and bytes: equal for the same weights wherever they were
        loaded from (a run directory's resume key for transcoder graphs)."""
        import hashlib

        h = hashlib.sha256()
        head = [self.kind, self.activation, self.layers, self.k, self.input_hook, self.output_hook]
        h.update(repr(head).encode())
        for name, ts in self.tensors().items():
            h.update(name.encode())
            for t in ts or []:
                c = t.detach().to("cpu").contiguous()
                h.update(f"{c.dtype}{tuple(c.shape)}".encode())
                h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
        return h.hexdigest()[:16]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Transcoders:
        """A copy with every tensor on ``device`` and/or in ``dtype`` (``meta`` copied)."""
        moved: dict[str, Any] = {
            n: None if ts is None else [t.to(device=device, dtype=dtype) for t in ts]
            for n, ts in self.tensors().items()
        }
        return replace(self, **moved, meta=dict(self.meta))

    def check(self, model: Model, *, all_layers: bool = True) -> None:
        """Raise a one-line :class:`AdagError` unless these transcoders fit ``model``: the hooks
        they were trained on are the model's MLP input and output, their layers exist (and, with
        ``all_layers``, cover every layer), their d_model is the model's, and their dtype and
        device are the model's (convert with :meth:`to`, or load with
        ``load_transcoders(path, model)``, which does)."""
        spec = model.spec
        if self.input_hook == "ln2.hook_normalized":
            raise AdagError(
                "these transcoders read ln2.hook_normalized (ln2 before its weight), not the MLP "
                "input; load them with load_transcoders(path, model) to fold ln2's weight in"
            )
        if self.input_hook in ("hook_resid_mid", "hook_mlp_in") and spec.ln2 is not None:
            raise AdagError(
                f"these transcoders read {self.input_hook} (the residual before ln2), but this "
                f"{spec.model_type} model's MLP input is ln2 of it (blocks.L.mlp.hook_in); use "
                "transcoders trained on mlp.hook_in or ln2.hook_normalized"
            )
        if self.output_hook == "mlp.hook_out" and spec.ln2_post is not None:
            raise AdagError(
                f"these transcoders write mlp.hook_out (before the post-MLP norm), but this "
                f"{spec.model_type} model adds ln2_post of it to the residual (hook_mlp_out); use "
                "transcoders trained on hook_mlp_out"
            )
        n = model.n_layers
        beyond = [x for x in self.layers if x >= n]
        if beyond:
            raise AdagError(
                f"transcoders cover layers {_ranges(beyond)}, the model has {n} layers (0-{n - 1})"
            )
        missing = sorted(set(range(n)) - set(self.layers))
        if all_layers and missing:
            raise AdagError(
                f"transcoders miss layers {_ranges(missing)} of the model's {n} (they cover "
                f"{_ranges(self.layers)})"
            )
        if self.d_model != model.d_model:
            raise AdagError(
                f"transcoders have d_model {self.d_model}, the model {model.d_model}: they belong "
                "to another model"
            )
        if self.dtype != model.dtype:
            raise AdagError(
                f"transcoders are {str(self.dtype).removeprefix('torch.')}, the model "
                f"{str(model.dtype).removeprefix('torch.')}; convert them with "
                f"tc.to(dtype=model.dtype)"
            )
        if self.device != model.device:
            raise AdagError(
                f"transcoders are on {self.device}, the model on {model.device}; move them with "
                "tc.to(device=model.device)"
            )


from adag.transcoders.formats import load_transcoders, save_transcoders  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "INPUT_HOOKS",
    "KINDS",
    "OUTPUT_HOOKS",
    "Transcoders",
    "load_transcoders",
    "save_transcoders",
]
