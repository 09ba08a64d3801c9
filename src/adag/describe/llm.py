"""LLM clients for the explainer, the simulator and the judge: one small async protocol (:class:`LLM`)
over three backends, with an on-disk cache, retries and a usage counter.

- ``complete(messages)``: chat messages in, text out.
- ``score_lines(messages, lines, candidates)``: *sequence scoring* for the simulator of Bills et al.
  (2023, "Language models can explain neurons in language models", the all-at-once method): the
  reply is one line per input line, ``f"{line}\\t{value}"`` with ``value`` one of ``candidates``
  (e.g. ``"0"``..``"10"``), and each line gets a distribution over the candidates (or a one-hot
  dict for a parsed value, or None where no value could be read).

Backends (:class:`LLMConfig` ``backend``):

- ``local``: any :func:`adag.load_model` model. Scoring is exact and teacher-forced: the messages
  through the chat template, then the assistant turn ``"".join(f"{line}\\t{PLACEHOLDER}\\n")``, all
  in ONE forward pass. The distribution at a slot is read from the logits right after its tab. A
  candidate of several tokens (``"10"`` is ``"1"``, ``"0"`` for SmolLM2) is scored by the product
  of its token probabilities, each conditioned on the ones before; a candidate that is a token
  prefix of a longer one (``"1"`` of ``"10"``) keeps only the mass that does not continue into it,
  ``P("1") · (1 − P("0" | "1"))``; then the candidates are renormalised. The continuation
  probabilities come from the same forward: the candidates' prefixes are appended once per slot
  as a token tree whose attention mask lets each appended token see the sequence before its slot
  and its own ancestors (positions as if it stood at the slot), which equals a separate forward
  per prefix. ``complete`` samples with a KV cache (temperature 0 = greedy; otherwise a
  ``torch.Generator`` seeded from the request hash plus the sample index, so it is reproducible).
- ``openai``: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp) via
  the ``openai`` SDK and ``base_url``. Scoring asks ``logprobs=True, top_logprobs=20``; a reply
  line whose value is a single token gets the distribution over the candidates found among that
  token's ``top_logprobs`` (renormalised); a value of several tokens, or no logprobs, gives the
  parsed integer (one-hot). A server that refuses logprobs is asked again without them (when
  ``logprobs`` is None) and not asked for them again.
- ``anthropic``: the Messages API via the ``anthropic`` SDK (no logprobs: parsed integers). The
  temperature travels in the request body (anthropic>=1 dropped the keyword) and is left out from
  then on if the model refuses it.

Reply lines are matched to the input lines by order: blank lines are skipped, and when any line
has a tab, lines without one (a preamble) too; the value is what follows the last tab (or a
trailing integer). Missing or unreadable values are None, never an exception.

The SDKs are the optional extra ``adag[llm]`` and are imported only when a backend needs one.
They are built with ``max_retries=0``: the retries here are the only ones — exponential backoff
with jitter on 408, 429, 5xx, timeouts, connection errors and unreadable 2xx bodies, a
``Retry-After`` header used as the delay; any other 4xx fails at once (:class:`LLMError`). API
keys are read from the environment when a client is built and never stored in a config, the cache
or a log message.

Answers are cached on disk (:mod:`adag.describe.cache`) under the hash of the full request, the
sample index included, so a rerun makes no calls; identical requests in flight at once are sent
once. An LLM belongs to the event loop that uses it: ``await llm.aclose()`` before that loop ends
(e.g. at the end of the coroutine given to ``asyncio.run``) releases its connections; the client
reconnects if it is used again, from any loop.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import email.utils
import inspect
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adag.describe.cache import Cache, request_key
from adag.errors import AdagError

if TYPE_CHECKING:
    from adag.models.model import Model

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]
"""Chat messages: ``{"role": "system" | "user" | "assistant", "content": str}``."""

Distribution = dict[str, float]

PLACEHOLDER = "unknown"
"""The value written in every slot of the local backend's teacher-forced reply (the all-at-once
simulator of Bills et al. 2023 writes "unknown" too); the distributions are read before it."""

TOP_LOGPROBS = 20
"""How many alternatives per token an OpenAI-compatible server is asked for (the API's maximum)."""

ROLES = ("system", "user", "assistant")
_T = TypeVar("_T")


class LLMError(AdagError):
    """An LLM call that failed for good: retries exhausted, or a request the server refused (4xx).
    One line naming the backend and the reason."""


class LLMConfig(BaseModel):
    """Which LLM answers, and how it is called. Every field has a default that runs offline
    (the local SmolLM2). The API key is never a field: it is read from ``api_key_env``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    backend: Literal["local", "openai", "anthropic"] = "local"
    """``local`` (an adag model), ``openai`` (any OpenAI-compatible server) or ``anthropic``."""
    model: str = "smollm2-135m"
    """local: an ``adag.load_model`` name or path; otherwise the API's model id."""
    base_url: str | None = None
    """The server's URL (OpenAI-compatible: up to ``/v1``); None = the SDK's default."""
    api_key_env: str | None = None
    """The environment variable holding the key (default ``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY``)."""
    concurrency: int = Field(default=4, ge=1)
    """Calls in flight at once."""
    timeout: float = Field(default=60.0, gt=0)
    """Seconds one attempt may take."""
    max_retries: int = Field(default=5, ge=0)
    """Further attempts after a 429, a 5xx, a timeout or a connection error."""
    backoff: float = Field(default=1.0, ge=0)
    """Base delay: retry ``n`` (from 0) waits ``min(backoff_max, backoff * 2**n)`` times a jitter in 0.5..1."""
    backoff_max: float = Field(default=30.0, ge=0)
    """The longest wait between attempts (a ``Retry-After`` header is capped by it too)."""
    temperature: float = Field(default=1.0, ge=0)
    """For sampled answers (explanations after the first; the simulator's retries)."""
    max_tokens: int = Field(default=256, ge=1)
    """Default length limit of a reply."""
    logprobs: bool | None = None
    """openai: ask for ``top_logprobs`` (None = ask, and stop asking if the server refuses)."""
    price_input: float = Field(default=0.0, ge=0)
    """USD per million input tokens (for the cost counter)."""
    price_output: float = Field(default=0.0, ge=0)
    """USD per million output tokens."""

    def identity(self) -> dict[str, str]:
        """What decides the answers — backend and model; not the URL, the key, or the
        concurrency, timeout and retry settings. Part of every cache key."""
        return {"backend": self.backend, "model": self.model}


@dataclasses.dataclass
class Usage:
    """What a client has done. ``calls`` counts the requests sent to the backend (each once,
    however many attempts it took: an HTTP server sees ``calls + retries`` requests);
    ``retries`` the extra attempts; ``failures`` the calls that raised :class:`LLMError`;
    ``cache_hits`` the requests answered from the cache (or by an identical request in flight).
    Tokens as the backend reports them; ``cost_usd`` from the config's prices."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


@runtime_checkable
class LLM(Protocol):
    """The client protocol (see the module docstring)."""

    name: str
    """``"local:smollm2-135m"``, ``"openai:gpt-4o-mini"``, ``"anthropic:claude-..."``."""
    config: LLMConfig
    usage: Usage
    distributions: bool
    """True when ``score_lines`` can return real distributions (not only one-hot ones)."""

    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        sample: int = 0,
    ) -> str: ...

    async def score_lines(
        self,
        messages: Messages,
        lines: Sequence[str],
        candidates: Sequence[str],
        *,
        sample: int = 0,
    ) -> list[Distribution | None]: ...

    async def aclose(self) -> None: ...


def make_llm(
    config: LLMConfig | Mapping[str, Any] | None = None,
    *,
    cache_dir: Path | str | None = None,
    model: Model | None = None,
) -> LLM:
    """An :class:`LLM` for ``config``.

    Parameters
    ----------
    config
        An :class:`LLMConfig`, a mapping of its fields, or None for the defaults (local SmolLM2).
    cache_dir
        The answer cache's directory (``RUN_DIR/llm-cache``); None = no cache.
    model
        local backend: an already loaded adag ``Model`` to use (else ``load_model(config.model)``
        on the first call that needs it).
    """
    cfg = _as_config(config)
    if cfg.backend == "openai":
        return _OpenAIClient(cfg, cache_dir)
    if cfg.backend == "anthropic":
        return _AnthropicClient(cfg, cache_dir)
    return _LocalClient(cfg, cache_dir, model)


def _as_config(config: LLMConfig | Mapping[str, Any] | None) -> LLMConfig:
    if config is None:
        return LLMConfig()
    if isinstance(config, LLMConfig):
        return config
    if not isinstance(config, Mapping):
        raise AdagError(
            f"LLM config must be an LLMConfig or a mapping, got {type(config).__name__}"
        )
    try:
        return LLMConfig.model_validate(dict(config))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        msg = str(first.get("msg", "invalid"))
        if first.get("type") == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        raise AdagError(f"LLM config: {where}: {msg}") from None


# ----------------------------------------------------------------------------------------------
# Checking and parsing


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_messages(messages: Messages) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise AdagError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise AdagError(f"a message must be a mapping with role and content, got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise AdagError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise AdagError(f"message content must be text, got {type(content).__name__}")
        out.append({"role": str(role), "content": content})
    return out


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    cands = [candidates] if isinstance(candidates, str) else list(candidates)
    if not cands or not all(isinstance(c, str) and c.strip() == c and c for c in cands):
        raise AdagError(
            f"candidates must be non-empty strings without surrounding spaces, got {candidates!r}"
        )
    if len(set(cands)) != len(cands):
        raise AdagError(f"candidates must be distinct, got {cands!r}")
    return cands


def _check_sample(sample: int) -> int:
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise AdagError(f"sample must be an integer >= 0, got {sample!r}")
    return sample


def _check_temperature(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise AdagError(f"temperature must be a finite number >= 0, got {t!r}")
    return float(t)


def _check_max_tokens(n: int | None, default: int) -> int:
    if n is None:
        return default
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdagError(f"max_tokens must be an integer >= 1, got {n!r}")
    return n


_INT_TAIL = re.compile(r"[+-]?\d+(?=\s*$)")


def _value_span(line: str) -> tuple[int, str]:
    """Where a reply line's value starts and its raw text: after the last tab (leading spaces
    skipped), or a trailing integer when the line has no tab."""
    if "\t" in line:
        start = line.rindex("\t") + 1
        while start < len(line) and line[start].isspace():
            start += 1
        return start, line[start:].strip()
    m = _INT_TAIL.search(line)
    return (m.start(), m.group()) if m else (len(line), "")


def _normalise(raw: str, candidates: Sequence[str]) -> str | None:
    """The candidate a raw value names: itself, or the same integer written plainly (``+3``, ``03``)."""
    if raw in candidates:
        return raw
    try:
        plain = str(int(raw))
    except ValueError:
        return None
    return plain if plain in candidates else None


def reply_lines(text: str) -> list[tuple[int, str]]:
    """The reply's value lines with their offsets in ``text``: non-blank lines, and only those
    with a tab when any line has one (a preamble such as "Here are my predictions:" is dropped)."""
    out = []
    offset = 0
    for line in text.split("\n"):
        if line.strip():
            out.append((offset, line.rstrip("\r")))
        offset += len(line) + 1
    if any("\t" in line for _, line in out):
        out = [(o, line) for o, line in out if "\t" in line]
    return out


def parse_scores(text: str, n_lines: int, candidates: Sequence[str]) -> list[Distribution | None]:
    """One-hot dicts for the values parsed from a reply, matched to the input lines by order;
    None where a line's value is not a candidate or the reply has too few lines."""
    out: list[Distribution | None] = [None] * n_lines
    for i, (_, line) in enumerate(reply_lines(text)[:n_lines]):
        value = _normalise(_value_span(line)[1], candidates)
        if value is not None:
            out[i] = {c: float(c == value) for c in candidates}
    return out


