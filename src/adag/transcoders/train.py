"""Train per-layer (PLT) or cross-layer (CLT) transcoders on a model's own activations.

The data are pairs (MLP input, MLP output) per covered layer: ``blocks.l.mlp.hook_in`` (the MLP
module's input, after ln2) → ``blocks.l.hook_mlp_out``, read through adag's sites from the model
running on text (``texts``), on token ids (``token_batches``) or on text the model samples itself
(``self_generate``: fully offline). They are *streamed*: the model runs a few sequences at a time
into a buffer of at most ``buffer_tokens`` tokens, training draws shuffled batches from it until it
is used up, and the buffer is refilled from where the data left off. Nothing ever holds more than
one buffer (plus the fixed held-out buffer on which FVU is measured).

Model (notation of :mod:`adag.transcoders`; inputs and outputs normalised per layer to
``E‖x‖² = d_model`` during training, weights stored in model units)::

    pre_l = W_enc[l] x_l + b_enc[l]          a_l = act(pre_l)
    ŷ_t   = Σ_{l writes to t} W_dec[l→t] a_l + b_dec[t]          PLT: l = t only; CLT: every l ≤ t

    loss  = Σ_t ‖y_t − ŷ_t‖²                                       (summed over layers, mean over tokens)
          + λ(step) Σ_l Σ_i tanh(c · a_{l,i} · ‖d_{l,i}‖)          (jumprelu, relu)
          + μ Σ_l Σ_i ReLU(θ_{l,i} − pre_{l,i}) · ‖d_{l,i}‖          (jumprelu: pre-activation loss)
          + α · AuxK                                               (topk)

``‖d_{l,i}‖`` is the norm of feature i's decoder (for a CLT, of its decoders to all later layers
together), so the penalty cannot be dodged by shrinking activations and growing decoders.

- **JumpReLU** (Rajamanoharan et al. 2024, "Jumping Ahead"): ``a = pre · H(pre − θ)``, ``θ = exp(log
  θ)``. The step has no gradient in θ; a straight-through estimator gives it one with the rectangle
  kernel ``K(u) = 1[|u| < ½]``: ``∂a/∂θ = −(θ/ε) K((pre − θ)/ε)`` (bandwidth ε), as in Gemma Scope,
  circuit-tracer's and SAELens's trainers. The sparsity penalty is Anthropic's tanh penalty
  ("Circuit Tracing", Ameisen et al. 2025; c = 4) — an L0 surrogate that saturates, so it does not
  shrink large activations the way L1 does — ramped linearly from 0 over the first
  ``sparsity_warmup`` of training, plus their pre-activation loss (μ = 3·10⁻⁶), which pushes the
  pre-activations of features that do not fire towards their threshold and so revives dead ones.
- **TopK** (Gao et al. 2024): the ``k`` largest pre-activations per token (ReLU'd) are kept; no
  penalty. Features that did not fire in the last ``dead_after`` training tokens are *dead*; the
  auxiliary loss AuxK (``α = 1/32``, ``k_aux = d_model/2``) makes the top-``k_aux`` dead features
  reconstruct the residual error ``y − ŷ``, normalised by the error's variance, so they get a
  gradient again. Chosen over resampling: it needs no data pass and keeps the run deterministic.
- **ReLU**: ``a = max(pre, 0)`` with the tanh penalty.

Every feature's time since it last fired is tracked for all activations; the share of dead
features per layer is reported (``dead``), as is the share that never fires on the held-out buffer.

Optimiser: Adam, learning rate ``lr`` (default ``2·10⁻⁴ · sqrt(16384 / n_features)``, the scaling
of EleutherAI's sparsify) with a short linear warm-up and a linear decay to 0 over the last 20% of
the steps. Initialisation: encoder and decoder rows random with norm 0.1 (decoder rows of a CLT
feature 0.1 in total), ``b_enc = 0``, ``θ = 0.1``, ``b_dec`` = the mean output of the first buffer.

Checkpoints (``out/checkpoint.safetensors`` + ``out/checkpoint.json``) hold the weights, Adam's
state, the dead-feature counters, the normalisation scales, the shuffle generator's state and the
data position (the first sequence group of the current buffer and the batches already taken from
it). A resumed run refills that buffer from the same groups, reshuffles it with the saved
generator state and skips the batches done, so it ends with the same weights as a run that was
never stopped (bit for bit on the same machine and thread count). A run with other settings refuses
to resume (``force`` starts over). At the end ``out/`` holds the transcoders in adag's format
(:func:`~adag.transcoders.save_transcoders`) and ``metrics.json`` (written last: its presence with
the same settings means the run is done); the checkpoint is then removed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.io import digest, remove, shown, write_bytes, write_text
from adag.transcoders import Activation, Kind, Transcoders

if TYPE_CHECKING:
    from adag.models.model import Model

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "adag-transcoder-checkpoint"
METRICS_FORMAT = "adag-transcoder-training"
FORMAT_VERSION = 1
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
METRICS_JSON = "metrics.json"

INPUT_SITE = "blocks.{}.mlp.hook_in"
OUTPUT_SITE = "blocks.{}.hook_mlp_out"

TANH_SCALE = 4.0
"""c in the tanh penalty ``tanh(c · a · ‖d‖)`` (Anthropic's value)."""
INIT_NORM = 0.1
"""Norm of the initial encoder and decoder rows."""
INIT_THRESHOLD = 0.1
"""Initial JumpReLU threshold (in normalised units)."""
AUXK_COEF = 1 / 32
"""α of the AuxK loss (Gao et al. 2024)."""
WARMUP_FRACTION = 0.02
DECAY_FRACTION = 0.2

SELF_PROMPTS: tuple[tuple[str, bool], ...] = (
    ("The", False),
    ("Write a few paragraphs about anything you like.", True),
    ("In", False),
    ("Tell me a story.", True),
    ("A", False),
    ("Explain something you know well.", True),
    ("It", False),
    ("Write about a place, a person or an idea.", True),
)
"""Prompts of self-generated text, one per sequence group in turn: ``(text, chat)``; chat prompts
go through the tokenizer's chat template (when it has one), the others are plain text the model
continues, so the data cover both the chat format and free text."""


# ----------------------------------------------------------------------------------------------
# Settings and progress.


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run (everything that changes its result)."""

    n_features: int
    """Features per layer (``d_features``)."""
    n_tokens: int
    """Training tokens (the run takes ``ceil(n_tokens / batch_tokens)`` steps)."""
    kind: Kind = "plt"
    """``plt`` (one encoder/decoder per layer) or ``clt`` (each layer's features write to every
    covered layer at or after it)."""
    activation: Activation = "jumprelu"
    """``jumprelu`` (learned thresholds, straight-through), ``topk`` or ``relu``."""
    k: int | None = None
    """TopK: features kept per token (default 32, at most ``n_features``)."""
    layers: tuple[int, ...] | None = None
    """Layers to cover, ascending; None: every layer."""
    lr: float | None = None
    """Adam's learning rate; None: ``2e-4 · sqrt(16384 / n_features)``."""
    batch_tokens: int = 1024
    """Tokens per optimiser step."""
    buffer_tokens: int = 8192
    """Most tokens of activations held at once for shuffling (per covered layer: input and
    output, ``2 · n_layers · d_model`` numbers a token)."""
    heldout_tokens: int = 1024
    """Tokens (the first of the data, never trained on) on which FVU, L0 and silent features are
    measured."""
    sparsity: float = 1.0
    """λ of the tanh sparsity penalty (jumprelu, relu), reached after ``sparsity_warmup``."""
    sparsity_warmup: float = 0.2
    """Fraction of the steps over which λ ramps linearly from 0."""
    preact: float = 3e-6
    """μ of the pre-activation loss (jumprelu)."""
    bandwidth: float = 2.0
    """ε of the JumpReLU straight-through estimator (normalised units)."""
    dead_after: int | None = None
    """A feature is dead when it has not fired in this many training tokens; None:
    ``max(batch_tokens, min(n_tokens // 10, 10**6))``."""
    seq_len: int = 128
    """Tokens per sequence (text windows; self-generated sequences sample this many tokens)."""
    seqs_per_forward: int = 16
    """Sequences run (or sampled) together in one forward pass."""
    seed: int = 0
    """Seeds the initialisation, the shuffling and the sampled text."""

    def __post_init__(self) -> None:
        def whole(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise AdagError(f"{name} must be an integer >= {lo}, got {v!r}")

        def real(name: str, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < lo or v > hi or (open_lo and v == lo):
                side = ">" if open_lo else ">="
                rng = f"{side} {lo}" + ("" if hi == math.inf else f" and <= {hi}")
                raise AdagError(f"{name} must be a finite number {rng}, got {v!r}")

        if self.kind not in ("plt", "clt"):
            raise AdagError(f"kind must be 'plt' or 'clt', got {self.kind!r}")
        if self.activation not in ("jumprelu", "topk", "relu"):
            raise AdagError(
                f"activation must be 'jumprelu', 'topk' or 'relu', got {self.activation!r}"
            )
        for name, lo in (
            ("n_features", 1),
            ("n_tokens", 1),
            ("batch_tokens", 1),
            ("buffer_tokens", 1),
            ("heldout_tokens", 1),
            ("seq_len", 2),
            ("seqs_per_forward", 1),
            ("seed", 0),
        ):
            whole(name, lo)
        if self.buffer_tokens < self.batch_tokens:
            raise AdagError(
                f"buffer_tokens ({self.buffer_tokens}) must be at least batch_tokens "
                f"({self.batch_tokens})"
            )
        if self.k is not None:
            if self.activation != "topk":
                raise AdagError(f"k is for activation='topk', not {self.activation!r}")
            whole("k", 1)
            if self.k > self.n_features:
                raise AdagError(f"k ({self.k}) must be at most n_features ({self.n_features})")
        if self.lr is not None:
            real("lr", 0.0, open_lo=True)
        real("sparsity", 0.0)
        real("sparsity_warmup", 0.0, 1.0)
        real("preact", 0.0)
        real("bandwidth", 0.0, open_lo=True)
        if self.dead_after is not None:
            whole("dead_after", 1)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(
                isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in layers
            ):
                raise AdagError(f"layers must be a non-empty list of integers, got {self.layers!r}")
            if any(b <= a for a, b in itertools.pairwise(layers)) or layers[0] < 0:
                raise AdagError(
                    f"layers must be distinct, non-negative and ascending, got {list(layers)}"
                )
            object.__setattr__(self, "layers", tuple(int(x) for x in layers))

    # -- derived -------------------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        return self.k if self.k is not None else min(32, self.n_features)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(16384 / self.n_features)

    @property
    def total_steps(self) -> int:
        return -(-self.n_tokens // self.batch_tokens)

    @property
    def dead_window(self) -> int:
        if self.dead_after is not None:
            return self.dead_after
        return max(self.batch_tokens, min(self.n_tokens // 10, 10**6))

    def covered(self, model: Model) -> list[int]:
        """The covered layers of ``model``; a one-line error for one it lacks."""
        if self.layers is None:
            return list(range(model.n_layers))
        beyond = [x for x in self.layers if x >= model.n_layers]
        if beyond:
            raise AdagError(
                f"layers {beyond} do not exist: the model has {model.n_layers} layers "
                f"(0-{model.n_layers - 1})"
            )
        return list(self.layers)


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback receives: after every training step (``phase == "train"``;
    also once when training starts or resumes, before its first step) and after every group of
    sequences the model has run or sampled (``phase == "data"``: reading the held-out set or
    filling a buffer, which for self-generated text takes a while)."""

    phase: Literal["data", "train"]
    step: int
    """Steps done."""
    total_steps: int
    tokens: int
    """Training tokens seen."""
    total_tokens: int
    layers: list[int]
    fvu: list[float]
    """Per covered (target) layer: fraction of variance unexplained on recent training batches
    (exponential moving average; the held-out FVU is in ``metrics.json``)."""
    l0: list[float]
    """Per covered (source) layer: mean active features per token (moving average)."""
    dead: list[float]
    """Per covered layer: share of features that did not fire in the last ``dead_after``
    training tokens."""
    loss: float
    lr: float
    resumed_from: int | None = None
    """The step the run resumed from, or None for a fresh run."""
    data_tokens: int = 0
    """Tokens of activations read from the model so far in this process (held-out included)."""


# ----------------------------------------------------------------------------------------------
# Data: groups of sequences, turned into activations on demand.


@dataclass
class _Group:
    """A group of sequences: ``rows`` bounds the activation rows it yields (known before the
    model runs, so a buffer can decide whether it fits); ``ids`` are its token ids when known in
    advance (text and token sources), ``index`` its place in the data."""

    index: int
    rows: int
    ids: Tensor | None = None


class _Reader:
    """Sequential access to a stream of groups with one group of look-ahead."""

    def __init__(self, groups: Iterator[_Group]) -> None:
        self._groups = groups
        self._next: _Group | None = None
        self._done = False
        self.pos = 0

    def peek(self) -> _Group | None:
        if self._next is None and not self._done:
            try:
                self._next = next(self._groups)
            except StopIteration:
                self._done = True
        return self._next

    def take(self) -> _Group:
        g = self.peek()
        assert g is not None
        self._next = None
        self.pos += 1
        return g

    def seek(self, pos: int) -> None:
        while self.pos < pos:
            if self.peek() is None:
                raise AdagError(
                    f"the data end after {self.pos} sequence groups, but the checkpoint is at "
                    f"group {pos}; resume with the same data, or pass force=True to start over"
                )
            self.take()


def _mix(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (independent streams per purpose)."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).hexdigest()
    return int(h[:15], 16)


def _text_windows(model: Model, texts: Iterable[str], seq_len: int) -> Iterator[Tensor]:
    """The texts tokenized (each with the tokenizer's special tokens and an EOS after it),
    concatenated and cut into windows of ``seq_len`` tokens; a last shorter window is dropped."""
    tok = model.tok()
    eos = tok.eos_token_id
    buf: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise AdagError(f"texts must be strings, got {type(text).__name__}")
        if not text.strip():
            continue
        buf.extend(tok(text, add_special_tokens=True)["input_ids"])
        if eos is not None:
            buf.append(int(eos))
        while len(buf) >= seq_len:
            yield torch.tensor(buf[:seq_len], dtype=torch.long)
            del buf[:seq_len]


def _text_groups(windows: Iterator[Tensor], per_group: int) -> Iterator[_Group]:
    index = 0
    rows: list[Tensor] = []
    for w in windows:
        rows.append(w)
        if len(rows) == per_group:
            ids = torch.stack(rows)
            yield _Group(index, ids.shape[0] * (ids.shape[1] - 1), ids)
            index += 1
            rows = []
    if rows:
        ids = torch.stack(rows)
        yield _Group(index, ids.shape[0] * (ids.shape[1] - 1), ids)


def _token_groups(batches: Iterable[Tensor], per_group: int, vocab: int) -> Iterator[_Group]:
    index = 0
    for b in batches:
        ids = torch.as_tensor(b)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype.is_floating_point or ids.is_complex():
            raise AdagError(
                f"token batches must be integer (batch, pos) tensors with pos >= 2, got "
                f"{ids.dtype} of shape {tuple(ids.shape)}"
            )
        ids = ids.long().cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise AdagError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
        for start in range(0, ids.shape[0], per_group):
            chunk = ids[start : start + per_group]
            yield _Group(index, chunk.shape[0] * (chunk.shape[1] - 1), chunk)
            index += 1


def _self_groups(per_group: int, seq_len: int) -> Iterator[_Group]:
    index = 0
    while True:
        yield _Group(index, per_group * seq_len)
        index += 1


def _self_prompts(model: Model) -> list[list[int]]:
    """Token ids of :data:`SELF_PROMPTS` (a model without a tokenizer starts from its BOS id,
    or 0)."""
    tok = model.tokenizer
    if tok is None:
        bos = getattr(model.hf.config, "bos_token_id", None)
        return [[int(bos) if isinstance(bos, int) else 0]]
    out: list[list[int]] = []
    for text, chat in SELF_PROMPTS:
        if chat and getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": text}]
            rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            out.append(list(tok(str(rendered), add_special_tokens=False)["input_ids"]))
        elif not chat:
            out.append(list(tok(text, add_special_tokens=True)["input_ids"]))
    return out


def _eos_ids(model: Model) -> set[int]:
    out: set[int] = set()
    for c in (
        getattr(model.tokenizer, "eos_token_id", None),
        getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(c, int):
            out.add(c)
        elif isinstance(c, (list, tuple)):
            out.update(int(x) for x in c)
    return out


class _Activations:
    """Turns groups into activations ``(n_layers, rows, d_model)`` (MLP inputs and outputs of
    the covered layers), in the model's dtype, on the CPU."""

    def __init__(self, model: Model, layers: list[int], cfg: TrainConfig, self_gen: bool) -> None:
        self.model = model
        self.layers = layers
        self.cfg = cfg
        self.sites = [INPUT_SITE.format(x) for x in layers] + [
            OUTPUT_SITE.format(x) for x in layers
        ]
        self.prompts = _self_prompts(model) if self_gen else []
        self.eos = _eos_ids(model) if self_gen else set()
        if self_gen:
            longest = max(len(p) for p in self.prompts) + cfg.seq_len
            if model.n_ctx is not None and longest > model.n_ctx:
                raise AdagError(
                    f"seq_len {cfg.seq_len} plus a prompt exceeds the model's context of "
                    f"{model.n_ctx} tokens; lower seq_len"
                )

    def __call__(self, g: _Group) -> tuple[Tensor, Tensor]:
        if g.ids is None:
            return self._generate(g.index)
        return self._forward(g.ids)

    def _split(self, cache: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        n = len(self.layers)
        acts = [cache[s] for s in self.sites]
        x = torch.stack([a.reshape(-1, a.shape[-1]) for a in acts[:n]])
        y = torch.stack([a.reshape(-1, a.shape[-1]) for a in acts[n:]])
        return x.cpu(), y.cpu()

    def _forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        model = self.model
        with torch.no_grad(), model.sites(read=self.sites) as run:
            model(ids.to(model.device), last_only=True)
        # position 0 is dropped: the first token of every window acts as an attention sink with
        # outlying activations that no transcoder should spend features on
        cache = {s: run.cache[s][:, 1:] for s in self.sites}
        return self._split(cache)

    def _generate(self, index: int) -> tuple[Tensor, Tensor]:
        """Sample ``seqs_per_forward`` sequences of ``seq_len`` tokens at temperature 1 from a
        prompt of :data:`SELF_PROMPTS` (by ``index``, with a generator seeded by the run's seed
        and ``index``), reading the activations of every sampled token as the KV-cached forward
        computes them. Prompt tokens are not data; a sequence ends at its first EOS."""
        from transformers import DynamicCache

        model = self.model
        cfg = self.cfg
        prompt = self.prompts[index % len(self.prompts)]
        gen = torch.Generator().manual_seed(_mix(cfg.seed, "self", index))
        n = cfg.seqs_per_forward
        cache = DynamicCache(config=model.hf.config)
        kw = _cache_kwarg(model.hf)
        ids = torch.tensor([prompt] * n, dtype=torch.long, device=model.device)
        alive = torch.ones(n, dtype=torch.bool)
        steps: list[dict[str, Tensor]] = []
        masks: list[Tensor] = []
        with torch.no_grad(), model.sites(read=self.sites) as run:
            out = model.hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            for _ in range(cfg.seq_len):
                probs = out.logits[:, -1].double().cpu().softmax(-1)  # (n, V)
                nxt = torch.multinomial(probs, 1, generator=gen)  # (n, 1)
                out = model.hf(
                    input_ids=nxt.to(model.device), use_cache=True, logits_to_keep=1, **{kw: cache}
                )
                steps.append({s: run.cache[s][:, -1].cpu() for s in self.sites})
                masks.append(alive.clone())
                if self.eos:
                    ended = torch.tensor([int(t) in self.eos for t in nxt[:, 0].tolist()])
                    alive &= ~ended
                if not alive.any():
                    break
        keep = torch.stack(masks, dim=1)  # (n, steps): the token was sampled before any EOS
        cat = {s: torch.stack([st[s] for st in steps], dim=1)[keep] for s in self.sites}
        return self._split(cat)


def _cache_kwarg(hf: Any) -> str:
    """transformers 5 calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


class _Buffer:
    """Preallocated activations of at most ``capacity`` tokens. ``peak`` counts the most rows
    ever held — filled rows plus the group being copied in — which never exceeds ``capacity``:
    a group joins only if its bound ``rows`` fits in the free space."""

    def __init__(self, n_layers: int, capacity: int, d_model: int, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.x = torch.empty(n_layers, capacity, d_model, dtype=dtype)
        self.y = torch.empty(n_layers, capacity, d_model, dtype=dtype)
        self.rows = 0
        self.peak = 0

    def fill(
        self,
        reader: _Reader,
        acts: Callable[[_Group], tuple[Tensor, Tensor]],
        on_group: Callable[[int], None],
    ) -> int:
        """Empty the buffer and fill it with whole groups from ``reader`` (calling ``on_group``
        with the rows of each); returns the rows."""
        self.rows = 0
        while (g := reader.peek()) is not None and self.rows + g.rows <= self.capacity:
            reader.take()
            x, y = acts(g)
            n = x.shape[1]
            self.peak = max(self.peak, self.rows + n)
            self.x[:, self.rows : self.rows + n] = x
            self.y[:, self.rows : self.rows + n] = y
            self.rows += n
            on_group(n)
        if self.rows == 0 and (g := reader.peek()) is not None:
            raise AdagError(
                f"a group of {g.rows} tokens does not fit the buffer of {self.capacity}; raise "
                "buffer_tokens or pass smaller token batches"
            )
        return self.rows


# ----------------------------------------------------------------------------------------------
# The transcoder being trained (normalised units).


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``; the gradient in θ by the rectangle-kernel straight-through
    estimator ``−(θ/ε) K((pre − θ)/ε)`` (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = grad * (pre > theta)
        window = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        g_theta = -(theta / eps) * window * grad
        # theta broadcasts over the token axis (dim 1): sum its gradient there
        return g_pre, g_theta.sum(dim=1, keepdim=True), None


class _Net:
    """Parameters of PLT/CLT transcoders for ``L`` covered layers, stacked over layers."""

    def __init__(self, cfg: TrainConfig, n: int, d: int, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.n = n
        self.d = d
        F = cfg.n_features
        self.params: dict[str, Tensor] = {
            "W_enc": torch.zeros(n, F, d, dtype=dtype),  # (L, F, d)
            "b_enc": torch.zeros(n, F, dtype=dtype),
            "b_dec": torch.zeros(n, d, dtype=dtype),
        }
        if cfg.activation == "jumprelu":
            self.params["log_threshold"] = torch.full((n, F), math.log(INIT_THRESHOLD), dtype=dtype)
        if cfg.kind == "plt":
            self.params["W_dec"] = torch.zeros(n, F, d, dtype=dtype)
        else:
            for i in range(n):
                self.params[f"W_dec.{i}"] = torch.zeros(n - i, F, d, dtype=dtype)  # (targets, F, d)
        for p in self.params.values():
            p.requires_grad_(True)

    def init(self, seed: int, y_mean: Tensor) -> None:
        gen = torch.Generator().manual_seed(_mix(seed, "init"))
        with torch.no_grad():
            for name, p in self.params.items():
                if name.startswith("W_"):
                    r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    # rows of norm INIT_NORM; a CLT feature's decoders INIT_NORM together
                    axes = (0, 2) if name.startswith("W_dec.") else (-1,)
                    r = r / r.pow(2).sum(axes, keepdim=True).sqrt() * INIT_NORM
                    p.copy_(r)
            self.params["b_dec"].copy_(y_mean)

    def W_dec(self, i: int) -> Tensor:
        """Decoder of source ``i``: ``(targets, F, d)`` (PLT: one target, its own layer)."""
        if self.cfg.kind == "plt":
            return self.params["W_dec"][i][None]
        return self.params[f"W_dec.{i}"]

    def dec_norm(self) -> Tensor:
        """``‖d_{l,i}‖``: ``(L, F)``."""
        if self.cfg.kind == "plt":
            return self.params["W_dec"].pow(2).sum(-1).sqrt()
        return torch.stack([self.W_dec(i).pow(2).sum((0, 2)).sqrt() for i in range(self.n)])

    def pre(self, x: Tensor) -> Tensor:
        """``(L, N, d)`` → ``(L, N, F)``."""
        p = self.params
        return torch.baddbmm(p["b_enc"][:, None, :], x, p["W_enc"].transpose(1, 2))

    def activate(self, pre: Tensor) -> Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            theta = self.params["log_threshold"].exp()[:, None, :]  # (L, 1, F)
            out: Tensor = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)  # type: ignore[no-untyped-call]
            return out
        top = pre.topk(self.cfg.top_k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, acts: Tensor, *, bias: bool = True) -> Tensor:
        """``(L, N, F)`` → ``(L, N, d)``: every target layer's reconstruction."""
        if self.cfg.kind == "plt":
            out = torch.bmm(acts, self.params["W_dec"])
        else:
            parts: list[Tensor | None] = [None] * self.n
            for i in range(self.n):
                c = torch.matmul(acts[i][None], self.W_dec(i))  # (n - i, N, d)
                for j in range(self.n - i):
                    t = parts[i + j]
                    parts[i + j] = c[j] if t is None else t + c[j]
            out = torch.stack([t for t in parts if t is not None])
        return out + self.params["b_dec"][:, None, :] if bias else out


# ----------------------------------------------------------------------------------------------
# Training.


@dataclass
class _State:
    step: int = 0
    buffer_start: int = 0
    """Index of the first group of the current buffer."""
    batch_in_buffer: int = 0
    """Batches of the current buffer already trained on."""
    rng: Tensor | None = None
    """The shuffle generator's state at the start of the current buffer."""
    extra: dict[str, Any] = field(default_factory=dict)


def _settings(
    cfg: TrainConfig, model: Model, layers: list[int], source: str, data: str
) -> dict[str, Any]:
    s = asdict(cfg)
    s["layers"] = layers
    s["model"] = {
        "name": model.name,
        "type": model.spec.model_type,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    s["source"] = source
    s["data"] = data
    s["version"] = FORMAT_VERSION
    return s


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _differing(a: dict[str, Any], b: Any) -> str:
    if not isinstance(b, dict):
        return "all"
    names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(names) or "none"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lr_at(cfg: TrainConfig, step: int) -> float:
    total = cfg.total_steps
    warm = max(1, round(WARMUP_FRACTION * total))
    f = min(1.0, (step + 1) / warm)
    decay_start = total - max(1, round(DECAY_FRACTION * total))
    if step >= decay_start:
        f *= max(0.0, (total - step) / (total - decay_start))
    return cfg.learning_rate * f


def _sparsity_at(cfg: TrainConfig, step: int) -> float:
    warm = cfg.sparsity_warmup * cfg.total_steps
    return cfg.sparsity if warm <= 0 else cfg.sparsity * min(1.0, step / warm)


def train_transcoders(
    model: Model,
    *,
    out: str | os.PathLike[str],
    n_features: int,
    n_tokens: int,
    kind: Kind = "plt",
    texts: Iterable[str] | None = None,
    token_batches: Iterable[Tensor] | None = None,
    self_generate: bool = False,
    activation: Activation = "jumprelu",
    k: int | None = None,
    layers: Sequence[int] | None = None,
    lr: float | None = None,
    batch_tokens: int = 1024,
    buffer_tokens: int = 8192,
    heldout_tokens: int = 1024,
    sparsity: float = 1.0,
    sparsity_warmup: float = 0.2,
    preact: float = 3e-6,
    bandwidth: float = 2.0,
    dead_after: int | None = None,
    seq_len: int = 128,
    seqs_per_forward: int = 16,
    seed: int = 0,
    checkpoint_every: int = 500,
    progress: Callable[[TrainProgress], None] | None = None,
    force: bool = False,
) -> Transcoders:
    """Train transcoders of ``model`` (see the module docstring for the method) and write them
    with their metrics into ``out``; returns them in model units, the model's dtype and device.

    Data: exactly one of ``texts`` (strings, e.g. the lines or paragraphs of a text file),
    ``token_batches`` (integer ``(batch, pos)`` tensors, for models without a tokenizer) or
    ``self_generate=True`` (text sampled from the model at temperature 1). The first
    ``heldout_tokens`` are held out for the metrics. The knobs are the fields of
    :class:`TrainConfig`; ``checkpoint_every`` (steps) and ``progress`` (called with a
    :class:`TrainProgress` after every step and every group of sequences read) do not change the
    result.

    A rerun with the same settings and data (the data are compared by their held-out tokens)
    resumes from ``out/checkpoint.json``, or returns the finished transcoders at once; other
    settings are refused with a one-line error unless ``force`` (which starts over). A
    directory holding transcoders that were not trained here is refused too.

    >>> tc = train_transcoders(model, out="tc", n_features=2048, n_tokens=100_000,
    ...                        self_generate=True)                          # doctest: +SKIP
    """
    from adag.transcoders import load_transcoders, save_transcoders
    from adag.transcoders.formats import JSON_NAME

    cfg = TrainConfig(
        n_features=n_features,
        n_tokens=n_tokens,
        kind=kind,
        activation=activation,
        k=k,
        layers=None if layers is None else tuple(layers),
        lr=lr,
        batch_tokens=batch_tokens,
        buffer_tokens=buffer_tokens,
        heldout_tokens=heldout_tokens,
        sparsity=sparsity,
        sparsity_warmup=sparsity_warmup,
        preact=preact,
        bandwidth=bandwidth,
        dead_after=dead_after,
        seq_len=seq_len,
        seqs_per_forward=seqs_per_forward,
        seed=seed,
    )
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise AdagError(f"checkpoint_every must be an integer, got {checkpoint_every!r}")
    if checkpoint_every < 1:
        raise AdagError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    given = [n for n, v in (("texts", texts), ("token_batches", token_batches)) if v is not None]
    if self_generate:
        given.append("self_generate")
    if len(given) != 1:
        raise AdagError(
            "give exactly one data source: texts, token_batches or self_generate=True"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if isinstance(texts, str):
        raise AdagError("texts must be an iterable of strings (e.g. a file's lines), not a string")
    covered = cfg.covered(model)
    out_dir = Path(out)

    # -- data --------------------------------------------------------------------------------
    if texts is not None:
        source = "texts"
        groups = _text_groups(_text_windows(model, texts, cfg.seq_len), cfg.seqs_per_forward)
    elif token_batches is not None:
        source = "tokens"
        groups = _token_groups(token_batches, cfg.seqs_per_forward, model.d_vocab)
    else:
        source = "self"
        groups = _self_groups(cfg.seqs_per_forward, cfg.seq_len)
    reader = _Reader(groups)
    acts = _Activations(model, covered, cfg, source == "self")
    heldout_groups: list[_Group] = []
    held_rows = 0
    while held_rows < cfg.heldout_tokens:
        g = reader.peek()
        if g is None:
            break
        heldout_groups.append(reader.take())
        held_rows += g.rows
    if not heldout_groups:
        raise AdagError("the data hold no sequence of at least 2 tokens; give more text")
    if source == "self":
        data_key = hashlib.sha256(json.dumps(acts.prompts).encode()).hexdigest()
    else:
        h = hashlib.sha256()
        for g in heldout_groups:
            assert g.ids is not None
            h.update(repr(tuple(g.ids.shape)).encode())
            h.update(g.ids.numpy().tobytes())
        data_key = h.hexdigest()
    settings = _settings(cfg, model, covered, source, data_key)
    key = _key(settings)

    # -- finished or resumable? --------------------------------------------------------------
    ck_json, ck_tensors = out_dir / CHECKPOINT_JSON, out_dir / CHECKPOINT_TENSORS
    done = _read_json(out_dir / METRICS_JSON) if (out_dir / METRICS_JSON).exists() else None
    if done is not None and done.get("settings_key") == key and not force:
        logger.info("transcoders in %s are already trained with these settings", out_dir)
        for p in (ck_json, ck_tensors):
            remove(p)
        return load_transcoders(out_dir, model, all_layers=False)
    if done is not None and not force:
        raise AdagError(
            f"{shown(out_dir)} holds transcoders trained with other settings (differing: "
            f"{_differing(settings, done.get('settings'))}); choose another --out, or pass "
            "force=True (--force) to train over them"
        )
    if done is None and not force and (out_dir / JSON_NAME).exists():
        raise AdagError(
            f"{shown(out_dir)} holds transcoders that were not trained here (no {METRICS_JSON}); "
            "choose another --out, or pass force=True (--force) to train over them"
        )
    resume: dict[str, Any] | None = None
    if ck_json.exists() and not force:
        resume = _read_json(ck_json)
        if resume is None or resume.get("format") != CHECKPOINT_FORMAT:
            raise AdagError(
                f"{shown(ck_json)} is not a readable training checkpoint; delete it or pass "
                "force=True (--force) to start over"
            )
        if resume.get("settings_key") != key:
            raise AdagError(
                f"{shown(ck_json)} was written with other settings (differing: "
                f"{_differing(settings, resume.get('settings'))}); rerun with the same settings "
                "to resume, or pass force=True (--force) to start over"
            )
    if force:
        for p in (out_dir / METRICS_JSON, ck_json, ck_tensors):
            remove(p)

    return _Run(cfg, model, covered, acts, reader, heldout_groups, settings, key, out_dir).train(
        resume, checkpoint_every, progress, save_transcoders
    )


class _Run:
    """One training run: the loop, checkpoints and the final metrics."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Model,
        layers: list[int],
        acts: _Activations,
        reader: _Reader,
        heldout_groups: list[_Group],
        settings: dict[str, Any],
        key: str,
        out: Path,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.layers = layers
        self.acts = acts
        self.reader = reader
        self.settings = settings
        self.key = key
        self.out = out
        n, d = len(layers), model.d_model
        self.dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
        self.store = torch.float64 if model.dtype == torch.float64 else torch.float32
        if model.dtype in (torch.float16, torch.bfloat16):
            self.store = model.dtype  # keep the buffers half as large
        self.heldout_groups = heldout_groups
        self.held_x = self.held_y = torch.empty(0)  # (L, H, d), read when training starts
        self.first_group = reader.pos
        self.buffer = _Buffer(n, cfg.buffer_tokens, d, self.store)
        self.net = _Net(cfg, n, d, self.dtype)
        self.opt = torch.optim.Adam(list(self.net.params.values()), lr=cfg.learning_rate)
        self.gen = torch.Generator().manual_seed(_mix(cfg.seed, "shuffle"))
        self.scale_in = torch.ones(n, dtype=torch.float64)
        self.scale_out = torch.ones(n, dtype=torch.float64)
        self.since_fired = torch.zeros(n, cfg.n_features, dtype=torch.long)
        self.fvu_init: list[float] = []
        self.ema_fvu = [math.nan] * n
        self.ema_l0 = [math.nan] * n
        self.exhausted = False
        self.data_tokens = 0

    # -- batches -----------------------------------------------------------------------------

    def _norm(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s_in = self.scale_in.to(self.dtype)[:, None, None]
        s_out = self.scale_out.to(self.dtype)[:, None, None]
        return x.to(self.dtype) * s_in, y.to(self.dtype) * s_out

    def _init_from(self, x: Tensor, y: Tensor) -> None:
        """Normalisation scales (``E‖x‖² = d_model`` per layer) and ``b_dec`` from a buffer."""
        d = self.model.d_model
        x64, y64 = x.double(), y.double()
        self.scale_in = (d / x64.pow(2).sum(-1).mean(1).clamp_min(1e-30)).sqrt()
        self.scale_out = (d / y64.pow(2).sum(-1).mean(1).clamp_min(1e-30)).sqrt()
        y_mean = (y64 * self.scale_out[:, None, None]).mean(1)
        self.net.init(self.cfg.seed, y_mean.to(self.dtype))

    def _step(self, x: Tensor, y: Tensor, step: int) -> float:
        cfg, net = self.cfg, self.net
        lr = _lr_at(cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.since_fired >= cfg.dead_window  # (L, F)
        pre = net.pre(x)  # (L, N, F)
        a = net.activate(pre)
        recon = net.decode(a)
        err = recon - y  # (L, N, d)
        mse = err.pow(2).sum(-1).mean(1)  # (L,)
        loss = mse.sum()
        if cfg.activation in ("jumprelu", "relu"):
            lam = _sparsity_at(cfg, step)
            dn = net.dec_norm()[:, None, :]  # (L, 1, F)
            if lam > 0:
                loss = loss + lam * torch.tanh(TANH_SCALE * a * dn).sum(-1).mean(1).sum()
            if cfg.activation == "jumprelu" and cfg.preact > 0:
                theta = net.params["log_threshold"].exp()[:, None, :]
                gap = torch.relu(theta - pre) * dn
                loss = loss + cfg.preact * gap.sum(-1).mean(1).sum()
        elif bool(dead.any()):
            loss = loss + AUXK_COEF * self._auxk(pre, dead, (y - recon).detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        with torch.no_grad():
            fired = (a > 0).any(dim=1)  # (L, F)
            self.since_fired = torch.where(fired, 0, self.since_fired + x.shape[1])
            var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)
            fvu = (mse / var.clamp_min(1e-30)).tolist()
            l0 = (a > 0).sum(-1).to(torch.float64).mean(1).tolist()
        for i in range(len(self.layers)):
            prev_f, prev_l = self.ema_fvu[i], self.ema_l0[i]
            self.ema_fvu[i] = fvu[i] if math.isnan(prev_f) else 0.9 * prev_f + 0.1 * fvu[i]
            self.ema_l0[i] = l0[i] if math.isnan(prev_l) else 0.9 * prev_l + 0.1 * l0[i]
        return float(loss.detach())

    def _auxk(self, pre: Tensor, dead: Tensor, e: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top ``d_model/2`` dead features reconstruct the error
        ``e`` (``L N d``); the squared error normalised by ``e``'s variance."""
        k_aux = min(self.model.d_model // 2, int(dead.sum(-1).max()))
        masked = pre.masked_fill(~dead[:, None, :], -math.inf)
        top = masked.topk(k_aux, dim=-1)
        # relu: -inf (live features picked where a layer has fewer dead ones) becomes 0
        a = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        e_hat = self.net.decode(a, bias=False)
        num = (e - e_hat).pow(2).sum((1, 2))  # (L,)
        den = (e - e.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-30)
        return (num / den)[dead.any(-1)].sum()

    # -- evaluation ----------------------------------------------------------------------------

    def _eval_net(self) -> list[float]:
        """Held-out FVU per layer of the network being trained (normalised units)."""
        n = len(self.layers)
        err = torch.zeros(n, dtype=torch.float64)
        var = torch.zeros(n, dtype=torch.float64)
        y_mean = (self.held_y.double() * self.scale_out[:, None, None]).mean(1, keepdim=True)
        with torch.no_grad():
            for s in range(0, self.held_x.shape[1], self.cfg.batch_tokens):
                x, y = self._norm(
                    self.held_x[:, s : s + self.cfg.batch_tokens],
                    self.held_y[:, s : s + self.cfg.batch_tokens],
                )
                recon = self.net.decode(self.net.activate(self.net.pre(x)))
                err += (recon - y).double().pow(2).sum((1, 2))
                var += (y.double() - y_mean).pow(2).sum((1, 2))
        return (err / var.clamp_min(1e-30)).tolist()

    def _metrics(self, tc: Transcoders) -> list[dict[str, Any]]:
        """Held-out FVU, L0 and silent share per layer of the final transcoders (model units)."""
        n = len(self.layers)
        err = torch.zeros(n, dtype=torch.float64)
        l0 = torch.zeros(n, dtype=torch.float64)
        fired = torch.zeros(n, tc.d_features, dtype=torch.bool)
        H = self.held_x.shape[1]
        tcd = tc.to(device="cpu", dtype=self.dtype)
        with torch.no_grad():
            for s in range(0, H, self.cfg.batch_tokens):
                x = self.held_x[:, s : s + self.cfg.batch_tokens].to(self.dtype)
                y = self.held_y[:, s : s + self.cfg.batch_tokens].to(self.dtype)
                a = {layer: tcd.encode(layer, x[i]) for i, layer in enumerate(self.layers)}
                for i, layer in enumerate(self.layers):
                    err[i] += (tcd.decode(a, layer) - y[i]).double().pow(2).sum()
                    l0[i] += (a[layer] > 0).sum()
                    fired[i] |= (a[layer] > 0).any(0)
        y64 = self.held_y.double()
        var = (y64 - y64.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-30)
        fvu = (err / var).tolist()
        dead = (self.since_fired >= self.cfg.dead_window).double().mean(-1).tolist()
        silent = (~fired).double().mean(-1).tolist()
        return [
            {
                "layer": layer,
                "fvu": fvu[i],
                "fvu_init": self.fvu_init[i] if self.fvu_init else None,
                "l0": float(l0[i]) / H,
                "dead": dead[i],
                "silent_heldout": silent[i],
            }
            for i, layer in enumerate(self.layers)
        ]

    def _transcoders(self) -> Transcoders:
        """The trained weights in model units: ``W_enc · s_in``, ``W_dec / s_out``, ``b_dec /
        s_out`` (pre-activations, thresholds and activations are unchanged)."""
        cfg, net = self.cfg, self.net
        p = {k: v.detach().double() for k, v in net.params.items()}
        s_in, s_out = self.scale_in, self.scale_out
        n = len(self.layers)
        W_enc = [p["W_enc"][i] * s_in[i] for i in range(n)]
        b_enc = [p["b_enc"][i] for i in range(n)]
        b_dec = [p["b_dec"][i] / s_out[i] for i in range(n)]
        if cfg.kind == "plt":
            W_dec = [p["W_dec"][i] / s_out[i] for i in range(n)]
        else:
            W_dec = [p[f"W_dec.{i}"] / s_out[i:, None, None] for i in range(n)]
        threshold = None
        if cfg.activation == "jumprelu":
            threshold = [p["log_threshold"][i].exp() for i in range(n)]
        dtype = self.model.dtype

        def cast(ts: list[Tensor]) -> list[Tensor]:
            return [t.to(device=self.model.device, dtype=dtype).contiguous() for t in ts]

        return Transcoders(
            kind=cfg.kind,
            layers=list(self.layers),
            W_enc=cast(W_enc),
            b_enc=cast(b_enc),
            W_dec=cast(W_dec),
            b_dec=cast(b_dec),
            activation=cfg.activation,
            threshold=None if threshold is None else cast(threshold),
            k=cfg.top_k if cfg.activation == "topk" else None,
            meta={"trained_by": "adag.transcoders.train", "model": self.model.name},
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoint(self, st: _State) -> None:
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {
            f"param.{k}": v.detach().contiguous() for k, v in self.net.params.items()
        }
        names = list(self.net.params)
        for idx, state in self.opt.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"adam.{names[idx]}.{k}"] = torch.as_tensor(v).contiguous()
        tensors["since_fired"] = self.since_fired.contiguous()
        tensors["scale_in"] = self.scale_in.contiguous()
        tensors["scale_out"] = self.scale_out.contiguous()
        tensors["fvu_init"] = torch.tensor(self.fvu_init, dtype=torch.float64)
        assert st.rng is not None
        tensors["rng.shuffle"] = st.rng.contiguous()
        data = save(tensors, metadata={"format": f"{CHECKPOINT_FORMAT}/{FORMAT_VERSION}"})
        write_bytes(self.out / CHECKPOINT_TENSORS, data)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "tensors": digest(data),
            "settings_key": self.key,
            "settings": self.settings,
            "step": st.step,
            "tokens": st.step * self.cfg.batch_tokens,
            "buffer_start": st.buffer_start,
            "batch_in_buffer": st.batch_in_buffer,
            "peak_buffer_rows": self.buffer.peak,
        }
        write_text(self.out / CHECKPOINT_JSON, json.dumps(meta, indent=1) + "\n")

    def _load_checkpoint(self, meta: dict[str, Any]) -> _State:
        from safetensors.torch import load

        path = self.out / CHECKPOINT_TENSORS
        try:
            data = path.read_bytes()
        except OSError as e:
            raise AdagError(
                f"cannot read {shown(path)} ({e.strerror or e}); pass force=True (--force) to "
                "start over"
            ) from None
        if meta.get("tensors") != digest(data):
            raise AdagError(
                f"{shown(path)} is not the tensor file {CHECKPOINT_JSON} was written with; pass "
                "force=True (--force) to start over"
            )
        ts = load(data)
        with torch.no_grad():
            for k, v in self.net.params.items():
                v.copy_(ts[f"param.{k}"])
        names = list(self.net.params)
        sd = self.opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for idx, name in enumerate(names):
            pre = f"adam.{name}."
            entry = {k[len(pre) :]: v for k, v in ts.items() if k.startswith(pre)}
            if entry:
                state[idx] = entry
        self.opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        self.since_fired = ts["since_fired"].clone()
        self.scale_in = ts["scale_in"].clone()
        self.scale_out = ts["scale_out"].clone()
        self.fvu_init = ts["fvu_init"].tolist()
        self.buffer.peak = int(meta.get("peak_buffer_rows", 0))
        return _State(
            step=int(meta["step"]),
            buffer_start=int(meta["buffer_start"]),
            batch_in_buffer=int(meta["batch_in_buffer"]),
            rng=ts["rng.shuffle"].clone(),
        )

    # -- the loop --------------------------------------------------------------------------------

    def train(
        self,
        resume: dict[str, Any] | None,
        checkpoint_every: int,
        progress: Callable[[TrainProgress], None] | None,
        save: Callable[[Transcoders, Path], Path],
    ) -> Transcoders:
        cfg = self.cfg
        t0 = time.perf_counter()
        total = cfg.total_steps
        n_batch = cfg.batch_tokens
        if resume is not None:
            st = self._load_checkpoint(resume)
            resumed_from: int | None = st.step
            logger.info("resuming from step %d of %d", st.step, total)
        else:
            st = _State(buffer_start=self.first_group)
            resumed_from = None
        initialized = restore = resume is not None
        last_loss = math.nan

        def report(phase: Literal["data", "train"]) -> None:
            if progress is None:
                return
            dead = (self.since_fired >= cfg.dead_window).double().mean(-1).tolist()
            progress(
                TrainProgress(
                    phase=phase,
                    step=st.step,
                    total_steps=total,
                    tokens=st.step * n_batch,
                    total_tokens=total * n_batch,
                    layers=list(self.layers),
                    fvu=list(self.ema_fvu),
                    l0=list(self.ema_l0),
                    dead=dead,
                    loss=last_loss,
                    lr=_lr_at(cfg, min(st.step, total - 1)),
                    resumed_from=resumed_from,
                    data_tokens=self.data_tokens,
                )
            )

        def on_group(rows: int) -> None:
            self.data_tokens += rows
            report("data")

        held_x, held_y = [], []
        for g in self.heldout_groups:
            x, y = self.acts(g)
            held_x.append(x.to(self.store))
            held_y.append(y.to(self.store))
            on_group(x.shape[1])
        self.held_x = torch.cat(held_x, dim=1)  # (L, H, d)
        self.held_y = torch.cat(held_y, dim=1)
        self.reader.seek(st.buffer_start)
        started = False

        while st.step < total:
            st.buffer_start = self.reader.pos
            rows = self.buffer.fill(self.reader, self.acts, on_group)
            n_batches = rows // n_batch
            if n_batches == 0:
                self.exhausted = True
                logger.warning(
                    "the data ran out after %d of %d steps; training stops there", st.step, total
                )
                break
            bx, by = self.buffer.x, self.buffer.y
            if not initialized:
                self._init_from(bx[:, :rows], by[:, :rows])
                self.fvu_init = self._eval_net()
                initialized = True
            if not started:
                report("train")
                started = True
            if restore:  # the first buffer of a resumed run: the saved shuffle state
                assert st.rng is not None
                self.gen.set_state(st.rng)
                restore = False
            else:
                st.batch_in_buffer = 0
            st.rng = self.gen.get_state()
            perm = torch.randperm(rows, generator=self.gen)
            for b in range(st.batch_in_buffer, n_batches):
                idx = perm[b * n_batch : (b + 1) * n_batch]
                x, y = self._norm(bx[:, idx], by[:, idx])
                last_loss = self._step(x, y, st.step)
                st.step += 1
                st.batch_in_buffer = b + 1
                if st.step % checkpoint_every == 0 and st.step < total:
                    if st.batch_in_buffer == n_batches:  # resume at the next buffer
                        self._save_checkpoint(
                            _State(st.step, self.reader.pos, 0, self.gen.get_state())
                        )
                    else:
                        self._save_checkpoint(st)
                report("train")
                if st.step >= total:
                    break
            st.batch_in_buffer = 0

        tc = self._transcoders()
        per_layer = self._metrics(tc)
        metrics: dict[str, Any] = {
            "format": METRICS_FORMAT,
            "version": FORMAT_VERSION,
            "settings_key": self.key,
            "settings": self.settings,
            "kind": cfg.kind,
            "activation": cfg.activation,
            "n_features": cfg.n_features,
            "steps": st.step,
            "tokens": st.step * n_batch,
            "heldout_tokens": int(self.held_x.shape[1]),
            "data_exhausted": self.exhausted,
            "buffer_tokens": cfg.buffer_tokens,
            "peak_buffer_rows": self.buffer.peak,
            "wall_s": round(time.perf_counter() - t0, 3),
            "resumed_from": resumed_from,
            "fvu_mean": sum(m["fvu"] for m in per_layer) / len(per_layer),
            "l0_mean": sum(m["l0"] for m in per_layer) / len(per_layer),
            "dead_mean": sum(m["dead"] for m in per_layer) / len(per_layer),
            "layers": per_layer,
        }
        tc.meta["training"] = {k: v for k, v in metrics.items() if k != "settings"}
        save(tc, self.out)
        write_text(self.out / METRICS_JSON, json.dumps(metrics, indent=1) + "\n")
        for p in (self.out / CHECKPOINT_JSON, self.out / CHECKPOINT_TENSORS):
            remove(p)
        return tc


__all__ = ["SELF_PROMPTS", "TrainConfig", "TrainProgress", "train_transcoders"]
