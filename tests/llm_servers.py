"""Fake LLM servers on the loopback interface, for tests of the real SDK clients (never mocked).

:class:`FakeOpenAI` speaks ``POST /v1/chat/completions`` (and ``GET /v1/models``), with
``choices[0].logprobs.content`` when the request asks for ``logprobs``; :class:`FakeAnthropic`
speaks ``POST /v1/messages``. Both answer with a ``reply`` callable (request JSON → reply text or
:class:`Reply`), consume injected :class:`Fault` s in order (one per API request), and record every
request (:class:`Recorded`: JSON, arrival time, headers, what was answered) so tests can assert
call counts and backoff delays.

Each server runs a ``ThreadingHTTPServer`` on ``127.0.0.1`` (a free port) in a daemon thread and
is a context manager; it can serve a subprocess (``adag run`` pointed at ``base_url``) as well as
the test's own event loop. HTTP/1.0: one request per connection, so closing never waits on an
idle keep-alive connection, and a hang is cut short when the server closes. For example::

    with FakeOpenAI(lambda req: "hello", [Fault.status(429, retry_after=0.2)]) as server:
        llm = make_llm({"backend": "openai", "base_url": server.base_url, "model": "m"})
        ...  # the first request gets the 429, the retry "hello"
        assert server.gaps()[0] >= 0.2
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_TOKEN = re.compile(r"-?\d+|\t|\n| ?[^\s\d]+|\s")
"""The fake tokenizer: a run of digits (optionally signed), a tab, a newline, a word (with its
leading space), or one other whitespace character. Spells every text exactly."""


def fake_tokens(text: str) -> list[str]:
    """``text`` split into the fake servers' tokens (they join back to ``text``)."""
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == text
    return tokens


