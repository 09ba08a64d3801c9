"""Transcoder training on tiny random models: it learns (held-out FVU at least halves), a killed
run resumes to exactly the weights of an uninterrupted one, other settings refuse to resume,
streaming stays within its buffer, self-generated activations equal a plain forward's, and
metrics.json states what the saved transcoders do on the held-out tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.transcoders import Transcoders, load_transcoders, save_transcoders
from adag.transcoders.train import (
    CHECKPOINT_JSON,
    METRICS_JSON,
    TrainConfig,
    TrainProgress,
    _Activations,
    _mix,
    train_transcoders,
)

from .conftest import VOCAB, tiny_hf, tiny_model

LAYERS = 3
D_MODEL = 32


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model("llama")


def batches(seed: int = 0, rows: int = 8, pos: int = 33) -> Iterator[torch.Tensor]:
    """An endless stream of random token batches (vocabulary of the tiny models)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, VOCAB, (rows, pos), generator=gen)


SMALL: dict[str, Any] = dict(
    n_features=96,
    batch_tokens=128,
    buffer_tokens=1024,
    heldout_tokens=512,
    seqs_per_forward=8,
    lr=1e-2,  # a few hundred steps: a higher rate than the default for long runs
)


def train(model: Model, out: Path, **kw: Any) -> Transcoders:
    args = {**SMALL, "n_tokens": 12_800, "token_batches": batches(), **kw}
    return train_transcoders(model, out=out, **args)


def metrics(out: Path) -> dict[str, Any]:
    data = json.loads((out / METRICS_JSON).read_text())
    assert isinstance(data, dict)
    return data


def same(a: Transcoders, b: Transcoders) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and all(map(torch.equal, x, y)))
        for x, y in zip(ta.values(), tb.values(), strict=True)
    )


@pytest.mark.parametrize(
    ("kind", "activation"),
    [("plt", "jumprelu"), ("plt", "topk"), ("clt", "jumprelu"), ("clt", "topk")],
)
def test_training_halves_heldout_fvu(
    model: Model, tmp_path: Path, kind: str, activation: str
) -> None:
    k = 8 if activation == "topk" else None
    tc = train(model, tmp_path, kind=kind, activation=activation, k=k, sparsity=0.1)
    m = metrics(tmp_path)
    assert [row["layer"] for row in m["layers"]] == list(range(LAYERS))
    for row in m["layers"]:
        assert row["fvu_init"] > 0.9  # b_dec = the mean output: FVU starts near 1
        assert row["fvu"] < 0.5 * row["fvu_init"], row
        assert 0 < row["l0"] <= (8 if k else SMALL["n_features"])
    assert tc.kind == kind and tc.activation == activation and tc.k == k
    assert tc.dtype == model.dtype and tc.d_features == SMALL["n_features"]
    assert same(tc, load_transcoders(tmp_path, model))


def heldout_ids(n_tokens: int) -> torch.Tensor:
    """The token rows the run holds out: the first whole groups reaching ``n_tokens`` tokens
    (position 0 of each row is not data)."""
    rows, got = [], 0
    for b in batches():
        for r in b.split(SMALL["seqs_per_forward"]):
            rows.append(r)
            got += r.numel() - r.shape[0]
            if got >= n_tokens:
                return torch.cat(rows)
    raise AssertionError


def test_metrics_json_states_what_the_saved_transcoders_do(model: Model, tmp_path: Path) -> None:
    """FVU, L0 and silent share in metrics.json equal those of the saved transcoders (model
    units) on the held-out tokens, recomputed here from a plain forward."""
    train(model, tmp_path, kind="clt", activation="jumprelu", sparsity=0.1, n_tokens=2560)
    m = metrics(tmp_path)
    assert m["format"] == "adag-transcoder-training" and m["steps"] == 20
    assert m["tokens"] == 2560 and m["heldout_tokens"] == 512
    assert m["settings"]["n_features"] == SMALL["n_features"] and not m["data_exhausted"]
    assert not (tmp_path / CHECKPOINT_JSON).exists()  # removed once the run is done
    tc = load_transcoders(tmp_path, model)
    assert tc.meta["training"]["fvu_mean"] == m["fvu_mean"]
    ids = heldout_ids(512)
    sites = [f"blocks.{x}.mlp.hook_in" for x in range(LAYERS)]
    sites += [f"blocks.{x}.hook_mlp_out" for x in range(LAYERS)]
    _, cache = model.run_with_cache(ids, sites)
    x = [cache[f"blocks.{i}.mlp.hook_in"][:, 1:].reshape(-1, D_MODEL) for i in range(LAYERS)]
    y = [cache[f"blocks.{i}.hook_mlp_out"][:, 1:].reshape(-1, D_MODEL) for i in range(LAYERS)]
    acts = {i: tc.encode(i, x[i]) for i in range(LAYERS)}
    for i, row in enumerate(m["layers"]):
        fvu = (tc.decode(acts, i) - y[i]).pow(2).sum() / (y[i] - y[i].mean(0)).pow(2).sum()
        assert row["fvu"] == pytest.approx(float(fvu), rel=1e-9)
        assert row["l0"] == pytest.approx(float((acts[i] > 0).sum(-1).double().mean()), rel=1e-12)
        silent = float((~(acts[i] > 0).any(0)).double().mean())
        assert row["silent_heldout"] == pytest.approx(silent, abs=1e-12)
        assert 0 <= row["dead"] <= 1


