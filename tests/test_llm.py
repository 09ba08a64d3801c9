"""The LLM clients (adag.describe.llm) against real loopback servers speaking the OpenAI and
Anthropic APIs through the real SDKs (tests/llm_servers.py), and the local backend's exact
scoring against brute force on tiny random models with a character-level tokenizer."""

from __future__ import annotations

import asyncio
import math
import os
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from adag.describe.cache import Cache, request_key
from adag.describe.llm import (
    PLACEHOLDER,
    LLMConfig,
    LLMError,
    chat_ids,
    generate_local,
    logprob_scores,
    make_llm,
    parse_scores,
    score_local,
)
from adag.errors import AdagError
from adag.models.model import Model
from tests.conftest import tiny_config
from tests.llm_servers import FakeAnthropic, FakeOpenAI, Fault, Reply, fake_tokens

T = TypeVar("T")
SCORES = [str(i) for i in range(11)]
SIGNED = [str(i) for i in range(-10, 11)]
MSGS = [{"role": "system", "content": "You predict."}, {"role": "user", "content": "Go."}]


def arun(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-anthropic")


def openai_llm(server: FakeOpenAI, cache_dir: Path | None = None, **kw: Any) -> Any:
    cfg = {"backend": "openai", "base_url": server.base_url, "model": "m", "backoff": 0.01, **kw}
    return make_llm(cfg, cache_dir=cache_dir)


def anthropic_llm(server: FakeAnthropic, cache_dir: Path | None = None, **kw: Any) -> Any:
    cfg = {"backend": "anthropic", "base_url": server.base_url, "model": "c", "backoff": 0.01, **kw}
    return make_llm(cfg, cache_dir=cache_dir)


def scored(lines: list[str], values: list[str]) -> str:
    return "\n".join(f"{x}\t{v}" for x, v in zip(lines, values, strict=True))


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible: replies, retries, failures


def test_openai_reply_usage_and_request() -> None:
    with FakeOpenAI("hello world") as server:
        llm = openai_llm(server, price_input=2.0, price_output=10.0)

        async def go() -> str:
            try:
                return await llm.complete(MSGS, max_tokens=17)
            finally:
                await llm.aclose()

        assert arun(go) == "hello world"
    [req] = server.api_requests()
    assert req.json["model"] == "m"
    assert req.json["messages"] == MSGS
    assert req.json["temperature"] == 0.0 and req.json["max_tokens"] == 17
    assert "logprobs" not in req.json
    assert req.headers["authorization"] == "Bearer sk-test-openai"
    assert req.usage is not None
    u = llm.usage
    assert (u.calls, u.retries, u.failures, u.cache_hits) == (1, 0, 0, 0)
    assert (
        u.input_tokens == req.usage["prompt_tokens"] == 3
    )  # fake tokens "You", " predict.", "Go."
    assert u.output_tokens == req.usage["completion_tokens"] == 2
    assert u.cost_usd == pytest.approx((3 * 2.0 + 2 * 10.0) / 1e6)
    assert set(u.as_dict()) == {
        "calls",
        "cache_hits",
        "retries",
        "failures",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    }
    assert llm.name == "openai:m"


def test_openai_retry_after_is_honoured() -> None:
    with FakeOpenAI("fine", [Fault.status(429, retry_after=0.25)]) as server:
        llm = openai_llm(server, backoff=0.001)

        async def go() -> str:
            try:
                return await llm.complete(MSGS)
            finally:
                await llm.aclose()

        assert arun(go) == "fine"
    assert [r.status for r in server.api_requests()] == [429, 200]
    [gap] = server.gaps()
    assert gap >= 0.25  # the header's delay, not backoff (0.001 s)
    assert llm.usage.retries == 1 and llm.usage.calls == 1


def test_openai_backoff_on_5xx_grows() -> None:
    with FakeOpenAI("fine", [Fault.status(500), Fault.status(503), Fault.status(502)]) as server:
        llm = openai_llm(server, backoff=0.04, backoff_max=10.0)

        async def go() -> str:
            try:
                return await llm.complete(MSGS)
            finally:
                await llm.aclose()

        assert arun(go) == "fine"
    assert [r.status for r in server.api_requests()] == [500, 503, 502, 200]
    gaps = server.gaps()
    # retry n waits backoff * 2**n * jitter(0.5..1)
    for n, gap in enumerate(gaps):
        assert gap >= 0.04 * 2**n * 0.5
    assert llm.usage.retries == 3
    assert len(server.api_requests()) == llm.usage.calls + llm.usage.retries


@pytest.mark.parametrize("answer", [False, True], ids=["dropped", "late"])
def test_openai_retries_a_hang_past_the_timeout(answer: bool) -> None:
    with FakeOpenAI("fine", [Fault.hang(1.5, answer=answer)]) as server:
        llm = openai_llm(server, timeout=0.3)

        async def go() -> str:
            try:
                return await llm.complete(MSGS)
            finally:
                await llm.aclose()

        start = time.monotonic()
        assert arun(go) == "fine"
        assert time.monotonic() - start >= 0.3
        assert len(server.api_requests()) == 2
        [gap] = server.gaps()
        # retried after the timeout, not after the hang (the server may see the first request
        # a little after the client sent it, so the gap alone can be under 0.3 s on a busy box)
        assert 0.15 <= gap < 1.4
    assert llm.usage.retries == 1


def test_openai_no_retry_on_400() -> None:
    with FakeOpenAI("fine", [Fault.status(400, message="bad model\nsecond line")]) as server:
        llm = openai_llm(server)

        async def go() -> None:
            try:
                await llm.complete(MSGS)
            finally:
                await llm.aclose()

        with pytest.raises(LLMError) as e:
            arun(go)
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 400" in msg and "bad model" in msg and "openai:m" in msg
    assert len(server.api_requests()) == 1
    assert (llm.usage.calls, llm.usage.retries, llm.usage.failures) == (1, 0, 1)


def test_openai_retries_exhausted() -> None:
    with FakeOpenAI("fine", [Fault.status(500)] * 3) as server:
        llm = openai_llm(server, max_retries=2)

        async def go() -> None:
            try:
                await llm.complete(MSGS)
            finally:
                await llm.aclose()

        with pytest.raises(LLMError, match=r"after 3 attempt\(s\): HTTP 500") as e:
            arun(go)
    assert "\n" not in str(e.value)
    assert len(server.api_requests()) == 3
    assert (llm.usage.retries, llm.usage.failures) == (2, 1)


def test_openai_malformed_body_is_retried() -> None:
    faults = [
        Fault.body("<html>bad gateway</html>"),
        Fault.body("{oops", content_type="application/json"),
    ]
    with FakeOpenAI("fine", faults) as server:
        llm = openai_llm(server)

        async def go() -> str:
            try:
                return await llm.complete(MSGS)
            finally:
                await llm.aclose()

        assert arun(go) == "fine"
    assert len(server.api_requests()) == 3 and llm.usage.retries == 2


def test_connection_refused_is_retried_then_fails() -> None:
    with FakeOpenAI() as server:
        url = server.base_url
    llm = make_llm(
        {"backend": "openai", "base_url": url, "model": "m", "max_retries": 1, "backoff": 0.01}
    )

    async def go() -> None:
        try:
            await llm.complete(MSGS)
        finally:
            await llm.aclose()

    with pytest.raises(LLMError, match="after 2 attempt"):
        arun(go)
    assert llm.usage.retries == 1


# ----------------------------------------------------------------------------------------------
# The cache


def test_cache_hits_samples_and_instances(tmp_path: Path) -> None:
    calls = []

    def reply(req: dict[str, Any]) -> str:
        calls.append(req)
        return f"answer {len(calls)}"

    with FakeOpenAI(reply) as server:
        a = openai_llm(server, tmp_path)
        b = openai_llm(server, tmp_path)

        async def go() -> tuple[list[str], list[str], list[str]]:
            try:
                first = [await a.complete(MSGS), await a.complete(MSGS)]
                other = [await a.complete(MSGS, sample=1)]
                samples = [await a.complete(MSGS, temperature=1.0, sample=s) for s in range(5)]
                again = [await b.complete(MSGS, temperature=1.0, sample=s) for s in range(5)]
                return first + other, samples, again
            finally:
                await a.aclose()
                await b.aclose()

        first, samples, again = arun(go)
    assert first == ["answer 1", "answer 1", "answer 2"]
    assert samples == [f"answer {i}" for i in range(3, 8)]  # 5 samples, 5 answers
    assert again == samples  # another client, the same cache
    assert len(server.api_requests()) == 7
    assert (a.usage.calls, a.usage.cache_hits) == (7, 1)
    assert (b.usage.calls, b.usage.cache_hits) == (0, 5)
    with Cache(tmp_path) as cache:
        assert len(cache) == 7
    assert (tmp_path / "cache.sqlite").is_file()


def test_cache_key_covers_the_request() -> None:
    base = {"kind": "complete", "messages": MSGS, "temperature": 0.0, "sample": 0}
    keys = {
        request_key(base),
        request_key({**base, "sample": 1}),
        request_key({**base, "temperature": 1.0}),
        request_key({**base, "messages": MSGS[:1]}),
        request_key({**base, "kind": "score_lines"}),
    }
    assert len(keys) == 5
    assert request_key(dict(reversed(list(base.items())))) == request_key(base)
    cfg = LLMConfig(backend="openai", model="x", base_url="http://a", concurrency=9)
    assert cfg.identity() == {"backend": "openai", "model": "x"}


def test_concurrent_tasks_share_answers(tmp_path: Path) -> None:
    with FakeOpenAI(lambda req: req["messages"][-1]["content"].upper(), delay=0.05) as server:
        a = openai_llm(server, tmp_path, concurrency=8)
        b = openai_llm(server, tmp_path, concurrency=8)

        async def go() -> list[str]:
            try:
                same = [a.complete([{"role": "user", "content": "x"}]) for _ in range(6)]
                diff = [
                    (a if i % 2 else b).complete([{"role": "user", "content": f"q{i}"}])
                    for i in range(6)
                ]
                out = await asyncio.gather(*same, *diff)
                # every answer is now on disk: a third round makes no request
                again = await asyncio.gather(
                    *[b.complete([{"role": "user", "content": f"q{i}"}]) for i in range(6)]
                )
                return list(out) + list(again)
            finally:
                await a.aclose()
                await b.aclose()

        out = arun(go)
    assert out[:6] == ["X"] * 6
    assert out[6:12] == out[12:] == [f"Q{i}" for i in range(6)]
    assert len(server.api_requests()) == 7  # "x" once, q0..q5 once each
    assert a.usage.cache_hits + b.usage.cache_hits == 5 + 6


def test_cache_is_safe_across_processes(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from adag.describe.cache import Cache\n"
        "c = Cache(sys.argv[1])\n"
        "for i in range(60):\n"
        "    c.put(f'k{i}', f'{sys.argv[2]}:{i}')\n"
        "    c.put(f'{sys.argv[2]}-{i}', 'x')\n"
        "    assert c.get(f'k{i}') is not None\n"
        "c.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"p{n}"]) for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    with Cache(tmp_path) as cache:
        assert len(cache) == 60 + 4 * 60
        owner = cache.get("k7")
        assert owner is not None and owner.endswith(":7")  # the first writer's answer stays


def test_api_key_never_reaches_disk_or_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"sk-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ADAG_TEST_KEY", secret)
    caplog.set_level("DEBUG")
    faults = [Fault.status(429, retry_after=0.01), Fault.status(500)]
    with FakeOpenAI(lambda req: scored(["a"], ["3"]), faults) as server:
        llm = openai_llm(server, tmp_path / "llm-cache", api_key_env="ADAG_TEST_KEY")

        async def go() -> None:
            try:
                await llm.complete(MSGS)  # after a 429 and a 500
                server.inject(Fault.status(401))
                with pytest.raises(LLMError, match="HTTP 401") as e:
                    await llm.complete(MSGS, sample=1)
                assert secret not in str(e.value)
                await llm.score_lines(MSGS, ["a"], SCORES)
            finally:
                await llm.aclose()

        arun(go)
    assert all(r.headers["authorization"] == f"Bearer {secret}" for r in server.api_requests())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert secret not in caplog.text
    assert secret not in repr(llm.config) and secret not in str(llm.config.model_dump())


def test_missing_key_sdk_and_bad_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AdagError, match="set OPENAI_API_KEY"):
        make_llm({"backend": "openai", "model": "gpt-4o-mini"})
    with pytest.raises(AdagError, match="api_key_env names NOPE_KEY, which is not set"):
        make_llm({"backend": "openai", "model": "m", "api_key_env": "NOPE_KEY"})
    make_llm({"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"})  # no key
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(AdagError, match=r"anthropic package: pip install 'adag\[llm\]'"):
        make_llm({"backend": "anthropic", "model": "c"})
    with pytest.raises(AdagError, match="LLM config: backend: "):
        make_llm({"backend": "gemini"})
    with pytest.raises(AdagError, match="LLM config: api_key: unknown field"):
        make_llm({"api_key": "sk-no"})
    with pytest.raises(AdagError, match="concurrency"):
        make_llm({"concurrency": 0})


