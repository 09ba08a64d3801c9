"""The local LLM backend on the real SmolLM2-135M-Instruct (float32): its BPE tokenizer splits
"10" into "1", "0" and "-10" into "-", "1", "0", and its chat template is the one the demo uses."""

from __future__ import annotations

import asyncio

import pytest

from adag.describe.llm import generate_local, make_llm, score_local
from adag.models.model import Model
from tests.test_llm import MSGS, SCORES, SIGNED, brute_force


def test_smollm2_candidates_are_multi_token(smollm2: Model) -> None:
    tok = smollm2.tok()
    assert [tok.decode([i]) for i in tok("10", add_special_tokens=False)["input_ids"]] == ["1", "0"]
    assert len(tok("-10", add_special_tokens=False)["input_ids"]) == 3


@pytest.mark.parametrize("cands", [SCORES, SIGNED], ids=["0..10", "-10..10"])
def test_smollm2_scores_equal_brute_force(smollm2: Model, cands: list[str]) -> None:
    lines = [" Paris", " is", " the capital"]
    got, _ = score_local(smollm2, MSGS, lines, cands)
    want = brute_force(smollm2, MSGS, lines, cands)
    for g, w in zip(got, want, strict=True):
        assert g is not None
        for c in cands:  # float32, different batch shapes: agreement to rounding
            assert g[c] == pytest.approx(w[c], rel=2e-3, abs=1e-6)


def test_smollm2_complete(smollm2: Model) -> None:
    llm = make_llm({"backend": "local", "max_tokens": 12}, model=smollm2)

    async def go() -> list[str]:
        try:
            return [
                await llm.complete([{"role": "user", "content": "Name a colour."}]),
                await llm.complete(
                    [{"role": "user", "content": "Name a colour."}], temperature=1.0, sample=3
                ),
            ]
        finally:
            await llm.aclose()

    greedy, sampled = asyncio.run(go())
    assert greedy.strip()
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert generate_local(smollm2, msgs, max_tokens=12)[0] == greedy
    assert llm.usage.calls == 2 and llm.usage.output_tokens > 0
    assert isinstance(sampled, str)