class Kill(Exception):
    pass


def killer(at: int) -> Any:
    def progress(p: TrainProgress) -> None:
        if p.phase == "train" and p.step == at:
            raise Kill

    return progress


@pytest.mark.parametrize(
    ("kind", "activation", "every", "kill", "resumes_at"),
    [
        ("plt", "jumprelu", 5, 7, 5),  # checkpoint inside a buffer (8 batches a buffer)
        ("clt", "topk", 4, 10, 8),  # at a buffer's end: resumes with the next buffer
    ],
)
def test_killed_run_resumes_to_the_same_weights(
    model: Model,
    tmp_path: Path,
    kind: str,
    activation: str,
    every: int,
    kill: int,
    resumes_at: int,
) -> None:
    kw: dict[str, Any] = dict(kind=kind, activation=activation, n_tokens=2560)
    if activation == "topk":
        kw.update(k=4, dead_after=256)  # features die early: AuxK and its counters take part
    whole = train(model, tmp_path / "whole", **kw)
    with pytest.raises(Kill):
        train(model, tmp_path / "cut", checkpoint_every=every, progress=killer(kill), **kw)
    ck = json.loads((tmp_path / "cut" / CHECKPOINT_JSON).read_text())
    assert ck["step"] == resumes_at
    seen: list[TrainProgress] = []
    resumed = train(model, tmp_path / "cut", checkpoint_every=every, progress=seen.append, **kw)
    steps = [p.step for p in seen if p.phase == "train"]
    assert steps == list(range(resumes_at, 21))  # once at the start, then after every step
    assert {p.resumed_from for p in seen} == {resumes_at}
    assert same(whole, resumed)
    assert metrics(tmp_path / "cut")["resumed_from"] == resumes_at
    # a finished run is not trained again
    again: list[TrainProgress] = []
    assert same(whole, train(model, tmp_path / "cut", progress=again.append, **kw))
    assert again == []


def test_other_settings_refuse_to_resume(model: Model, tmp_path: Path) -> None:
    with pytest.raises(Kill):
        train(model, tmp_path, n_tokens=2560, checkpoint_every=2, progress=killer(3))
    with pytest.raises(AdagError, match=r"other settings \(differing: lr\)") as e:
        train(model, tmp_path, n_tokens=2560, lr=1e-3)
    assert "\n" not in str(e.value) and "force" in str(e.value)
    with pytest.raises(AdagError, match="differing: data"):  # other token ids
        train(model, tmp_path, n_tokens=2560, token_batches=batches(seed=1))
    seen: list[TrainProgress] = []
    train(model, tmp_path, n_tokens=2560, lr=1e-3, force=True, progress=seen.append)
    assert seen[-1].step == 20 and seen[-1].resumed_from is None
    with pytest.raises(AdagError, match="trained with other settings"):
        train(model, tmp_path, n_tokens=2560)


def test_foreign_transcoders_are_not_overwritten(model: Model, tmp_path: Path) -> None:
    first = train(model, tmp_path / "a", n_tokens=256)
    save_transcoders(first, tmp_path / "b")
    with pytest.raises(AdagError, match="not trained here"):
        train(model, tmp_path / "b", n_tokens=256)
    train(model, tmp_path / "b", n_tokens=256, force=True)
    assert metrics(tmp_path / "b")["steps"] == 2


