"""Shared fixtures: tiny random models of every supported architecture (float64) and the real
SmolLM2-135M (float32)."""

from __future__ import annotations

import math

import pytest
import torch

from adag.models.model import Model

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "gpt2"]
VOCAB = 61

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(arch: str):
    import transformers as tr

    if arch == "llama":
        return tr.LlamaConfig(**_COMMON, head_dim=8)
    if arch == "qwen2":
        return tr.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return tr.Qwen3Config(**_COMMON, head_dim=8)
    if arch == "gemma2":
        return tr.Gemma2Config(
            **_COMMON,
            head_dim=8,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
            sliding_window=4,
        )
    if arch == "gemma3_text":
        return tr.Gemma3TextConfig(
            **_COMMON,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if arch == "olmo2":
        return tr.Olmo2Config(**_COMMON)
    if arch == "gpt2":
        return tr.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_inner=48,
            n_positions=64,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise KeyError(arch)


def tiny_hf(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager"):
    """A tiny random HF model whose weights are large enough for every nonlinearity to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attn)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # norm weights; Gemma's are stored as w in (1 + w)
                base = 0.0 if arch.startswith("gemma") else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "wpe" in name or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[0] if arch == "gpt2" else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
    return hf.to(dtype).eval()


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Model:
    return Model(tiny_hf(arch, dtype, seed), None, name=f"tiny-{arch}")


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request) -> Model:
    """A tiny random float64 model, parametrised over every supported architecture."""
    return tiny_model(request.param)


@pytest.fixture
def tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 9), generator=gen)


@pytest.fixture(scope="session")
def smollm2() -> Model:
    from adag.models.load import load_model

    return load_model("smollm2-135m")
