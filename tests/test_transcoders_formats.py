"""Transcoder formats: every supported layout, written here from small random tensors in its own
orientation and names, loads into adag's type, and the loaded encoder/decoder equal the format's
own formula computed by hand on the raw arrays. adag's layout round-trips exactly and byte for
byte; every mismatch with the model is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.ops import norm_eps, norm_scale
from adag.transcoders import Transcoders, load_transcoders, save_transcoders
from adag.transcoders.formats import JSON_NAME, TENSORS_NAME

from .conftest import tiny_model

D_MODEL, D_F, N_LAYERS = 32, 24, 3  # the tiny models of conftest: d_model 32, 3 layers
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale


def _x(seed: int = 99, d: int = D_MODEL) -> torch.Tensor:
    return _randn(2, 5, d, seed=seed)  # (batch, pos, d_model)


def _one_line(e: pytest.ExceptionInfo[AdagError], *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def random_transcoders(
    kind: str = "plt",
    *,
    activation: str = "jumprelu",
    layers: tuple[int, ...] = (0, 1, 2),
    d_model: int = D_MODEL,
    d_f: int = D_F,
    skip: bool = False,
    dtype: torch.dtype = F64,
    seed: int = 0,
) -> Transcoders:
    n = len(layers)
    s = seed * 100
    return Transcoders(
        kind=kind,  # type: ignore[arg-type]
        layers=list(layers),
        W_enc=[_randn(d_f, d_model, seed=s + i, scale=d_model**-0.5).to(dtype) for i in range(n)],
        b_enc=[_randn(d_f, seed=s + 10 + i, scale=0.1).to(dtype) for i in range(n)],
        W_dec=[
            (
                _randn(d_f, d_model, seed=s + 20 + i)
                if kind == "plt"
                else _randn(n - i, d_f, d_model, seed=s + 20 + i)
            ).to(dtype)
            for i in range(n)
        ],
        b_dec=[_randn(d_model, seed=s + 30 + i).to(dtype) for i in range(n)],
        activation=activation,  # type: ignore[arg-type]
        threshold=(
            [_randn(d_f, seed=s + 40 + i).abs().mul(0.3).to(dtype) for i in range(n)]
            if activation == "jumprelu"
            else None
        ),
        k=5 if activation == "topk" else None,
        W_skip=(
            [_randn(d_model, d_model, seed=s + 50 + i, scale=0.1).to(dtype) for i in range(n)]
            if skip
            else None
        ),
    )


# ----------------------------------------------------------------------------------------------
# The type: its formulas by hand.


def _act_by_hand(pre: torch.Tensor, activation: str, thr=None, k=None) -> torch.Tensor:
    if activation == "relu":
        return pre.clamp(min=0)
    if activation == "jumprelu":
        return torch.where(pre > thr, pre, torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    flat_pre, flat_out = pre.reshape(-1, pre.shape[-1]), out.view(-1, pre.shape[-1])
    for row in range(flat_pre.shape[0]):
        order = sorted(range(pre.shape[-1]), key=lambda j: -float(flat_pre[row, j]))[:k]
        for j in order:
            flat_out[row, j] = max(float(flat_pre[row, j]), 0.0)
    return out


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_encode_decode_equal_the_formulas(kind, activation):
    tc = random_transcoders(kind, activation=activation, skip=True)
    xs = {layer: _x(seed=70 + layer) for layer in tc.layers}
    acts = {}
    for i, layer in enumerate(tc.layers):
        pre = xs[layer] @ tc.W_enc[i].T + tc.b_enc[i]
        torch.testing.assert_close(tc.pre_activation(layer, xs[layer]), pre, rtol=0, atol=1e-13)
        thr = tc.threshold[i] if tc.threshold else None
        want = _act_by_hand(pre, activation, thr, tc.k)
        acts[layer] = tc.encode(layer, xs[layer])
        torch.testing.assert_close(acts[layer], want, rtol=0, atol=1e-13)
        assert 0 < int((acts[layer] != 0).sum()) < acts[layer].numel()
    for t, target in enumerate(tc.layers):
        want = tc.b_dec[t] + xs[target] @ tc.W_skip[t].T  # type: ignore[index]
        for s, source in enumerate(tc.layers):
            if kind == "plt" and s == t:
                want = want + acts[source] @ tc.W_dec[s]
            if kind == "clt" and s <= t:
                want = want + acts[source] @ tc.W_dec[s][t - s]
        got = tc.decode(acts, target, x=xs[target])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert tc.targets(0) == ([0] if kind == "plt" else [0, 1, 2])
    assert tc.sources(2) == ([2] if kind == "plt" else [0, 1, 2])


def test_decode_needs_x_with_skip_and_encode_is_differentiable():
    tc = random_transcoders(skip=True)
    with pytest.raises(AdagError) as e:
        tc.decode({0: torch.zeros(D_F, dtype=F64)}, 0)
    _one_line(e, "skip", "x=")
    x = _x().requires_grad_(True)
    tc.encode(1, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_shapes_are_one_line():
    good = random_transcoders()
    cases = {
        "W_dec": dict(W_dec=[torch.zeros(D_F, D_MODEL + 1, dtype=F64)] * 3),
        "threshold": dict(threshold=None),
        "k": dict(activation="topk", threshold=None, k=D_F + 1),
        "ascending": dict(layers=[2, 1, 0]),
        "W_skip": dict(W_skip=[torch.zeros(D_MODEL, D_F, dtype=F64)] * 3),
        "input hook": dict(input_hook="blocks.0.hook_resid_pre"),
    }
    fields = dict(
        kind=good.kind,
        layers=good.layers,
        W_enc=good.W_enc,
        b_enc=good.b_enc,
        W_dec=good.W_dec,
        b_dec=good.b_dec,
        activation=good.activation,
        threshold=good.threshold,
    )
    for needle, change in cases.items():
        with pytest.raises(AdagError) as e:
            Transcoders(**{**fields, **change})  # type: ignore[arg-type]
        _one_line(e, needle)
    clt = random_transcoders("clt")
    with pytest.raises(AdagError) as e:
        Transcoders(**{**fields, "kind": "clt"})  # type: ignore[arg-type]
    _one_line(e, "n_later")
    assert clt.decoder(0, 2).shape == (D_F, D_MODEL)
    with pytest.raises(AdagError) as e:
        clt.decoder(2, 1)
    _one_line(e, "layer 2", "not to layer 1")


# ----------------------------------------------------------------------------------------------
# adag's own layout.


@pytest.mark.parametrize(
    "tc",
    [
        random_transcoders(skip=True),
        random_transcoders("clt", activation="relu", layers=(0, 2)),
        random_transcoders(activation="topk", dtype=torch.float32),
    ],
    ids=["plt-jumprelu-skip", "clt-relu-partial", "plt-topk-f32"],
)
def test_adag_round_trip_is_exact_and_byte_identical(tmp_path: Path, tc: Transcoders):
    tc.meta = {"note": "random", "trained": {"tokens": 10}}
    a = save_transcoders(tc, tmp_path / "a")
    back = load_transcoders(a)
    for name in ("kind", "layers", "activation", "k", "meta", "input_hook", "output_hook"):
        assert getattr(back, name) == getattr(tc, name), name
    for name, ts in tc.tensors().items():
        got = back.tensors()[name]
        if ts is None:
            assert got is None, name
            continue
        assert got is not None and len(got) == len(ts)
        for t, g in zip(ts, got, strict=True):
            assert g.dtype == t.dtype and torch.equal(g, t), name
    b = save_transcoders(back, tmp_path / "b")
    c = save_transcoders(tc, tmp_path / "c")
    for name in (JSON_NAME, TENSORS_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes() == (c / name).read_bytes()


def test_adag_files_checked(tmp_path: Path):
    d = save_transcoders(random_transcoders(), tmp_path / "tc")
    data = bytearray((d / TENSORS_NAME).read_bytes())
    data[-1] ^= 1
    (d / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(AdagError) as e:
        load_transcoders(d)
    _one_line(e, "not the tensor file")
    record = json.loads((d / JSON_NAME).read_text())
    record["version"] = 99
    (d / JSON_NAME).write_text(json.dumps(record))
    with pytest.raises(AdagError) as e:
        load_transcoders(d)
    _one_line(e, "version 99")
    bad = random_transcoders()
    bad.meta = {"x": object()}
    with pytest.raises(AdagError) as e:
        save_transcoders(bad, tmp_path / "bad")
    _one_line(e, "JSON")


# ----------------------------------------------------------------------------------------------
# circuit-tracer.


def _write_yaml(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg))


def _ct_plt_files(d: Path, *, skip: bool, transposed: bool = False, seed: int = 1) -> list[dict]:
    """circuit-tracer PLT layer files: W_enc, W_dec (d_transcoder, d_model), b_enc, b_dec,
    activation_function.threshold, W_skip (used as x @ W_skip.T)."""
    d.mkdir(parents=True, exist_ok=True)
    raw = []
    for i in range(N_LAYERS):
        s = seed * 100 + i
        t = {
            "W_enc": _randn(D_F, D_MODEL, seed=s, scale=D_MODEL**-0.5),
            "W_dec": _randn(D_F, D_MODEL, seed=s + 10),
            "b_enc": _randn(D_F, seed=s + 20, scale=0.1),
            "b_dec": _randn(D_MODEL, seed=s + 30),
            "activation_function.threshold": _randn(D_F, seed=s + 40).abs() * 0.3,
        }
        if skip:
            t["W_skip"] = _randn(D_MODEL, D_MODEL, seed=s + 50, scale=0.1)
        raw.append(t)
        stored = dict(t)
        if transposed:
            stored["W_enc"] = t["W_enc"].T.contiguous()
        save_file(stored, str(d / f"layer_{i}.safetensors"))
    return raw


def _check_ct_plt(tc: Transcoders, raw: list[dict], *, skip: bool) -> None:
    assert tc.kind == "plt" and tc.layers == [0, 1, 2] and tc.activation == "jumprelu"
    for i, t in enumerate(raw):
        x = _x(seed=i)
        pre = x @ t["W_enc"].T + t["b_enc"]
        a = pre * (pre > t["activation_function.threshold"])
        torch.testing.assert_close(tc.encode(i, x), a, rtol=0, atol=1e-13)
        want = a @ t["W_dec"] + t["b_dec"]
        if skip:
            want = want + x @ t["W_skip"].T
        torch.testing.assert_close(tc.decode({i: a}, i, x=x), want, rtol=0, atol=1e-12)


def test_circuit_tracer_plt_with_paths_and_skip(tmp_path: Path):
    raw = _ct_plt_files(tmp_path / "files", skip=True)
    _write_yaml(
        tmp_path / "config.yaml",
        {
            "model_kind": "transcoder_set",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out",
            "scan": "tiny-llama",
            "transcoders": [f"files/layer_{i}.safetensors" for i in range(N_LAYERS)],
        },
    )
    tc = load_transcoders(tmp_path)
    _check_ct_plt(tc, raw, skip=True)
    assert tc.input_hook == "mlp.hook_in" and tc.output_hook == "mlp.hook_out"
    assert tc.meta["format"] == "circuit-tracer transcoder_set" and "transposed" not in tc.meta
    model = tiny_model("llama")
    fitted = load_transcoders(
        tmp_path / "config.yaml", model
    )  # llama: mlp.hook_out == hook_mlp_out
    assert fitted.output_hook == "hook_mlp_out"
    assert fitted.meta["source_hooks"] == ["mlp.hook_in", "mlp.hook_out"]
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path, tiny_model("gemma2"))
    _one_line(e, "mlp.hook_out", "post-MLP norm")


def test_circuit_tracer_plt_layer_files_transposed_and_hf_paths(tmp_path: Path):
    raw = _ct_plt_files(tmp_path, skip=False, transposed=True)
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    _write_yaml(tmp_path / "config.yaml", cfg)  # no list: layer_{i}.safetensors beside it
    tc = load_transcoders(tmp_path)
    _check_ct_plt(tc, raw, skip=False)
    assert tc.meta["transposed"] == ["W_enc"]
    hf = [f"hf://org/repo/sub/layer_{i}.safetensors?revision=main" for i in range(N_LAYERS)]
    _write_yaml(tmp_path / "config.yaml", {**cfg, "transcoders": hf})  # found by file name
    _check_ct_plt(load_transcoders(tmp_path), raw, skip=False)
    _write_yaml(
        tmp_path / "config.yaml", {**cfg, "transcoders": ["hf://org/repo/other.safetensors"]}
    )
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "hf://org/repo/other.safetensors", "Hugging Face hub", "other.safetensors")


def test_circuit_tracer_plt_topk_and_bad_hooks(tmp_path: Path):
    _ct_plt_files(tmp_path, skip=False)
    cfg = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "activation": "topk",
        "k": 4,
    }
    _write_yaml(tmp_path / "config.yaml", cfg)
    tc = load_transcoders(tmp_path)
    assert tc.activation == "topk" and tc.k == 4 and tc.threshold is None
    assert int((tc.encode(0, _x()) != 0).sum(-1).max()) <= 4
    _write_yaml(tmp_path / "config.yaml", {**cfg, "feature_input_hook": "hook_resid_pre"})
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "hook_resid_pre", "mlp.hook_in", "ln2.hook_normalized")
    _write_yaml(tmp_path / "config.yaml", {**cfg, "model_kind": "sae"})
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "model_kind", "transcoder_set")


def _ct_clt_files(d: Path, *, seed: int = 3) -> list[dict]:
    """circuit-tracer CLT files: W_enc_{i}.safetensors (W_enc_i, b_enc_i, b_dec_i, threshold_i),
    W_dec_{i}.safetensors (W_dec_i: (d_transcoder, n_layers - i, d_model))."""
    raw = []
    for i in range(N_LAYERS):
        s = seed * 100 + i
        t = {
            f"W_enc_{i}": _randn(D_F, D_MODEL, seed=s, scale=D_MODEL**-0.5),
            f"b_enc_{i}": _randn(D_F, seed=s + 10, scale=0.1),
            f"b_dec_{i}": _randn(D_MODEL, seed=s + 20),
            f"threshold_{i}": _randn(D_F, seed=s + 30).abs() * 0.3,
        }
        save_file(t, str(d / f"W_enc_{i}.safetensors"))
        dec = _randn(D_F, N_LAYERS - i, D_MODEL, seed=s + 40)
        save_file({f"W_dec_{i}": dec}, str(d / f"W_dec_{i}.safetensors"))
        raw.append({**t, f"W_dec_{i}": dec})
    return raw


def test_circuit_tracer_clt(tmp_path: Path):
    raw = _ct_clt_files(tmp_path)
    tc = load_transcoders(tmp_path)  # no config: circuit-tracer's CLT default hooks
    assert tc.kind == "clt" and tc.activation == "jumprelu" and tc.input_hook == "hook_resid_mid"
    xs = [_x(seed=i) for i in range(N_LAYERS)]
    acts = {}
    for i in range(N_LAYERS):
        pre = xs[i] @ raw[i][f"W_enc_{i}"].T + raw[i][f"b_enc_{i}"]
        acts[i] = pre * (pre > raw[i][f"threshold_{i}"])
        torch.testing.assert_close(tc.encode(i, xs[i]), acts[i], rtol=0, atol=1e-13)
    for t in range(N_LAYERS):
        want = raw[t][f"b_dec_{t}"] + sum(
            acts[s] @ raw[s][f"W_dec_{s}"][:, t - s, :] for s in range(t + 1)
        )
        torch.testing.assert_close(tc.decode(acts, t), want, rtol=0, atol=1e-12)
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path, tiny_model("llama"))
    _one_line(e, "hook_resid_mid", "mlp.hook_in")
    olmo = tiny_model("olmo2")  # no pre-MLP norm: the residual is the MLP input
    assert load_transcoders(tmp_path, olmo).input_hook == "mlp.hook_in"
    _write_yaml(
        tmp_path / "config.yaml",
        {
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out",
        },
    )
    assert load_transcoders(tmp_path, tiny_model("qwen3")).kind == "clt"
    (tmp_path / "W_enc_1.safetensors").unlink()
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "W_enc", "without gaps")


def test_gemmascope2_plt_and_clt_files(tmp_path: Path):
    """GemmaScope-2 files in a circuit-tracer config: w_enc (d_in, d_sae), w_dec, and an affine
    skip used as x @ affine_skip_connection."""
    plt_dir, clt_dir = tmp_path / "plt", tmp_path / "clt"
    plt_dir.mkdir()
    clt_dir.mkdir()
    raw = []
    for i in range(N_LAYERS):
        t = {
            "w_enc": _randn(D_MODEL, D_F, seed=i, scale=D_MODEL**-0.5),
            "w_dec": _randn(D_F, D_MODEL, seed=10 + i),
            "b_enc": _randn(D_F, seed=20 + i, scale=0.1),
            "b_dec": _randn(D_MODEL, seed=30 + i),
            "threshold": _randn(D_F, seed=40 + i).abs() * 0.3,
            "affine_skip_connection": _randn(D_MODEL, D_MODEL, seed=50 + i, scale=0.1),
        }
        save_file(t, str(plt_dir / f"l{i}.safetensors"))
        clt = {**t, "w_dec": _randn(D_F, N_LAYERS, D_MODEL, seed=60 + i)}
        save_file(clt, str(clt_dir / f"l{i}.safetensors"))
        raw.append((t, clt))
    base = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}
    files = [f"l{i}.safetensors" for i in range(N_LAYERS)]
    _write_yaml(
        plt_dir / "config.yaml", {**base, "model_kind": "transcoder_set", "transcoders": files}
    )
    _write_yaml(
        clt_dir / "config.yaml",
        {**base, "model_kind": "cross_layer_transcoder", "transcoders": files},
    )
    plt, clt = load_transcoders(plt_dir), load_transcoders(clt_dir)
    assert plt.meta["transposed"] == ["W_enc"] and clt.kind == "clt"
    xs = [_x(seed=i) for i in range(N_LAYERS)]
    acts = {}
    for i, (t, _) in enumerate(raw):
        pre = xs[i] @ t["w_enc"] + t["b_enc"]
        acts[i] = pre * (pre > t["threshold"])
        want = acts[i] @ t["w_dec"] + t["b_dec"] + xs[i] @ t["affine_skip_connection"]
        torch.testing.assert_close(
            plt.decode({i: plt.encode(i, xs[i])}, i, x=xs[i]), want, rtol=0, atol=1e-12
        )
    for t in range(N_LAYERS):
        want = raw[t][1]["b_dec"] + xs[t] @ raw[t][1]["affine_skip_connection"]
        want = want + sum(acts[s] @ raw[s][1]["w_dec"][:, t, :] for s in range(t + 1))
        torch.testing.assert_close(clt.decode(acts, t, x=xs[t]), want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# SAELens.


def _saelens_dir(
    d: Path, layer: int, *, cfg: dict, seed: int, d_f: int = D_F, threshold: bool = True
) -> dict:
    """SAELens: W_enc (d_in, d_sae), W_dec (d_sae, d_out), b_enc, b_dec, threshold."""
    d.mkdir(parents=True)
    t = {
        "W_enc": _randn(D_MODEL, d_f, seed=seed, scale=D_MODEL**-0.5),
        "W_dec": _randn(d_f, D_MODEL, seed=seed + 1),
        "b_enc": _randn(d_f, seed=seed + 2, scale=0.1),
        "b_dec": _randn(D_MODEL, seed=seed + 3),
    }
    if threshold:  # some negative: SAELens's ReLU comes first
        t["threshold"] = _randn(d_f, seed=seed + 4) * 0.3
    save_file(t, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": d_f, **cfg}))
    return t


def _saelens_tc_cfg(layer: int, hook: str = "mlp.hook_in") -> dict:
    return {
        "architecture": "jumprelu_transcoder",
        "d_out": D_MODEL,
        "hook_name": f"blocks.{layer}.{hook}",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
    }


def test_saelens_transcoders_per_layer_dirs(tmp_path: Path):
    raw = [
        _saelens_dir(tmp_path / f"layer_{i}", i, cfg=_saelens_tc_cfg(i), seed=10 * i)
        for i in range(N_LAYERS)
    ]
    tc = load_transcoders(tmp_path)
    assert tc.activation == "jumprelu" and tc.meta["transposed"] == ["W_enc"]
    for i, t in enumerate(raw):
        x = _x(seed=i)
        pre = x @ t["W_enc"] + t["b_enc"]
        a = pre.clamp(min=0) * (pre > t["threshold"])  # SAELens's JumpReLU transcoder
        torch.testing.assert_close(tc.encode(i, x), a, rtol=0, atol=1e-13)
        torch.testing.assert_close(
            tc.decode({i: a}, i), a @ t["W_dec"] + t["b_dec"], rtol=0, atol=1e-12
        )


def test_saelens_square_topk_single_dir_and_sae_refused(tmp_path: Path):
    cfg = {
        "architecture": "transcoder",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": 3},
        "metadata": {"hook_name": "blocks.1.mlp.hook_in", "hook_name_out": "blocks.1.hook_mlp_out"},
    }
    t = _saelens_dir(tmp_path / "tc", 1, cfg=cfg, seed=5, d_f=D_MODEL, threshold=False)
    tc = load_transcoders(tmp_path / "tc")
    assert tc.layers == [1] and tc.activation == "topk" and tc.k == 3
    assert tc.meta["transposed"] == ["W_enc"]  # square: SAELens's documented (d_in, d_sae)
    x = _x()
    pre = x @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(tc.encode(1, x), _act_by_hand(pre, "topk", k=3), rtol=0, atol=1e-13)
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path / "tc", tiny_model("llama"))
    _one_line(e, "miss layers 0, 2", "cover 1")
    assert load_transcoders(tmp_path / "tc", tiny_model("llama"), all_layers=False).layers == [1]
    sae = {"architecture": "jumprelu", "hook_name": "blocks.1.hook_resid_post"}
    _saelens_dir(tmp_path / "sae", 1, cfg=sae, seed=6)
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path / "sae")
    _one_line(e, "sparse autoencoder", "blocks.1.hook_resid_post", "not a transcoder")


def _unweighted_ln2_input(model: Model, layer: int, mid: torch.Tensor) -> torch.Tensor:
    """TransformerLens's ln2.hook_normalized: ln2 without its weight (and bias)."""
    norm = model.submodule(model.spec.ln2, layer)
    s = norm_scale(model.spec.norm, mid, norm_eps(norm))
    centred = mid - mid.mean(-1, keepdim=True) if model.spec.norm == "layer" else mid
    return centred * s