TokenLogprobs = Sequence[tuple[str, float, Sequence[tuple[str, float]]]]
"""``(token, logprob, [(alternative, logprob), ...])`` for each token of a reply."""


def logprob_scores(
    text: str, tokens: TokenLogprobs, n_lines: int, candidates: Sequence[str]
) -> list[Distribution | None]:
    """Distributions from an OpenAI-style reply with per-token ``top_logprobs``.

    For each reply line (matched to the input lines by order) the token where its value starts
    is found by walking the tokens' text offsets; when that token is the whole value (stripped),
    the candidates among its alternatives (stripped; ``"5"`` and ``" 5"`` add up) give the
    distribution, renormalised. Otherwise (a value of several tokens, no candidate among the
    alternatives, tokens that do not spell the reply) the parsed value, one-hot, or None."""
    out = parse_scores(text, n_lines, candidates)
    starts: list[int] = []
    pos = 0
    for tok, _, _ in tokens:
        starts.append(pos)
        pos += len(tok)
    if "".join(t for t, _, _ in tokens) != text:
        return out
    for i, (offset, line) in enumerate(reply_lines(text)[:n_lines]):
        start, raw = _value_span(line)
        if not raw:
            continue
        k = bisect.bisect_right(starts, offset + start) - 1
        if k < 0 or tokens[k][0].strip() != raw:
            continue
        tok, lp, alternatives = tokens[k]
        seen = dict(alternatives)
        seen.setdefault(tok, lp)
        mass: dict[str, float] = {}
        for alt, alt_lp in seen.items():
            key = alt.strip()
            if key in candidates and math.isfinite(alt_lp):
                mass[key] = mass.get(key, 0.0) + math.exp(alt_lp)
        total = sum(mass.values())
        if total > 0:
            out[i] = {c: mass.get(c, 0.0) / total for c in candidates}
    return out