def test_concurrency_limit() -> None:
    with FakeOpenAI("ok", delay=0.15) as server:
        llm = openai_llm(server, concurrency=3)

        async def go() -> None:
            try:
                await asyncio.gather(
                    *[llm.complete([{"role": "user", "content": f"q{i}"}]) for i in range(10)]
                )
            finally:
                await llm.aclose()

        arun(go)
    assert 1 < server.max_in_flight <= 3  # concurrent, never more than the limit
    assert len(server.api_requests()) == 10


# ----------------------------------------------------------------------------------------------
# score_lines over HTTP


def test_openai_score_lines_with_logprobs() -> None:
    lines = ["The", " cat", " sat", " down"]
    reply = Reply(
        scored(lines, ["3", "7", "x", "10"]),
        value_probs=[{"3": 0.5, "4": 0.3, " the": 0.2}, None, None, {"10": 0.6, "9": 0.2}],
    )
    with FakeOpenAI(lambda req: reply) as server:
        llm = openai_llm(server)
        assert llm.distributions

        async def go() -> list[Any]:
            try:
                return await llm.score_lines(MSGS, lines, SCORES)
            finally:
                await llm.aclose()

        out = arun(go)
    [req] = server.api_requests()
    assert req.json["logprobs"] is True and req.json["top_logprobs"] == 20
    assert req.json["temperature"] == 0.0
    assert out[0] == pytest.approx({c: {"3": 0.625, "4": 0.375}.get(c, 0.0) for c in SCORES})
    assert out[1] == {c: float(c == "7") for c in SCORES}
    assert out[2] is None
    assert out[3] == pytest.approx({c: {"10": 0.75, "9": 0.25}.get(c, 0.0) for c in SCORES})
    for d in (out[0], out[3]):
        assert math.isclose(sum(d.values()), 1.0)


