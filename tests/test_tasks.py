"""Prompt pairs, metrics, JSONL files and the built-in tasks, on the real SmolLM2-135M."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.tasks import (
    TASKS,
    PromptPair,
    TokenizedPair,
    answer_prob,
    capitals,
    ioi,
    load_pairs,
    logit_diff,
    make_metric,
    make_task,
    max_pairs,
    save_pairs,
    tokenize_pair,
    tokenize_pairs,
)

IOI = PromptPair(
    "When Mary and John went to the store, John gave a drink to",
    "When Alice and Bob went to the store, Tom gave a drink to",
    " Mary",
    " John",
)


def one_line(e: pytest.ExceptionInfo[AdagError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def words(text: str) -> list[str]:
    return text.replace(",", " ").replace(".", " ").split()


def last_logits(model: Model, prompts: list[str]) -> torch.Tensor:
    """Last-position logits ``n_prompt d_vocab``: one forward per group of equal token length."""
    groups: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(model.to_tokens(p).shape[1], []).append(k)
    out = torch.empty(len(prompts), model.d_vocab)
    with torch.no_grad():
        for idx in groups.values():
            out[idx] = model(model.to_tokens([prompts[k] for k in idx]))[:, -1]
    return out


def check_pairs(model: Model, pairs: list[PromptPair]) -> list[TokenizedPair]:
    """Every pair tokenizes (equal lengths, single-token answer and foil) and is answered right:
    top-1 after the clean prompt is the answer, and logit(answer) > logit(foil)."""
    tps = tokenize_pairs(model, pairs)
    for tp in tps:
        assert tp.clean.shape == tp.noise.shape and tp.clean.shape[0] == 1
        assert tp.foil_id is not None and tp.foil_id != tp.answer_id
        assert model.tokenizer.decode([tp.answer_id]) == tp.pair.answer
        assert model.tokenizer.decode([tp.foil_id]) == tp.pair.foil
    last = last_logits(model, [p.clean for p in pairs])
    assert last.argmax(-1).tolist() == [tp.answer_id for tp in tps]
    for row, tp in zip(last, tps, strict=True):
        assert row[tp.answer_id] > row[tp.foil_id]
    return tps


# -- built-in tasks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi20(smollm2: Model) -> list[PromptPair]:
    return ioi(smollm2, 20, seed=0)


@pytest.fixture(scope="module")
def capitals_all(smollm2: Model) -> list[PromptPair]:
    return capitals(smollm2, 10**6, seed=0)


def test_ioi_pairs_are_answered(smollm2: Model, ioi20: list[PromptPair]):
    assert len(ioi20) == 20 and len({p.clean for p in ioi20}) == 20
    check_pairs(smollm2, ioi20)
    for p in ioi20:
        assert p.foil is not None
        io, subj = p.answer.strip(), p.foil.strip()
        clean, noise = words(p.clean), words(p.noise)
        assert clean.count(io) == 1 and clean.count(subj) == 2
        # ABC noise: the three name slots hold three other distinct names.
        slots = [k for k, (c, n) in enumerate(zip(clean, noise, strict=True)) if c != n]
        assert [clean[k] for k in slots].count(subj) == 2 and len(slots) == 3
        others = {noise[k] for k in slots}
        assert len(others) == 3 and not others & {io, subj}
    # Both name orders occur: ABB (answer first) and BAB (subject first).
    orders = {p.clean.index(p.answer.strip()) < p.clean.index(p.foil.strip()) for p in ioi20}
    assert orders == {True, False}


def test_ioi_is_deterministic_per_seed(smollm2: Model, ioi20: list[PromptPair]):
    assert ioi(smollm2, 20, seed=0) == ioi20
    assert ioi(smollm2, 6, seed=0) == ioi20[:6]  # a smaller n is a prefix
    other = ioi(smollm2, 20, seed=1)
    assert len(other) == 20 and other != ioi20


def test_capitals_pairs_are_answered(smollm2: Model, capitals_all: list[PromptPair]):
    # Every clean (template, country) prompt the model knows, times every known partner country
    # of the same token length: 2686 pairs over 117 clean prompts on SmolLM2 (float32, CPU).
    assert len(capitals_all) >= 1500
    assert len({p.clean for p in capitals_all}) >= 80
    head = capitals_all[:50]
    assert len({p.clean for p in head}) == 50  # rounds: distinct clean prompts come first
    tps = check_pairs(smollm2, head)
    # The noise prompt's own top-1 is the foil, so the metric flips sign.
    assert last_logits(smollm2, [p.noise for p in head]).argmax(-1).tolist() == [
        tp.foil_id for tp in tps
    ]
    for p in head:
        assert p.clean != p.noise and p.answer != p.foil


def test_capitals_is_deterministic_per_seed(smollm2: Model, capitals_all: list[PromptPair]):
    assert capitals(smollm2, 20, seed=0) == capitals_all[:20]
    other = make_task("capitals", smollm2, 20, seed=1)
    assert len(other) == 20 and other != capitals_all[:20]


def test_make_task(smollm2: Model, ioi20: list[PromptPair]):
    assert set(TASKS) == {"ioi", "capitals"}
    assert make_task("ioi", smollm2, 3) == ioi20[:3]
    with pytest.raises(AdagError) as e:
        make_task("greater_than", smollm2, 3)
    assert "ioi, capitals" in one_line(e)
    with pytest.raises(AdagError) as e:
        ioi(smollm2, 0)
    assert "n >= 1" in one_line(e)


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_make_task_refuses_more_than_it_can_make(smollm2: Model, task: str):
    most = max_pairs(task, smollm2)
    assert 1000 < most < 100_000  # ioi: 8 templates x names x others x 2 orders
    with pytest.raises(AdagError) as e:
        make_task(task, smollm2, most + 1)  # refused from the tokenizer alone, at once
    assert f"task {task} can make at most {most} pairs" in one_line(e)


def test_make_task_says_when_it_made_fewer(
    smollm2: Model, capitals_all: list[PromptPair], caplog: pytest.LogCaptureFixture
):
    n = len(capitals_all) + 1
    assert n <= max_pairs("capitals", smollm2)
    with caplog.at_level(logging.WARNING, logger="adag.tasks.builtin"):
        assert make_task("capitals", smollm2, n) == capitals_all
    assert f"made only {len(capitals_all)} of the {n} pairs" in caplog.text


class _Clueless:
    """The real tokenizer in front of a "model" that always predicts token 0."""

    def __init__(self, model: Model) -> None:
        self.tokenizer = model.tokenizer
        self.name = "clueless"
        self.d_vocab = model.d_vocab
        self.to_tokens = model.to_tokens

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.d_vocab)
        logits[..., 0] = 1.0
        return logits


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_task_error_when_nothing_is_answered(smollm2: Model, task: str):
    with pytest.raises(AdagError) as e:
        make_task(task, _Clueless(smollm2), 2)  # type: ignore[arg-type]
    assert "none of" in one_line(e)


# -- tokenization ----------------------------------------------------------------------------------


def test_tokenize_pair(smollm2: Model):
    tp = tokenize_pair(smollm2, IOI)
    assert tp.pair is IOI and tp.clean.dtype == torch.long
    assert tp.clean.shape == tp.noise.shape == (1, 14) and tp.n_pos == 14
    assert torch.equal(tp.clean, smollm2.to_tokens(IOI.clean))
    assert smollm2.tokenizer.decode([tp.answer_id]) == " Mary"
    assert smollm2.tokenizer.decode([tp.foil_id]) == " John"
    no_foil = tokenize_pair(smollm2, PromptPair(IOI.clean, IOI.noise, " Mary"))
    assert no_foil.foil_id is None


@pytest.mark.parametrize(
    ("pair", "needles"),
    [
        (PromptPair(IOI.clean, "When Alice went to the store", " Mary", " John"), ["14", "6"]),
        (PromptPair(IOI.clean, IOI.noise, " Mary Ann", " John"), ["answer", "2 tokens"]),
        (PromptPair(IOI.clean, IOI.noise, " Mary", " Johnathan Smith"), ["foil", "tokens"]),
        (PromptPair(IOI.clean, IOI.noise, "", " John"), ["answer", "0 tokens"]),
        (PromptPair("", IOI.noise, " Mary", " John"), ["clean prompt is empty"]),
        (PromptPair(IOI.clean, "", " Mary", " John"), ["noise prompt is empty"]),
        (PromptPair(IOI.clean, IOI.noise, " Mary", " Mary"), ["the same token", "is 0"]),
    ],
)
def test_tokenize_pair_errors(smollm2: Model, pair: PromptPair, needles: list[str]):
    with pytest.raises(AdagError) as e:
        tokenize_pair(smollm2, pair)
    msg = one_line(e)
    assert msg.startswith("pair ")
    for needle in needles:
        assert needle in msg


def test_tokenize_pairs_names_the_index(smollm2: Model):
    bad = PromptPair(IOI.clean, IOI.noise, " Mary Ann", " John")
    with pytest.raises(AdagError) as e:
        tokenize_pairs(smollm2, [IOI, bad])
    assert one_line(e).startswith("pair 1 ")
    with pytest.raises(AdagError) as e:
        tokenize_pairs(smollm2, [])
    assert "no prompt pairs" in one_line(e)


def test_prompt_pair_validates_types():
    with pytest.raises(AdagError, match="answer must be a string"):
        PromptPair("a", "b", 3)  # type: ignore[arg-type]
    with pytest.raises(AdagError, match="foil must be a string"):
        PromptPair("a", "b", " c", 4)  # type: ignore[arg-type]


# -- metrics ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ioi_logits(smollm2: Model) -> tuple[torch.Tensor, TokenizedPair]:
    tp = tokenize_pair(smollm2, IOI)
    with torch.no_grad():
        logits = smollm2(torch.cat([tp.clean, tp.noise]))  # (2, 14, d_vocab)
    return logits, tp


def test_logit_diff_by_hand(ioi_logits: tuple[torch.Tensor, TokenizedPair]):
    logits, tp = ioi_logits
    m = logit_diff()
    assert m.name == "logit_diff"
    got = m(logits, tp)
    assert got.shape == (2,)
    a, f = tp.answer_id, tp.foil_id
    assert f is not None
    for b in range(2):
        assert got[b].item() == pytest.approx(logits[b, -1, a].item() - logits[b, -1, f].item())
    assert got[0] > 2.0  # the model prefers Mary on the clean prompt

    # Differentiable, reading only the last position: d/dlogits is +1 at answer, -1 at foil.
    x = logits.clone().requires_grad_(True)
    m(x, tp).sum().backward()
    grad = x.grad
    assert grad is not None
    expected = torch.zeros_like(grad)
    expected[:, -1, a], expected[:, -1, f] = 1.0, -1.0
    assert torch.equal(grad, expected)


def test_logit_diff_needs_a_foil(smollm2: Model, ioi_logits: tuple[torch.Tensor, TokenizedPair]):
    logits, _ = ioi_logits
    tp = tokenize_pair(smollm2, PromptPair(IOI.clean, IOI.noise, " Mary"))
    with pytest.raises(AdagError) as e:
        logit_diff()(logits, tp)
    assert "foil" in one_line(e) and "prob" in str(e.value)
    assert answer_prob()(logits, tp).shape == (2,)


def test_answer_prob_by_hand(ioi_logits: tuple[torch.Tensor, TokenizedPair]):
    logits, tp = ioi_logits
    m = answer_prob()
    assert m.name == "prob"
    got = m(logits, tp)
    last = logits[:, -1].double()
    expected = last[:, tp.answer_id].exp() / last.exp().sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert 0.3 < got[0].item() < 1.0 and got[1].item() < 0.05


def test_metrics_upcast_half_logits(ioi_logits: tuple[torch.Tensor, TokenizedPair]):
    logits, tp = ioi_logits
    got = logit_diff()(logits.bfloat16(), tp)
    assert got.dtype == torch.float32


def test_make_metric(ioi_logits: tuple[torch.Tensor, TokenizedPair]):
    logits, tp = ioi_logits
    assert make_metric(None).name == "logit_diff"
    assert make_metric("logit_diff").name == "logit_diff"
    assert make_metric("prob").name == "prob"
    ld = logit_diff()
    assert make_metric(ld) is ld

    def answer_logit(logits: torch.Tensor, pair: TokenizedPair) -> torch.Tensor:
        return logits[:, -1, pair.answer_id]

    m = make_metric(answer_logit)
    assert m.name == "answer_logit"
    assert torch.equal(m(logits, tp), logits[:, -1, tp.answer_id])

    bad = make_metric(lambda logits, pair: logits[:, -1].sum())
    with pytest.raises(AdagError) as e:
        bad(logits, tp)
    assert "(2,)" in one_line(e)

    with pytest.raises(AdagError) as e:
        make_metric("kl")
    assert "logit_diff, prob" in one_line(e)
    with pytest.raises(AdagError) as e:
        make_metric(3)  # type: ignore[arg-type]
    assert "callable" in one_line(e)
    with pytest.raises(AdagError) as e:
        logit_diff()(logits[0], tp)
    assert "(batch, pos, d_vocab)" in one_line(e)


# -- JSONL -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path):
    pairs = [
        IOI,
        PromptPair("Le capital de la France est", "Le capital de l'Italie est", " Paris"),
        PromptPair('She said "über"\tthen', 'He said "x"\nthen', " it", " x"),
    ]
    path = tmp_path / "sub" / "pairs.jsonl"
    save_pairs(pairs, path)
    assert load_pairs(path) == pairs
    assert load_pairs(str(path)) == pairs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {
        "clean": IOI.clean,
        "noise": IOI.noise,
        "answer": " Mary",
        "foil": " John",
    }
    assert "foil" not in json.loads(lines[1]) and "über" in lines[2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temp files left

    save_pairs(pairs[:1], path)  # overwrites
    assert load_pairs(path) == pairs[:1]
    with pytest.raises(AdagError):
        save_pairs([], path)


def test_load_skips_blank_lines_and_null_foil(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    row = {"clean": "a b", "noise": "c d", "answer": " e"}
    path.write_text("\n" + json.dumps(row) + "\n  \n" + json.dumps({**row, "foil": None}) + "\n")
    assert load_pairs(path) == [PromptPair("a b", "c d", " e")] * 2


GOOD = json.dumps({"clean": "a", "noise": "b", "answer": " c", "foil": " d"})


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (GOOD + "\n\n{not json\n", 3, "not valid JSON"),
        (GOOD + "\n" + GOOD[:-1] + "\n", 2, "not valid JSON"),
        ('["a", "b", " c"]\n', 1, "expected a JSON object"),
        ('"just a string"\n', 1, "expected a JSON object"),
        ('{"clean": "a", "noise": "b"}\n', 1, "missing field(s) 'answer'"),
        ('{"clean": "a", "answer": " c"}\n', 1, "missing field(s) 'noise'"),
        ('{"clean": "a", "noise": "b", "answer": 3}\n', 1, "field 'answer' must be a string"),
        ('{"clean": null, "noise": "b", "answer": " c"}\n', 1, "field 'clean' must be a string"),
        ('{"clean": "a", "noise": "b", "answer": " c", "foil": 1}\n', 1, "'foil' must be a string"),
        (GOOD + '\n{"clean": "a", "noise": "b", "answer": " c", "seed": "x"}\n', 2, "unknown"),
        ('{"clean": "a", "noise": "b", "answer": " c", "foil": " c"}\n', 1, "the same token"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path: Path, text: str, line: int, needle: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AdagError) as e:
        load_pairs(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}:{line}: ")
    assert needle in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_load_empty_file(tmp_path: Path, text: str):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(AdagError) as e:
        load_pairs(path)
    assert one_line(e).startswith(f"no prompt pairs in {path}")


def test_load_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(AdagError) as e:
        load_pairs(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in one_line(e) and "does not exist" in str(e.value)
    with pytest.raises(AdagError) as e:
        load_pairs(tmp_path)
    assert "directory" in one_line(e)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"clean": "caf\xe9"}\n')
    with pytest.raises(AdagError) as e:
        load_pairs(bad)
    assert "UTF-8" in one_line(e)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("a\tb\n", 1, "expected clean<TAB>noise<TAB>answer[<TAB>foil] (3 or 4"),
        ("a\tb\t c\n\na\tb\t c\t d\t e\n", 3, "got 5"),
        ("a\tb\t c\t c\n", 1, "the same token"),
    ],
)
def test_load_text_pairs_errors(tmp_path: Path, text: str, line: int, needle: str):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AdagError) as e:
        load_pairs(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}:{line}: ") and needle in msg


def test_load_pairs_format(tmp_path: Path):
    path = tmp_path / "pairs"  # no name to go by: the first line decides
    path.write_text("\ufeff" + GOOD + "\n", encoding="utf-8")
    got = load_pairs(path)
    assert got == [PromptPair("a", "b", " c", " d")] and got.format == "jsonl"
    path.write_text("a\tb\t c\t d\n", encoding="utf-8")
    got = load_pairs(path)
    assert got == [PromptPair("a", "b", " c", " d")] and got.format == "text"
    with pytest.raises(AdagError, match=r":1: not valid JSON .*read as JSONL because --format"):
        load_pairs(path, format="jsonl")
