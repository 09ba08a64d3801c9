"""``Model``: a Hugging Face causal LM, its tokenizer and its architecture spec, with adag's sites
installed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.attention import attention_scores
from adag.models.linear import linearize
from adag.models.ops import work_dtype
from adag.models.sites import (
    Patch,
    Prefix,
    Session,
    SiteRun,
    get_module,
    install,
    layer_modules,
    register_site_axes,
    site_names,
)
from adag.models.specs import ACTIVATIONS, SPECS, ActKind, ArchSpec, supported


@dataclass(frozen=True)
class TokenProb:
    """One next-token candidate."""

    token: str
    id: int
    prob: float
    logit: float


@dataclass(frozen=True, eq=False)
class RunState:
    """What :meth:`Model.forward_from` resumes from: one batch-1 forward's block inputs, keys,
    values and attention masks at every layer (:meth:`Model.capture`)."""

    tokens: Tensor
    """``1 pos`` token ids."""
    resid: list[Tensor]
    """Per layer its block's input ``1 pos d_model`` (``blocks.L.hook_resid_pre``)."""
    keys: list[Tensor]
    values: list[Tensor]
    masks: list[Tensor | None]
    logits: Tensor
    """The forward's logits at the last position, ``1 1 d_vocab``."""
    cache: dict[str, Tensor]
    """The other sites read in that forward."""

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])


class _Stop(Exception):
    pass


