"""Architecture facts as data: one row per supported Hugging Face ``model_type``.

Everything else in adag reads these rows; no other module knows where a model keeps its norms or
projections. Adding an architecture means adding a row here (and a tiny config to the test fixture).

Module paths are dotted attribute paths. ``layers`` is relative to the HF ``*ForCausalLM`` model;
every path whose name starts with ``ln`` or ``attn``/``mlp`` is relative to one decoder layer.

Residual-stream layout the sites rely on (true of every row): a layer computes
``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``, where ``attn_out``
is the output of ``attn_out_module`` (the attention module, or its post-norm when the
architecture has one) and ``mlp_out`` the output of ``mlp_out_module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NormKind = Literal["rms", "rms_1p", "layer"]
"""``rms``: ``w * (x * s)``; ``rms_1p`` (Gemma): ``(x * s) * (1 + w)``; ``layer``: LayerNorm with
bias, ``((x - mean) * s) * w + b``. ``s`` is the norm scale ``1 / sqrt(mean(x²) + eps)`` (RMS) or
``1 / sqrt(var(x) + eps)`` (LayerNorm); it is what ``ln*.hook_scale`` reads and what linearisation
freezes."""

ActKind = Literal["silu", "gelu", "gelu_tanh", "relu"]

# HF activation names (config.hidden_act & co.) -> the activation kind whose ratio act(g)/g we know.
ACTIVATIONS: dict[str, ActKind] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its parts, and what kind of parts they are."""

    model_type: str
    """HF ``config.model_type``."""
    family: str
    """Human-readable family name (shown by ``adag models``)."""
    layers: str
    """Path of the ModuleList of decoder layers."""
    embed: str
    """Path of the token embedding (its weight is the unembedding when tied)."""
    final_norm: str
    """Path of the final norm, applied before the unembedding."""
    unembed: str
    """Path of the unembedding (``lm_head``)."""
    attn: str
    """Attention module, relative to a layer."""
    mlp: str
    """MLP module, relative to a layer."""
    mlp_in: str
    """Gate projection (gated MLP) or input projection (non-gated): its output is ``mlp.hook_pre``."""
    mlp_in_linear: str | None
    """Up projection of a gated MLP (``mlp.hook_pre_linear``); None for non-gated MLPs."""
    mlp_down: str
    """Down projection: its input is ``mlp.hook_post``, the neurons."""
    attn_o: str
    """Attention output projection (``W_O``), relative to a layer."""
    ln1: str | None
    """Pre-attention norm, or None (OLMo-2 has only post-norms)."""
    ln2: str | None
    """Pre-MLP norm, or None."""
    ln1_post: str | None = None
    """Norm applied to the attention output before it is added to the residual (Gemma 2/3, OLMo-2)."""
    ln2_post: str | None = None
    """Norm applied to the MLP output before it is added to the residual."""
    norm: NormKind = "rms"
    act_key: str = "hidden_act"
    """Config field naming the MLP activation."""
    attn_softcap_key: str | None = None
    """Config field of the attention-logit softcap (Gemma 2), if any."""
    final_softcap_key: str | None = None
    """Config field of the final-logit softcap (Gemma 2/3), if any."""
    qk_norm: bool = False
    """Queries and keys are normalised before rotary (Qwen3, Gemma 3, OLMo-2)."""
    rotary: bool = True
    conv1d: bool = False
    """Projections are GPT-2 ``Conv1D`` (weight stored ``in x out``) instead of ``nn.Linear``."""

    @property
    def gated(self) -> bool:
        return self.mlp_in_linear is not None

    @property
    def attn_out_module(self) -> str:
        return self.ln1_post or self.attn

    @property
    def mlp_out_module(self) -> str:
        return self.ln2_post or self.mlp


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    mlp_in="mlp.gate_proj",
    mlp_in_linear="mlp.up_proj",
    mlp_down="mlp.down_proj",
    attn_o="self_attn.o_proj",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
)
_GEMMA_LIKE = {
    **_LLAMA_LIKE,
    "ln2": "pre_feedforward_layernorm",
    "ln1_post": "post_attention_layernorm",
    "ln2_post": "post_feedforward_layernorm",
    "norm": "rms_1p",
    "act_key": "hidden_activation",
}

SPECS: dict[str, ArchSpec] = {
    s.model_type: s
    for s in [
        ArchSpec("llama", "Llama (SmolLM2, Llama 2/3.x)", **_LLAMA_LIKE),  # type: ignore[arg-type]
        ArchSpec("qwen2", "Qwen2 / Qwen2.5", **_LLAMA_LIKE),  # type: ignore[arg-type]
        ArchSpec("qwen3", "Qwen3", qk_norm=True, **_LLAMA_LIKE),  # type: ignore[arg-type]
        ArchSpec(
            "gemma2",
            "Gemma 2",
            attn_softcap_key="attn_logit_softcapping",
            final_softcap_key="final_logit_softcapping",
            **_GEMMA_LIKE,  # type: ignore[arg-type]
        ),
        ArchSpec(
            "gemma3_text",
            "Gemma 3 (text)",
            # Gemma 3's config has attn_logit_softcapping but its attention never applies it
            # (transformers 5.x passes no softcap), so neither do we.
            attn_softcap_key=None,
            final_softcap_key="final_logit_softcapping",
            qk_norm=True,
            **_GEMMA_LIKE,  # type: ignore[arg-type]
        ),
        ArchSpec(
            "olmo2",
            "OLMo 2",
            qk_norm=True,
            **{  # type: ignore[arg-type]
                **_LLAMA_LIKE,
                "ln1": None,
                "ln2": None,
                "ln1_post": "post_attention_layernorm",
                "ln2_post": "post_feedforward_layernorm",
            },
        ),
        ArchSpec(
            "gpt2",
            "GPT-2",
            layers="transformer.h",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            attn="attn",
            mlp="mlp",
            mlp_in="mlp.c_fc",
            mlp_in_linear=None,
            mlp_down="mlp.c_proj",
            attn_o="attn.c_proj",
            ln1="ln_1",
            ln2="ln_2",
            norm="layer",
            act_key="activation_function",
            rotary=False,
            conv1d=True,
        ),
    ]
}


def supported() -> list[str]:
    """The supported ``model_type`` values, sorted."""
    return sorted(SPECS)