def test_ln2_hook_normalized_is_folded_exactly(tiny: Model, tokens, tmp_path: Path):
    """Transcoders trained on ln2.hook_normalized (SAELens here) give, on the model's MLP input,
    exactly the activations and skip term they give on their own input."""
    raw = []
    for i in range(N_LAYERS):
        cfg = {
            **_saelens_tc_cfg(i, "ln2.hook_normalized"),
            "architecture": "jumprelu_skip_transcoder",
        }
        t = _saelens_dir(tmp_path / f"l{i}", i, cfg=cfg, seed=10 * i)
        t["W_skip"] = _randn(D_MODEL, D_MODEL, seed=10 * i + 7, scale=0.1)
        save_file(t, str(tmp_path / f"l{i}" / "sae_weights.safetensors"))
        raw.append(t)
    if tiny.spec.ln2 is None:
        with pytest.raises(AdagError) as e:
            load_transcoders(tmp_path, tiny)
        _one_line(e, "ln2.hook_normalized", "no pre-MLP norm")
        return
    tc = load_transcoders(tmp_path, tiny)
    assert tc.input_hook == "mlp.hook_in" and "folded" in tc.meta
    names = [f"blocks.{i}.{s}" for i in range(N_LAYERS) for s in ("hook_resid_mid", "mlp.hook_in")]
    _, c = tiny.run_with_cache(tokens, names)
    for i, t in enumerate(raw):
        n = _unweighted_ln2_input(tiny, i, c[f"blocks.{i}.hook_resid_mid"])
        h = c[f"blocks.{i}.mlp.hook_in"]
        pre = n @ t["W_enc"] + t["b_enc"]
        torch.testing.assert_close(tc.pre_activation(i, h), pre, rtol=1e-10, atol=1e-10)
        # the skip's constant (LayerNorm's bias through W_skip) moves into b_dec
        want = n @ t["W_skip"].T + t["b_dec"]
        torch.testing.assert_close(tc.decode({}, i, x=h), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path).check(tiny)
    _one_line(e, "ln2.hook_normalized", "load_transcoders(path, model)")