def test_openai_score_lines_without_logprobs_and_malformed() -> None:
    lines = ["a", "b", "c", "d"]
    replies = iter(
        [
            "Here you go:\n\na\t3\n\nb\t+7\nc\tseven\n",  # a preamble, blanks, a word, a short reply
            "malformed garbage",
        ]
    )
    with FakeOpenAI(lambda req: next(replies)) as server:
        llm = openai_llm(server, logprobs=False)
        assert not llm.distributions

        async def go() -> tuple[list[Any], list[Any]]:
            try:
                one = await llm.score_lines(MSGS, lines, SCORES)
                two = await llm.score_lines(MSGS, lines, SCORES, sample=1)
                return one, two
            finally:
                await llm.aclose()

        one, two = arun(go)
    reqs = server.api_requests()
    assert all("logprobs" not in r.json for r in reqs)
    assert reqs[1].json["temperature"] == 1.0  # a retry with a new sample is sampled
    assert one == [
        {c: float(c == "3") for c in SCORES},
        {c: float(c == "7") for c in SCORES},
        None,
        None,
    ]
    assert two == [None] * 4
    assert llm.usage.retries == 0  # a malformed answer is the caller's to retry


def test_openai_logprobs_refused_then_remembered() -> None:
    lines = ["a", "b"]
    with FakeOpenAI(lambda req: scored(lines, ["1", "2"]), logprobs=False) as server:
        llm = openai_llm(server)

        async def go() -> tuple[list[Any], list[Any]]:
            try:
                one = await llm.score_lines(MSGS, lines, SCORES)
                two = await llm.score_lines(MSGS, lines, SCORES, sample=1)
                return one, two
            finally:
                await llm.aclose()

        one, two = arun(go)
    reqs = server.api_requests()
    assert [bool(r.json.get("logprobs")) for r in reqs] == [True, False, False]
    assert [r.status for r in reqs] == [400, 200, 200]
    assert one == two == [{c: float(c == v) for c in SCORES} for v in ("1", "2")]
    assert not llm.distributions

    with FakeOpenAI(lambda req: scored(lines, ["1", "2"]), logprobs=False) as server:
        llm = openai_llm(server, logprobs=True)  # asked for explicitly: a refusal is an error

        async def go2() -> None:
            try:
                await llm.score_lines(MSGS, lines, SCORES)
            finally:
                await llm.aclose()

        with pytest.raises(LLMError, match="HTTP 400: logprobs"):
            arun(go2)