@dataclasses.dataclass(frozen=True)
class Reply:
    """A scripted reply: ``text``, and for OpenAI logprobs the distribution of each reply line's
    value token (the token right after a tab), by value line (``None`` entries: that value alone)."""

    text: str
    value_probs: Sequence[Mapping[str, float] | None] | None = None


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, consumed by one API request (build with the class methods)."""

    kind: str
    code: int = 200
    retry_after: float | None = None
    seconds: float = 0.0
    payload: str = ""
    answer: bool = False
    content_type: str = "text/plain"

    @classmethod
    def status(
        cls, code: int, *, retry_after: float | None = None, message: str | None = None
    ) -> Fault:
        """An error response with status ``code`` (and a ``Retry-After`` header in seconds)."""
        return cls("status", code=code, retry_after=retry_after, payload=message or "")

    @classmethod
    def hang(cls, seconds: float, *, answer: bool = False) -> Fault:
        """Wait ``seconds`` (past the client's timeout), then answer normally or (default) close
        the connection without a response."""
        return cls("hang", seconds=seconds, answer=answer)

    @classmethod
    def text(cls, reply: str) -> Fault:
        """A well-formed response whose reply text is ``reply`` (e.g. malformed model output)."""
        return cls("text", payload=reply)

    @classmethod
    def body(cls, raw: str, *, code: int = 200, content_type: str = "text/plain") -> Fault:
        """A raw, non-API response body (e.g. an HTML page from a proxy)."""
        return cls("body", code=code, payload=raw, content_type=content_type)


@dataclasses.dataclass
class Recorded:
    """One request as the server saw it."""

    path: str
    json: Any
    time: float
    """``time.monotonic()`` when the request arrived."""
    headers: dict[str, str]
    fault: Fault | None = None
    status: int | None = None
    """The status answered (None: the connection was dropped)."""
    usage: dict[str, int] | None = None
    """The usage reported in a successful answer."""


ReplyFn = Callable[[dict[str, Any]], "str | Reply"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.fake._get(self)

    def do_POST(self) -> None:
        self.server.fake._post(self)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handlers (hangs end when the server closes)
    block_on_close = True
    fake: _FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a hang: nothing to report


def _constant(text: str) -> ReplyFn:
    def reply(request: dict[str, Any]) -> str:
        return text

    return reply


class _FakeServer:
    api_path = ""

    def __init__(
        self,
        reply: ReplyFn | str | None = None,
        faults: Iterable[Fault] = (),
        *,
        delay: float = 0.0,
        model: str = "fake-model",
    ) -> None:
        self.reply: ReplyFn = _constant(reply or "ok") if not callable(reply) else reply
        self.delay = delay
        self.model = model
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: collections.deque[Fault] = collections.deque(faults)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._n = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> _FakeServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """What the SDK's ``base_url`` should be."""
        return self.url

    # -- scripting -------------------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue more faults (after the ones not yet consumed)."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def api_requests(self) -> list[Recorded]:
        """The recorded API requests (``POST`` to the API path), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0].endswith(self.api_path)]

    def gaps(self) -> list[float]:
        """Seconds between consecutive API requests."""
        times = [r.time for r in self.api_requests()]
        return [b - a for a, b in itertools.pairwise(times)]

    # -- serving ---------------------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        code: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            h.send_response(code)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout)

    def _send_json(
        self,
        h: BaseHTTPRequestHandler,
        code: int,
        obj: Any,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._send(h, code, json.dumps(obj).encode(), headers=headers)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        self._send_json(h, 404, self._error(404, f"no route GET {h.path}"))

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = None
        rec = Recorded(h.path, payload, arrived, {k.lower(): v for k, v in h.headers.items()})
        is_api = h.path.split("?")[0].endswith(self.api_path)
        with self._lock:
            self.requests.append(rec)
            fault = self._faults.popleft() if is_api and self._faults else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._n += 1
            n = self._n
        rec.fault = fault
        try:
            if not is_api:
                rec.status = 404
                self._send_json(h, 404, self._error(404, f"no route POST {h.path}"))
                return
            if not isinstance(payload, dict):
                rec.status = 400
                self._send_json(h, 400, self._error(400, "request body is not a JSON object"))
                return
            self._answer(h, rec, payload, fault, n)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(
        self,
        h: BaseHTTPRequestHandler,
        rec: Recorded,
        payload: dict[str, Any],
        fault: Fault | None,
        n: int,
    ) -> None:
        if fault is not None and fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            rec.status = fault.code
            message = fault.payload or f"injected status {fault.code}"
            self._send_json(h, fault.code, self._error(fault.code, message), headers)
            return
        if fault is not None and fault.kind == "hang":
            self._stop.wait(fault.seconds)
            if not fault.answer or self._stop.is_set():
                h.close_connection = True
                return  # dropped: the connection closes without a response
        if fault is not None and fault.kind == "body":
            rec.status = fault.code
            self._send(h, fault.code, fault.payload.encode(), fault.content_type)
            return
        if self.delay:
            self._stop.wait(self.delay)
        refusal = self._refuse(payload)
        if refusal is not None:
            rec.status = 400
            self._send_json(h, 400, self._error(400, refusal))
            return
        if fault is not None and fault.kind == "text":
            reply: str | Reply = fault.payload
        else:
            try:
                reply = self.reply(payload)
            except Exception as e:  # a broken script is a 500 the test will see
                rec.status = 500
                self._send_json(h, 500, self._error(500, f"reply script failed: {e!r}"))
                return
        if isinstance(reply, str):
            reply = Reply(reply)
        body, usage = self._response(payload, reply, n)
        rec.status, rec.usage = 200, usage
        self._send_json(h, 200, body)

    # -- per API -----------------------------------------------------------------------------------

    def _refuse(self, payload: dict[str, Any]) -> str | None:
        return None

    def _error(self, code: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def _response(
        self, payload: dict[str, Any], reply: Reply, n: int
    ) -> tuple[dict[str, Any], dict[str, int]]:
        raise NotImplementedError


def _prompt_tokens(payload: dict[str, Any]) -> int:
    texts = [str(m.get("content", "")) for m in payload.get("messages", []) if isinstance(m, dict)]
    if isinstance(payload.get("system"), str):
        texts.append(payload["system"])
    return sum(len(fake_tokens(t)) for t in texts)


class FakeOpenAI(_FakeServer):
    """An OpenAI-compatible chat-completions server (``base_url`` ends in ``/v1``).

    ``logprobs=False`` makes it refuse requests that ask for logprobs (HTTP 400 naming them), as
    some servers do."""

    api_path = "/chat/completions"

    def __init__(
        self,
        reply: ReplyFn | str | None = None,
        faults: Iterable[Fault] = (),
        *,
        delay: float = 0.0,
        model: str = "fake-model",
        logprobs: bool = True,
    ) -> None:
        super().__init__(reply, faults, delay=delay, model=model)
        self.logprobs = logprobs

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.split("?")[0] == "/v1/models":
            self._send_json(
                h, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            )
            return
        super()._get(h)

    def _refuse(self, payload: dict[str, Any]) -> str | None:
        if payload.get("logprobs") and not self.logprobs:
            return "logprobs are not supported by this model"
        return None

    def _error(self, code: int, message: str) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(code, "server_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": str(code)}}

    def _response(
        self, payload: dict[str, Any], reply: Reply, n: int
    ) -> tuple[dict[str, Any], dict[str, int]]:
        tokens = fake_tokens(reply.text)
        usage = {"prompt_tokens": _prompt_tokens(payload), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        logprobs = None
        if payload.get("logprobs"):
            logprobs = {
                "content": self._logprobs(tokens, reply, int(payload.get("top_logprobs") or 0))
            }
        body = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(payload.get("model", self.model)),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return body, usage

    @staticmethod
    def _logprobs(tokens: list[str], reply: Reply, top: int) -> list[dict[str, Any]]:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        out = []
        line = 0  # index of the current non-blank line
        blank = True
        for i, token in enumerate(tokens):
            probs = None
            value = i > 0 and tokens[i - 1] == "\t"
            if value and reply.value_probs is not None and line < len(reply.value_probs):
                probs = reply.value_probs[line]
            if probs is None:
                item = entry(token, 0.0)
                item["top_logprobs"] = [entry(token, 0.0)] if top else []
            else:
                own = probs.get(token, 1e-6)
                item = entry(token, math.log(own))
                ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
                item["top_logprobs"] = [entry(t, math.log(p)) for t, p in ranked if p > 0]
            out.append(item)
            if token == "\n":
                line += 0 if blank else 1
                blank = True
            elif token.strip():
                blank = False
        return out


class FakeAnthropic(_FakeServer):
    """An Anthropic Messages API server (``base_url`` is the server's root)."""

    api_path = "/v1/messages"

    def _error(self, code: int, message: str) -> dict[str, Any]:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def _response(
        self, payload: dict[str, Any], reply: Reply, n: int
    ) -> tuple[dict[str, Any], dict[str, int]]:
        usage = {
            "input_tokens": _prompt_tokens(payload),
            "output_tokens": len(fake_tokens(reply.text)),
        }
        body = {
            "id": f"msg_fake_{n}",
            "type": "message",
            "role": "assistant",
            "model": str(payload.get("model", self.model)),
            "content": [{"type": "text", "text": reply.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        return body, usage


__all__ = ["FakeAnthropic", "FakeOpenAI", "Fault", "Recorded", "Reply", "fake_tokens"]


# -- a scripted explainer, simulator, labeller and judge ---------------------------------------

_MARKED = re.compile(r"<<(.+?)>>")


def scripted_reply(request: dict[str, Any]) -> str:
    """A deterministic stand-in for a real LLM behind :mod:`adag.describe`'s prompts (for
    pipeline tests): the explainer names the marked tokens (input side) or the tokens with the
    largest effects (output side), the simulator predicts 10 (or 5) for a token its explanation
    names and 0 otherwise, the labeller takes the explanation's first words, the judge says yes."""
    messages = request.get("messages") or []
    system = request.get("system") or ""
    if isinstance(system, list):  # anthropic content blocks
        system = " ".join(b.get("text", "") for b in system)
    if messages and messages[0].get("role") == "system":
        system = str(messages[0]["content"])
    last = messages[-1]["content"] if messages else ""
    if isinstance(last, list):
        last = " ".join(b.get("text", "") for b in last)
    last = str(last)
    if "grade" in system:
        return "yes"
    if "name groups" in system:
        words = re.findall(r"[A-Za-z0-9]+", last.split(":", 1)[-1])
        return " ".join(words[:2]) or "group"
    if "predict" in system:
        explanation = last.split("\n", 1)[0].removeprefix("Explanation:").strip()
        body = last.split("one per line:\n", 1)[-1].rsplit("\nFor each token", 1)[0]
        value = "10" if "from 0 to 10" in last else "5"
        named = set(explanation.replace(",", " ").split())
        lines = body.split("\n")
        return "".join(f"{t}\t{value if t.strip() in named else '0'}\n" for t in lines)
    if "explain" in system:
        marked = _MARKED.findall(last.rsplit("Excerpts:", 1)[-1])
        if marked:
            return "tokens " + ", ".join(sorted(set(m.strip() for m in marked))[:4])
        promoted = [t.strip() for t in re.findall(r'"([^"]*)" [+]\d+', last)]
        return "promotes " + " ".join(sorted(set(promoted))[:3] or ["nothing"])
    return "ok"
