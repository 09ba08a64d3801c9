"""Small numeric building blocks shared by sites and linearisation: norm formulas and activation
ratios. Each formula follows the operation order of its Hugging Face counterpart, but works in
``promote(x.dtype, float32)``: HF norms always upcast to float32, which silently throws away
float64 precision in exactness tests."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.specs import ActKind, NormKind


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision dtypes, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def norm_eps(module: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, (int, float)):
            return float(eps)
    raise TypeError(f"cannot find the epsilon of norm module {type(module).__name__}")


def norm_scale(kind: NormKind, x: Tensor, eps: float) -> Tensor:
    """The norm scale ``s`` (``batch pos 1``), in the working dtype."""
    xf = x.to(work_dtype(x.dtype))
    if kind == "layer":
        var = xf.var(-1, keepdim=True, unbiased=False)
        return torch.rsqrt(var + eps)
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


@contextmanager
def _materialised(module: torch.nn.Module, x: Tensor) -> Iterator[None]:
    """The weights of a module that accelerate offloaded (``device_map`` with CPU or disk
    offload keeps them on the meta device outside its forward), loaded for the block and put
    back after: adag's norm hooks run after the module's forward, when accelerate has already
    put them back."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        raise AdagError(
            f"the weights of {type(module).__name__} are on the meta device with no accelerate "
            "hook to load them; load the model with device_map or give it real weights"
        )
    hook.pre_forward(module, x)
    try:
        yield
    finally:
        hook.post_forward(module, x)


def norm_apply(kind: NormKind, module: torch.nn.Module, x: Tensor, scale: Tensor) -> Tensor:
    """The norm's output for input ``x`` with the given scale (which may be frozen or patched)."""
    if cast(Tensor, module.weight).is_meta:  # offloaded by accelerate (device_map, disk/CPU)
        with _materialised(module, x):
            return norm_apply(kind, module, x, scale)
    wd = work_dtype(x.dtype)
    xf = x.to(wd)
    weight = cast(Tensor, module.weight)
    if kind == "rms":
        return (weight.to(wd) * (xf * scale)).to(x.dtype)
    if kind == "rms_1p":
        return ((xf * scale) * (1.0 + weight.to(wd))).to(x.dtype)
    bias = cast("Tensor | None", getattr(module, "bias", None))
    out = (xf - xf.mean(-1, keepdim=True)) * scale * weight.to(wd)
    if bias is not None:
        out = out + bias.to(wd)
    return out.to(x.dtype)


def act_ratio(kind: ActKind, g: Tensor) -> Tensor:
    """``act(g) / g`` in closed form, finite at ``g = 0`` (where it is ``act'(0)``)."""
    if kind == "silu":
        return torch.sigmoid(g)
    if kind == "gelu":
        return 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
    return (g > 0).to(g.dtype)