class _StopAt(Session):
    """Ends the forward pass once ``name`` has been handed to the sessions before it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def touches(self, name: str) -> bool:
        return name == self.name

    def site(self, name: str, x: Tensor) -> Tensor:
        if name == self.name:
            raise _Stop
        return x


def _zero_mlp(*args: Any, **kwargs: Any) -> Tensor:
    x = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
    return torch.zeros_like(x)


class Model:
    """A causal LM ready for adag: ``hf`` (the transformers model, eval mode, routed through adag's
    attention and hooks), ``tokenizer`` (may be None for models built from a config), ``spec``.

    Tokens are ``batch pos`` LongTensors; calling the model returns logits ``batch pos d_vocab``.
    """

    def __init__(self, hf: Any, tokenizer: Any = None, *, name: str = "custom") -> None:
        config = hf.config
        spec = SPECS.get(config.model_type)
        if spec is None:
            raise AdagError(
                f"unsupported architecture {config.model_type!r}; supported: {', '.join(supported())}"
            )
        act_name = getattr(config, spec.act_key, None)
        act = ACTIVATIONS.get(str(act_name))
        if act is None:
            raise AdagError(
                f"unsupported MLP activation {act_name!r} in this {config.model_type} model; "
                f"supported: {', '.join(sorted(ACTIVATIONS))}"
            )
        self.hf = hf.eval()
        # adag differentiates activations (sites), never weights: no parameter gradients.
        for p in hf.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.spec: ArchSpec = spec
        self.act: ActKind = act
        self.n_layers = len(layer_modules(hf, spec))
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = config.hidden_size
        self.d_head: int = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        self.d_mlp: int = (
            getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None)
            or 4 * self.d_model
        )
        self.d_vocab: int = config.vocab_size
        self.n_ctx: int | None = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        self.final_softcap: float | None = (
            getattr(config, spec.final_softcap_key, None) if spec.final_softcap_key else None
        )
        self.attn_softcap: float | None = (
            getattr(config, spec.attn_softcap_key, None) if spec.attn_softcap_key else None
        )
        self._dispatch = install(hf, spec, act)
        self._site_names = site_names(spec, self.n_layers)
        self._site_set = frozenset(self._site_names)

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, {self.spec.model_type}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, heads={self.n_heads}/{self.n_kv_heads}, "
            f"dtype={self.dtype})"
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where token ids go in: the input embeddings' device (their accelerate hook's
        execution device when ``device_map`` offloaded them to the meta device)."""
        emb = self.hf.get_input_embeddings()
        hook = getattr(emb, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
        return cast(Tensor, emb.weight).device

    # -- tokens ------------------------------------------------------------------------------

    def tok(self) -> Any:
        """The tokenizer; a one-line error if the model has none."""
        if self.tokenizer is None:
            raise AdagError(f"model {self.name!r} has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def to_tokens(self, text: str | Sequence[str]) -> Tensor:
        """Token ids ``batch pos`` (with the tokenizer's own BOS convention). A list of prompts must
        tokenize to equal lengths."""
        tok = self.tok()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise AdagError("no prompts given")
        rows = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        for t, r in zip(texts, rows, strict=True):
            if not r:
                raise AdagError(
                    f"prompt {t!r} is empty after tokenization; give a non-empty prompt"
                )
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise AdagError(
                f"prompts tokenize to different lengths {sorted(lengths)}; batch prompts of equal length"
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def to_str_tokens(self, text: str | Tensor | Sequence[int]) -> list[str]:
        """The tokens of one prompt (or one row of ids) as strings."""
        tok = self.tok()
        if isinstance(text, str):
            ids = self.to_tokens(text)[0].tolist()
        else:
            ids = torch.as_tensor(text).reshape(-1).tolist()
        return [tok.decode([i]) for i in ids]

    @property
    def prepends_bos(self) -> bool:
        """Whether the tokenizer puts a BOS token before every prompt."""
        tok = self.tok()
        bos = tok.bos_token_id
        ids = tok("a", add_special_tokens=True)["input_ids"]
        return bos is not None and len(ids) > 0 and ids[0] == bos

    # -- running -----------------------------------------------------------------------------

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens`` as a non-empty ``batch pos`` tensor on the model's device (a 1-d row gets a
        batch axis); a one-line error if it is empty or longer than the model's context."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise AdagError(
                f"tokens must be a non-empty (batch, pos) tensor, got shape {tuple(tokens.shape)}"
            )
        if self.n_ctx is not None and tokens.shape[1] > self.n_ctx:
            raise AdagError(
                f"prompt is {tokens.shape[1]} tokens, longer than the model's context of "
                f"{self.n_ctx}; shorten it"
            )
        return tokens.to(self.device)

    def __call__(self, tokens: Tensor | str | Sequence[str], *, last_only: bool = False) -> Tensor:
        """Logits ``batch pos d_vocab`` for token ids (or prompts, tokenized with ``to_tokens``);
        with ``last_only`` only the last position's (``batch 1 d_vocab``), which skips the
        unembedding of every other position."""
        if not isinstance(tokens, Tensor):
            tokens = self.to_tokens(tokens)
        tokens = self.check_tokens(tokens)
        if last_only:
            return self.hf(input_ids=tokens, use_cache=False, logits_to_keep=1).logits
        out = self.hf(input_ids=tokens, use_cache=False)
        return out.logits

    def top_k(self, prompt: str | Tensor, k: int = 5) -> list[TokenProb]:
        """The ``k`` most likely next tokens after ``prompt``."""
        if k < 1:
            raise AdagError(f"k must be at least 1, got {k}")
        tokens = self.to_tokens(prompt) if isinstance(prompt, str) else prompt
        with torch.no_grad():
            logits = self(tokens)[0, -1].float()
        probs = logits.softmax(-1)
        top = probs.topk(min(k, probs.shape[-1]))
        decode = self.tokenizer.decode if self.tokenizer is not None else str
        return [
            TokenProb(
                decode([i]) if self.tokenizer is not None else str(i), i, float(p), float(logits[i])
            )
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def submodule(self, path: str, layer: int | None = None) -> torch.nn.Module:
        """The HF module at ``path`` (a spec path; relative to decoder layer ``layer`` if given)."""
        root = self.hf if layer is None else layer_modules(self.hf, self.spec)[layer]
        return get_module(root, path)

    def attention_scores(self, layer: int, q: Tensor, k: Tensor, masked: Tensor) -> Tensor:
        """Attention scores ``head q_pos k_pos`` of ``layer`` from queries ``head q_pos d_head`` and
        keys ``kv_head k_pos d_head`` (one batch row of the ``hook_q`` / ``hook_k`` sites; a
        leading batch axis is kept if given), with the entries where ``masked`` is True at -inf.

        The scores are the forward's own (:func:`adag.models.attention.attention_scores` with
        this layer's scaling and softcap, in the model's dtype), so they equal the
        ``hook_attn_scores`` site wherever it is unmasked; they are returned in
        ``work_dtype`` (float32 for half models) so that a softmax over them runs in the dtype
        of the model's own softmax."""
        attn = self.submodule(self.spec.attn, layer)
        scaling = getattr(attn, "scaling", None)
        if scaling is None:
            scaling = q.shape[-1] ** -0.5
        batched = q.dim() == 4
        qb, kb = (q, k) if batched else (q[None], k[None])
        s = attention_scores(qb, kb, scaling=scaling, softcap=self.attn_softcap)
        s = s if batched else s[0]  # (H, T, S)
        return s.to(work_dtype(s.dtype)).masked_fill(masked, float("-inf"))

    # -- sites -------------------------------------------------------------------------------

    def site_names(self) -> list[str]:
        """Every named site of this model, in forward order."""
        return list(self._site_names)

    def site_name_set(self) -> frozenset[str]:
        return self._site_set

    def register_site(self, name: str, axes: Sequence[str]) -> None:
        """Add a site published at run time by code that runs inside the forward pass (a
        transcoder splice publishing its feature activations): that code calls
        :meth:`publish`, and :class:`~adag.models.sites.SiteRun` can then read, patch and
        differentiate the site like a built-in one. ``axes`` name its dimensions, starting with
        ``batch`` (e.g. ``("batch", "pos", "d_feature")``)."""
        register_site_axes(name, axes)
        if name not in self._site_set:
            self._site_names.append(name)
            self._site_set = frozenset(self._site_names)

    @contextmanager
    def skip_mlps(self, layers: Iterable[int]) -> Iterator[None]:
        """Run the MLP modules of ``layers`` as zero maps while the block runs: for splices that
        discard the MLP's output (a transcoder's linearised passes). The module's input hook
        (``blocks.L.mlp.hook_in``) still fires; ``hook_mlp_out`` sees zeros (after a post-MLP
        norm: its output for zeros)."""
        wanted = set(layers)
        mods = [
            get_module(block, self.spec.mlp)
            for layer, block in enumerate(layer_modules(self.hf, self.spec))
            if layer in wanted
        ]
        # an instance-level forward (accelerate's device hooks put one there) is put back
        saved = [(mod, mod.__dict__.get("forward")) for mod in mods]
        for mod in mods:
            mod.forward = _zero_mlp  # type: ignore[method-assign]
        try:
            yield
        finally:
            for mod, prev in saved:
                if prev is None:
                    del mod.forward
                else:
                    mod.forward = prev  # type: ignore[method-assign]

    @contextmanager
    def session(self, session: Session) -> Iterator[Session]:
        """Make ``session`` react to this model's hook points while the block runs (after the
        sessions already active): how a splice (code that changes the forward pass, e.g. a
        transcoder replacing the MLPs) joins the model."""
        self._dispatch.push(session)
        try:
            yield session
        finally:
            self._dispatch.pop(session)

    def publish(self, name: str, x: Tensor) -> Tensor:
        """Hand the value of a registered run-time site to the active sessions (reads, patches,
        gradients) and return the value the model must go on with."""
        if name not in self._site_set:
            raise AdagError(f"site {name!r} is not registered; call Model.register_site first")
        return self._dispatch.site(name, x) if self._dispatch.sessions else x

    def sites(
        self, *, read: Iterable[str] = (), patches: Iterable[Patch] = (), grad: Iterable[str] = ()
    ) -> SiteRun:
        """A :class:`~adag.models.sites.SiteRun` on this model (use as a context manager)."""
        return SiteRun(self, read=read, patches=patches, grad=grad)

    def run_with_cache(
        self, tokens: Tensor, sites: Iterable[str], *, patches: Iterable[Patch] = ()
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One no-grad forward; returns logits and the values of ``sites``."""
        with torch.no_grad(), self.sites(read=sites, patches=patches) as run:
            logits = self(tokens)
        return logits, run.cache

    # -- resuming a forward --------------------------------------------------------------------

    def capture(self, tokens: Tensor, read: Iterable[str] = ()) -> RunState:
        """One no-grad forward of a single prompt (``1 pos``), keeping what
        :meth:`forward_from` needs to resume it at any layer and position, and the sites
        ``read``."""
        tokens = self.check_tokens(tokens)
        if tokens.shape[0] != 1:
            raise AdagError(f"capture takes one prompt (batch 1), got batch {tokens.shape[0]}")
        n = self.n_layers
        res = [f"blocks.{i}.hook_resid_pre" for i in range(n)]
        kv = [f"blocks.{i}.attn.hook_{x}" for i in range(n) for x in ("k", "v")]
        d = self._dispatch
        masks: dict[int, Tensor | None] = {}
        d.masks = masks
        try:
            with torch.no_grad(), self.sites(read=[*res, *kv, *read]) as run:
                logits = self(tokens, last_only=True)
        finally:
            d.masks = None
        c = run.cache
        return RunState(
            tokens=tokens,
            resid=[c[r] for r in res],
            keys=[c[f"blocks.{i}.attn.hook_k"] for i in range(n)],
            values=[c[f"blocks.{i}.attn.hook_v"] for i in range(n)],
            masks=[masks.get(i) for i in range(n)],
            logits=logits,
            cache={k: c[k] for k in read},
        )

    def forward_from(
        self,
        state: RunState,
        *,
        layer: int,
        start: int,
        rows: int,
        patches: Iterable[Patch] = (),
        read: Iterable[str] = (),
        stop_at: str | None = None,
        end: int | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Re-run ``rows`` copies of the forward captured in ``state`` from block ``layer`` on and
        for positions ``start..T-1`` only, with ``patches``; return the last position's logits
        (``rows 1 d_vocab``) and the sites ``read``. Exact for any patch that leaves the blocks
        before ``layer`` and the positions before ``start`` as they were: those come from the
        state (block ``layer - 1``'s output, and every later layer's keys and values of the
        positions before ``start``). No gradients.

        In this forward every site's ``pos`` axis counts from ``start`` (patch position ``p`` as
        ``p - start``); ``hook_k``/``hook_v`` hold the new positions' keys and values, and
        ``hook_attn_scores``/``hook_pattern`` have the new query rows over all ``T`` keys. With
        ``stop_at`` (a site name) the forward ends when that site is reached, the logits are
        None and ``read`` holds what was read up to it. With ``end``, only positions
        ``start..end-1`` are computed (the logits are then those of position ``end - 1``)."""
        t = state.n_pos if end is None else end
        if not 0 < t <= state.n_pos:
            raise AdagError(f"end position {end} out of range for a {state.n_pos}-token prompt")
        if not 0 <= layer < self.n_layers:
            raise AdagError(f"layer {layer} out of range for {self.n_layers} layers")
        if not 0 <= start < t:
            raise AdagError(f"start position {start} out of range for a {t}-token prompt")
        toks = state.tokens[:, start:t].expand(rows, -1)
        pos_ids = torch.arange(start, t, device=toks.device)[None].expand(rows, -1)
        blocks = layer_modules(self.hf, self.spec)
        # blocks before ``layer`` hand on the captured input of the next block
        saved = [(b, b.__dict__.get("forward")) for b in blocks[:layer]]
        for i, b in enumerate(blocks[:layer]):
            out = state.resid[i + 1][:, start:t].expand(rows, -1, -1)
            b.forward = lambda *a, _o=out, **k: _o  # type: ignore[method-assign]
        d = self._dispatch
        d.prefix = Prefix(start, t, state.keys, state.values, state.masks)
        logits: Tensor | None = None
        try:
            with torch.no_grad(), self.sites(read=read, patches=patches) as run:
                stop = _StopAt(stop_at) if stop_at is not None else None
                if stop is not None:
                    d.push(stop)
                try:
                    logits = self.hf(
                        input_ids=toks, position_ids=pos_ids, use_cache=False, logits_to_keep=1
                    ).logits
                except _Stop:
                    logits = None
                finally:
                    if stop is not None:
                        d.pop(stop)
        finally:
            d.prefix = None
            for b, prev in saved:
                if prev is None:
                    del b.forward
                else:
                    b.forward = prev  # type: ignore[method-assign]
        return logits, run.cache

    def linearize(self, **kwargs: Any) -> Any:
        """``adag.models.linear.linearize(self, **kwargs)``."""
        return linearize(self, **kwargs)