# ----------------------------------------------------------------------------------------------
# GemmaScope.


def _gemmascope(root: Path, layer: int, seed: int, l0: int = 71) -> dict:
    d = root / f"layer_{layer}" / "width_16k" / f"average_l0_{l0}"
    d.mkdir(parents=True)
    t = {
        "W_enc": _randn(D_MODEL, D_F, seed=seed, scale=D_MODEL**-0.5).float().numpy(),
        "W_dec": _randn(D_F, D_MODEL, seed=seed + 1).float().numpy(),
        "b_enc": _randn(D_F, seed=seed + 2, scale=0.1).float().numpy(),
        "b_dec": _randn(D_MODEL, seed=seed + 3).float().numpy(),
        "threshold": (_randn(D_F, seed=seed + 4).abs() * 0.3).float().numpy(),
    }
    np.savez(d / "params.npz", **t)
    return t


def test_gemmascope_npz(tmp_path: Path):
    root = tmp_path / "gemma-scope-2b-pt-transcoders"
    raw = [_gemmascope(root, i, 10 * i) for i in range(N_LAYERS)]
    tc = load_transcoders(root)
    assert tc.dtype == torch.float32 and tc.input_hook == "ln2.hook_normalized"
    assert tc.meta["transposed"] == ["W_enc"]
    for i, t in enumerate(raw):
        x = _x(seed=i).float()
        pre = x @ torch.from_numpy(t["W_enc"]) + torch.from_numpy(t["b_enc"])
        a = pre * (pre > torch.from_numpy(t["threshold"]))
        torch.testing.assert_close(tc.encode(i, x), a)
        want = a @ torch.from_numpy(t["W_dec"]) + torch.from_numpy(t["b_dec"])
        torch.testing.assert_close(tc.decode({i: a}, i), want)
    gemma = tiny_model("gemma2")
    fitted = load_transcoders(root, gemma)  # folded ln2 weight, cast to the model's float64
    assert fitted.dtype == torch.float64 and fitted.meta["source_dtype"] == "float32"
    _gemmascope(root, 1, 50, l0=20)
    with pytest.raises(AdagError) as e:
        load_transcoders(root)
    _one_line(e, "two GemmaScope files for layer 1", "one width and L0 per layer")
    sae_root = tmp_path / "gemma-scope-2b-pt-res"
    _gemmascope(sae_root, 0, 0)
    with pytest.raises(AdagError) as e:
        load_transcoders(sae_root)
    _one_line(e, "sparse autoencoder", "not a transcoder")