# ----------------------------------------------------------------------------------------------
# The shared client: cache, in-flight deduplication, usage


@dataclasses.dataclass
class _Answer:
    value: str
    """What is cached: the text, or the JSON of the distributions."""
    input_tokens: int = 0
    output_tokens: int = 0


@dataclasses.dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    semaphore: asyncio.Semaphore
    inflight: dict[str, asyncio.Future[str]]
    client: Any = None


class _Client:
    backend: str = ""

    def __init__(self, config: LLMConfig, cache_dir: Path | str | None) -> None:
        self.config = config
        self.usage = Usage()
        self.distributions = False
        self._identity = config.identity()
        self.name = f"{config.backend}:{config.model}"
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        self._cache: Cache | None = None
        self._state: _LoopState | None = None

    def __repr__(self) -> str:
        return f"<LLM {self.name}>"

    @property
    def identity(self) -> dict[str, str]:
        """What decides this client's answers (part of every cache key)."""
        return dict(self._identity)

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            if self._state is not None:
                log.debug("%s: used from a new event loop; reconnecting", self.name)
            self._state = _LoopState(loop, asyncio.Semaphore(self.config.concurrency), {})
        return self._state

    def _open_cache(self) -> Cache | None:
        if self._cache is None and self._cache_dir is not None:
            self._cache = Cache(self._cache_dir)
        return self._cache

    async def _answer(
        self, request: dict[str, Any], compute: Callable[[], Awaitable[_Answer]]
    ) -> str:
        """The answer to ``request``: from the cache, from an identical request in flight, or
        computed (then counted and cached)."""
        key = request_key({"identity": self._identity, **request})
        state = self._loop_state()
        pending = state.inflight.get(key)
        if pending is not None:
            value = await asyncio.shield(pending)
            self.usage.cache_hits += 1
            return value
        fut: asyncio.Future[str] = state.loop.create_future()
        state.inflight[key] = fut
        try:
            cache = self._open_cache()
            hit = None if cache is None else await asyncio.to_thread(cache.get, key)
            if hit is not None:
                self.usage.cache_hits += 1
                fut.set_result(hit)
                return hit
            self.usage.calls += 1
            answer = await compute()
            self.usage.input_tokens += answer.input_tokens
            self.usage.output_tokens += answer.output_tokens
            self.usage.cost_usd += (
                answer.input_tokens * self.config.price_input
                + answer.output_tokens * self.config.price_output
            ) / 1e6
            if cache is not None:
                await asyncio.to_thread(cache.put, key, answer.value, kind=request["kind"])
            fut.set_result(answer.value)
            return answer.value
        except BaseException as e:
            if isinstance(e, LLMError):
                self.usage.failures += 1
            if not fut.done():
                if isinstance(e, Exception):
                    fut.set_exception(e)
                    fut.exception()  # retrieved: no "never retrieved" log when nobody waits
                else:
                    fut.cancel()
            raise
        finally:
            if state.inflight.get(key) is fut:
                del state.inflight[key]

    async def complete(
        self,
        messages: Messages,
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        sample: int = 0,
    ) -> str:
        """The reply to ``messages`` (temperature 0 = greedy; ``sample`` tells apart answers to
        the same request, e.g. several explanations at temperature 1)."""
        msgs = _check_messages(messages)
        t = _check_temperature(temperature)
        n = _check_max_tokens(max_tokens, self.config.max_tokens)
        s = _check_sample(sample)
        request = {
            "kind": "complete",
            "messages": msgs,
            "temperature": t,
            "max_tokens": n,
            "sample": s,
        }
        return await self._answer(request, lambda: self._complete(msgs, t, n, s, request))

    async def score_lines(
        self,
        messages: Messages,
        lines: Sequence[str],
        candidates: Sequence[str],
        *,
        sample: int = 0,
    ) -> list[Distribution | None]:
        """Per line, a distribution over ``candidates`` (sums to 1), a one-hot dict for a parsed
        value, or None where no value could be read. Never raises for a malformed reply; raises
        :class:`LLMError` for a call that failed for good."""
        msgs = _check_messages(messages)
        if isinstance(lines, str) or not all(isinstance(x, str) for x in lines):
            raise AdagError("lines must be a list of strings")
        lines = list(lines)
        cands = _check_candidates(candidates)
        s = _check_sample(sample)
        if not lines:
            return []
        t, n = self._score_settings(lines, s)
        request = {
            "kind": "score_lines",
            "messages": msgs,
            "lines": lines,
            "candidates": cands,
            "temperature": t,
            "max_tokens": n,
            "sample": s,
            "logprobs": self.config.logprobs,
        }
        value = await self._answer(request, lambda: self._score(msgs, lines, cands, t, n))
        return [
            None if d is None else {str(k): float(v) for k, v in d.items()}
            for d in json.loads(value)
        ]

    def _score_settings(self, lines: list[str], sample: int) -> tuple[float, int | None]:
        """Temperature and max_tokens of a scoring request: greedy first, sampled on retries;
        room for every line of the reply."""
        t = 0.0 if sample == 0 else self.config.temperature
        return t, max(self.config.max_tokens, sum(len(x) + 8 for x in lines))

    async def aclose(self) -> None:
        """Release this event loop's connections and the cache (the client reopens them if used
        again)."""
        state, self._state = self._state, None
        if state is not None and state.client is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is state.loop:
                await state.client.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # backend hooks
    async def _complete(
        self, msgs: list[dict[str, str]], t: float, n: int, sample: int, request: dict[str, Any]
    ) -> _Answer:
        raise NotImplementedError

    async def _score(
        self,
        msgs: list[dict[str, str]],
        lines: list[str],
        cands: list[str],
        t: float,
        n: int | None,
    ) -> _Answer:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# HTTP backends: retries with backoff


