"""Attribution graphs: the tracing half of ADAG (Arora, Wu, Steinhardt, Schwettmann 2026,
"ADAG: Automatically Describing Attribution Graphs", §2), written once over node families
(:mod:`adag.graphs.family`; MLP neurons by default, transcoder features next).

For one prompt and a metric ``m = Σ_j c_j · logit_j`` at the last position (the top-k next tokens
with ``c_j = 1`` by default, or a logit difference), :func:`trace_tokens` runs five steps:

1. **clean run** (:func:`clean_run`): the values of every site the later steps need, the targets
   and the metric;
2. **node attribution** (:func:`attribute_nodes`): one backward pass under the linearised
   backward of :func:`adag.models.linear.linearize` (frozen norm scales and attention patterns,
   the ``relp`` rule with the half rule in gated MLPs), one row per target logit. A node's
   attribution is ``a · dm/da`` (RelP), which is complete: the embeddings' attributions plus the
   bias terms sum to ``m``. Nodes with ``|attribution| >= node_threshold · |m|`` are kept, with
   their attribution to each target (the output profile);
3. **input attribution** (:func:`input_attributions`): for every kept node the total effect of
   each prompt position's embedding, ``Σ_d e_{p,d} · da/de_{p,d}``, by forward passes of the
   linear replica (one row per position);
4. **edges** (:func:`direct_edges`): direct effects between kept nodes. Every MLP is stopped, so
   the gradient reaches a source only through attention (frozen pattern), norms (frozen scale) and
   the residual stream. ``w = a_s · ∂a_t/∂a_s / a_t``; into a logit, ``contribution / logit``.
   Because the linearised target is homogeneous of degree one in its inputs, a target's incoming
   contributions over *all* earlier nodes and embeddings plus the bias terms equal its value.
   Edges with ``|w| >= edge_threshold`` are kept, each with its flow ``w · attribution(target) / m``;
5. **assembly** (:func:`assemble`) into a :class:`~adag.graphs.graph.Graph`.

Efficiency: each backward pass runs on a batch of identical rows of the prompt built by one forward
pass whose graph is kept; each row carries the seed of a different target node, so one backward
gives ``batch_size`` targets' gradients, and targets of different layers and families share a pass
(deepest first). A target at position ``p`` depends on positions ``<= p`` only, so targets are
grouped by the prefix they need and a group gets a forward of that prefix when the narrower
backward passes save more than the forward costs (:func:`_prefix_groups`). Nothing dense over
all nodes × positions × targets is built: each pass gathers the kept sources' gradients and keeps
the edges above threshold, so memory is linear in kept nodes and edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adag import nodes as node_ids
from adag.errors import AdagError
from adag.graphs.config import Targets, TraceConfig, targets_json
from adag.graphs.family import NodeFamily, Nodes, spliced
from adag.graphs.graph import Graph
from adag.graphs.neurons import MlpNeurons
from adag.models import memory
from adag.models.linear import linear_replica, linearize, replica_sites, resolve_mlp_rules
from adag.models.model import Model
from adag.models.sites import Patch
from adag.tasks.prompts import assemble_prompt, join_seed

if TYPE_CHECKING:
    from adag.transcoders import Transcoders

log = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Tensor

EMBED = "blocks.0.hook_resid_pre"


# ----------------------------------------------------------------------------------------------
# Inputs


def prepare(
    model: Model,
    items: Sequence[Prompt],
    seeds: Sequence[str | None],
    config: TraceConfig,
    *,
    where: Sequence[str | None] | None = None,
) -> list[tuple[str, list[int]]]:
    """Assemble and check every prompt (and the targets) before any tracing: ``(text, ids)`` per
    prompt (text ``""`` for prompts given as token ids). An error about one prompt names it by
    ``where`` (e.g. ``prompts.jsonl:3``), or by its number when there are several."""
    if not items:
        raise AdagError("no prompts given; pass a prompt or a non-empty list of prompts")
    if len(seeds) != len(items):
        raise AdagError(f"got {len(seeds)} seed responses for {len(items)} prompts")
    if config.targets is None and config.k > model.d_vocab:
        raise AdagError(
            f"k={config.k} is more than the {model.d_vocab} tokens of the vocabulary; "
            f"give k <= {model.d_vocab}"
        )
    resolve_targets(model, None, config.targets, config.k)
    out = []
    for i, (item, seed) in enumerate(zip(items, seeds, strict=True)):
        name = where[i] if where is not None else (f"prompt {i + 1}" if len(items) > 1 else None)
        try:
            if isinstance(item, str):
                out.append(assemble_prompt(model, item, chat=config.chat, seed=seed))
            else:
                if config.chat or seed:
                    raise AdagError("chat and seed_response need text prompts, not token ids")
                ids = torch.as_tensor(item).reshape(-1).tolist()
                model.check_tokens(torch.tensor([ids], dtype=torch.long))
                out.append(("", ids))
        except AdagError as e:
            if name is None:
                raise
            raise AdagError(f"{name}: {e}") from None
    return out


def target_token_id(model: Model, t: str | int) -> int:
    """The id of a single-token target given as a string (with its leading space) or an id."""
    if isinstance(t, int):
        if not 0 <= t < model.d_vocab:
            raise AdagError(
                f"target token id {t} is outside the vocabulary (0..{model.d_vocab - 1})"
            )
        return t
    ids = model.tok()(t, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise AdagError(
            f"target {t!r} is {len(ids)} tokens for this tokenizer; give a single token "
            "(with its leading space, e.g. ' Paris')"
        )
    return int(ids[0])


def resolve_targets(
    model: Model,
    logits: Tensor | None,
    targets: Targets,
    k: int,
    *,
    desired_prob: float | None = None,
    max_n_logits: int = 10,
) -> tuple[list[int], list[float]]:
    """Target token ids and coefficients from ``targets``, or from ``logits``: the top ``k``,
    or with ``desired_prob`` circuit-tracer's rule (``compute_salient_logits``): the smallest
    prefix of the top ``max_n_logits`` tokens whose probabilities sum to at least
    ``desired_prob`` (all ``max_n_logits`` if they do not reach it). Coefficients are 1. With
    ``logits=None``, only check ``targets``."""
    if targets is None:
        if logits is None:
            return [], []
        if desired_prob is not None:
            top = logits.double().softmax(-1).topk(min(max_n_logits, logits.shape[-1]))
            cum = top.values.cumsum(0)
            n = int(torch.searchsorted(cum, torch.tensor([desired_prob], dtype=cum.dtype)))
            ids = top.indices[: min(n + 1, len(cum))].tolist()
            return ids, [1.0] * len(ids)
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
# The front door


def trace(
    model: Model,
    prompts: Prompt | Sequence[Prompt],
    config: TraceConfig | None = None,
    *,
    seed_response: str | Sequence[str | None] | None = None,
    families: Sequence[NodeFamily] | None = None,
    transcoders: Transcoders | None = None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> list[Graph]:
    """Trace one attribution graph per prompt (see the module docstring).

    ``prompts``: a string, token ids (1-D), or a list of either. ``config`` and ``options`` (any
    :class:`TraceConfig` field, e.g. ``k=5``, ``targets={" Mary": 1, " John": -1}``,
    ``node_threshold=0.01``) say how. ``seed_response``: a seed opening the answer (one, or one per
    prompt), e.g. ``"Answer:"`` with ``chat=True``. ``families``: the node families (default: MLP
    neurons). ``transcoders``: trace the local replacement model instead (transcoder features and
    error nodes, :mod:`adag.graphs.features`; the MLP neurons are not used), with targets by
    ``desired_logit_prob`` 0.95 unless set otherwise. ``progress`` is called with 1 after each
    prompt.
    """
    config = (config or TraceConfig()).updated(**options)
    if transcoders is not None:
        if families is not None:
            raise AdagError("give transcoders or families, not both")
        if config.targets is None and config.desired_logit_prob is None:
            config = config.updated(desired_logit_prob=0.95)
        from adag.graphs.features import replacement_families

        families = replacement_families(
            model, transcoders, max_feature_nodes=config.max_feature_nodes
        )
    items: list[Prompt]
    if isinstance(prompts, str | Tensor) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
    ):
        items = [prompts]  # type: ignore[list-item]
    else:
        items = list(prompts)  # type: ignore[arg-type]
    seeds = (
        list(seed_response)
        if isinstance(seed_response, Sequence) and not isinstance(seed_response, str)
        else [seed_response] * len(items)
    )
    graphs = []
    for (text, ids), seed in zip(prepare(model, items, seeds, config), seeds, strict=True):
        graphs.append(
            trace_tokens(
                model,
                ids,
                config,
                prompt=text,
                families=families,
                extra_settings={"seed_response": seed},
            )
        )
        if progress is not None:
            progress(1)
    return graphs


def trace_tokens(
    model: Model,
    ids: Sequence[int],
    config: TraceConfig | None = None,
    *,
    prompt: str = "",
    families: Sequence[NodeFamily] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> Graph:
    """:func:`trace` for one prompt given as token ids; the traced position is the last."""
    config = config or TraceConfig()
    fams: list[NodeFamily] = list(families) if families is not None else [MlpNeurons()]
    try:
        return _trace_tokens(model, ids, config, fams, prompt, extra_settings)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not memory.is_oom(e):
            raise
        raise memory.oom_error(len(ids), config.max_batch_tokens, config.batch_size) from None


def _trace_tokens(
    model: Model,
    ids: Sequence[int],
    config: TraceConfig,
    fams: list[NodeFamily],
    prompt: str,
    extra_settings: Mapping[str, Any] | None,
) -> Graph:
    clean = clean_run(model, ids, fams, config)
    # the widest pass, checked against the free memory before it runs
    widest = max(
        1, min(max(len(clean.target_ids), config.batch_size), config.max_batch_tokens // clean.T)
    )
    memory.check_pass(model, widest, clean.T, max_batch_tokens=config.max_batch_tokens)
    emb_out, kept = attribute_nodes(model, clean, fams, config)
    log.info(
        "prompt of %d tokens: m = %.4g, %s kept",
        clean.T,
        clean.metric,
        ", ".join(f"{len(n)} {f.kind}" for f, n in zip(fams, kept, strict=True)),
    )
    rows = max(1, min(config.batch_size, config.max_batch_tokens // clean.T))
    in_attr = input_attributions(model, clean, fams, kept, rows + 1)
    # circuit-tracer's logit rows are demeaned over the vocabulary: transcoder graphs also trace
    # every source's direct effect on the mean logit
    mean_logit = any(getattr(f, "demeaned_logits", False) for f in fams)
    edges = direct_edges(
        model, clean, fams, kept, rows, config.edge_threshold, mean_logit=mean_logit
    )
    return assemble(
        model, clean, fams, kept, in_attr, emb_out, edges, config, prompt, extra_settings
    )


# ----------------------------------------------------------------------------------------------
# 1. The clean run


@dataclass
class Clean:
    """What the clean run found: tokens, values (batch stripped), targets and metric."""

    tokens: Tensor  # (1, T)
    allowed: Tensor  # (T,) positions that may hold nodes
    embed_pos: Tensor  # positions with an embedding node (allowed, and BOS where kept)
    excluded: list[int]
    values: dict[str, Tensor]  # each (T, ...)
    batch1: dict[str, Tensor]  # the same, (1, T, ...), for the linear replica
    target_ids: Tensor  # (K,)
    coef: Tensor  # (K,)
    target_logits: Tensor  # (K,)
    target_probs: Tensor  # (K,)
    metric: float

    @property
    def T(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def emb(self) -> Tensor:
        return self.values[EMBED]  # (T, d_model)


def _mlp_rules(model: Model, families: Sequence[NodeFamily]) -> list[str]:
    rules: dict[int, str] = {}
    for f in families:
        rules.update(f.mlp_rules(model))
    return resolve_mlp_rules(rules, model.n_layers)


def clean_run(
    model: Model, ids: Sequence[int], families: Sequence[NodeFamily], config: TraceConfig
) -> Clean:
    tokens = model.check_tokens(torch.as_tensor(list(ids), dtype=torch.long)[None])
    T = tokens.shape[1]
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    excluded = [0] if config.exclude_bos and bos is not None and int(tokens[0, 0]) == bos else []
    allowed = torch.ones(T, dtype=torch.bool, device=tokens.device)
    allowed[excluded] = False
    embed_pos = (
        torch.arange(T, device=tokens.device)
        if any(f.bos_embedding for f in families)
        else allowed.nonzero().flatten()
    )
    reads = [EMBED, *replica_sites(model)]
    for f in families:
        reads += [f.site(layer) for layer in f.layers(model)] + f.clean_sites(model)
    with (
        torch.no_grad(),
        model.sites(read=reads) as run,
        spliced(model, families, "clean", None),
    ):
        last = model(tokens, last_only=True)[0, -1]
    target_ids, coef_list = resolve_targets(
        model,
        last,
        config.targets,
        config.k,
        desired_prob=config.desired_logit_prob,
        max_n_logits=config.max_n_logits,
    )
    tid = torch.tensor(target_ids, device=tokens.device)
    coef = torch.tensor(coef_list, dtype=last.dtype, device=tokens.device)
    tlogits = last[tid]
    m = float((coef * tlogits).sum())
    if m == 0.0:
        raise AdagError("the metric is exactly 0 at this prompt; choose other targets")
    return Clean(
        tokens=tokens,
        allowed=allowed,
        embed_pos=embed_pos,
        excluded=excluded,
        values={n: v[0] for n, v in run.cache.items()},
        batch1=dict(run.cache),
        target_ids=tid,
        coef=coef,
        target_logits=tlogits,
        target_probs=last.double().softmax(-1)[tid],
        metric=m,
    )


# ----------------------------------------------------------------------------------------------
# 2. Node attribution


def attribute_nodes(
    model: Model, clean: Clean, families: Sequence[NodeFamily], config: TraceConfig
) -> tuple[Tensor, list[Nodes]]:
    """Linearised backward passes with one row per target logit (as many rows per pass as
    ``max_batch_tokens`` allows). Returns the embeddings' attribution to each target ``(K, T)``
    and each family's kept nodes. Only each family's candidate entries
    (:meth:`~adag.graphs.family.NodeFamily.candidates`: active transcoder features) are kept
    between passes, so memory does not grow with the dense site width times the prompt."""
    K, T = len(clean.target_ids), clean.T
    sites = [
        (fi, f, layer, f.site(layer)) for fi, f in enumerate(families) for layer in f.layers(model)
    ]
    cand: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    outs: dict[tuple[int, int], Tensor] = {}
    for fi, f, layer, site in sites:
        x = clean.values[site]
        mask = f.candidates(x) & clean.allowed[:, None]
        p, i = mask.nonzero(as_tuple=True)  # row-major: sorted by (pos, idx)
        cand[fi, layer] = (p, i)
        outs[fi, layer] = x.new_zeros(K, len(p))
    emb_out = clean.emb.new_zeros(K, T)
    rows = max(1, min(K, config.max_batch_tokens // T))
    for sl in _chunks(K, rows):
        k = sl.stop - sl.start
        with (
            linearize(model, mlp=_mlp_rules(model, families)),
            model.sites(grad=[EMBED, *(s for *_, s in sites)]) as run,
            spliced(model, families, "attribution", clean.values),
        ):
            z = model(clean.tokens.expand(k, T), last_only=True)[:, -1]  # (k, d_vocab)
            seed = torch.zeros_like(z)
            seed[torch.arange(k), clean.target_ids[sl]] = 1.0
            g = run.vjp([z], [seed])
        emb_out[sl] = torch.einsum("kpd,pd->kp", g[EMBED], clean.emb)  # Σ_d e·dlogit_j/de
        for fi, f, layer, site in sites:
            p, i = cand[fi, layer]
            # (k, T, n): a · dlogit_j/da, reduced to the candidates at once
            outs[fi, layer][sl] = f.attribution(g.pop(site), clean.values[site])[:, p, i]
        del g
    thr = config.node_threshold * abs(clean.metric)
    kept = []
    for fi, f in enumerate(families):
        cols: dict[str, list[Tensor]] = {
            k: [] for k in ("layer", "pos", "idx", "act", "attr", "out")
        }
        for layer in f.layers(model):
            p, i = cand[fi, layer]
            out = outs.pop((fi, layer))
            attr = clean.coef @ out
            v = f.values(clean.values[f.site(layer)])[p, i]
            keep = f.keep(attr, v, thr)
            cols["layer"].append(torch.full_like(p[keep], layer))
            cols["pos"].append(p[keep])
            cols["idx"].append(i[keep])
            cols["act"].append(v[keep])
            cols["attr"].append(attr[keep])
            cols["out"].append(out[:, keep].T)
        cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in cols.items()}
        if not cols["out"]:
            cat["out"] = torch.zeros(0, K, dtype=clean.emb.dtype)
        cap = getattr(f, "max_nodes", None)
        if cap is not None and len(cat["attr"]) > cap:
            top = cat["attr"].abs().topk(cap).indices.sort().values  # keep (layer, pos, idx) order
            cat = {k: v[top] for k, v in cat.items()}
        kept.append(
            Nodes(cat["layer"], cat["pos"], cat["idx"], cat["act"], cat["attr"], cat["out"])
        )
    return emb_out, kept


# ----------------------------------------------------------------------------------------------
# 3. Input attribution


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


REVERSE_COST = 3.0
"""A reverse-mode input-profile row (a forward with autograd and a backward over the prompt)
in forward-mode rows (a no-grad forward of the linear replica), for :func:`input_attributions`'
choice."""


def input_attributions(
    model: Model,
    clean: Clean,
    families: Sequence[NodeFamily],
    kept: Sequence[Nodes],
    rows: int,
    *,
    mode: str = "auto",
) -> list[Tensor]:
    """Per family ``(n, T)``: ``Σ_d e_{p,d} · da_v/de_{p,d}`` under the linearisation.

    Forward mode, without dual numbers: the linearised model is an affine map of the embeddings
    (:func:`adag.models.linear.linear_replica`), so feeding it ``e_p`` alone at position ``p``
    (row ``p``) and subtracting its output for a zero input (the bias terms, row 0) gives the
    derivative of *every* node along every position's embedding in one plain forward pass:
    ``T + 1`` rows instead of one backward row per kept node. That is ``T²`` token-forwards,
    which dominates long prompts; there, reverse mode (:func:`_input_attributions_reverse`:
    one backward row per kept neuron or feature, ``n · T`` tokens) is cheaper, and
    ``mode="auto"`` takes it when ``REVERSE_COST · n < T + 1`` (error nodes, constants of the
    replica, have zero input attributions either way). ``mode``: ``"auto"``, ``"forward"`` or
    ``"reverse"`` (both give the same numbers up to rounding)."""
    # seeded nodes (neurons, features); constant ones (error nodes: 0 in the replica) need none
    n_all = sum(len(n) for f, n in zip(families, kept, strict=True) if f.can_be_target)
    seedable = all(f.kind in ("neuron", "feature") or not f.can_be_target for f in families)
    if mode not in ("auto", "forward", "reverse"):
        raise AdagError(f"input-profile mode {mode!r}: use auto, forward or reverse")
    if mode == "reverse" and not seedable:
        raise AdagError("reverse-mode input profiles are written for neurons and features")
    if mode == "reverse" or (
        mode == "auto" and seedable and n_all and REVERSE_COST * n_all < clean.T + 1
    ):
        return _input_attributions_reverse(model, clean, families, kept, rows)
    emb, T = clean.emb, clean.T
    outs = [torch.zeros(len(n), T, dtype=emb.dtype, device=emb.device) for n in kept]
    reads = [
        (fi, layer, f.site(layer))
        for fi, (f, n) in enumerate(zip(families, kept, strict=True))
        for layer in sorted(set(n.layer.tolist()))
    ]
    if not reads:
        return outs
    rules = _mlp_rules(model, families)
    for sl in _chunks(T, max(1, rows - 1)):
        P = sl.stop - sl.start
        pos = torch.arange(sl.start, sl.stop, device=emb.device)
        x = torch.zeros(P + 1, T, emb.shape[-1], dtype=emb.dtype, device=emb.device)
        x[1 + torch.arange(P), pos] = emb[pos]
        with (
            torch.no_grad(),
            linear_replica(model, clean.batch1, mlp=rules),
            model.sites(read=[s for _, _, s in reads], patches=[Patch(EMBED, x)]) as run,
            spliced(model, families, "replica", clean.values),
        ):
            model(clean.tokens.expand(P + 1, T), last_only=True)
        for fi, layer, site in reads:
            f, n = families[fi], kept[fi]
            sel = n.of_layer(layer)
            v = f.values(run.cache[site])[:, n.pos[sel], n.idx[sel]]  # (P + 1, n_layer)
            outs[fi][sel, sl] = (v[1:] - v[:1]).T
    return outs


def _input_attributions_reverse(
    model: Model,
    clean: Clean,
    families: Sequence[NodeFamily],
    kept: Sequence[Nodes],
    rows: int,
) -> list[Tensor]:
    """:func:`input_attributions` by reverse mode: backward passes under the same linearisation
    (every MLP by its rule, frozen norms and patterns), one row per kept node, seeded by its
    family's :meth:`~adag.graphs.family.NodeFamily.seeds` (the node's partials at its
    pre-activation sites), then ``Σ_d e_{p,d} · g_{p,d}`` at every position."""
    emb, T = clean.emb, clean.T
    outs = [torch.zeros(len(n), T, dtype=emb.dtype, device=emb.device) for n in kept]
    rules = _mlp_rules(model, families)
    seeded = [fi for fi, f in enumerate(families) if f.can_be_target]
    items = [(fi, j) for fi in seeded for j in range(len(kept[fi]))]
    seed_sites = sorted(
        {
            s
            for fi in seeded
            for s in families[fi].edge_sites(model, sorted(set(kept[fi].layer.tolist())))
        }
    )
    B = max(1, rows)
    for sl in _chunks(len(items), B):
        chunk = items[sl]
        b = len(chunk)
        with (
            linearize(model, mlp=rules),
            model.sites(read=seed_sites, grad=[EMBED, *seed_sites]) as run,
            spliced(model, families, "attribution", clean.values),
        ):
            z = model(clean.tokens.expand(b, T), last_only=True)[:, -1]
            fam = torch.tensor([fi for fi, _ in chunk], device=emb.device)
            idx = torch.tensor([j for _, j in chunk], device=emb.device)
            pairs = _chunk_seeds(model, run, clean, families, kept, z, fam, idx)
            g = run.vjp([o for o, _ in pairs], [s for _, s in pairs], sites=[EMBED])
        attr = torch.einsum("bpd,pd->bp", g[EMBED], emb)  # (b, T)
        for r, (fi, j) in enumerate(chunk):
            outs[fi][j] = attr[r]
    return outs


# ----------------------------------------------------------------------------------------------
# 4. Edges


def direct_edges(
    model: Model,
    clean: Clean,
    families: Sequence[NodeFamily],
    kept: Sequence[Nodes],
    batch_size: int,
    edge_threshold: float,
    *,
    mean_logit: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Direct-effect edges among the kept nodes, as (source row, target row, weight) with rows
    numbered embeddings, each family's nodes, logits. Forward passes (one per group of targets
    needing the same prompt prefix, :func:`_prefix_groups`) with every MLP stopped and each
    family's splice in ``"edges"`` mode; each backward pass seeds up to ``batch_size`` targets
    (logits at the last position, nodes by their family's seeds), deepest first so a pass rarely
    reaches further down than it must. Sources' contributions come from each family's
    :meth:`~adag.graphs.family.NodeFamily.edge_source`; the edges are returned sorted by
    (target, source) with int32 indices. With ``mean_logit``, one more row seeds the vocabulary
    mean of the logits, and the fourth value is every source's raw direct effect on it
    (``a_s · ∂ mean_v(logit_v) / ∂a_s``, unthresholded, one per source row); else None."""
    emb, dev, T, L = clean.emb, clean.emb.device, clean.T, model.n_layers
    embed_pos = clean.embed_pos
    E, K = len(embed_pos), len(clean.target_ids)
    sizes = [len(n) for n in kept]
    offset = np.concatenate([[E], E + np.cumsum(sizes)]).tolist()  # first row of each family
    n_all = offset[-1] - E
    # Sources: embeddings, then every family's nodes, with the stage where they write.
    src_write = torch.cat(
        [torch.zeros(E, device=dev, dtype=torch.float64)]
        + [_stages(f.write_stage, n.layer) for f, n in zip(families, kept, strict=True)]
    )
    # Targets: (family index or -1 for logits, index within the family), read stage and value.
    t_fam, t_idx, t_row, t_read, t_val, t_pos = [], [], [], [], [], []
    for fi, (f, n) in enumerate(zip(families, kept, strict=True)):
        if f.can_be_target and len(n):
            t_pos.append(n.pos)
            t_fam.append(torch.full((len(n),), fi, device=dev))
            t_idx.append(torch.arange(len(n), device=dev))
            t_row.append(offset[fi] + torch.arange(len(n), device=dev))
            t_read.append(_stages(f.read_stage, n.layer))
            t_val.append(n.act)
    t_pos.append(torch.full((K + int(mean_logit),), T - 1, device=dev))
    t_fam.append(torch.full((K,), -1, device=dev))
    t_idx.append(torch.arange(K, device=dev))
    t_row.append(E + n_all + torch.arange(K, device=dev))
    t_read.append(torch.full((K,), float(L), device=dev, dtype=torch.float64))
    t_val.append(clean.target_logits)
    if mean_logit:  # the pseudo-target -2: the vocabulary mean of the logits (row -1: no edges)
        t_fam.append(torch.full((1,), -2, device=dev))
        t_idx.append(torch.zeros(1, dtype=torch.long, device=dev))
        t_row.append(torch.full((1,), -1, device=dev))
        t_read.append(torch.full((1,), float(L), device=dev, dtype=torch.float64))
        t_val.append(torch.ones(1, dtype=clean.target_logits.dtype, device=dev))
    tf, ti, tr, tv = torch.cat(t_fam), torch.cat(t_idx), torch.cat(t_read), torch.cat(t_val)
    rows_of = torch.cat(t_row)
    # A target at position p depends on positions <= p only: targets go by prefix length (one
    # forward of that prefix each), then deepest first so a pass rarely reaches further down
    # than it must.
    prefix = torch.cat(t_pos).to(torch.float64) + 1
    order = torch.argsort(prefix * (L + 2) + tr, descending=True, stable=True)
    src_layers = [sorted(set(n.layer.tolist())) for n in kept]
    reads = [s for f, ls in zip(families, src_layers, strict=True) for s in f.edge_sites(model, ls)]

    def grad_sites(reach: float) -> list[str]:  # the sites a pass of this reach needs
        return list(
            dict.fromkeys(
                [EMBED]
                + [
                    s
                    for f, ls in zip(families, src_layers, strict=True)
                    for s in f.edge_sites_within(model, ls, reach)
                ]
            )
        )

    grads_at = grad_sites(float("inf"))
    sources = [  # every family's nodes, prepared once
        f.edge_source(model, clean.values, n) for f, n in zip(families, kept, strict=True)
    ]
    B = min(batch_size, len(order))
    counts = torch.zeros(E + n_all + K, dtype=torch.long, device=dev)  # edges per target row
    pieces = []
    mean_effect: Tensor | None = None
    groups = _prefix_groups([order[sl] for sl in _chunks(len(order), B)], prefix)
    for P, group in groups:
        with (
            linearize(model, mlp="stop"),
            model.sites(read=reads, grad=grads_at) as run,
            spliced(model, families, "edges", clean.values),
        ):
            z = model(clean.tokens[:, :P].expand(B, P), last_only=True)[:, -1]  # (B, d_vocab)
            for chunk in group:
                # rows by target row: the chunk's edges come out sorted by (target, source)
                chunk = chunk[torch.argsort(rows_of[chunk])]
                b = len(chunk)
                pairs = _chunk_seeds(model, run, clean, families, kept, z, tf[chunk], ti[chunk])
                # sources writing after the deepest target's read get no gradient: skip them
                reach = float(tr[chunk].max())
                grads = run.vjp(
                    [o for o, _ in pairs],
                    [s for _, s in pairs],
                    retain_graph=True,
                    sites=grad_sites(reach),
                )
                # a prefix pass: every site is (batch, P, ...); sources at positions >= P
                # have no effect (each family's source handles P < T)
                e_full = torch.einsum("bpd,pd->bp", grads[EMBED][:b], emb[:P])
                if P < T:
                    e_part = e_full.new_zeros(b, E)
                    inside = embed_pos < P
                    e_part[:, inside] = e_full[:, embed_pos[inside]]
                else:
                    e_part = e_full[:, embed_pos]
                parts = [e_part]
                parts += [source(grads, b, reach) for source in sources]
                contrib = torch.cat(parts, dim=1)  # (b, E + n_all): a_s · ∂target/∂a_s
                w = contrib / tv[chunk][:, None]
                ok = (src_write[None, :] <= tr[chunk][:, None]) & (w.abs() >= edge_threshold)
                is_mean = tf[chunk] == -2
                if is_mean.any():
                    mean_effect = contrib[is_mean][0].clone()
                    ok &= ~is_mean[:, None]
                r, s_idx = ok.nonzero(as_tuple=True)
                cnt = torch.bincount(r, minlength=b)
                trows = rows_of[chunk]
                counts[trows[cnt > 0]] += cnt[cnt > 0]
                pieces.append((trows, cnt, s_idx.to(torch.int32), w[r, s_idx]))
    # place each chunk's edges at their target rows' offsets (int32 indices, no global sort)
    offsets = torch.cumsum(counts, 0) - counts
    n_e = int(counts.sum())
    src = torch.empty(n_e, dtype=torch.int32, device=dev)
    tgt = torch.empty(n_e, dtype=torch.int32, device=dev)
    wout = torch.empty(n_e, dtype=emb.dtype, device=dev)
    pieces.reverse()
    while pieces:
        trows, cnt, s_i, w_i = pieces.pop()
        rr = torch.repeat_interleave(torch.arange(len(cnt), device=dev), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        dest = offsets[trows[rr]] + torch.arange(len(s_i), device=dev) - first[rr]
        src[dest], tgt[dest], wout[dest] = s_i, trows[rr].to(torch.int32), w_i
    return src, tgt, wout, mean_effect


FORWARD_COST = 4.0
"""The cost of the edge pass's forward in backward passes of the same width (measured on CPU:
the forward runs every projection, the unembedding and the hooks; a backward with frozen
patterns and stopped MLPs only the value/output projections)."""


def _prefix_groups(chunks: list[Tensor], prefix: Tensor) -> list[tuple[int, list[Tensor]]]:
    """Chunks (sorted by needed prefix length, descending) grouped into forward passes:
    ``(prefix length, chunks)``. A chunk joins the previous group (a longer prefix than it
    needs) unless a forward of its own costs less than the extra width of its backward passes:
    ``FORWARD_COST · P < (P_group − P) · n_chunks`` (greedy, per run of equal prefix)."""
    runs: list[tuple[int, list[Tensor]]] = []
    for chunk in chunks:
        P = int(prefix[chunk].max())
        if runs and runs[-1][0] == P:
            runs[-1][1].append(chunk)
        else:
            runs.append((P, [chunk]))
    groups: list[tuple[int, list[Tensor]]] = []
    for P, cs in runs:
        if groups and (groups[-1][0] - P) * len(cs) <= FORWARD_COST * P:
            groups[-1][1].extend(cs)
        else:
            groups.append((P, list(cs)))
    return groups


def _stages(stage: Callable[[int], float], layers: Tensor) -> Tensor:
    table = {layer: stage(layer) for layer in set(layers.tolist())}
    return torch.tensor(
        [table[layer] for layer in layers.tolist()], dtype=torch.float64, device=layers.device
    )


def _chunk_seeds(
    model: Model,
    run: Any,
    clean: Clean,
    families: Sequence[NodeFamily],
    kept: Sequence[Nodes],
    z: Tensor,
    fam: Tensor,
    idx: Tensor,
) -> list[tuple[Tensor, Tensor]]:
    """The (output, seed) pairs of one edge-pass chunk: row ``r`` seeds target ``r``."""
    rows = torch.arange(len(fam), device=fam.device)
    pairs = []
    is_logit = fam == -1
    is_mean = fam == -2
    if is_logit.any() or is_mean.any():
        s = torch.zeros_like(z)
        s[rows[is_logit], clean.target_ids[idx[is_logit]]] = 1.0
        s[rows[is_mean]] = 1.0 / z.shape[-1]  # d mean_v(z_v)
        pairs.append((z, s))
    for fi, (f, n) in enumerate(zip(families, kept, strict=True)):
        mine = fam == fi
        if not mine.any():
            continue
        v, r = idx[mine], rows[mine]
        for layer in sorted(set(n.layer[v].tolist())):
            sel = n.layer[v] == layer
            pairs += f.seeds(model, run, clean.values, layer, r[sel], n.pos[v[sel]], n.idx[v[sel]])
    return pairs


# ----------------------------------------------------------------------------------------------
# 5. Assembly


def _np(x: Tensor) -> np.ndarray:
    # numpy has no bfloat16: half-precision models store their graphs in float32
    if x.is_floating_point() and x.element_size() < 4:
        x = x.float()
    return x.detach().cpu().numpy()


def _decoder(model: Model) -> Callable[[int], str]:
    if model.tokenizer is None:
        return str
    tok = model.tokenizer
    return lambda i: str(tok.decode([i]))


def assemble(
    model: Model,
    clean: Clean,
    families: Sequence[NodeFamily],
    kept: Sequence[Nodes],
    in_attr: Sequence[Tensor],
    emb_out: Tensor,
    edges: tuple[Tensor, Tensor, Tensor, Tensor | None],
    config: TraceConfig,
    prompt: str,
    extra_settings: Mapping[str, Any] | None,
) -> Graph:
    """The :class:`Graph`: rows are the embeddings, each family's kept nodes, the target logits."""
    emb, T, L = clean.emb, clean.T, model.n_layers
    embed_pos = clean.embed_pos
    E, K = len(embed_pos), len(clean.target_ids)
    tid, coef, tlogits = clean.target_ids, clean.coef, clean.target_logits
    tok_str = _decoder(model)
    ids_list = clean.tokens[0].tolist()
    ptoks = [tok_str(i) for i in ids_list]
    ids = [node_ids.format("embed", p) for p in embed_pos.tolist()]
    kinds = ["embed"] * E
    for f, n in zip(families, kept, strict=True):
        cols = zip(n.layer.tolist(), n.pos.tolist(), n.idx.tolist(), strict=True)
        arity = len(node_ids.KINDS[f.kind])  # fields in order layer, pos, index (error: 2)
        ids += [node_ids.format(f.kind, *(a, b, c)[:arity]) for a, b, c in cols]
        kinds += [f.kind] * len(n)
    ids += [node_ids.format("logit", t) for t in tid.tolist()]
    kinds += ["logit"] * K

    def col(first: Tensor, name: str, last: Tensor) -> Tensor:
        return torch.cat([first, *(getattr(n, name).cpu() for n in kept), last])

    layer_col = col(torch.full((E,), -1), "layer", torch.full((K,), L))
    pos_col = col(embed_pos.cpu(), "pos", torch.full((K,), T - 1))
    index_col = col(clean.tokens[0, embed_pos].cpu(), "idx", tid.cpu())
    activation = col(emb[embed_pos].norm(dim=-1).cpu(), "act", tlogits.cpu())
    attribution = col((coef @ emb_out)[embed_pos].cpu(), "attr", (coef * tlogits).cpu())
    input_attr = torch.cat(
        [torch.zeros(E, T, dtype=emb.dtype), *(a.cpu() for a in in_attr), emb_out.cpu()]
    )
    output_attr = col(emb_out[:, embed_pos].T.cpu(), "out_attr", torch.zeros(K, K, dtype=emb.dtype))
    src_t, tgt_t, w, mean_effect = edges
    src, tgt = _np(src_t), _np(tgt_t)  # int32
    w_np = _np(w)
    flow = w_np * _np(attribution)[tgt] / clean.metric
    target_tokens = [tok_str(t) for t in tid.tolist()]
    settings = {
        **config.content(model),
        "batch_size": config.batch_size,
        "max_batch_tokens": config.max_batch_tokens,
        "excluded_positions": clean.excluded,
        "traced_position": T - 1,
        "families": [f.kind for f in families],
        "linearization": {"mlp": "relp", "norms": "frozen", "attention": "frozen"},
        "edges": "direct effects; MLPs strictly between source and target stop-gradded",
        **(extra_settings or {}),
    }
    rules = set(_mlp_rules(model, families))
    if rules != {"relp"}:
        settings["linearization"]["mlp"] = _mlp_rules(model, families)
    for f in families:
        settings.update(f.settings(model))
    return Graph(
        node_ids=ids,
        node_kinds=kinds,
        node_layer=_np(layer_col).astype(np.int64),
        node_position=_np(pos_col).astype(np.int64),
        node_index=_np(index_col).astype(np.int64),
        node_activation=_np(activation),
        node_attribution=_np(attribution),
        node_tokens=[ptoks[p] for p in pos_col[: len(ids) - K].tolist()] + target_tokens,
        edge_source=src,
        edge_target=tgt,
        edge_weight=w_np,
        edge_flow=flow,
        input_attr=_np(input_attr),
        output_attr=_np(output_attr),
        target_ids=np.array(tid.tolist(), dtype=np.int64),
        target_tokens=target_tokens,
        target_coef=_np(coef),
        target_logits=_np(tlogits),
        target_probs=_np(clean.target_probs.to(tlogits.dtype)),
        prompt_ids=np.array(ids_list, dtype=np.int64),
        prompt_tokens=ptoks,
        prompt=prompt,
        metric=clean.metric,
        settings=settings,
        logit_mean_effect=(
            None
            if mean_effect is None
            else np.concatenate([_np(mean_effect), np.zeros(K, dtype=_np(mean_effect).dtype)])
        ),
    )


__all__ = [
    "Clean",
    "Targets",
    "TraceConfig",
    "assemble",
    "assemble_prompt",
    "attribute_nodes",
    "clean_run",
    "direct_edges",
    "input_attributions",
    "join_seed",
    "prepare",
    "resolve_targets",
    "target_token_id",
    "targets_json",
    "trace",
    "trace_tokens",
]