def test_logprob_scores_walks_tokens() -> None:
    text = "a\t1\nbb\t10\n\nc\t7"
    tokens = [
        ("a", 0.0, []),
        ("\t1", math.log(0.5), [("\t1", math.log(0.5)), ("\t2", math.log(0.25)), (" x", -1.0)]),
        ("\n", 0.0, []),
        ("bb", 0.0, []),
        ("\t", 0.0, []),
        ("1", math.log(0.9), [("1", math.log(0.9)), ("2", math.log(0.1))]),  # "10" = "1" "0"
        ("0", 0.0, []),
        ("\n\n", 0.0, []),
        ("c", 0.0, []),
        ("\t", 0.0, []),
        ("7", math.log(0.4), [("8", math.log(0.4)), (" 8", math.log(0.2))]),
    ]
    out = logprob_scores(text, tokens, 4, SCORES)
    assert out[0] == pytest.approx({c: {"1": 2 / 3, "2": 1 / 3}.get(c, 0.0) for c in SCORES})
    assert out[1] == {c: float(c == "10") for c in SCORES}  # several tokens: the parsed value
    # the sampled token is counted even when the server leaves it out of top_logprobs
    assert out[2] == pytest.approx({c: {"7": 0.4, "8": 0.6}.get(c, 0.0) for c in SCORES})
    assert out[3] is None
    # tokens that do not spell the reply: parsed values
    assert logprob_scores(text + "!", tokens, 3, SCORES) == parse_scores(text + "!", 3, SCORES)
    assert fake_tokens("a\t-10\n word") == ["a", "\t", "-10", "\n", " word"]