def test_streaming_holds_at_most_one_buffer(model: Model, tmp_path: Path) -> None:
    drawn = 0

    def counted() -> Iterator[torch.Tensor]:
        nonlocal drawn
        for b in batches():
            drawn += 1
            yield b

    at_start: list[int] = []
    seen: list[TrainProgress] = []

    def progress(p: TrainProgress) -> None:
        seen.append(p)
        if p.phase == "train" and p.step == 0:
            at_start.append(drawn)

    train(model, tmp_path, n_tokens=8192, token_batches=counted(), progress=progress)
    data = [p.data_tokens for p in seen if p.phase == "data"]
    assert data == list(range(256, 8192 + 512 + 1, 256))  # 8 rows of 32 tokens a group
    last = seen[-1]
    assert (last.phase, last.step, last.total_steps, last.tokens) == ("train", 64, 64, 8192)
    assert len(last.fvu) == len(last.l0) == len(last.dead) == LAYERS and last.loss > 0
    m = metrics(tmp_path)
    assert m["tokens"] == 8192 > 4 * m["buffer_tokens"]
    assert 0 < m["peak_buffer_rows"] <= m["buffer_tokens"] == SMALL["buffer_tokens"]
    # when training starts, only the held-out set, one buffer and one look-ahead batch are read
    per_batch = 8 * 32
    assert at_start == [(512 + 1024) // per_batch + 1]


def test_self_generated_activations_equal_a_plain_forward(model: Model) -> None:
    """Sampling with a KV cache reads the same activations as a forward on the sampled text."""
    cfg = TrainConfig(n_features=8, n_tokens=8, seq_len=12, seqs_per_forward=3, seed=5)
    acts = _Activations(model, [0, 1, 2], cfg, self_gen=True)
    x, y = acts._generate(4)
    gen = torch.Generator().manual_seed(_mix(5, "self", 4))
    prompt = acts.prompts[4 % len(acts.prompts)]
    ids = torch.tensor([prompt] * 3)
    for _ in range(12):
        with torch.no_grad():
            probs = model(ids)[:, -1].double().softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    new = ids[:, len(prompt) :]
    ended = torch.zeros_like(new, dtype=torch.bool)
    for e in acts.eos:
        ended |= new == e
    keep = (ended.long().cumsum(1) - ended.long()) == 0  # up to and including the first EOS
    _, cache = model.run_with_cache(ids, acts.sites)
    want = torch.stack([cache[s][:, len(prompt) :][keep] for s in acts.sites])
    got = torch.cat([x, y])
    assert got.shape == want.shape and got.shape[1] == int(keep.sum())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_self_generate_trains(model: Model, tmp_path: Path) -> None:
    tc = train_transcoders(
        model,
        out=tmp_path,
        n_features=32,
        n_tokens=512,
        self_generate=True,
        batch_tokens=64,
        buffer_tokens=256,
        heldout_tokens=64,
        seq_len=16,
        seqs_per_forward=4,
        layers=[1, 2],
    )
    m = metrics(tmp_path)
    assert tc.layers == [1, 2] and m["settings"]["source"] == "self" and m["steps"] == 8


class CharTokenizer:
    """A tokenizer for the tiny models: one token per character (ids 3..60), EOS = 2."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def test_texts_are_windowed(tmp_path: Path) -> None:
    model = Model(tiny_hf("llama"), CharTokenizer(), name="tiny-llama-chars")
    lines = ["the quick brown fox jumps over the lazy dog " * 3] * 40
    train_transcoders(
        model,
        out=tmp_path,
        n_features=16,
        n_tokens=640,
        texts=iter(lines),
        batch_tokens=64,
        buffer_tokens=256,
        heldout_tokens=64,
        seq_len=17,
        seqs_per_forward=4,
    )
    m = metrics(tmp_path)
    # 40 lines of 132 characters + EOS = 5320 tokens = 312 windows of 17; 4 windows a group
    # (64 rows: position 0 is not data); held out: 1 group; 4 groups a buffer, 4 steps each
    assert m["heldout_tokens"] == 64 and m["steps"] == 10 and m["settings"]["source"] == "texts"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(n_features=0), "n_features must be an integer >= 1"),
        (dict(kind="xlt"), "kind must be 'plt' or 'clt'"),
        (dict(activation="gelu"), "activation must be"),
        (dict(k=4), "k is for activation='topk'"),
        (dict(activation="topk", k=500), r"k \(500\) must be at most n_features"),
        (dict(buffer_tokens=64), r"buffer_tokens \(64\) must be at least batch_tokens"),
        (dict(sparsity=-1.0), "sparsity must be a finite number >= 0"),
        (dict(layers=[2, 1]), "layers must be distinct"),
        (dict(layers=[5]), r"layers \[5\] do not exist: the model has 3 layers"),
        (dict(checkpoint_every=0), "checkpoint_every must be at least 1"),
        (dict(token_batches=None), "give exactly one data source"),
        (dict(self_generate=True), r"give exactly one data source.*\(got token_batches"),
    ],
)
def test_bad_settings_are_one_line_errors(
    model: Model, tmp_path: Path, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(AdagError, match=message) as e:
        train(model, tmp_path, **kw)
    assert "\n" not in str(e.value)
    assert not tmp_path.joinpath(METRICS_JSON).exists()


def test_texts_need_a_tokenizer(model: Model, tmp_path: Path) -> None:
    with pytest.raises(AdagError, match="has no tokenizer"):
        train(model, tmp_path, token_batches=None, texts=["some text"])