@dataclasses.dataclass
class _Failure:
    retryable: bool
    reason: str
    retry_after: float | None = None


class _Malformed(Exception):
    """A 2xx response that is not the API's JSON."""


def _retry_after(headers: Any) -> float | None:
    """A ``retry-after-ms`` or ``Retry-After`` header (seconds or an HTTP date) in seconds."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(getattr(e, "message", None) or e)


def _import_sdk(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise AdagError(
            f"the {name} backend needs the {name} package: pip install 'adag[llm]'"
        ) from None


class _HTTPClient(_Client):
    sdk_name = ""
    default_key_env = ""

    def __init__(self, config: LLMConfig, cache_dir: Path | str | None) -> None:
        super().__init__(config, cache_dir)
        self._sdk = _import_sdk(self.sdk_name)
        self._api_key()  # a missing key fails now, not at the first call
        self._random = random.Random()

    def _api_key(self) -> str:
        """The key from the environment (read each time a client is built; kept nowhere else)."""
        env = self.config.api_key_env or self.default_key_env
        key = os.environ.get(env)
        if key:
            return key
        if self.config.api_key_env:
            raise AdagError(f"api_key_env names {env}, which is not set; export the API key in it")
        if self.config.base_url:
            return "none"  # a local server (vLLM, Ollama, llama.cpp) takes any key
        raise AdagError(
            f"the {self.backend} backend needs an API key: set {env} "
            "(or name another variable in api_key_env)"
        )

    def _make_client(self) -> Any:
        raise NotImplementedError

    def _classify(self, e: Exception) -> _Failure | None:
        sdk = self._sdk
        if isinstance(e, (asyncio.TimeoutError, sdk.APITimeoutError)):
            return _Failure(True, f"no answer within {self.config.timeout:g} s")
        if isinstance(e, sdk.APIConnectionError):
            return _Failure(True, f"connection error ({_one_line(str(e), 120)})")
        if isinstance(e, sdk.APIStatusError):
            code = int(e.status_code)
            retryable = code in (408, 429) or code >= 500
            reason = f"HTTP {code}: {_one_line(_error_message(e), 200)}"
            return _Failure(retryable, reason, _retry_after(getattr(e.response, "headers", None)))
        if isinstance(e, (sdk.APIResponseValidationError, _Malformed, json.JSONDecodeError)):
            return _Failure(True, f"malformed response ({_one_line(str(e), 120)})")
        return None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(cfg.backoff_max, retry_after)
        return min(cfg.backoff_max, cfg.backoff * 2**attempt) * self._random.uniform(0.5, 1.0)

    def _loop_state(self) -> _LoopState:
        state = super()._loop_state()
        if state.client is None:
            state.client = self._make_client()
        return state

    async def _retrying(self, attempt: Callable[[Any], Awaitable[_T]]) -> _T:
        """``attempt(sdk_client)`` under the concurrency limit and the timeout, retried on
        transient failures with backoff (slept outside the limit)."""
        cfg = self.config
        for n in range(cfg.max_retries + 1):
            state = self._loop_state()
            try:
                async with state.semaphore:
                    return await asyncio.wait_for(attempt(state.client), cfg.timeout)
            except Exception as e:
                failure = self._classify(e)
                if failure is None:
                    raise
            if not failure.retryable:
                raise LLMError(_one_line(f"{self.name} call failed: {failure.reason}"))
            if n == cfg.max_retries:
                raise LLMError(
                    _one_line(
                        f"{self.name} call failed after {n + 1} attempt(s): {failure.reason}; "
                        "check the server or raise max_retries / timeout"
                    )
                )
            delay = self._delay(n, failure.retry_after)
            self.usage.retries += 1
            log.info("%s: %s; retrying in %.2f s", self.name, failure.reason, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class _OpenAIClient(_HTTPClient):
    backend = "openai"
    sdk_name = "openai"
    default_key_env = "OPENAI_API_KEY"

    def __init__(self, config: LLMConfig, cache_dir: Path | str | None) -> None:
        super().__init__(config, cache_dir)
        self._use_logprobs = config.logprobs is not False
        self._max_tokens_param = "max_tokens"
        self.distributions = self._use_logprobs

    def _make_client(self) -> Any:
        return self._sdk.AsyncOpenAI(
            api_key=self._api_key(),
            base_url=self.config.base_url,
            max_retries=0,
            timeout=self.config.timeout,
        )

    async def _chat(
        self, client: Any, msgs: list[dict[str, str]], t: float, n: int, logprobs: bool
    ) -> Any:
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": msgs,
            "temperature": t,
            self._max_tokens_param: n,
        }
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        try:
            resp = await client.chat.completions.create(**kwargs)
        except self._sdk.APIStatusError as e:
            text = _error_message(e).lower()
            if e.status_code not in (400, 422):
                raise
            if "max_completion_tokens" in text and self._max_tokens_param == "max_tokens":
                # newer OpenAI models refuse max_tokens
                self._max_tokens_param = "max_completion_tokens"
                return await self._chat(client, msgs, t, n, logprobs)
            if logprobs and "logprob" in text and self.config.logprobs is None:
                log.info("%s refuses logprobs; scoring by parsed values", self.name)
                self._use_logprobs = False
                self.distributions = False
                self.usage.retries += 1
                return await self._chat(client, msgs, t, n, False)
            raise
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise _Malformed(f"no choices in {_one_line(repr(resp), 80)}")
        return resp

    @staticmethod
    def _tokens(resp: Any) -> tuple[int, int]:
        usage = getattr(resp, "usage", None)
        return (
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def _complete(
        self, msgs: list[dict[str, str]], t: float, n: int, sample: int, request: dict[str, Any]
    ) -> _Answer:
        resp = await self._retrying(lambda c: self._chat(c, msgs, t, n, False))
        text = getattr(getattr(resp.choices[0], "message", None), "content", None) or ""
        return _Answer(str(text), *self._tokens(resp))

    async def _score(
        self,
        msgs: list[dict[str, str]],
        lines: list[str],
        cands: list[str],
        t: float,
        n: int | None,
    ) -> _Answer:
        assert n is not None
        resp = await self._retrying(lambda c: self._chat(c, msgs, t, n, self._use_logprobs))
        choice = resp.choices[0]
        text = str(getattr(getattr(choice, "message", None), "content", None) or "")
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if content:
            tokens = [
                (
                    str(x.token),
                    float(x.logprob),
                    [(str(a.token), float(a.logprob)) for a in (x.top_logprobs or [])],
                )
                for x in content
            ]
            scores = logprob_scores(text, tokens, len(lines), cands)
        else:
            scores = parse_scores(text, len(lines), cands)
        return _Answer(json.dumps(scores), *self._tokens(resp))


class _AnthropicClient(_HTTPClient):
    backend = "anthropic"
    sdk_name = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"

    def __init__(self, config: LLMConfig, cache_dir: Path | str | None) -> None:
        super().__init__(config, cache_dir)
        self._send_temperature = True

    def _make_client(self) -> Any:
        return self._sdk.AsyncAnthropic(
            api_key=self._api_key(),
            base_url=self.config.base_url,
            max_retries=0,
            timeout=self.config.timeout,
        )

    async def _message(self, client: Any, msgs: list[dict[str, str]], t: float, n: int) -> Any:
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        turns: list[dict[str, str]] = []
        for m in msgs:  # the Messages API wants alternating turns: merge neighbours
            if m["role"] == "system":
                continue
            if turns and turns[-1]["role"] == m["role"]:
                turns[-1] = {
                    "role": m["role"],
                    "content": turns[-1]["content"] + "\n\n" + m["content"],
                }
            else:
                turns.append(dict(m))
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": turns, "max_tokens": n}
        if system:
            kwargs["system"] = system
        if self._send_temperature:
            # anthropic>=1 dropped the keyword; the API still takes the field (most models)
            kwargs["extra_body"] = {"temperature": t}
        try:
            resp = await client.messages.create(**kwargs)
        except self._sdk.APIStatusError as e:
            if not (
                self._send_temperature
                and e.status_code == 400
                and "temperature" in _error_message(e).lower()
            ):
                raise
            log.info("%s refuses a temperature; sending none", self.name)
            self._send_temperature = False
            self.usage.retries += 1
            return await self._message(client, msgs, t, n)
        if not isinstance(getattr(resp, "content", None), list):
            raise _Malformed(f"no content in {_one_line(repr(resp), 80)}")
        return resp

    @staticmethod
    def _text(resp: Any) -> str:
        return "".join(
            str(getattr(b, "text", "")) for b in resp.content if getattr(b, "type", "") == "text"
        )

    @staticmethod
    def _tokens(resp: Any) -> tuple[int, int]:
        usage = getattr(resp, "usage", None)
        return (
            int(getattr(usage, "input_tokens", 0) or 0),
            int(getattr(usage, "output_tokens", 0) or 0),
        )

    async def _complete(
        self, msgs: list[dict[str, str]], t: float, n: int, sample: int, request: dict[str, Any]
    ) -> _Answer:
        resp = await self._retrying(lambda c: self._message(c, msgs, t, n))
        return _Answer(self._text(resp), *self._tokens(resp))

    async def _score(
        self,
        msgs: list[dict[str, str]],
        lines: list[str],
        cands: list[str],
        t: float,
        n: int | None,
    ) -> _Answer:
        assert n is not None
        resp = await self._retrying(lambda c: self._message(c, msgs, t, n))
        scores = parse_scores(self._text(resp), len(lines), cands)
        return _Answer(json.dumps(scores), *self._tokens(resp))


# ----------------------------------------------------------------------------------------------
# The local backend


class _LocalClient(_Client):
    """An adag model in this process; its work runs in a worker thread, one call at a time."""

    backend = "local"

    def __init__(
        self, config: LLMConfig, cache_dir: Path | str | None, model: Model | None
    ) -> None:
        super().__init__(config, cache_dir)
        self._model = model
        if model is not None:
            self._identity = {"backend": "local", "model": model.name}
            self.name = f"local:{model.name}"
        self.distributions = True
        self._lock = threading.Lock()

    def _get_model(self) -> Model:
        if self._model is None:
            from adag.models import load

            self._model = load.load_model(self.config.model)
        return self._model

    async def _in_worker(self, fn: Callable[[Model], _T]) -> _T:
        def run() -> _T:
            with self._lock:
                return fn(self._get_model())

        return await asyncio.to_thread(run)

    def _score_settings(self, lines: list[str], sample: int) -> tuple[float, int | None]:
        return 0.0, None  # exact: no sampling, no reply length

    async def _complete(
        self, msgs: list[dict[str, str]], t: float, n: int, sample: int, request: dict[str, Any]
    ) -> _Answer:
        seed = (int(request_key({**request, "sample": None}), 16) + sample) % 2**63
        text, n_in, n_out = await self._in_worker(
            lambda m: generate_local(m, msgs, temperature=t, max_tokens=n, seed=seed)
        )
        return _Answer(text, n_in, n_out)

    async def _score(
        self,
        msgs: list[dict[str, str]],
        lines: list[str],
        cands: list[str],
        t: float,
        n: int | None,
    ) -> _Answer:
        scores, n_in = await self._in_worker(lambda m: score_local(m, msgs, lines, cands))
        return _Answer(json.dumps(scores), n_in, 0)


def chat_ids(model: Model, messages: Messages) -> tuple[list[int], bool]:
    """The token ids of ``messages`` with the assistant turn opened, and whether they were
    joined plainly (``"System: ...\\n\\nUser: ...\\n\\nAssistant:"``) because the tokenizer has
    no chat template."""
    tok = model.tok()
    msgs = [dict(m) for m in messages]
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tok(str(text), add_special_tokens=False)["input_ids"]), False
    text = "".join(f"{m['role'].title()}: {m['content']}\n\n" for m in msgs) + "Assistant:"
    return list(tok(text, add_special_tokens=True)["input_ids"]), True


def _encode(model: Model, text: str) -> list[int]:
    return list(model.tok()(text, add_special_tokens=False)["input_ids"])


def _eos_ids(model: Model) -> set[int]:
    out: set[int] = set()
    for c in (
        getattr(model.tokenizer, "eos_token_id", None),
        getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(c, int):
            out.add(c)
        elif isinstance(c, (list, tuple)):
            out.update(int(x) for x in c)
    return out


def _cache_kwarg(hf: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever it takes."""
    params = inspect.signature(hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_local(
    model: Model,
    messages: Messages,
    *,
    temperature: float = 0.0,
    max_tokens: int = 256,
    seed: int = 0,
) -> tuple[str, int, int]:
    """The model's reply to ``messages`` (chat template, or joined plainly without one): greedy
    at temperature 0, else sampled from ``softmax(logits / temperature)`` (float64) with a
    generator seeded by ``seed``; a KV cache, stopping at EOS, ``max_tokens`` or a full context.
    Returns the text and the numbers of prompt and generated tokens."""
    import torch
    from transformers import DynamicCache

    ids, _ = chat_ids(model, messages)
    if model.n_ctx is not None and len(ids) >= model.n_ctx:
        raise LLMError(
            f"local:{model.name}: the prompt is {len(ids)} tokens, as long as the model's "
            f"context of {model.n_ctx}; shorten it"
        )
    eos = _eos_ids(model)
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.hf.config)
    kw = _cache_kwarg(model.hf)
    new: list[int] = []
    step = ids
    with torch.inference_mode():
        for _ in range(max_tokens):
            if model.n_ctx is not None and len(ids) + len(new) >= model.n_ctx:
                break
            x = torch.tensor([step], device=model.device)
            out = model.hf(input_ids=x, use_cache=True, logits_to_keep=1, **{kw: cache})
            logits = out.logits[0, -1].double().cpu()  # (V,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = (logits / temperature).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt in eos:
                break
            new.append(nxt)
            step = [nxt]
    text = model.tok().decode(new, skip_special_tokens=True)
    return str(text), len(ids), len(new)