def test_anthropic_complete_score_and_faults() -> None:
    lines = ["x", "y"]
    replies = iter(["Hi there", scored(lines, ["-3", "12"])])
    faults = [Fault.status(529), Fault.status(429, retry_after=0.2)]
    with FakeAnthropic(lambda req: next(replies), faults) as server:
        llm = anthropic_llm(server, price_output=1.0)
        assert not llm.distributions

        async def go() -> tuple[str, list[Any]]:
            try:
                text = await llm.complete([*MSGS, {"role": "user", "content": "More."}])
                return text, await llm.score_lines(MSGS, lines, SIGNED)
            finally:
                await llm.aclose()

        text, scores = arun(go)
    assert text == "Hi there"
    assert scores == [{c: float(c == "-3") for c in SIGNED}, None]
    reqs = server.api_requests()
    assert [r.status for r in reqs] == [529, 429, 200, 200]  # both faults hit complete()
    assert server.gaps()[1] >= 0.2
    first = reqs[2].json
    assert first["system"] == "You predict."
    assert first["messages"] == [{"role": "user", "content": "Go.\n\nMore."}]
    assert first["max_tokens"] == 256 and first["temperature"] == 0.0 and first["model"] == "c"
    h = reqs[0].headers  # anthropic 2.x sends the key as a bearer token, older ones as x-api-key
    assert "sk-test-anthropic" in (h.get("x-api-key"), h.get("authorization", "")[7:])
    assert llm.usage.output_tokens == sum(r.usage["output_tokens"] for r in reqs if r.usage)
    assert llm.usage.cost_usd == pytest.approx(llm.usage.output_tokens / 1e6)
    assert llm.usage.retries == 2 and llm.usage.calls == 2


def test_anthropic_no_retry_on_400_and_cache(tmp_path: Path) -> None:
    with FakeAnthropic("ok", [Fault.status(400, message="prompt is too long")]) as server:
        llm = anthropic_llm(server, tmp_path)

        async def go() -> list[str]:
            try:
                with pytest.raises(LLMError, match="HTTP 400: prompt is too long"):
                    await llm.complete(MSGS)
                return [await llm.complete(MSGS) for _ in range(3)]
            finally:
                await llm.aclose()

        assert arun(go) == ["ok"] * 3
    assert len(server.api_requests()) == 2
    assert (llm.usage.calls, llm.usage.cache_hits, llm.usage.failures) == (2, 2, 1)


def test_anthropic_drops_a_refused_temperature() -> None:
    faults = [Fault.status(400, message="temperature is deprecated for this model")]
    with FakeAnthropic("ok", faults) as server:
        llm = anthropic_llm(server)

        async def go() -> list[str]:
            try:
                return [await llm.complete(MSGS), await llm.complete(MSGS, sample=1)]
            finally:
                await llm.aclose()

        assert arun(go) == ["ok", "ok"]
    assert ["temperature" in r.json for r in server.api_requests()] == [True, False, False]


