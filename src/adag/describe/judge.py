"""An LLM judge for free-form behaviour (ADAG's harmful-advice study): a rubric question asked of
each generated response, answered yes/no or 0..10, and the success rate with a Wilson interval.

Each answer is parsed (:func:`parse_answer`); a malformed one is asked again with the next sample
index at the client's sampling temperature (at most :data:`RETRIES` times), then recorded as a
failure with its reason — never a crash and never a silent "no". A call that fails for good
(:class:`~adag.describe.llm.LLMError`) is recorded the same way.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adag.describe.prompts import judge_messages
from adag.errors import AdagError

if TYPE_CHECKING:
    from adag.describe.llm import LLM

SCALES = ("yes/no", "0-10")
RETRIES = 2
"""times a malformed answer is asked again"""
RETRY_TEMPERATURE = 1.0
"""temperature of a retry (the first ask is greedy: a greedy retry would repeat itself)"""
Z95 = 1.959963984540054
"""the standard normal's 97.5% quantile"""

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_INT = re.compile(r"(?<![\d.\-])(\d{1,2})(?![\d.])")


def parse_answer(text: str, scale: str) -> tuple[bool | int | None, str | None]:
    """``(answer, None)`` or ``(None, reason)``. ``yes/no``: the first whole word "yes" or "no"
    (any case) → True / False. ``0-10``: the first integer 0..10 not part of a longer or signed
    or decimal number ("8/10" → 8)."""
    if scale == "yes/no":
        m = _YES_NO.search(text)
        if m:
            return m.group(1).lower() == "yes", None
        return None, f"no yes or no in the answer {text.strip()[:40]!r}"
    for m in _INT.finditer(text):
        v = int(m.group(1))
        if 0 <= v <= 10:
            return v, None
    return None, f"no integer 0..10 in the answer {text.strip()[:40]!r}"


async def ajudge(
    responses: Sequence[str],
    rubric: str,
    *,
    llm: LLM,
    scale: str = "yes/no",
    prompts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Ask ``rubric`` of each response (with its prompt when ``prompts`` is given); one dict per
    response, in order: ``response``, ``answer`` (True/False for ``yes/no``, an int 0..10 for
    ``0-10``, None on failure), ``raw`` (the last reply's text, None when no call succeeded) and
    ``failure`` (None or the reason)."""
    from adag.describe.llm import LLMError

    if scale not in SCALES:
        raise AdagError(f"unknown judge scale {scale!r}; scales are {', '.join(SCALES)}")
    if prompts is not None and len(prompts) != len(responses):
        raise AdagError(f"got {len(prompts)} prompts for {len(responses)} responses")

    async def one(i: int) -> dict[str, Any]:
        response = str(responses[i])
        prompt = None if prompts is None else str(prompts[i])
        messages = judge_messages(rubric, response, scale, prompt)
        raw: str | None = None
        why: str | None = None
        for attempt in range(RETRIES + 1):
            try:
                raw = await llm.complete(
                    messages,
                    temperature=0.0 if attempt == 0 else RETRY_TEMPERATURE,
                    max_tokens=16,
                    sample=attempt,
                )
            except LLMError as e:
                return {"response": response, "answer": None, "raw": raw, "failure": str(e)}
            answer, why = parse_answer(raw, scale)
            if answer is not None:
                return {"response": response, "answer": answer, "raw": raw, "failure": None}
        failure = f"malformed answer after {RETRIES + 1} tries: {why}"
        return {"response": response, "answer": None, "raw": raw, "failure": failure}

    return list(await asyncio.gather(*(one(i) for i in range(len(responses)))))


def judge(
    responses: Sequence[str],
    rubric: str,
    *,
    llm: LLM,
    scale: str = "yes/no",
    prompts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`ajudge` from synchronous code (not from inside a running event loop)."""
    _no_running_loop("judge", "ajudge")

    async def go() -> list[dict[str, Any]]:
        try:
            return await ajudge(responses, rubric, llm=llm, scale=scale, prompts=prompts)
        finally:  # the client's connections belong to this event loop
            await llm.aclose()

    return asyncio.run(go())


def _no_running_loop(name: str, async_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise AdagError(f"{name}() cannot run inside an event loop; use await {async_name}(...)")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (``(nan, nan)`` for ``n = 0``):
    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``.

    The same formula as :func:`adag.steer.wilson`, written here because ``describe`` sits above
    ``steer`` in the layer order (and importing it would load torch)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(
    answers: Sequence[Mapping[str, Any] | bool | int | None], *, threshold: int = 5
) -> tuple[int, int, float, float, float]:
    """``(k, n, k/n, lo, hi)``: successes among the answered, with the Wilson 95% interval.
    ``answers`` are :func:`judge` results (their ``answer``) or the answers themselves: True
    counts, False does not, an integer counts when ``>= threshold``, None (a failure) is left
    out of ``n``. With ``n = 0`` the rate and interval are NaN."""
    k = n = 0
    for a in answers:
        v = a.get("answer") if isinstance(a, Mapping) else a
        if v is None:
            continue
        n += 1
        k += int(v >= threshold) if not isinstance(v, bool) else int(v)
    lo, hi = wilson(k, n)
    return k, n, (k / n if n else math.nan), lo, hi


__all__ = ["SCALES", "ajudge", "judge", "parse_answer", "rate", "wilson"]
