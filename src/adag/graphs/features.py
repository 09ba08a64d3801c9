"""Transcoder features and error nodes: the local replacement model of circuit tracing (Ameisen et
al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models", §2.2–2.4; as the
``circuit-tracer`` library builds it) as two node families of :func:`adag.graphs.trace.trace`.

**The replacement model.** At every layer ``l`` the MLP output (site ``blocks.l.hook_mlp_out``,
after the post-norm where the architecture has one) is replaced by

    ``mlp_out_l = Σ_{s <= l} decode_{s→l}(a_s) + b_dec_l (+ W_skip_l x_l) + err_l``

where ``x_l`` is the MLP input (``blocks.l.mlp.hook_in``, after ``ln2``), ``a_s =
act(W_enc_s x_s + b_enc_s)`` are the transcoder features of layer ``s`` (a per-layer transcoder
(PLT) decodes only ``s = l``, a cross-layer transcoder (CLT) every ``s <= l``) and the **error**
``err_l = real mlp_out_l − reconstruction_l`` is a constant taken from the clean run. So in the
clean run the replacement model computes exactly the model's logits. A layer without an encoder
has no features; its whole MLP output is its error. Attention patterns and norm scales are frozen
at their clean values by the trace's linearised passes (:mod:`adag.models.linear`).

**Sites** published at run time (:meth:`adag.models.model.Model.publish`), for every layer with an
encoder: ``blocks.l.transcoder.hook_pre`` (``batch pos d_feature``, the pre-activation
``W_enc x + b_enc``) and ``blocks.l.transcoder.hook_feature`` (the activation); for every layer
``blocks.l.transcoder.hook_error`` (``batch pos d_model``, the error vector). Note that a
:class:`~adag.models.sites.SiteRun` entered before the splice reads ``hook_mlp_out`` *before* the
replacement (the real MLP output); ``hook_resid_post`` carries the replaced stream.

**Linearisation.** A feature's activation is linearised at its clean value as
``a = r · pre`` with the frozen ratio ``r = a / pre`` (0 where ``pre = 0``). For ReLU, JumpReLU and
TopK every active feature has ``a = pre``, so ``r = 1`` on the nodes and 0 elsewhere (the
JumpReLU threshold's jump is not differentiated, as in circuit-tracer). The linearised replacement
model is then homogeneous of degree one in embeddings, errors and biases.

**Nodes and edges** (``w`` as :mod:`adag.graphs.trace` defines it: ``a_s · ∂a_t/∂a_s / a_t``,
every other feature held at its clean value, attention and norms frozen):

- feature ``feature:L:P:I`` — reads at stage ``L + 0.5`` (the MLP input), writes first at
  ``L + 1`` (a CLT feature writes to every covered layer ``>= L``; all its writes are carried in
  the splice, and an edge into a target exists when its first write precedes the target's read).
  Kept when active (``a != 0``) and ``|a · dm/da| >= node_threshold · |m|``. The edge into a
  feature is the direct effect on its pre-activation times ``r_t``, over ``a_t``:
  ``w = a_s · ∂pre_t/∂a_s / pre_t`` (``r_t = 1``). circuit-tracer's adjacency entry
  ``A[t, s] = a_s · ∂pre_t/∂a_s`` (the raw direct effect on the target's pre-activation) is
  ``w · a_t``.
- the embedding of a leading BOS position is kept as a source-only node (``embed:0``), as
  circuit-tracer keeps its BOS token node; the position has no features or errors.
- error ``error:L:P`` — one per layer and allowed position, all kept; its value is the error
  vector ``err`` (``node_activation``: ``‖err‖``), its attribution ``err · dm/derr``, its outgoing
  edges ``err · ∂target/∂err / target``. Edges go out of error nodes only (``can_be_target``
  False): the error is a constant of the clean run.

**The edge pass is sparse.** No encoder or decoder runs densely: the features are constants of the
clean run, the MLP output is ``clean reconstruction (constant) + skip (live) + error (a site)``
and the real MLPs are not computed (:meth:`adag.models.model.Model.skip_mlps`). A target
feature's seed is ``r · W_enc[i]`` at its MLP input (``pre = x @ W_enc.T + b_enc``); a source
feature's contribution is ``a · Σ_t ∂target/∂mlp_out_t · W_dec[s→t][i]``, read from the error
sites' gradients through its active decoder row only (:class:`PositionRows`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adag.graphs.family import EdgeSource, Mode, NodeFamily, Nodes
from adag.models.sites import Session

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.models.sites import SiteRun
    from adag.transcoders import Transcoders

_SPLICE_SITE = re.compile(r"^blocks\.(\d+)\.(mlp\.hook_in|hook_mlp_out)$")


def pre_site(layer: int) -> str:
    """The feature pre-activations of ``layer``: ``batch pos d_feature``."""
    return f"blocks.{layer}.transcoder.hook_pre"


def feature_site(layer: int) -> str:
    """The feature activations of ``layer``: ``batch pos d_feature``."""
    return f"blocks.{layer}.transcoder.hook_feature"


def error_site(layer: int) -> str:
    """The error vector of ``layer``: ``batch pos d_model``."""
    return f"blocks.{layer}.transcoder.hook_error"


def mlp_in_site(layer: int) -> str:
    """The MLP input of ``layer`` (after its norm): ``batch pos d_model``."""
    return f"blocks.{layer}.mlp.hook_in"


class PositionRows:
    """``n`` vectors ``w[k]`` at positions ``pos[k]``, padded into one ``(U, n_max, d)`` block
    per used position, so that ``out[b, k] = g[b, pos[k]] · w[k]`` for a ``(B, T, d)`` gradient is
    one batched matrix product (``U`` positions × ``(B, d) @ (d, n_max)``) instead of a gather
    of ``(B, n, d)``."""

    def __init__(self, pos: Tensor, w: Tensor, T: int) -> None:
        n, d = w.shape
        counts = torch.bincount(pos, minlength=T)
        self.used = counts.nonzero().flatten()
        compact = torch.full((T,), -1, dtype=torch.long, device=pos.device)
        compact[self.used] = torch.arange(len(self.used), device=pos.device)
        self.compact = compact
        order = torch.argsort(pos, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(pos)
        slot[order] = torch.arange(n, device=pos.device) - starts[pos[order]]
        self.cpos, self.slot = compact[pos], slot
        width = int(counts.max()) if n else 0
        self.w = w.new_zeros(len(self.used), width, d)
        self.w[self.cpos, slot] = w

    def dot(self, g: Tensor) -> Tensor:
        """``(B, n)`` from ``g (B, P, d)``, ``P <= T`` (a prefix pass: entries at positions
        ``>= P`` are 0)."""
        B, P = g.shape[0], g.shape[1]
        if not len(self.cpos):
            return g.new_zeros(B, 0)
        u = int(torch.searchsorted(self.used, P)) if len(self.compact) > P else len(self.used)
        if u == 0:
            return g.new_zeros(B, len(self.cpos))
        gu = g[:, self.used[:u]].transpose(0, 1).to(self.w.dtype)  # (u, B, d)
        r = torch.bmm(gu, self.w[:u].transpose(1, 2))  # (u, B, n_max)
        if u == len(self.used):
            return r[self.cpos, :, self.slot].T
        out = r.new_zeros(B, len(self.cpos))
        m = self.cpos < u
        out[:, m] = r[self.cpos[m], :, self.slot[m]].T
        return out


def _swap_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    return value.detach() + (surrogate - surrogate.detach())


def _ratio(act: Tensor, pre: Tensor) -> Tensor:
    """``r = act / pre`` where ``pre != 0``, else 0: the frozen activation ratio."""
    nz = pre != 0
    return torch.where(nz, act / torch.where(nz, pre, torch.ones_like(pre)), torch.zeros_like(pre))


class Replacement:
    """The replacement model of one model and one :class:`~adag.transcoders.Transcoders` set:
    registers the run-time sites and builds the splice of each pass (see the module docstring)."""

    def __init__(self, model: Model, transcoders: Transcoders) -> None:
        transcoders.check(model, all_layers=False)
        self.tc = transcoders
        self.covered = list(transcoders.layers)
        self.n_layers = model.n_layers
        for layer in self.covered:
            model.register_site(pre_site(layer), ("batch", "pos", "d_feature"))
            model.register_site(feature_site(layer), ("batch", "pos", "d_feature"))
        for layer in range(model.n_layers):
            model.register_site(error_site(layer), ("batch", "pos", "d_model"))
        self._edge_consts: tuple[Mapping[str, Tensor], dict[int, Tensor]] | None = None

    def edge_constant(self, clean: Mapping[str, Tensor], layer: int) -> Tensor:
        """The clean reconstruction of a covered ``layer`` without its skip term,
        ``(pos, d_model)``: the MLP output's constant part in the edge pass. Computed once per
        clean run (the edge pass runs a forward per prefix group)."""
        if self._edge_consts is None or self._edge_consts[0] is not clean:
            self._edge_consts = (clean, {})
        memo = self._edge_consts[1]
        if layer not in memo:
            acts = {s: clean[feature_site(s)] for s in self.tc.sources(layer)}
            memo[layer] = self.tc.decode(acts, layer, skip=False)
        return memo[layer]

    def reconstruction(self, layer: int, acts: Mapping[int, Tensor], x: Tensor | None) -> Tensor:
        """``Σ_s decode_{s→layer}(a_s) + b_dec (+ x W_skip^T)`` for a covered layer; ``x`` is
        its MLP input. The skip term is a live linear path in every pass (like attention's OV
        circuit), so direct effects run through it."""
        return self.tc.decode(acts, layer, x=x)

    def settings(self) -> dict[str, Any]:
        tc = self.tc
        return {
            "kind": tc.kind,
            "activation": tc.activation,
            "layers": list(tc.layers),
            "d_features": int(tc.d_features),
            "skip": tc.W_skip is not None,
            "source": {k: v for k, v in tc.meta.items() if isinstance(v, str | int | float)},
        }


class ReplacementSplice(Session):
    """The replacement model inside one forward pass of mode ``mode``:

    - ``clean``: features from the real MLP inputs, errors ``real − reconstruction``; the stream
      is left exactly as the model computes it;
    - ``attribution``: ``a`` has its clean value and the gradient of ``r · pre``; the MLP output
      is the reconstruction plus the clean error;
    - ``edges``: ``a`` is the clean value, detached from its input (a direct effect must not run
      through another feature), ``pre`` stays live for the target seeds;
    - ``replica``: ``a = r · pre`` (the affine map the linearised backward differentiates).
    """

    def __init__(
        self, model: Model, rep: Replacement, mode: Mode, clean: Mapping[str, Tensor] | None
    ) -> None:
        self.model, self.rep, self.mode = model, rep, mode
        self.clean = clean
        self.acts: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}

    def _clean(self, name: str, like: Tensor) -> Tensor:
        assert self.clean is not None
        v = self.clean[name][: like.shape[1]].to(like.dtype)  # a prefix pass: its positions
        return v.expand(like.shape[0], *v.shape)

    def site(self, name: str, x: Tensor) -> Tensor:
        m = _SPLICE_SITE.match(name)
        if m is None:
            return x
        layer = int(m.group(1))
        if m.group(2) == "mlp.hook_in":
            self.inputs[layer] = x
            if layer in self.rep.covered:
                self._encode(layer, x)
            return x
        return self._replace(layer, x)

    def _encode(self, layer: int, x: Tensor) -> None:
        if self.mode == "edges":
            # the features are constants of the clean run: no encoder runs; the target seeds
            # are ``r · W_enc[i]`` at the MLP input and the sources' effects are read from the
            # error sites' gradients through the active decoder rows (sparse)
            return
        tc, publish = self.rep.tc, self.model.publish
        pre = publish(pre_site(layer), tc.pre_activation(layer, x))
        if self.mode == "clean":
            act = tc.activate(layer, pre)
        else:
            clean_act = self._clean(feature_site(layer), pre)
            assert self.clean is not None
            r = _ratio(self.clean[feature_site(layer)], self.clean[pre_site(layer)]).to(pre.dtype)
            # attribution: the clean value with the gradient of r·pre; replica: r·pre
            act = _swap_grad(clean_act, r * pre) if self.mode == "attribution" else r * pre
        self.acts[layer] = publish(feature_site(layer), act)

    def _replace(self, layer: int, x: Tensor) -> Tensor:
        rep = self.rep
        if self.mode == "edges":
            # MLP output = clean feature decodes (constant) + skip (live) + error (a site)
            err = self.model.publish(error_site(layer), self._clean(error_site(layer), x))
            if layer not in rep.covered:
                return err
            assert self.clean is not None
            out = err + rep.edge_constant(self.clean, layer)[: err.shape[1]].to(err.dtype)
            if rep.tc.W_skip is not None:
                out = out + rep.tc.skip(layer, self.inputs[layer])
            return out
        recon = (
            rep.reconstruction(layer, self.acts, self.inputs.get(layer))
            if layer in rep.covered
            else None
        )
        if self.mode == "clean":
            self.model.publish(error_site(layer), x if recon is None else x - recon)
            return x
        err = self.model.publish(error_site(layer), self._clean(error_site(layer), x))
        return err if recon is None else recon + err


@contextlib.contextmanager
def _spliced(model: Model, splice: ReplacementSplice) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if splice.mode != "clean":  # the replaced MLPs' outputs are discarded: skip them
            stack.enter_context(model.skip_mlps(range(model.n_layers)))
        stack.enter_context(model.session(splice))
        yield


class TranscoderFeatures(NodeFamily):
    """Transcoder features ``feature:L:P:I`` (see the module docstring). ``max_nodes``: keep at
    most this many features, those of largest ``|attribution|`` (the ADAG analogue of
    circuit-tracer's ``max_feature_nodes``, which ranks by influence)."""

    kind = "feature"
    bos_embedding = True
    demeaned_logits = True
    """the edge pass also traces every source's effect on the vocabulary mean of the logits
    (``Graph.logit_mean_effect``: circuit-tracer's demeaned logit rows)"""

    def __init__(self, replacement: Replacement, *, max_nodes: int | None = None) -> None:
        self.rep = replacement
        self.max_nodes = max_nodes

    def layers(self, model: Model) -> list[int]:
        return list(self.rep.covered)

    def site(self, layer: int) -> str:
        return feature_site(layer)

    def read_stage(self, layer: int) -> float:
        return layer + 0.5

    def write_stage(self, layer: int) -> float:
        return layer + 1.0

    def candidates(self, x: Tensor) -> Tensor:
        return x != 0

    def keep(self, attr: Tensor, v: Tensor, threshold: float) -> Tensor:
        return (attr.abs() >= threshold) & (v != 0)

    def mlp_rules(self, model: Model) -> Mapping[int, str]:
        # the real MLPs' outputs are discarded by the splice: nothing flows through them
        return dict.fromkeys(range(model.n_layers), "stop")

    def clean_sites(self, model: Model) -> list[str]:
        return [pre_site(layer) for layer in self.rep.covered]

    def edge_sites(self, model: Model, layers: Sequence[int]) -> list[str]:
        return [mlp_in_site(layer) for layer in layers]

    def edge_grad_sites(self, model: Model, layer: int) -> list[str]:
        return [error_site(t) for t in self.rep.tc.targets(layer)]

    def edge_source(self, model: Model, clean: Mapping[str, Tensor], nodes: Nodes) -> EdgeSource:
        # a_s · Σ_t ∂target/∂mlp_out_t · W_dec[s→t][i]: only the active decoder rows, scaled by
        # their activations (prepared once; per pass one small product per source and target
        # layer within the pass's reach)
        tc = self.rep.tc
        T = int(clean[feature_site(self.rep.covered[0])].shape[0])
        blocks: list[tuple[float, Tensor, str, PositionRows]] = []
        for s in sorted(set(nodes.layer.tolist())):
            sel = nodes.of_layer(s).nonzero().flatten()
            for t in tc.targets(s):
                w = tc.decoder(s, t)[nodes.idx[sel]].to(nodes.act.dtype) * nodes.act[sel, None]
                blocks.append((t + 1.0, sel, error_site(t), PositionRows(nodes.pos[sel], w, T)))
        n = len(nodes)

        def contributions(grads: Mapping[str, Tensor], rows: int, reach: float) -> Tensor:
            out = nodes.act.new_zeros(rows, n)
            for write, sel, site, block in blocks:
                if write <= reach:
                    out[:, sel] += block.dot(grads[site][:rows])
            return out

        return contributions

    def edge_sites_within(self, model: Model, layers: Sequence[int], reach: float) -> list[str]:
        tc = self.rep.tc
        return [error_site(t) for s in layers for t in tc.targets(s) if t + 1.0 <= reach]

    def splice(
        self, model: Model, mode: Mode, clean: Mapping[str, Tensor] | None
    ) -> contextlib.AbstractContextManager[object]:
        return _spliced(model, ReplacementSplice(model, self.rep, mode, clean))

    def seeds(
        self,
        model: Model,
        run: SiteRun,
        clean: Mapping[str, Tensor],
        layer: int,
        rows: Tensor,
        pos: Tensor,
        idx: Tensor,
    ) -> list[tuple[Tensor, Tensor]]:
        # pre = x @ W_enc.T + b_enc: the seed of r · pre at the MLP input x is r · W_enc[i]
        r = _ratio(clean[feature_site(layer)][pos, idx], clean[pre_site(layer)][pos, idx])
        x = run.value(mlp_in_site(layer))
        w = self.rep.tc.W_enc[self.rep.tc.index(layer)]
        s = torch.zeros_like(x)
        s[rows, pos] = r.to(x.dtype)[:, None] * w[idx].to(x.dtype)
        return [(x, s)]

    def settings(self, model: Model) -> dict[str, Any]:
        return {
            "transcoders": self.rep.settings(),
            "linearization": {
                "mlp": "replaced by transcoders (features a = r·pre, r frozen; errors constant)",
                "norms": "frozen",
                "attention": "frozen",
            },
            "edges": "direct effects in the replacement model; into a feature: on its "
            "pre-activation (times r = 1), over its activation",
            "max_feature_nodes": self.max_nodes,
        }


class ErrorNodes(NodeFamily):
    """Error nodes ``error:L:P``, one per layer and position (see the module docstring); they
    share the splice of the :class:`TranscoderFeatures` family traced with them."""

    kind = "error"
    can_be_target = False

    def __init__(self, replacement: Replacement) -> None:
        self.rep = replacement

    def site(self, layer: int) -> str:
        return error_site(layer)

    def read_stage(self, layer: int) -> float:
        return layer + 0.5

    def write_stage(self, layer: int) -> float:
        return layer + 1.0

    def keep(self, attr: Tensor, v: Tensor, threshold: float) -> Tensor:
        return torch.ones_like(attr, dtype=torch.bool)

    def mlp_rules(self, model: Model) -> Mapping[int, str]:
        return dict.fromkeys(range(model.n_layers), "stop")

    def values(self, x: Tensor) -> Tensor:
        return x.norm(dim=-1, keepdim=True)  # (..., pos, 1): ‖err‖

    def attribution(self, grad: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("kpd,pd->kp", grad, x)[..., None]  # (K, T, 1): err · dm/derr

    def source_contributions(
        self, grad: Tensor, x: Tensor, pos: Tensor, idx: Tensor, act: Tensor
    ) -> Tensor:
        return torch.einsum("btd,td->bt", grad, x)[:, pos]

    def seeds(
        self,
        model: Model,
        run: SiteRun,
        clean: Mapping[str, Tensor],
        layer: int,
        rows: Tensor,
        pos: Tensor,
        idx: Tensor,
    ) -> list[tuple[Tensor, Tensor]]:
        raise AssertionError("error nodes are never edge targets")


def replacement_families(
    model: Model, transcoders: Transcoders, *, max_feature_nodes: int | None = None
) -> list[NodeFamily]:
    """The node families of a transcoder graph: features, then errors (one shared splice)."""
    rep = Replacement(model, transcoders)
    return [TranscoderFeatures(rep, max_nodes=max_feature_nodes), ErrorNodes(rep)]


__all__ = [
    "ErrorNodes",
    "PositionRows",
    "Replacement",
    "ReplacementSplice",
    "TranscoderFeatures",
    "error_site",
    "feature_site",
    "mlp_in_site",
    "pre_site",
    "replacement_families",
]