def test_a_client_survives_a_new_event_loop() -> None:
    with FakeOpenAI("ok") as server:
        llm = openai_llm(server)

        async def go() -> str:
            try:
                return await llm.complete([{"role": "user", "content": str(uuid.uuid4())}])
            finally:
                await llm.aclose()

        assert arun(go) == arun(go) == "ok"
    assert llm.usage.calls == 2


# ----------------------------------------------------------------------------------------------
# The local backend: exact scores against brute force on tiny random models

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(template: bool = True) -> Any:
    """One token per printable character (digits included, as in SmolLM2), plus chat specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    special = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(special + chars)}, merges=[]))
    tk.add_special_tokens(special)
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    if template:
        tok.chat_template = TEMPLATE
    return tok


def char_model(arch: str, template: bool = True, seed: int = 0) -> Model:
    """A tiny random float64 model of ``arch`` over :func:`char_tokenizer`'s vocabulary."""
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer(template)
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    if arch == "gpt2":
        cfg.n_positions = 512
    else:
        cfg.max_position_embeddings = 512
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = cfg.pad_token_id = None
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # large weights, as in tests/conftest.py's tiny_hf
            if p.dim() == 1:
                base = 0.0 if arch.startswith("gemma") or name.endswith("bias") else 1.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "wpe" in name or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[0] if arch == "gpt2" else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
    hf.generation_config.eos_token_id = tok.eos_token_id
    return Model(hf.double().eval(), tok, name=f"char-{arch}")


def brute_force(model: Model, msgs: list[dict[str, str]], lines: list[str], cands: list[str]):
    """The definition: for each slot, a separate full forward per candidate prefix on the
    explicit prefix string; product of token probabilities; the mass continuing into a longer
    candidate removed; renormalised."""
    tok = model.tok()
    if tok.chat_template:
        head = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        bos: list[int] = []
    else:
        head = "".join(f"{m['role'].title()}: {m['content']}\n\n" for m in msgs) + "Assistant:\n"
        bos = tok("", add_special_tokens=True)["input_ids"]
    enc = [tuple(tok(c, add_special_tokens=False)["input_ids"]) for c in cands]

    seen: dict[str, torch.Tensor] = {}

    def probs(text: str) -> torch.Tensor:
        if text not in seen:
            ids = bos + tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                seen[text] = model(torch.tensor([ids]))[0, -1].double().softmax(-1)
        return seen[text]

    out = []
    for i, line in enumerate(lines):
        prefix = head + "".join(f"{x}\t{PLACEHOLDER}\n" for x in lines[:i]) + line + "\t"
        ps = []
        for c, t in zip(cands, enc, strict=True):
            p = 1.0
            for j in range(len(t)):
                p *= float(probs(prefix + tok.decode(t[:j]))[t[j]])
            longer = {u[len(t)] for u in enc if len(u) > len(t) and u[: len(t)] == t}
            if longer:
                nxt = probs(prefix + c)
                p *= 1.0 - sum(float(nxt[x]) for x in longer)
            ps.append(p)
        out.append({c: p / sum(ps) for c, p in zip(cands, ps, strict=True)})
    return out


LOCAL_ARCHS = ["llama", "gemma2", "gpt2", "qwen3", "gemma3_text", "olmo2", "qwen2"]


@pytest.mark.parametrize("arch", LOCAL_ARCHS)
def test_local_scores_equal_brute_force(arch: str) -> None:
    model = char_model(arch)
    lines = ["Paris", " is", " nice", "!"]
    for cands in (SCORES, SIGNED):
        got, n_tokens = score_local(model, MSGS, lines, cands)
        want = brute_force(model, MSGS, lines, cands)
        assert n_tokens > 0
        for g, w in zip(got, want, strict=True):
            assert g is not None and list(g) == cands
            for c in cands:
                assert g[c] == pytest.approx(w[c], rel=1e-9, abs=1e-300), (arch, c)
            assert math.isclose(sum(g.values()), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("arch", LOCAL_ARCHS)
def test_local_greedy_equals_the_argmax_loop(arch: str) -> None:
    """The KV-cached sampling loop against re-running the whole sequence at every step."""
    model = char_model(arch, seed=1)
    text, n_in, n_out = generate_local(model, MSGS, max_tokens=10)
    ids, _ = chat_ids(model, MSGS)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(torch.tensor([ids + new]), last_only=True)[0, -1].argmax())
            if nxt == model.tok().eos_token_id:
                break
            new.append(nxt)
    assert text == model.tok().decode(new, skip_special_tokens=True)
    assert (n_in, n_out) == (len(ids), len(new))
    sampled = [
        generate_local(model, MSGS, temperature=1.0, max_tokens=10, seed=s)[0] for s in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1]  # reproducible (a peaked random model may agree for 6 too)


