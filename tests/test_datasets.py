"""Prompt datasets (``adag.tasks.datasets``) on the real SmolLM2: the kept prompts are answered
right (recomputed one prompt at a time), the targets are the answers' first tokens, the JSONL
round trip, one-line errors, and ``adag dataset``. Each checked dataset is made once per module,
as small as the test allows."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adag.cli import app
from adag.errors import AdagError
from adag.models.model import Model
from adag.tasks import datasets
from adag.tasks.builtin import NAMES, ioi_candidates, ioi_names
from adag.tasks.datasets import DATASETS, Dataset, make_dataset, max_prompts
from adag.tasks.prompts import PromptSpec, assemble_prompt, join_seed, load_prompts, write_prompts

runner = CliRunner()


@pytest.fixture(scope="module")
def capitals(smollm2: Model) -> Dataset:
    return make_dataset("capitals", smollm2)


@pytest.fixture(scope="module")
def checked(smollm2: Model, capitals: Dataset) -> dict[str, Dataset]:
    """A few checked prompts of every dataset SmolLM2 can do (capitals_2hop: see its tests)."""
    made = {name: make_dataset(name, smollm2, 4, seed=1) for name in ("math", "antonyms", "ioi")}
    return {"capitals": capitals, **made}


def first_token(model: Model, spec: PromptSpec, chat: bool = False) -> tuple[list[int], int]:
    """The assembled prompt's ids and the id of the label's first token after them, by the
    definition: tokenize prompt + label the way the prompt is tokenized."""
    text, ids = assemble_prompt(model, spec.prompt, chat=chat, seed=spec.seed)
    full = model.tok()(text + (spec.label or ""), add_special_tokens=not chat)["input_ids"]
    assert full[: len(ids)] == ids
    return ids, int(full[len(ids)])


def top1(model: Model, ids: list[int]) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([ids]), last_only=True)[0, -1].argmax())


def test_capitals_keeps_at_least_40(smollm2: Model, capitals: Dataset):
    assert len(capitals) >= 40 and capitals.tried == max_prompts("capitals", smollm2)
    known = {f"The capital of {c} is": " " + cap for c, cap in datasets.COUNTRIES}
    assert all(known[s.prompt] == s.label and s.seed is None for s in capitals)
    assert len({s.prompt for s in capitals}) == len(capitals)


@pytest.mark.parametrize("name", ["capitals", "math", "antonyms", "ioi"])
def test_kept_prompts_are_answered_right(smollm2: Model, checked: dict[str, Dataset], name: str):
    got = checked[name]
    assert got.checked and not got.chat and (name == "capitals" or len(got) == 4)
    for spec in got[:3]:
        ids, target = first_token(smollm2, spec)
        assert top1(smollm2, ids) == target, spec
        assert smollm2.tok().decode([target]).strip()  # never a bare space


def test_math_targets_are_the_answers_first_token(smollm2: Model, checked: dict[str, Dataset]):
    for spec in checked["math"]:
        x, y = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", spec.prompt).groups())  # type: ignore[union-attr]
        assert 1 <= x < 100 and 1 <= y < 100
        answer = str(x + y)
        assert spec.label is not None and spec.label.strip() == answer
        # SmolLM2 writes " 57" as " ", "5", "7": the space joins the seed, the target is "5"
        assert spec.seed in ("Answer:", "Answer: ")
        text = join_seed(spec.prompt, spec.seed) + spec.label
        assert text == f"{spec.prompt} Answer: {answer}"
        _, target = first_token(smollm2, spec)
        assert answer.startswith(smollm2.tok().decode([target]).strip())


def test_antonyms_languages_and_template(smollm2: Model):
    assert {"English", "French", "Spanish", "German"} <= set(datasets.ANTONYMS)
    every = make_dataset("antonyms", smollm2, check=False)
    assert len(every) == max_prompts("antonyms", smollm2) == every.tried
    hot = next(s for s in every if s.prompt.endswith('"hot" is "'))
    assert hot.label == "cold" and hot.prompt.startswith('The opposite of "big" is "small".')
    for _, examples, words in datasets.ANTONYMS.values():
        assert not {w for w, _ in words} & {w for w, _ in examples}  # no question is an example


def test_ioi_prompts_are_the_builtin_candidates(smollm2: Model, checked: dict[str, Dataset]):
    plain = make_dataset("ioi", smollm2, 6, seed=3, check=False)
    pairs = list(itertools.islice(ioi_candidates(ioi_names(smollm2), 3), 6))
    assert plain == [PromptSpec(p.clean, label=p.answer) for p in pairs]
    for spec in checked["ioi"]:
        assert spec.label is not None and spec.label[1:] in NAMES and spec.label[1:] in spec.prompt


def test_order_is_deterministic_per_seed_and_n_gives_a_prefix(smollm2: Model):
    five = make_dataset("math", smollm2, 5, check=False)
    assert make_dataset("math", smollm2, 3, check=False) == five[:3]
    assert make_dataset("math", smollm2, 5, seed=1, check=False) != five
    assert max_prompts("math", smollm2) == 99 * 99


def test_two_hop_prompts_are_for_the_chat_template(smollm2: Model):
    every = make_dataset("capitals_2hop", smollm2, check=False)
    assert every.chat and len(every) == len(datasets.CITIES) >= 50
    for spec in every:
        assert spec.seed == "Answer:" and spec.label is not None and spec.label.startswith(" ")
        assert spec.prompt.startswith("What is the capital of the state containing ")
        assert spec.label.strip() not in spec.prompt  # copying the city never answers


def test_two_hop_is_checked_with_the_chat_template(smollm2: Model, monkeypatch: pytest.MonkeyPatch):
    # SmolLM2 repeats the city, so a city that is its own answer is the one it gets "right"
    monkeypatch.setattr(datasets, "CITIES", (("Chicago", "Springfield"), ("Boise", "Boise")))
    got = make_dataset("capitals_2hop", smollm2)
    assert [s.label for s in got] == [" Boise"] and got.tried == 2
    ids, target = first_token(smollm2, got[0], chat=True)
    assert ids[-1] == smollm2.tok()("Answer:", add_special_tokens=False)["input_ids"][-1]
    assert top1(smollm2, ids) == target
    monkeypatch.setattr(datasets, "CITIES", (("Chicago", "Springfield"),))
    with pytest.raises(AdagError, match="answered none of 1 candidate") as e:
        make_dataset("capitals_2hop", smollm2)
    assert "\n" not in str(e.value)


def test_write_and_load_round_trip(tmp_path: Path, capitals: Dataset):
    specs = [
        *capitals[:2],
        PromptSpec("What is 2 + 3?", "Answer: ", "5", score=0.25),
        PromptSpec("The capital of Brazil is", label=" Brasília", score=3),
        PromptSpec("no label", score=-1.5),
    ]
    path = write_prompts(specs, tmp_path / "sub" / "p.jsonl")
    assert path == tmp_path / "sub" / "p.jsonl"
    back = load_prompts(path)
    assert back == specs and back.format == "jsonl"
    assert back[3].score == 3.0 and isinstance(back[3].score, float)
    assert back[0].where == f"{path}:1"
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"prompt": capitals[0].prompt, "label": capitals[0].label}
    assert lines[4] == {"prompt": "no label", "score": -1.5}
    assert "Brasília" in path.read_text(encoding="utf-8")  # not \\u-escaped
    assert PromptSpec("a", score=1.0) != PromptSpec("a", score=2.0)  # score is part of equality


@pytest.mark.parametrize(
    ("score", "shown"), [('"high"', '"high"'), ("true", "true"), ("[1]", "[1]"), ("NaN", "NaN")]
)
def test_non_numeric_score_is_an_error_naming_the_line(tmp_path: Path, score: str, shown: str):
    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"prompt": "a", "score": 1}}\n{{"prompt": "b", "score": {score}}}\n')
    with pytest.raises(AdagError) as e:
        load_prompts(path)
    assert str(e.value) == f'{path}:2: "score" must be a finite number, got {shown}'


def test_bad_inputs_are_one_line_errors(smollm2: Model, tmp_path: Path):
    cases = [
        (lambda: make_dataset("countries", smollm2), "unknown dataset 'countries'; choose one of"),
        (lambda: make_dataset("capitals", smollm2, 1000), "can make at most 137 prompts"),
        (lambda: make_dataset("math", smollm2, 0), "needs n >= 1"),
        (lambda: make_dataset("math", smollm2, 99 * 99 + 1), f"at most {99 * 99} prompts"),
        (lambda: write_prompts([], tmp_path / "x.jsonl"), "no prompts to write"),
    ]
    for call, needle in cases:
        with pytest.raises(AdagError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.jsonl").exists()
    assert DATASETS == ("capitals", "capitals_2hop", "math", "antonyms", "ioi")


def test_cli_dataset(tmp_path: Path):
    out = tmp_path / "caps.jsonl"
    r = runner.invoke(app, ["dataset", "capitals", "smollm2-135m", "--n", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "kept" in r.stdout and f"wrote 5 prompts to {out}" in r.stdout
    specs = load_prompts(out)
    assert len(specs) == 5 and all(s.label and s.label.startswith(" ") for s in specs)

    out2 = tmp_path / "hop.jsonl"
    args = ["dataset", "capitals_2hop", "smollm2-135m", "--n", "3", "--no-check", "--out"]
    r = runner.invoke(app, [*args, str(out2), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary == {
        "dataset": "capitals_2hop",
        "model": "smollm2-135m",
        "n": 3,
        "seed": 0,
        "checked": False,
        "tried": 3,
        "kept": 3,
        "chat": True,
        "out": str(out2),
    }
    assert [s.seed for s in load_prompts(out2)] == ["Answer:"] * 3
    r = runner.invoke(app, [*args, str(out2)])
    assert r.exit_code == 0 and "--chat" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bogus", "smollm2-135m"], "unknown dataset 'bogus'"),
        (["capitals", "smollm2-135m", "--n", "1000"], "can make at most 137 prompts"),
        (["capitals", "smollm2-135m", "--n", "0"], "--n must be at least 1"),
    ],
)
def test_cli_dataset_errors_write_nothing(tmp_path: Path, args: list[str], needle: str):
    out = tmp_path / "d" / "p.jsonl"
    r = runner.invoke(app, ["dataset", *args, "--out", str(out)])
    assert r.exit_code == 2
    assert needle in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_cli_dataset_refuses_an_out_that_is_not_jsonl(tmp_path: Path):
    for out, needle in [(tmp_path / "p.txt", "must end in .jsonl"), (tmp_path, "must end in")]:
        r = runner.invoke(app, ["dataset", "math", "smollm2-135m", "--out", str(out)])
        assert r.exit_code == 2 and needle in r.stderr, r.output
    (tmp_path / "dir.jsonl").mkdir()
    r = runner.invoke(
        app, ["dataset", "math", "smollm2-135m", "--out", str(tmp_path / "dir.jsonl")]
    )
    assert r.exit_code == 2 and "is a directory" in r.stderr
