"""Neuron attribution graphs: the tracing half of ADAG (Arora, Wu, Steinhardt, Schwettmann 2026,
"ADAG: Automatically Describing Attribution Graphs", §2).

For one prompt and a metric ``m = Σ_j c_j · logit_j`` at the last position (the top-k next tokens
with ``c_j = 1`` by default, or a logit difference):

* **Nodes** are the MLP neurons (inputs of the down projection), the input embeddings and the
  target logits. A neuron's attribution is RelP, ``a · dm/da`` under the linearised backward of
  :func:`adag.models.linear.linearize` (frozen norm scales and attention patterns, the ``relp``
  rule with the half rule in gated MLPs), which is complete: the embeddings' attributions plus
  the bias terms sum to ``m``. Neurons with ``|RelP| >= node_threshold · |m|`` are kept.
* **Edges** are direct effects between kept nodes: every MLP strictly between source and target is
  stop-gradded, so the gradient reaches the source only through attention (frozen pattern), norms
  (frozen scale) and the residual stream. ``w = a_s · ∂a_t/∂a_s / a_t``; into a logit,
  ``contribution / logit``. Because the linearised target is homogeneous of degree one in its
  inputs, a target's incoming contributions over *all* earlier neurons and embeddings plus the bias
  terms equal its value. Edges with ``|w| >= edge_threshold`` are kept, each with its attribution
  flow ``w · attribution(target) / m``.
* **Profiles** (raw values, stored on the graph for :mod:`adag.profiles`): for every kept neuron the
  total-effect attribution of each prompt position's embedding, ``Σ_d e_{p,d} · da/de_{p,d}``
  (forward mode through the linear replica: one row per position), and the neuron's attribution to each target logit,
  ``a · dlogit_j/da`` (from the node-attribution backward pass, one row per target).

Efficiency: each kind of backward pass runs on a batch of identical rows of the prompt built by one
forward pass whose graph is kept; each row carries the seed of a different target node, so one
backward gives ``batch_size`` targets' gradients. Edge passes seed a neuron through its own MLP in
closed form (:func:`adag.models.linear.post_partials`) at the gate/up pre-activations while every
MLP is stopped, so targets of different layers share a pass. Nothing dense over all neurons ×
positions × targets is ever built: each pass gathers the kept sources' gradients and keeps the
edges above threshold, so memory is linear in kept nodes and edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.models.linear import linear_replica, linearize, post_partials, replica_sites
from adag.models.model import Model
from adag.models.sites import Patch

log = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Tensor
Targets = Sequence[str | int] | Mapping[str | int, float] | None

EMBED = "blocks.0.hook_resid_pre"


def _post(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def _pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def _lin(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre_linear"


# ----------------------------------------------------------------------------------------------
# Inputs


def assemble_prompt(
    model: Model, prompt: str, *, chat: bool = False, seed: str | None = None
) -> tuple[str, list[int]]:
    """The text and token ids traced for ``prompt``: the raw prompt, or the model's chat template
    with ``prompt`` as the user turn and the assistant turn opened; ``seed`` (e.g. ``"Answer:"``)
    is appended either way, so the traced position is its last token."""
    if not prompt.strip():
        raise AdagError("prompt is empty; give a non-empty prompt")
    tok = model._tok()
    if chat:
        if not getattr(tok, "chat_template", None):
            raise AdagError(f"model {model.name!r} has no chat template; trace without --chat")
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        text = str(text) + (seed or "")
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        text = prompt + (seed or "")
        ids = model.to_tokens(text)[0].tolist()
    return text, ids


def target_token_id(model: Model, t: str | int) -> int:
    if isinstance(t, int):
        if not 0 <= t < model.d_vocab:
            raise AdagError(
                f"target token id {t} is outside the vocabulary (0..{model.d_vocab - 1})"
            )
        return t
    ids = model._tok()(t, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise AdagError(
            f"target {t!r} is {len(ids)} tokens for this tokenizer; give a single token "
            "(with its leading space, e.g. ' Paris')"
        )
    return int(ids[0])


def _resolve_targets(
    model: Model, logits: Tensor, targets: Targets, k: int
) -> tuple[list[int], list[float]]:
    """Target token ids and coefficients from ``targets`` or the top ``k`` of ``logits``."""
    if targets is None:
        if k < 1:
            raise AdagError(f"k must be at least 1, got {k}")
        ids = logits.topk(min(k, logits.shape[-1])).indices.tolist()
        return ids, [1.0] * len(ids)
    if isinstance(targets, Mapping):
        pairs = [(target_token_id(model, t), float(c)) for t, c in targets.items()]
    else:
        pairs = [(target_token_id(model, t), 1.0) for t in targets]
    if not pairs:
        raise AdagError(
            "no targets given; pass token strings, ids, or leave targets=None for top-k"
        )
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise AdagError(f"targets repeat a token: {ids}; give each target once")
    return ids, [c for _, c in pairs]


# ----------------------------------------------------------------------------------------------
# Tracing


@dataclass
class _Kept:
    """Kept neurons, sorted by (layer, position, index)."""

    layer: Tensor  # (n,)
    pos: Tensor
    idx: Tensor
    act: Tensor  # (n,) activation a
    attr: Tensor  # (n,) RelP
    out_attr: Tensor  # (n, K)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_settings(node_threshold: float, edge_threshold: float, batch_size: int) -> None:
    """One-line errors for bad tracing settings."""
    if not (node_threshold >= 0 and edge_threshold >= 0):
        raise AdagError(
            f"thresholds must be >= 0, got node_threshold={node_threshold}, "
            f"edge_threshold={edge_threshold}"
        )
    if batch_size < 1:
        raise AdagError(f"batch_size must be at least 1, got {batch_size}")


def trace(
    model: Model,
    prompts: Prompt | Sequence[Prompt],
    *,
    k: int = 5,
    targets: Targets = None,
    node_threshold: float = 0.005,
    edge_threshold: float = 0.01,
    chat: bool = False,
    seed_response: str | Sequence[str | None] | None = None,
    batch_size: int = 32,
    max_batch_tokens: int = 1024,
    exclude_bos: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[Graph]:
    """Trace one neuron attribution graph per prompt (see the module docstring).

    ``prompts``: a string, token ids (1-D), or a list of either. ``targets``: ``None`` (the top
    ``k`` next tokens), token strings or ids (``m`` is the sum of their logits), or
    ``{token: coefficient}`` (e.g. ``{" Mary": 1, " John": -1}`` for a logit difference).
    ``chat`` / ``seed_response``: wrap each prompt in the chat template and open the assistant turn
    with the seed (one seed, or one per prompt). ``batch_size``: rows per backward pass (targets
    per pass), lowered so that rows × prompt length stays within ``max_batch_tokens`` (memory
    grows with both). ``exclude_bos``: leave a leading BOS position out of the
    nodes (attention sinks; as in ADAG); recorded in ``settings``. ``progress`` is called with 1
    after each prompt.
    """
    check_settings(node_threshold, edge_threshold, batch_size)
    items: list[Prompt]
    if isinstance(prompts, str | Tensor) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        items = [prompts]  # type: ignore[list-item]
    else:
        items = list(prompts)  # type: ignore[arg-type]
    if not items:
        raise AdagError("no prompts given; pass a prompt or a non-empty list of prompts")
    seeds = (
        list(seed_response)
        if isinstance(seed_response, Sequence) and not isinstance(seed_response, str)
        else [seed_response] * len(items)
    )
    if len(seeds) != len(items):
        raise AdagError(f"got {len(seeds)} seed responses for {len(items)} prompts")
    graphs = []
    for item, seed in zip(items, seeds, strict=True):
        if isinstance(item, str):
            text, ids = assemble_prompt(model, item, chat=chat, seed=seed)
        else:
            if chat or seed:
                raise AdagError("chat and seed_response need text prompts, not token ids")
            text, ids = "", torch.as_tensor(item).reshape(-1).tolist()
        graphs.append(
            trace_tokens(
                model,
                ids,
                prompt=text,
                k=k,
                targets=targets,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                exclude_bos=exclude_bos,
                extra_settings={"chat": chat, "seed_response": seed},
            )
        )
        if progress is not None:
            progress(1)
    return graphs


def trace_tokens(
    model: Model,
    ids: Sequence[int],
    *,
    prompt: str = "",
    k: int = 5,
    targets: Targets = None,
    node_threshold: float = 0.005,
    edge_threshold: float = 0.01,
    batch_size: int = 32,
    max_batch_tokens: int = 1024,
    exclude_bos: bool = True,
    extra_settings: Mapping[str, Any] | None = None,
) -> Graph:
    """:func:`trace` for one prompt given as token ids; the traced position is the last."""
    check_settings(node_threshold, edge_threshold, batch_size)
    tokens = model._check_tokens(torch.as_tensor(list(ids), dtype=torch.long)[None])
    T = tokens.shape[1]
    L = model.n_layers
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    excluded = [0] if exclude_bos and bos is not None and int(tokens[0, 0]) == bos else []
    allowed = torch.ones(T, dtype=torch.bool, device=tokens.device)
    allowed[excluded] = False

    # -- clean values -------------------------------------------------------------------------
    reads = [EMBED, *(_post(i) for i in range(L)), *replica_sites(model)]
    with torch.no_grad(), model.sites(read=reads) as run:
        last = model(tokens, last_only=True)[0, -1]
    clean = dict(run.cache)  # each (1, ...)
    c = {n: v[0] for n, v in clean.items()}  # each (pos, ·)
    emb = c[EMBED]  # (T, d_model)
    target_ids, coef_list = _resolve_targets(model, last, targets, k)
    K = len(target_ids)
    tid = torch.tensor(target_ids, device=tokens.device)
    coef = torch.tensor(coef_list, dtype=last.dtype, device=tokens.device)
    tlogits = last[tid]
    probs = last.double().softmax(-1)[tid]
    m = float((coef * tlogits).sum())
    if m == 0.0:
        raise AdagError("the metric is exactly 0 at this prompt; choose other targets")

    # -- node attributions and output attributions: one relp backward, one row per target ----
    post_names = [_post(i) for i in range(L)]
    with linearize(model, mlp="relp"), model.sites(grad=[*post_names, EMBED]) as run:
        z = model(tokens.expand(K, T), last_only=True)[:, -1]  # (K, d_vocab)
        seed = torch.zeros_like(z)
        seed[torch.arange(K), tid] = 1.0
        g = run.vjp([z], [seed])
    emb_out = torch.einsum("kpd,pd->kp", g[EMBED], emb)  # (K, T): Σ_d e·dlogit_j/de
    emb_attr = coef @ emb_out  # (T,)
    layers, poss, idxs, acts, attrs, outs = [], [], [], [], [], []
    thr = node_threshold * abs(m)
    for layer in range(L):
        a = c[_post(layer)]  # (T, d_mlp)
        out = g[_post(layer)] * a  # (K, T, d_mlp): a · dlogit_j/da
        relp = torch.einsum("k,kpn->pn", coef, out)
        keep = (relp.abs() >= thr) & allowed[:, None]
        p, i = keep.nonzero(as_tuple=True)  # row-major: sorted by (pos, idx)
        layers.append(torch.full_like(p, layer))
        poss.append(p)
        idxs.append(i)
        acts.append(a[p, i])
        attrs.append(relp[p, i])
        outs.append(out[:, p, i].T)
    del g
    kept = _Kept(
        torch.cat(layers),
        torch.cat(poss),
        torch.cat(idxs),
        torch.cat(acts),
        torch.cat(attrs),
        torch.cat(outs),
    )
    n = len(kept.layer)
    log.info("prompt of %d tokens: m = %.4g, %d neurons kept", T, m, n)

    rows = max(1, min(batch_size, max_batch_tokens // T))
    in_attr = _input_attributions(model, tokens, kept, emb, clean, rows + 1)
    embed_pos = allowed.nonzero().flatten()
    edges = _edges(model, tokens, kept, c, emb, embed_pos, tid, tlogits, rows, edge_threshold)

    # -- assemble the graph -------------------------------------------------------------------
    E = len(embed_pos)
    tok_str = _decoder(model)
    ids_list = tokens[0].tolist()
    ptoks = [tok_str(i) for i in ids_list]
    node_ids = [f"embed:{p}" for p in embed_pos.tolist()]
    node_ids += [
        f"neuron:{a}:{b}:{d}"
        for a, b, d in zip(kept.layer.tolist(), kept.pos.tolist(), kept.idx.tolist(), strict=True)
    ]
    node_ids += [f"logit:{t}" for t in target_ids]
    kinds = ["embed"] * E + ["neuron"] * n + ["logit"] * K
    layer_col = torch.cat([torch.full((E,), -1), kept.layer.cpu(), torch.full((K,), L)])
    pos_col = torch.cat([embed_pos.cpu(), kept.pos.cpu(), torch.full((K,), T - 1)])
    index_col = torch.cat([tokens[0, embed_pos].cpu(), kept.idx.cpu(), tid.cpu()])
    activation = torch.cat([emb[embed_pos].norm(dim=-1), kept.act, tlogits])
    attribution = torch.cat([emb_attr[embed_pos], kept.attr, coef * tlogits])
    input_attr = torch.cat([torch.zeros(E, T, dtype=emb.dtype), in_attr.cpu(), emb_out.cpu()])
    output_attr = torch.cat(
        [emb_out[:, embed_pos].T.cpu(), kept.out_attr.cpu(), torch.zeros(K, K, dtype=emb.dtype)]
    )
    src, tgt, w = edges
    # edges index sources/targets among [embeds, neurons, logits] already
    flow = w * attribution[tgt] / m
    target_tokens = [tok_str(t) for t in target_ids]
    settings = {
        **trace_settings(
            model,
            k=k,
            targets=targets,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            exclude_bos=exclude_bos,
        ),
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "excluded_positions": excluded,
        "traced_position": T - 1,
        "linearization": {"mlp": "relp", "norms": "frozen", "attention": "frozen"},
        "edges": "direct effects; MLPs strictly between source and target stop-gradded",
        **(extra_settings or {}),
    }

    def np_(x: Tensor) -> np.ndarray:
        # numpy has no bfloat16: half-precision models store their graphs in float32
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        return x.detach().cpu().numpy()

    return Graph(
        node_ids=node_ids,
        node_kinds=kinds,
        node_layer=np_(layer_col).astype(np.int64),
        node_position=np_(pos_col).astype(np.int64),
        node_index=np_(index_col).astype(np.int64),
        node_activation=np_(activation),
        node_attribution=np_(attribution),
        node_tokens=[ptoks[p] for p in pos_col[: E + n].tolist()] + target_tokens,
        edge_source=np_(src).astype(np.int64),
        edge_target=np_(tgt).astype(np.int64),
        edge_weight=np_(w),
        edge_flow=np_(flow),
        input_attr=np_(input_attr),
        output_attr=np_(output_attr),
        target_ids=np.array(target_ids, dtype=np.int64),
        target_tokens=target_tokens,
        target_coef=np_(coef),
        target_logits=np_(tlogits),
        target_probs=np_(probs.to(tlogits.dtype)),
        prompt_ids=np.array(ids_list, dtype=np.int64),
        prompt_tokens=ptoks,
        prompt=prompt,
        metric=m,
        settings=settings,
    )


def trace_settings(
    model: Model,
    *,
    k: int,
    targets: Targets,
    node_threshold: float,
    edge_threshold: float,
    exclude_bos: bool,
) -> dict[str, Any]:
    """The settings that decide a graph's content (recorded in ``Graph.settings``; a run
    directory reuses a graph whose recorded settings match)."""
    return {
        "model": model.name,
        "architecture": model.spec.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "k": k if targets is None else None,
        "targets": None if targets is None else targets_json(targets),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "exclude_bos": exclude_bos,
    }


def targets_json(targets: Targets) -> Any:
    """``targets`` as JSON (for settings)."""
    if isinstance(targets, Mapping):
        return [[t, float(c)] for t, c in targets.items()]
    return list(targets or [])


def _decoder(model: Model) -> Callable[[int], str]:
    if model.tokenizer is None:
        return str
    tok = model.tokenizer
    return lambda i: str(tok.decode([i]))


def _input_attributions(
    model: Model,
    tokens: Tensor,
    kept: _Kept,
    emb: Tensor,
    clean: Mapping[str, Tensor],
    rows: int,
) -> Tensor:
    """``(n_kept, T)``: ``Σ_d e_{p,d} · da_v/de_{p,d}`` under the relp linearisation.

    Forward mode, without dual numbers: the linearised model is an affine map of the embeddings
    (:func:`adag.models.linear.linear_replica`), so feeding it ``e_p`` alone at position ``p``
    (row ``p``) and subtracting its output for a zero input (the bias terms, row 0) gives the
    derivative of *every* neuron along every position's embedding in one plain forward pass:
    ``T + 1`` rows instead of one backward row per kept neuron."""
    n, T = len(kept.layer), tokens.shape[1]
    out = torch.zeros(n, T, dtype=emb.dtype, device=emb.device)
    if n == 0:
        return out
    layers = sorted(set(kept.layer.tolist()))
    for sl in _chunks(T, max(1, rows - 1)):
        P = sl.stop - sl.start
        pos = torch.arange(sl.start, sl.stop, device=emb.device)
        x = torch.zeros(P + 1, T, emb.shape[-1], dtype=emb.dtype, device=emb.device)
        x[1 + torch.arange(P), pos] = emb[pos]
        with (
            torch.no_grad(),
            linear_replica(model, clean, mlp="relp"),
            model.sites(read=[_post(i) for i in layers], patches=[Patch(EMBED, x)]) as run,
        ):
            model(tokens.expand(P + 1, T), last_only=True)
        for layer in layers:
            sel = kept.layer == layer
            v = run.cache[_post(layer)][:, kept.pos[sel], kept.idx[sel]]  # (P + 1, n_layer)
            out[sel, sl] = (v[1:] - v[:1]).T
    return out


def _edges(
    model: Model,
    tokens: Tensor,
    kept: _Kept,
    c: Mapping[str, Tensor],
    emb: Tensor,
    embed_pos: Tensor,
    tid: Tensor,
    tlogits: Tensor,
    batch_size: int,
    edge_threshold: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct-effect edges among the kept nodes, as (source row, target row, weight) with rows
    numbered embeddings, neurons, logits. One forward with every MLP stopped; each backward pass
    seeds up to ``batch_size`` targets (logits at the last position; neurons at their gate/up
    pre-activations with the relp partials), deepest targets first so a pass rarely reaches
    further down than it must."""
    n, K, E = len(kept.layer), len(tid), len(embed_pos)
    T = tokens.shape[1]
    L = model.n_layers
    dev = emb.device
    # Sources: embeddings then kept neurons, with their layer (-1 for embeddings).
    src_layer = torch.cat([torch.full((E,), -1, device=dev), kept.layer])
    src_layers = sorted(set(kept.layer.tolist()))
    # Targets: every kept neuron (value a_t, layer) and every logit (layer L).
    tgt_rows = torch.cat([E + torch.arange(n, device=dev), E + n + torch.arange(K, device=dev)])
    tgt_layer = torch.cat([kept.layer, torch.full((K,), L, device=dev)])
    tgt_value = torch.cat([kept.act, tlogits])
    order = torch.argsort(tgt_layer, descending=True, stable=True)
    # Closed-form seeds of each kept neuron through its own MLP (relp rule).
    dg = torch.zeros(n, dtype=emb.dtype, device=dev)
    du = torch.zeros(n, dtype=emb.dtype, device=dev)
    for layer in set(kept.layer.tolist()):
        sel = kept.layer == layer
        gv = c[_pre(layer)][kept.pos[sel], kept.idx[sel]]
        uv = c[_lin(layer)][kept.pos[sel], kept.idx[sel]] if model.spec.gated else None
        pg, pu = post_partials("relp", model.act, model.spec.gated, gv, uv)
        dg[sel] = pg
        if pu is not None:
            du[sel] = pu
    n_t = n + K
    B = min(batch_size, n_t)
    reads = [_pre(i) for i in src_layers] + (
        [_lin(i) for i in src_layers] if model.spec.gated else []
    )
    srcs, tgts, ws = [], [], []
    with (
        linearize(model, mlp="stop"),
        model.sites(read=reads, grad=[EMBED, *(_post(i) for i in src_layers)]) as run,
    ):
        z = model(tokens.expand(B, T), last_only=True)[:, -1]  # (B, d_vocab)
        for sl in _chunks(n_t, B):
            chunk = order[sl]
            rows = torch.arange(len(chunk), device=dev)
            outs: list[Tensor] = []
            seeds: list[Tensor] = []
            is_logit = chunk >= n
            if is_logit.any():
                s = torch.zeros_like(z)
                s[rows[is_logit], tid[chunk[is_logit] - n]] = 1.0
                outs.append(z)
                seeds.append(s)
            neu = chunk[~is_logit]
            nrows = rows[~is_logit]
            for layer in sorted(set(kept.layer[neu].tolist())):
                sel = kept.layer[neu] == layer
                v = neu[sel]
                for name, part in ((_pre(layer), dg), (_lin(layer), du)):
                    if name == _lin(layer) and not model.spec.gated:
                        continue
                    x = run.value(name)
                    s = torch.zeros_like(x)
                    s[nrows[sel], kept.pos[v], kept.idx[v]] = part[v]
                    outs.append(x)
                    seeds.append(s)
            grads = run.vjp(outs, seeds, retain_graph=True)
            b = len(chunk)
            parts = [torch.einsum("bpd,pd->bp", grads[EMBED][:b], emb)[:, embed_pos]]
            for layer in src_layers:
                sel = kept.layer == layer
                gl = grads[_post(layer)][:b]  # (b, T, d_mlp)
                parts.append(gl[:, kept.pos[sel], kept.idx[sel]] * kept.act[sel])
            contrib = torch.cat(parts, dim=1)  # (b, E + n): a_s · ∂target/∂a_s
            w = contrib / tgt_value[chunk][:, None]
            ok = (src_layer[None, :] < tgt_layer[chunk][:, None]) & (w.abs() >= edge_threshold)
            r, s_idx = ok.nonzero(as_tuple=True)
            srcs.append(s_idx)
            tgts.append(tgt_rows[chunk][r])
            ws.append(w[r, s_idx])
    if not srcs:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, torch.zeros(0, dtype=emb.dtype, device=dev)
    src, tgt, w = torch.cat(srcs), torch.cat(tgts), torch.cat(ws)
    o = torch.argsort(tgt * (E + n) + src)
    return src[o], tgt[o], w[o]


__all__ = [
    "assemble_prompt",
    "check_settings",
    "target_token_id",
    "trace",
    "trace_settings",
    "trace_tokens",
]