def test_local_scores_without_a_chat_template() -> None:
    model = char_model("llama", template=False)
    ids, plain = chat_ids(model, MSGS)
    assert plain
    assert model.tok().decode(ids) == "System: You predict.\n\nUser: Go.\n\nAssistant:"
    lines = ["a", "b c"]
    got, _ = score_local(model, MSGS, lines, SCORES)
    want = brute_force(model, MSGS, lines, SCORES)
    for g, w in zip(got, want, strict=True):
        assert g is not None
        for c in SCORES:
            assert g[c] == pytest.approx(w[c], rel=1e-9)


def test_local_client_scores_complete_and_cache(tmp_path: Path) -> None:
    model = char_model("llama")
    llm = make_llm({"backend": "local"}, cache_dir=tmp_path, model=model)
    assert llm.name == "local:char-llama" and llm.distributions
    lines = ["x", "yz"]

    async def go() -> dict[str, Any]:
        try:
            out: dict[str, Any] = {}
            out["scores"] = await llm.score_lines(MSGS, lines, SIGNED)
            out["scores_again"] = await llm.score_lines(MSGS, lines, SIGNED)
            out["greedy"] = await llm.complete(MSGS, max_tokens=12)
            out["s0"] = await llm.complete(MSGS, temperature=1.0, max_tokens=12, sample=0)
            out["s1"] = await llm.complete(MSGS, temperature=1.0, max_tokens=12, sample=1)
            out["many"] = await asyncio.gather(
                *[llm.complete(MSGS, temperature=1.0, max_tokens=8, sample=s) for s in range(4)]
            )
            return out
        finally:
            await llm.aclose()

    out = arun(go)
    assert out["scores"] == out["scores_again"] == score_local(model, MSGS, lines, SIGNED)[0]
    assert out["s0"] != out["s1"]
    assert llm.usage.cache_hits == 1
    assert llm.usage.calls == 2 + 2 + 4
    assert llm.usage.output_tokens > 0 and llm.usage.input_tokens > 0

    # greedy equals the argmax loop without a KV cache
    ids, _ = chat_ids(model, MSGS)
    eos = model.tok().eos_token_id
    new: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([ids + new]), last_only=True)[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
    assert out["greedy"] == model.tok().decode(new, skip_special_tokens=True)

    # reproducible: a fresh client without the cache samples the same texts
    fresh = make_llm({"backend": "local"}, model=model)

    async def again() -> tuple[str, str]:
        try:
            s0 = await fresh.complete(MSGS, temperature=1.0, max_tokens=12, sample=0)
            s1 = await fresh.complete(MSGS, temperature=1.0, max_tokens=12, sample=1)
            return s0, s1
        finally:
            await fresh.aclose()

    assert arun(again) == (out["s0"], out["s1"])


def test_local_errors() -> None:
    model = char_model("llama")
    with pytest.raises(AdagError, match="tokenize to the same tokens"):
        score_local(model, MSGS, ["a"], ["1", "1"])
    with pytest.raises(LLMError, match="longer than the model's context"):
        score_local(model, MSGS, ["a" * 600], SCORES)
    llm = make_llm(model=model)
    with pytest.raises(AdagError, match="role must be one of"):
        arun(lambda: llm.complete([{"role": "bot", "content": "x"}]))
    with pytest.raises(AdagError, match="candidates must be"):
        arun(lambda: llm.score_lines(MSGS, ["a"], ["1", " 2"]))
    with pytest.raises(AdagError, match="candidates must be distinct"):
        arun(lambda: llm.score_lines(MSGS, ["a"], ["1", "1"]))
    assert arun(lambda: llm.score_lines(MSGS, [], SCORES)) == []
    assert os.environ.get("OPENAI_API_KEY") == "sk-test-openai"
