"""Transcoder files: every supported layout, detected from a directory's contents; ours written
atomically. Never pickle (``.npz`` files are read with ``allow_pickle=False``).

=========================  ===================================================================
layout                     recognised by
=========================  ===================================================================
adag                       ``transcoders.json`` + ``transcoders.safetensors``, written by
                           :func:`save_transcoders`
circuit-tracer PLT         ``config.yaml`` with ``model_kind: transcoder_set``; one file per layer
                           (``transcoders: [paths]``, else ``layer_{i}.safetensors`` beside it):
                           ``W_enc (d_transcoder, d_model)``, ``W_dec (d_transcoder, d_model)``,
                           ``b_enc``, ``b_dec``, optional ``activation_function.threshold``
                           (JumpReLU), ``W_skip`` and ``k`` (TopK); also GemmaScope ``.npz`` and
                           GemmaScope-2 (``w_enc``/``w_dec``/``affine_skip_connection``) files
circuit-tracer CLT         ``config.yaml`` with ``model_kind: cross_layer_transcoder``, or no
                           config: ``W_enc_{i}.safetensors`` (``W_enc_{i} (d_transcoder,
                           d_model)``, ``b_enc_{i}``, ``b_dec_{i}``, optional ``threshold_{i}``)
                           and ``W_dec_{i}.safetensors`` (``W_dec_{i} (d_transcoder, n_layers - i,
                           d_model)``); GemmaScope-2 CLT files listed in ``transcoders:``
SAELens                    ``cfg.json`` + ``sae_weights.safetensors`` in the directory or one
                           subdirectory per layer: ``W_enc (d_in, d_sae)``, ``W_dec (d_sae,
                           d_out)``, ``b_enc``, ``b_dec``, ``threshold`` / ``log_threshold``,
                           ``W_skip (d_out, d_in)``; a transcoder only if the config names an
                           output hook (``hook_name_out``, ``d_out`` or a ``*transcoder``
                           architecture) — an SAE is refused
GemmaScope                 ``params.npz`` files under ``layer_{L}/...`` directories (e.g.
                           ``layer_5/width_16k/average_l0_71/params.npz``, one per layer):
                           ``W_enc (d_model, d_sae)``, ``W_dec (d_sae, d_model)``, ``b_enc``,
                           ``b_dec``, ``threshold`` (JumpReLU)
=========================  ===================================================================

Orientation: every encoder and decoder matrix is turned into adag's ``(d_features, d_model)`` by
its shape against ``d_features`` (``b_enc``'s length) and ``d_model`` (``b_dec``'s), so a file
stored the other way round loads too; only a square matrix (``d_features == d_model``) falls back
on its format's documented orientation. The names read transposed are listed in
``meta["transposed"]``. Skip matrices are square and always follow their format: circuit-tracer
PLT and SAELens store adag's ``(out, in)``; GemmaScope-2's ``affine_skip_connection`` is ``(in,
out)``.

Hooks: the configs name the hooks the transcoders were trained on (TransformerLens names; see
:data:`adag.transcoders.INPUT_HOOKS`). GemmaScope files name none: they are read as GemmaScope's
transcoders (``ln2.hook_normalized`` → ``hook_mlp_out``, as circuit-tracer's GemmaScope config
says). ``ln2.hook_normalized`` (the norm's output before its elementwise weight) is converted
exactly when the model is given: the weight ``g`` (and bias ``β``) of ln2 is folded into the
encoder, ``W_enc ← W_enc / g``, ``b_enc ← b_enc − W_enc β`` (likewise the skip). The residual
before ln2 (``hook_resid_mid``) cannot be converted — its norm scale differs per token — so it is
accepted only for models without a pre-MLP norm (OLMo-2).

Dtype: loading without a model keeps the files' dtype; ``load_transcoders(path, model)`` casts to
the model's dtype and device (the source dtype is kept in ``meta["source_dtype"]``), and
:meth:`~adag.transcoders.Transcoders.check` refuses transcoders whose dtype is not the model's
(convert explicitly with ``tc.to(dtype=...)``): a float32 set on a float64 model would silently
break the exactness the replacement model promises.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor

from adag.errors import AdagError
from adag.io import digest, shown, write_bytes, write_text
from adag.transcoders import INPUT_HOOKS, OUTPUT_HOOKS, Transcoders, _ranges

if TYPE_CHECKING:
    from adag.models.model import Model

FORMAT = "adag-transcoders"
FORMAT_VERSION = 1
JSON_NAME = "transcoders.json"
TENSORS_NAME = "transcoders.safetensors"

_EXPECTED = (
    "expected transcoders.json (adag), config.yaml (circuit-tracer), W_enc_0.safetensors "
    "(circuit-tracer CLT), cfg.json + sae_weights.safetensors (SAELens) or "
    "layer_L/.../params.npz (GemmaScope)"
)
_SEARCH_DEPTH = 4
"""How deep below the given directory SAELens and GemmaScope files are looked for."""


# ----------------------------------------------------------------------------------------------
# The front door.


def load_transcoders(
    path: str | os.PathLike[str], model: Model | None = None, *, all_layers: bool = True
) -> Transcoders:
    """Read transcoders from a directory in any supported layout (see the module docstring),
    detected from its contents.

    With ``model``, the result is fitted to it and checked: ``ln2.hook_normalized`` encoders get
    ln2's weight folded in, hooks equal to the model's MLP input/output are renamed to them, the
    tensors are cast to the model's dtype and device, and
    :meth:`~adag.transcoders.Transcoders.check` runs (with ``all_layers``: every layer of the
    model must be covered). Every problem is a one-line :class:`AdagError`."""
    p = Path(path)
    if not p.exists():
        raise AdagError(f"transcoder directory {shown(p)} does not exist")
    if p.is_file():
        p = p.parent
    tc = _reader(p)(p)
    if model is not None:
        tc = fit_to_model(tc, model)
        tc.check(model, all_layers=all_layers)
    return tc


def save_transcoders(tc: Transcoders, path: str | os.PathLike[str]) -> Path:
    """Write ``tc`` in adag's layout into the directory ``path`` (created if needed):
    ``transcoders.safetensors`` (tensors ``W_enc.L``, ``b_enc.L``, ``W_dec.L``, ``b_dec.L`` and,
    when present, ``threshold.L``, ``W_skip.L`` for every covered layer ``L``) and
    ``transcoders.json`` (kind, layers, activation, k, sizes, hooks, ``meta`` and the size and
    SHA-256 of the tensor file). Each file is written atomically, the tensors first and the JSON
    last, so a killed save never leaves a pair that loads. Equal transcoders give equal bytes.
    Returns the directory."""
    from safetensors.torch import save

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AdagError(f"cannot save transcoders into {shown(out)}: it is a file, not a directory")
    tensors: dict[str, Tensor] = {}
    for name, ts in tc.tensors().items():
        for layer, t in zip(tc.layers, ts or [], strict=False):
            tensors[f"{name}.{layer}"] = _plain(t)
    try:
        meta_json = json.loads(json.dumps(tc.meta))
    except (TypeError, ValueError) as e:
        raise AdagError(f"transcoder meta must be JSON-serialisable to be saved ({e})") from None
    # one metadata entry: safetensors writes its metadata in a Rust HashMap's random order, so two
    # entries would make equal transcoders differ byte for byte between saves
    data = save(tensors, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    write_bytes(out / TENSORS_NAME, data)
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": tc.kind,
        "layers": tc.layers,
        "activation": tc.activation,
        "k": tc.k,
        "d_model": tc.d_model,
        "d_features": tc.d_features,
        "skip": tc.W_skip is not None,
        "input_hook": tc.input_hook,
        "output_hook": tc.output_hook,
        "dtype": _dtype_name(tc.dtype),
        "tensors": digest(data),
        "meta": meta_json,
    }
    write_text(out / JSON_NAME, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return out


def fit_to_model(tc: Transcoders, model: Model) -> Transcoders:
    """A copy of ``tc`` in ``model``'s terms: ``ln2.hook_normalized`` encoders with ln2's weight
    (and bias) folded in (a LayerNorm bias's constant through ``W_skip`` moves into ``b_dec``);
    ``hook_resid_mid`` / ``mlp.hook_out`` renamed to ``mlp.hook_in`` / ``hook_mlp_out`` where the
    model has no norm between them; on the model's device in its dtype. What was converted is
    noted in ``meta`` (``folded``, ``source_hooks``, ``source_dtype``). Hooks that cannot be
    converted are left for :meth:`Transcoders.check` to refuse."""
    spec = model.spec
    meta = dict(tc.meta)
    if tc.dtype != model.dtype:
        meta.setdefault("source_dtype", _dtype_name(tc.dtype))
    hooks = (tc.input_hook, tc.output_hook)
    if tc.input_hook == "ln2.hook_normalized":
        tc = _fold_ln2(tc, model)
        meta["folded"] = tc.meta["folded"]
    in_hook, out_hook = tc.input_hook, tc.output_hook
    if in_hook in ("hook_resid_mid", "hook_mlp_in") and spec.ln2 is None:
        in_hook = "mlp.hook_in"  # no pre-MLP norm: the residual is the MLP input
    if out_hook == "mlp.hook_out" and spec.ln2_post is None:
        out_hook = "hook_mlp_out"  # no post-MLP norm: the MLP output is what it adds
    if (in_hook, out_hook) != hooks:
        meta.setdefault("source_hooks", list(hooks))
    tc = replace(tc, input_hook=in_hook, output_hook=out_hook, meta=meta)
    return tc.to(device=model.device, dtype=model.dtype)


def _fold_ln2(tc: Transcoders, model: Model) -> Transcoders:
    """Encoders of ln2's normalized input ``n`` turned into encoders of the MLP input
    ``h = n ⊙ g + β`` (``g`` = w, or 1 + w for Gemma; ``β`` = LayerNorm's bias, else 0):
    ``W n + b = (W / g) h + b − (W / g) β``, computed in float64."""
    spec = model.spec
    if spec.ln2 is None:
        raise AdagError(
            f"these transcoders read ln2.hook_normalized, but this {spec.model_type} model has "
            "no pre-MLP norm (ln2)"
        )
    beyond = [x for x in tc.layers if x >= model.n_layers]
    if beyond:
        raise AdagError(
            f"transcoders cover layers {_ranges(beyond)}, the model has {model.n_layers} layers "
            f"(0-{model.n_layers - 1})"
        )
    if tc.d_model != model.d_model:
        raise AdagError(
            f"transcoders have d_model {tc.d_model}, the model {model.d_model}: they belong to "
            "another model"
        )
    f64 = torch.float64
    W_enc, b_enc, b_dec = [], [], []
    W_skip: list[Tensor] | None = None if tc.W_skip is None else []
    for i, layer in enumerate(tc.layers):
        norm = model.submodule(spec.ln2, layer)
        w = cast(Tensor, norm.weight).detach().to(device=tc.device, dtype=f64)
        g = 1.0 + w if spec.norm == "rms_1p" else w
        bias = getattr(norm, "bias", None) if spec.norm == "layer" else None
        beta = None if bias is None else bias.detach().to(device=tc.device, dtype=f64)
        if bool((g == 0).any()):
            raise AdagError(
                f"ln2 of layer {layer} has a zero weight: its normalized input cannot be "
                "recovered from the MLP input, so these transcoders cannot be converted"
            )
        we = tc.W_enc[i].to(f64) / g
        be = tc.b_enc[i].to(f64)
        bd = tc.b_dec[i].to(f64)
        if beta is not None:
            be = be - we @ beta
        W_enc.append(we)
        b_enc.append(be)
        if W_skip is not None:
            assert tc.W_skip is not None
            ws = tc.W_skip[i].to(f64) / g
            if beta is not None:
                bd = bd - ws @ beta
            W_skip.append(ws)
        b_dec.append(bd)
    meta = {**tc.meta, "folded": "ln2 weight folded into W_enc (trained on ln2.hook_normalized)"}
    return replace(
        tc,
        W_enc=W_enc,
        b_enc=b_enc,
        b_dec=b_dec,
        W_skip=W_skip,
        input_hook="mlp.hook_in",
        meta=meta,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain(t: Tensor) -> Tensor:
    """``t`` as a CPU tensor that owns its storage (safetensors refuses views of one storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


# ----------------------------------------------------------------------------------------------
# Detection.


def _reader(p: Path) -> Callable[[Path], Transcoders]:
    if (p / JSON_NAME).is_file():
        return _read_adag
    for name in ("config.yaml", "config.yml"):
        if (p / name).is_file():
            return _read_circuit_tracer
    if (p / "W_enc_0.safetensors").is_file():
        return _read_clt_dir
    if any(_walk(p, "cfg.json")):
        return _read_saelens
    if any(_walk(p, "params.npz")):
        return _read_gemmascope
    if (p / "layer_0.safetensors").is_file():
        raise AdagError(
            f"{shown(p)} holds layer_*.safetensors but no config.yaml: a circuit-tracer "
            "transcoder set needs its config.yaml (model_kind, feature_input_hook, "
            "feature_output_hook)"
        )
    raise AdagError(f"{shown(p)} holds no transcoders adag can read: {_EXPECTED}")


def _walk(root: Path, name: str) -> Iterator[Path]:
    """Files called ``name`` in ``root`` and its subdirectories (up to :data:`_SEARCH_DEPTH`
    levels down), in sorted order."""
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - base >= _SEARCH_DEPTH:
            dirnames[:] = []
        dirnames.sort()
        if name in filenames:
            yield here / name


# ----------------------------------------------------------------------------------------------
# Tensor files.


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AdagError(f"transcoder file {shown(path)} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))  # memory-mapped: one copy of a large CLT, not two
    except OSError as e:
        raise AdagError(f"cannot read {shown(path)} ({e.strerror or e})") from None
    except Exception as e:  # safetensors raises its own SafetensorError for malformed files
        raise AdagError(
            f"{shown(path)} is not a readable safetensors file ({_first_line(e)})"
        ) from None


def _read_npz(path: Path) -> dict[str, Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in f.files}
    except OSError as e:
        raise AdagError(f"cannot read {shown(path)} ({_first_line(e)})") from None
    except Exception as e:  # ValueError for object arrays (pickle) and malformed archives
        raise AdagError(
            f"{shown(path)} is not a readable .npz of arrays ({_first_line(e)})"
        ) from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)


@dataclass
class _Layer:
    """One layer's tensors in adag's orientation."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    W_skip: Tensor | None = None
    k: int | None = None


class _Reading:
    """What one load learns along the way (for ``meta``): which tensors were transposed."""

    def __init__(self) -> None:
        self.transposed: set[str] = set()

    def need(self, ts: dict[str, Tensor], key: str, where: Path, what: str) -> Tensor:
        t = ts.get(key)
        if t is None:
            raise AdagError(
                f"{shown(where)} lacks tensor {key!r} (it has {', '.join(sorted(ts)) or 'none'}); "
                f"expected {what}"
            )
        return t

    def vector(self, ts: dict[str, Tensor], key: str, where: Path, what: str) -> Tensor:
        t = self.need(ts, key, where, what)
        if t.dim() != 1:
            t = t.squeeze()
        if t.dim() != 1:
            raise AdagError(f"{shown(where)}: {key} has shape {tuple(t.shape)}; expected a vector")
        return t

    def orient(
        self, t: Tensor, name: str, d_f: int, d_m: int, stored: Literal["fd", "df"], where: Path
    ) -> Tensor:
        """``t`` as ``(d_features, d_model)``, decided by shape; a square matrix follows
        ``stored``, the format's documented orientation."""
        shape = tuple(t.shape)
        if d_f == d_m and shape == (d_f, d_m):
            flip = stored == "df"
        elif shape == (d_f, d_m):
            flip = False
        elif shape == (d_m, d_f):
            flip = True
        else:
            raise AdagError(
                f"{shown(where)}: {name} has shape {shape}; expected ({d_f}, {d_m}) or "
                f"({d_m}, {d_f}) (d_features {d_f} from b_enc, d_model {d_m} from b_dec)"
            )
        if flip:
            self.transposed.add(name)
            return t.T.contiguous()
        return t

    def encoder(
        self,
        ts: dict[str, Tensor],
        where: Path,
        keys: tuple[str, str, str],
        stored: Literal["fd", "df"],
        what: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(W_enc, b_enc, b_dec)`` under ``keys`` (their names in the file), ``W_enc`` as
        ``(d_features, d_model)``: ``d_features`` is ``b_enc``'s length, ``d_model`` ``b_dec``'s."""
        k_we, k_be, k_bd = keys
        b_enc = self.vector(ts, k_be, where, what)
        b_dec = self.vector(ts, k_bd, where, what)
        d_f, d_m = b_enc.shape[0], b_dec.shape[0]
        W_enc = self.orient(self.need(ts, k_we, where, what), "W_enc", d_f, d_m, stored, where)
        return W_enc, b_enc, b_dec

    def layer(
        self,
        ts: dict[str, Tensor],
        where: Path,
        *,
        keys: tuple[str, str, str, str],
        enc_stored: Literal["fd", "df"],
        dec_stored: Literal["fd", "df"],
        what: str,
    ) -> _Layer:
        """A per-layer file's encoder and decoder (``keys``: the file's names for W_enc, b_enc,
        W_dec, b_dec)."""
        k_we, k_be, k_wd, k_bd = keys
        W_enc, b_enc, b_dec = self.encoder(ts, where, (k_we, k_be, k_bd), enc_stored, what)
        d_f, d_m = W_enc.shape
        W_dec = self.orient(self.need(ts, k_wd, where, what), "W_dec", d_f, d_m, dec_stored, where)
        return _Layer(W_enc, b_enc, W_dec, b_dec)

    def meta(self, fmt: str, path: Path, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"format": fmt, "path": str(path)}
        if self.transposed:
            out["transposed"] = sorted(self.transposed)
        out.update({k: v for k, v in extra.items() if v is not None})
        return out


def _threshold(t: Tensor | None, d_f: int, where: Path) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != d_f:
        raise AdagError(
            f"{shown(where)}: threshold has shape {tuple(t.shape)}; expected ({d_f},), one per "
            "feature"
        )
    return t.reshape(d_f)


def _assemble_plt(
    layers: dict[int, _Layer],
    *,
    activation: str,
    k: int | None,
    input_hook: str,
    output_hook: str,
    meta: dict[str, Any],
    where: Path,
) -> Transcoders:
    """Per-layer tensors → one PLT :class:`Transcoders` (one width, one dtype, skip everywhere or
    nowhere)."""
    order = sorted(layers)
    first = layers[order[0]]
    d_f, d_m = first.W_enc.shape
    for layer in order:
        got = layers[layer].W_enc.shape
        if tuple(got) != (d_f, d_m):
            raise AdagError(
                f"{shown(where)}: layer {layer} has {got[0]} features of d_model {got[1]}, layer "
                f"{order[0]} {d_f} of {d_m}; adag needs one width for every layer"
            )
    skips = [layers[x].W_skip is not None for x in order]
    if any(skips) and not all(skips):
        raise AdagError(
            f"{shown(where)}: only layers {_ranges([x for x, s in zip(order, skips, strict=True) if s])} "
            "have skip weights; give every layer one or none"
        )
    if activation == "jumprelu":
        lacking = [x for x in order if layers[x].threshold is None]
        if lacking:
            raise AdagError(
                f"{shown(where)}: JumpReLU transcoders without a threshold for layers "
                f"{_ranges(lacking)}"
            )
    dtype = first.W_enc.dtype

    def unify(t: Tensor) -> Tensor:
        return t.to(dtype)

    return Transcoders(
        kind="plt",
        layers=order,
        W_enc=[unify(layers[x].W_enc) for x in order],
        b_enc=[unify(layers[x].b_enc) for x in order],
        W_dec=[unify(layers[x].W_dec) for x in order],
        b_dec=[unify(layers[x].b_dec) for x in order],
        activation=activation,  # type: ignore[arg-type]
        threshold=(
            [unify(layers[x].threshold) for x in order]  # type: ignore[arg-type]
            if activation == "jumprelu"
            else None
        ),
        k=k if activation == "topk" else None,
        W_skip=[unify(layers[x].W_skip) for x in order] if all(skips) else None,  # type: ignore[arg-type]
        meta=meta,
        input_hook=input_hook,
        output_hook=output_hook,
    )


def _hook(name: Any, known: dict[str, str], where: Path, what: str) -> str:
    """A TransformerLens hook name without its ``blocks.L.`` prefix, if adag accepts it."""
    text = str(name)
    m = re.fullmatch(r"blocks\.\d+\.(.+)", text)
    suffix = m.group(1) if m else text
    if suffix not in known:
        raise AdagError(
            f"{shown(where)}: {what} {text!r} is not supported; adag accepts {', '.join(known)}"
        )
    return suffix


# ----------------------------------------------------------------------------------------------
# adag's own layout.


def _read_adag(p: Path) -> Transcoders:
    from safetensors.torch import load

    js, st = p / JSON_NAME, p / TENSORS_NAME
    try:
        record = json.loads(js.read_text(encoding="utf-8"))
    except OSError as e:
        raise AdagError(f"cannot read {shown(js)} ({e.strerror or e})") from None
    except ValueError as e:
        raise AdagError(f"{shown(js)} is not valid JSON ({_first_line(e)}); save again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdagError(f"{shown(js)} is not an adag transcoder file (format {FORMAT!r})")
    if record.get("version") != FORMAT_VERSION:
        raise AdagError(
            f"{shown(js)} has transcoder format version {record.get('version')}; this adag reads "
            f"version {FORMAT_VERSION}"
        )
    if not st.is_file():
        raise AdagError(f"{shown(st)} does not exist; save the transcoders again")
    try:
        data = st.read_bytes()
    except OSError as e:
        raise AdagError(f"cannot read {shown(st)} ({e.strerror or e})") from None
    if record.get("tensors") != digest(data):
        raise AdagError(
            f"{shown(st)} is not the tensor file {JSON_NAME} was saved with (a save stopped "
            "between the two files?); save the transcoders again"
        )
    fields = ("kind", "layers", "activation", "k", "skip", "input_hook", "output_hook", "meta")
    missing = [f for f in fields if f not in record]
    if missing:
        raise AdagError(f"{shown(js)} lacks {', '.join(missing)}; save the transcoders again")
    tensors = load(data)
    layers = record["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        raise AdagError(f"{shown(js)}: layers must be a list of integers, got {layers!r}")

    def per_layer(name: str) -> list[Tensor]:
        names = [f"{name}.{x}" for x in layers]
        lacking = [n for n in names if n not in tensors]
        if lacking:
            raise AdagError(f"{shown(st)} lacks tensors {', '.join(lacking)}; save again")
        return [tensors[n] for n in names]

    return Transcoders(
        kind=record["kind"],
        layers=layers,
        W_enc=per_layer("W_enc"),
        b_enc=per_layer("b_enc"),
        W_dec=per_layer("W_dec"),
        b_dec=per_layer("b_dec"),
        activation=record["activation"],
        threshold=per_layer("threshold") if record["activation"] == "jumprelu" else None,
        k=record["k"],
        W_skip=per_layer("W_skip") if record["skip"] else None,
        meta=record["meta"],
        input_hook=record["input_hook"],
        output_hook=record["output_hook"],
    )


# ----------------------------------------------------------------------------------------------
# circuit-tracer.


def _read_circuit_tracer(p: Path) -> Transcoders:
    import yaml

    config = p / "config.yaml" if (p / "config.yaml").is_file() else p / "config.yml"
    try:
        cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    except OSError as e:
        raise AdagError(f"cannot read {shown(config)} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise AdagError(f"{shown(config)} is not valid YAML ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise AdagError(f"{shown(config)} is not a circuit-tracer config (a mapping)")
    kind = cfg.get("model_kind")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise AdagError(
            f"{shown(config)}: model_kind {kind!r}; adag reads transcoder_set (PLT) and "
            "cross_layer_transcoder (CLT)"
        )
    default_in = "hook_resid_mid" if kind == "cross_layer_transcoder" else None
    raw_in = cfg.get("feature_input_hook", default_in)
    raw_out = cfg.get("feature_output_hook", "hook_mlp_out")
    if raw_in is None:
        raise AdagError(f"{shown(config)} lacks feature_input_hook")
    input_hook = _hook(raw_in, INPUT_HOOKS, config, "feature_input_hook")
    output_hook = _hook(raw_out, OUTPUT_HOOKS, config, "feature_output_hook")
    extra = {"scan": cfg.get("scan"), "model_name": cfg.get("model_name")}
    paths = cfg.get("transcoders")
    if paths is not None and (
        not isinstance(paths, list) or not all(isinstance(x, str) for x in paths)
    ):
        raise AdagError(f"{shown(config)}: transcoders must be a list of file paths")
    if kind == "cross_layer_transcoder":
        if paths:
            return _read_gemmascope2_clt(
                config, [_resolve(config, x) for x in paths], input_hook, output_hook, extra
            )
        return _read_clt_dir(p, input_hook=input_hook, output_hook=output_hook, extra=extra)
    files = [_resolve(config, x) for x in paths] if paths else _layer_files(p, config)
    reading = _Reading()
    layers: dict[int, _Layer] = {}
    for i, f in enumerate(files):
        layers[i] = _ct_layer(_read_tensors(f), f, reading)
    activation = cfg.get("activation")
    k = cfg.get("k")
    ks = {x.k for x in layers.values() if x.k is not None}
    if activation is None and ks:
        activation = "topk"
    if activation == "topk":
        if k is None and len(ks) == 1:
            k = ks.pop()
        if not isinstance(k, int):
            raise AdagError(f"{shown(config)}: activation topk needs an integer k, got {k!r}")
    elif activation in (None, "jumprelu", "jump_relu"):
        has = [x.threshold is not None for x in layers.values()]
        activation = "jumprelu" if any(has) else "relu"
    elif activation != "relu":
        raise AdagError(
            f"{shown(config)}: activation {activation!r} is not supported (relu, jumprelu, topk)"
        )
    return _assemble_plt(
        layers,
        activation=activation,
        k=k,
        input_hook=input_hook,
        output_hook=output_hook,
        meta=reading.meta("circuit-tracer transcoder_set", p, **extra),
        where=config,
    )


def _resolve(config: Path, entry: str) -> Path:
    """A path of a config's ``transcoders`` list: relative to the config's directory, or an
    ``hf://org/repo/path`` reference looked for beside the config (as ``path``, then its file
    name): this machine has no hub access."""
    base = config.parent
    if entry.startswith("hf://"):
        rest = entry[len("hf://") :].split("?", 1)[0]
        parts = rest.split("/")
        inner = "/".join(parts[2:])
        for cand in (base / inner, base / Path(inner).name) if inner else ():
            if cand.is_file():
                return cand
        name = Path(inner).name or rest
        raise AdagError(
            f"{shown(config)} names {entry} on the Hugging Face hub, which adag does not reach; "
            f"download it beside the config as {name}"
        )
    path = Path(entry)
    return path if path.is_absolute() else base / path


def _layer_files(p: Path, config: Path) -> list[Path]:
    files: list[Path] = []
    while (p / f"layer_{len(files)}.safetensors").is_file():
        files.append(p / f"layer_{len(files)}.safetensors")
    if not files:
        raise AdagError(
            f"{shown(config)} lists no transcoders and {shown(p)} holds no layer_0.safetensors"
        )
    return files


_CT_WHAT = "W_enc, W_dec (d_transcoder, d_model), b_enc, b_dec"
_GS2_WHAT = "w_enc (d_model, d_sae), w_dec (d_sae, d_model), b_enc, b_dec, threshold"
_GS_WHAT = "W_enc (d_model, d_sae), W_dec (d_sae, d_model), b_enc, b_dec, threshold"


def _ct_layer(ts: dict[str, Tensor], where: Path, reading: _Reading) -> _Layer:
    """One layer file of a circuit-tracer transcoder set, in whichever of its layouts."""
    if where.suffix == ".npz":
        return _gemmascope_layer(ts, where, reading)
    if "W_enc" in ts:
        out = reading.layer(
            ts,
            where,
            keys=("W_enc", "b_enc", "W_dec", "b_dec"),
            enc_stored="fd",
            dec_stored="fd",
            what=_CT_WHAT,
        )
        d_f = out.b_enc.shape[0]
        thr = ts.get("activation_function.threshold", ts.get("threshold"))
        out.threshold = _threshold(thr, d_f, where)
        out.W_skip = ts.get("W_skip")  # used as x @ W_skip.T: adag's (out, in) already
        if "k" in ts:
            out.k = int(ts["k"].reshape(-1)[0].item())
        return out
    if "w_enc" in ts:  # GemmaScope-2: w_enc (d_in, d_sae), affine_skip_connection (in, out)
        out = reading.layer(
            ts,
            where,
            keys=("w_enc", "b_enc", "w_dec", "b_dec"),
            enc_stored="df",
            dec_stored="fd",
            what=_GS2_WHAT,
        )
        out.threshold = _threshold(ts.get("threshold"), out.b_enc.shape[0], where)
        skip = ts.get("affine_skip_connection")
        out.W_skip = None if skip is None else skip.T.contiguous()
        return out
    raise AdagError(
        f"{shown(where)} holds {', '.join(sorted(ts)) or 'no tensors'}; expected {_CT_WHAT}"
    )


def _read_clt_dir(
    p: Path,
    *,
    input_hook: str = "hook_resid_mid",
    output_hook: str = "hook_mlp_out",
    extra: dict[str, Any] | None = None,
) -> Transcoders:
    """circuit-tracer's CLT files: ``W_enc_{i}.safetensors`` (``W_enc_{i}``, ``b_enc_{i}``,
    ``b_dec_{i}``, ``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i}``
    ``(d_transcoder, n_layers - i, d_model)``). Without a config the hooks are circuit-tracer's
    CLT defaults (hook_resid_mid → hook_mlp_out)."""
    found = sorted(
        int(m.group(1))
        for f in p.iterdir()
        if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", f.name))
    )
    n = len(found)
    if found != list(range(n)):
        raise AdagError(
            f"{shown(p)} holds W_enc files for layers {_ranges(found)}; a cross-layer transcoder "
            "needs W_enc_0 .. W_enc_{n-1}.safetensors without gaps"
        )
    reading = _Reading()
    W_enc, b_enc, W_dec, b_dec, thresholds = [], [], [], [], []
    what_enc = "W_enc_i (d_transcoder, d_model), b_enc_i, b_dec_i"
    for i in range(n):
        enc_file, dec_file = p / f"W_enc_{i}.safetensors", p / f"W_dec_{i}.safetensors"
        enc = _read_safetensors(enc_file)
        we, be, bd = reading.encoder(
            enc, enc_file, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"), "fd", what_enc
        )
        d_f, d_m = we.shape
        W_enc.append(we)
        b_enc.append(be)
        b_dec.append(bd)
        thresholds.append(_threshold(enc.get(f"threshold_{i}"), d_f, enc_file))
        dec = _read_safetensors(dec_file)
        wd = reading.need(
            dec, f"W_dec_{i}", dec_file, f"W_dec_{i} (d_transcoder, {n - i}, d_model)"
        )
        W_dec.append(_clt_decoder(wd, d_f, n - i, d_m, dec_file, reading))
    return _assemble_clt(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        thresholds,
        None,
        input_hook=input_hook,
        output_hook=output_hook,
        meta=reading.meta("circuit-tracer cross_layer_transcoder", p, **(extra or {})),
        where=p,
    )


def _clt_decoder(
    t: Tensor, d_f: int, n_later: int, d_m: int, where: Path, reading: _Reading
) -> Tensor:
    """A CLT decoder stored ``(d_features, n_later, d_model)`` (circuit-tracer) as adag's
    ``(n_later, d_features, d_model)``."""
    shape = tuple(t.shape)
    if shape == (d_f, n_later, d_m):
        return t.permute(1, 0, 2).contiguous()
    if shape == (n_later, d_f, d_m):
        reading.transposed.add("W_dec")
        return t
    raise AdagError(
        f"{shown(where)}: W_dec has shape {shape}; expected ({d_f}, {n_later}, {d_m}) "
        "(d_transcoder, later layers, d_model)"
    )


def _read_gemmascope2_clt(
    config: Path, files: list[Path], input_hook: str, output_hook: str, extra: dict[str, Any]
) -> Transcoders:
    """GemmaScope-2 CLT files (one per layer): ``w_enc (d_model, d_sae)``, ``w_dec (d_sae,
    n_layers, d_model)`` (the part for layers >= its own is used, as circuit-tracer does),
    ``b_enc``, ``b_dec``, ``threshold``, optional ``affine_skip_connection (in, out)``."""
    reading = _Reading()
    n = len(files)
    W_enc, b_enc, W_dec, b_dec, thresholds, skips = [], [], [], [], [], []
    for i, f in enumerate(files):
        ts = _read_tensors(f)
        we, be, bd = reading.encoder(ts, f, ("w_enc", "b_enc", "b_dec"), "df", _GS2_WHAT)
        d_f, d_m = we.shape
        W_enc.append(we)
        b_enc.append(be)
        b_dec.append(bd)
        wd = reading.need(ts, "w_dec", f, _GS2_WHAT)
        if tuple(wd.shape) != (d_f, n, d_m):
            raise AdagError(
                f"{shown(f)}: w_dec has shape {tuple(wd.shape)}; expected ({d_f}, {n}, {d_m}) "
                "(d_sae, n_layers, d_model)"
            )
        W_dec.append(wd[:, i:, :].permute(1, 0, 2).contiguous())
        thresholds.append(_threshold(ts.get("threshold"), d_f, f))
        skip = ts.get("affine_skip_connection")
        skips.append(None if skip is None else skip.T.contiguous())
    return _assemble_clt(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        thresholds,
        skips,
        input_hook=input_hook,
        output_hook=output_hook,
        meta=reading.meta(
            "circuit-tracer cross_layer_transcoder (GemmaScope-2)", config.parent, **extra
        ),
        where=config,
    )


def _assemble_clt(
    W_enc: list[Tensor],
    b_enc: list[Tensor],
    W_dec: list[Tensor],
    b_dec: list[Tensor],
    thresholds: list[Tensor | None],
    skips: list[Tensor | None] | None,
    *,
    input_hook: str,
    output_hook: str,
    meta: dict[str, Any],
    where: Path,
) -> Transcoders:
    has = [t is not None for t in thresholds]
    if any(has) and not all(has):
        raise AdagError(f"{shown(where)}: only some layers have a JumpReLU threshold")
    skip_has = [s is not None for s in skips or []]
    if any(skip_has) and not all(skip_has):
        raise AdagError(f"{shown(where)}: only some layers have skip weights")
    dtype = W_enc[0].dtype

    def unify(ts: list[Any]) -> list[Tensor]:
        return [t.to(dtype) for t in ts]

    return Transcoders(
        kind="clt",
        layers=list(range(len(W_enc))),
        W_enc=unify(W_enc),
        b_enc=unify(b_enc),
        W_dec=unify(W_dec),
        b_dec=unify(b_dec),
        activation="jumprelu" if all(has) else "relu",
        threshold=unify(thresholds) if all(has) else None,
        W_skip=unify(skips) if skips and all(skip_has) else None,
        meta=meta,
        input_hook=input_hook,
        output_hook=output_hook,
    )


# ----------------------------------------------------------------------------------------------
# SAELens.


def _read_saelens(p: Path) -> Transcoders:
    reading = _Reading()
    layers: dict[int, _Layer] = {}
    seen: dict[int, Path] = {}
    settings: set[tuple[Any, ...]] = set()
    for cfg_file in _walk(p, "cfg.json"):
        d = cfg_file.parent
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except OSError as e:
            raise AdagError(f"cannot read {shown(cfg_file)} ({e.strerror or e})") from None
        except ValueError as e:
            raise AdagError(f"{shown(cfg_file)} is not valid JSON ({_first_line(e)})") from None
        if not isinstance(cfg, dict):
            raise AdagError(f"{shown(cfg_file)} is not a SAELens config (a JSON object)")
        md: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}

        def get(key: str, cfg: dict[str, Any] = cfg, md: dict[str, Any] = md) -> Any:
            return cfg[key] if key in cfg else md.get(key)

        hook_in, hook_out = get("hook_name"), get("hook_name_out")
        arch = str(get("architecture") or "standard")
        if "transcoder" not in arch and hook_out is None and "d_out" not in cfg:
            raise AdagError(
                f"{shown(cfg_file)} describes a sparse autoencoder of {hook_in} (architecture "
                f"{arch!r}), not a transcoder: it reconstructs its input instead of mapping the "
                "MLP input to the MLP output"
            )
        if hook_in is None:
            raise AdagError(f"{shown(cfg_file)} lacks hook_name (the hook the encoder reads)")
        m = re.fullmatch(r"blocks\.(\d+)\..+", str(hook_in))
        layer = int(m.group(1)) if m else get("hook_layer")
        if not isinstance(layer, int):
            raise AdagError(
                f"{shown(cfg_file)}: hook_name {hook_in!r} names no layer (expected blocks.L.<hook>)"
            )
        input_hook = _hook(hook_in, INPUT_HOOKS, cfg_file, "hook_name")
        output_hook = "hook_mlp_out"
        if hook_out is not None:
            output_hook = _hook(hook_out, OUTPUT_HOOKS, cfg_file, "hook_name_out")
            m_out = re.fullmatch(r"blocks\.(\d+)\..+", str(hook_out))
            if m_out and int(m_out.group(1)) != layer:
                raise AdagError(
                    f"{shown(cfg_file)} maps layer {layer}'s {input_hook} to layer "
                    f"{m_out.group(1)}'s {output_hook}; adag's transcoders map each layer's MLP "
                    "input to its own MLP output"
                )
        if get("apply_b_dec_to_input"):
            raise AdagError(
                f"{shown(cfg_file)} sets apply_b_dec_to_input, which transcoders cannot use"
            )
        norm = get("normalize_activations")
        if norm not in (None, "none"):
            raise AdagError(
                f"{shown(cfg_file)} normalizes activations ({norm!r}); adag reads transcoders "
                "without activation normalization"
            )
        if layer in seen:
            raise AdagError(
                f"two SAELens transcoders for layer {layer}: {shown(seen[layer])} and {shown(d)}; "
                "point at a directory with one per layer"
            )
        seen[layer] = d
        weights = d / "sae_weights.safetensors"
        ts = _read_safetensors(weights)
        out = reading.layer(
            ts,
            weights,
            keys=("W_enc", "b_enc", "W_dec", "b_dec"),
            enc_stored="df",
            dec_stored="fd",
            what="W_enc (d_in, d_sae), W_dec (d_sae, d_out), b_enc, b_dec",
        )
        d_f = out.b_enc.shape[0]
        thr = ts.get("threshold")
        if thr is None and "log_threshold" in ts:
            thr = ts["log_threshold"].exp()
        act_fn = get("activation_fn") or get("activation_fn_str")
        kwargs = get("activation_fn_kwargs") or {}
        k: int | None = None
        if "jumprelu" in arch or thr is not None:
            if thr is None:
                raise AdagError(f"{shown(weights)} lacks the JumpReLU threshold")
            activation = "jumprelu"
            # SAELens applies a ReLU before the mask: relu(pre)·[pre > t] = pre·[pre > max(t, 0)]
            out.threshold = _threshold(thr, d_f, weights).clamp(min=0)  # type: ignore[union-attr]
        elif "topk" in arch or act_fn == "topk":
            activation = "topk"
            k = get("k") if get("k") is not None else kwargs.get("k")
            if not isinstance(k, int):
                raise AdagError(
                    f"{shown(cfg_file)}: a TopK transcoder needs an integer k, got {k!r}"
                )
        elif act_fn in (None, "relu"):
            activation = "relu"
        else:
            raise AdagError(
                f"{shown(cfg_file)}: activation {act_fn!r} is not supported (relu, jumprelu, topk)"
            )
        out.W_skip = ts.get("W_skip")  # (d_out, d_in), used as x @ W_skip.T
        layers[layer] = out
        settings.add((activation, k, input_hook, output_hook))
    if len(settings) > 1:
        raise AdagError(
            f"the SAELens transcoders under {shown(p)} differ in activation, k or hooks "
            f"({sorted(map(str, settings))}); point at one set"
        )
    activation, k, input_hook, output_hook = settings.pop()
    return _assemble_plt(
        layers,
        activation=activation,
        k=k,
        input_hook=input_hook,
        output_hook=output_hook,
        meta=reading.meta("SAELens", p),
        where=p,
    )


# ----------------------------------------------------------------------------------------------
# GemmaScope.

_GEMMASCOPE_SAE = re.compile(r"gemma-scope-.*-(res|mlp|att)(-.*)?")
"""GemmaScope's SAE repositories (residual, MLP-output and attention SAEs): same file layout as
its transcoders, but not transcoders."""


def _read_gemmascope(p: Path) -> Transcoders:
    reading = _Reading()
    layers: dict[int, _Layer] = {}
    seen: dict[int, Path] = {}
    for f in _walk(p, "params.npz"):
        parts = f.resolve().parts
        if any(_GEMMASCOPE_SAE.fullmatch(x) for x in parts):
            raise AdagError(
                f"{shown(f)} is a GemmaScope sparse autoencoder (by its repository name), not a "
                "transcoder; use gemma-scope-*-transcoders"
            )
        found = [int(m.group(1)) for x in parts if (m := re.fullmatch(r"layer_(\d+)", x))]
        if not found:
            raise AdagError(
                f"{shown(f)}: no layer_L directory names its layer (expected "
                "layer_5/width_16k/average_l0_71/params.npz)"
            )
        layer = found[-1]
        if layer in seen:
            raise AdagError(
                f"two GemmaScope files for layer {layer}: {shown(seen[layer])} and {shown(f)}; "
                "point at one width and L0 per layer"
            )
        seen[layer] = f
        layers[layer] = _gemmascope_layer(_read_npz(f), f, reading)
    return _assemble_plt(
        layers,
        activation="jumprelu",
        k=None,
        input_hook="ln2.hook_normalized",
        output_hook="hook_mlp_out",
        meta=reading.meta("GemmaScope", p),
        where=p,
    )


def _gemmascope_layer(ts: dict[str, Tensor], where: Path, reading: _Reading) -> _Layer:
    out = reading.layer(
        ts,
        where,
        keys=("W_enc", "b_enc", "W_dec", "b_dec"),
        enc_stored="df",
        dec_stored="fd",
        what=_GS_WHAT,
    )
    out.threshold = _threshold(
        reading.need(ts, "threshold", where, _GS_WHAT), out.b_enc.shape[0], where
    )
    return out