def _sliding_window(model: Model) -> int | None:
    """The window of the model's sliding-window layers, or None when every layer is full."""
    config = model.hf.config
    types = getattr(config, "layer_types", None) or []
    if "sliding_attention" not in types:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def score_local(
    model: Model, messages: Messages, lines: Sequence[str], candidates: Sequence[str]
) -> tuple[list[Distribution | None], int]:
    """Exact teacher-forced candidate distributions for each line (see the module docstring),
    in one forward pass; returns them and the number of tokens run.

    The sequence is the chat prompt, then per line the tokens of ``line + "\\t"``, of
    :data:`PLACEHOLDER` and of ``"\\n"`` (each piece tokenized on its own, so every slot starts
    at a token boundary), then the token tree: for each slot and each proper token prefix ``u``
    of a candidate that a longer candidate continues, one token (``u``'s last) at position
    ``slot + len(u) - 1`` that attends to the sequence before the slot and to ``u``'s earlier
    tokens of the same slot."""
    import torch

    tok_ids, plain = chat_ids(model, messages)
    ids = tok_ids + (_encode(model, "\n") if plain else [])
    cand_ids = [tuple(_encode(model, c)) for c in candidates]
    for c, t in zip(candidates, cand_ids, strict=True):
        if not t:
            raise AdagError(f"candidate {c!r} is empty after tokenization")
    if len(set(cand_ids)) != len(cand_ids):
        raise AdagError(f"candidates {list(candidates)!r} tokenize to the same tokens")
    children: dict[tuple[int, ...], set[int]] = {}
    for t in cand_ids:
        for j in range(len(t)):
            children.setdefault(t[:j], set()).add(t[j])
    internal = sorted((u for u in children if u), key=lambda u: (len(u), u))  # parents first
    placeholder, newline = _encode(model, PLACEHOLDER), _encode(model, "\n")
    slots = []
    for line in lines:
        ids += _encode(model, line + "\t")
        slots.append(len(ids))
        ids += placeholder + newline
    n_main = len(ids)
    depth = max(len(t) for t in cand_ids)
    if model.n_ctx is not None and n_main + depth - 1 > model.n_ctx:
        raise LLMError(
            f"local:{model.name}: the scoring prompt is {n_main} tokens, longer than the model's "
            f"context of {model.n_ctx}; score fewer or shorter lines"
        )
    positions = list(range(n_main))
    row: dict[tuple[int, tuple[int, ...]], int] = {}  # (slot index, prefix) -> sequence index
    parents: list[tuple[int, list[int]]] = []  # per tree token: its slot, its ancestors' rows
    for i, s in enumerate(slots):
        for u in internal:
            row[i, u] = len(ids)
            parents.append((s, [row[i, u[:k]] for k in range(1, len(u))]))
            ids.append(u[-1])
            positions.append(s + len(u) - 1)
    n = len(ids)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[n_main:, :n_main] = False
    allowed[n_main:, n_main:] = torch.eye(n - n_main, dtype=torch.bool)
    for r, (s, anc) in enumerate(parents, start=n_main):
        allowed[r, :s] = True
        allowed[r, anc] = True
    pos = torch.tensor(positions)
    keep = [s - 1 for s in slots] + list(range(n_main, n))
    out_row = {r: k for k, r in enumerate(keep)}

    def additive(ok: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(1, 1, n, n, dtype=model.dtype, device=model.device)
        return m.masked_fill(~ok.to(model.device), torch.finfo(model.dtype).min)

    mask: Any = additive(allowed)
    window = _sliding_window(model)
    if window is not None:
        near = (pos[:, None] - pos[None, :]) < window
        mask = {"full_attention": mask, "sliding_attention": additive(allowed & near)}
    with torch.inference_mode():
        out = model.hf(
            input_ids=torch.tensor([ids], device=model.device),
            attention_mask=mask,
            position_ids=pos[None].to(model.device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, device=model.device),
        )
    logp = out.logits[0].double().log_softmax(-1).cpu()  # (len(keep), V)
    results: list[Distribution | None] = []
    for i, s in enumerate(slots):

        def at(u: tuple[int, ...], i: int = i, s: int = s) -> torch.Tensor:
            return logp[out_row[s - 1 if not u else row[i, u]]]

        probs = []
        for t in cand_ids:
            p = math.exp(sum(float(at(t[:j])[t[j]]) for j in range(len(t))))
            if t in children:  # a longer candidate continues this one: keep what stops here
                go_on = sum(math.exp(float(at(t)[x])) for x in children[t])
                p *= max(0.0, 1.0 - go_on)
            probs.append(p)
        total = sum(probs)
        if total > 0 and math.isfinite(total):
            results.append({c: p / total for c, p in zip(candidates, probs, strict=True)})
        else:
            results.append(None)
    return results, n


__all__ = [
    "LLM",
    "PLACEHOLDER",
    "LLMConfig",
    "LLMError",
    "Messages",
    "Usage",
    "make_llm",
]