# ----------------------------------------------------------------------------------------------
# Mismatches with the model, unreadable directories.


def test_mismatches_with_the_model_are_one_line(tmp_path: Path):
    model = tiny_model("llama")
    random_transcoders().check(model)  # fits: no error
    with pytest.raises(AdagError) as e:
        random_transcoders(d_model=64).check(model)
    _one_line(e, "transcoders have d_model 64, the model 32")
    with pytest.raises(AdagError) as e:
        random_transcoders(layers=(0, 1)).check(model)
    _one_line(e, "miss layers 2 of the model's 3", "cover 0-1")
    with pytest.raises(AdagError) as e:
        random_transcoders(layers=(0, 1, 2, 3)).check(model)
    _one_line(e, "layers 3", "3 layers (0-2)")
    f32 = random_transcoders(dtype=torch.float32)
    with pytest.raises(AdagError) as e:
        f32.check(model)
    _one_line(e, "transcoders are float32, the model float64", "tc.to(dtype=model.dtype)")
    f32.to(dtype=model.dtype).check(model)
    d = save_transcoders(f32, tmp_path / "f32")
    fitted = load_transcoders(d, model)  # loading with the model converts
    assert fitted.dtype == torch.float64 and fitted.meta["source_dtype"] == "float32"
    with pytest.raises(AdagError) as e:
        load_transcoders(save_transcoders(random_transcoders(d_model=64), tmp_path / "wide"), model)
    _one_line(e, "d_model 64, the model 32")


def test_unreadable_directories_are_one_line(tmp_path: Path):
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path / "nowhere")
    _one_line(e, "does not exist")
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "transcoders.json", "config.yaml", "cfg.json", "params.npz")
    save_file({"W_enc": torch.zeros(2, 2)}, str(tmp_path / "layer_0.safetensors"))
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "no config.yaml")
    _write_yaml(
        tmp_path / "config.yaml",
        {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in"},
    )
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "layer_0.safetensors", "lacks tensor 'b_enc'", "expected W_enc")
    (tmp_path / "layer_0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "not a readable safetensors file")
    (tmp_path / "config.yaml").write_text("model_kind: [unclosed")
    with pytest.raises(AdagError) as e:
        load_transcoders(tmp_path)
    _one_line(e, "not valid YAML")
