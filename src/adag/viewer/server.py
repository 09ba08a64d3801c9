"""``adag serve RUN_DIR``: a local web server for a run directory's attribution graphs, standard
library only (:class:`http.server.ThreadingHTTPServer`). It serves the viewer's static files, the
run's files read-only, a small JSON API over the run (:mod:`adag.viewer.data` has the JSON
layouts), and one write: a graph's ``qParams`` (pins, supernodes, labels, layout).

Routes (GET and HEAD; POST only where said; any other method or a POST elsewhere: 405):

- ``/`` (and ``/index.html``) → ``static/index.html``; ``/graph.html`` → ``static/graph.html``
  (any query string, e.g. ``/graph.html?slug=...``, is left to the page).
- ``/static/<name>`` → a plain file directly in the package folder ``adag/viewer/static/`` (no
  subfolders).
- ``/run/<relpath>`` → a file of the run directory, e.g. ``/run/viewer/<slug>.json``,
  ``/run/report.html``, ``/run/summary.json``; read-only.
- ``/api/run``, ``/api/clusters``, ``/api/unit?kind=neuron&layer=3&index=17[&limit=20]`` → JSON.
- ``POST /api/graphs/<slug>/qparams``, body a JSON object of qParams keys
  (``Content-Type: application/json``) → ``{"ok": true, "qParams": {...}}``, the graph file's
  qParams as saved.

Responses: JSON ones have ``Content-Type: application/json; charset=utf-8`` and
``Cache-Control: no-store``; API errors are JSON ``{"error": "one line"}`` (400 bad parameters or
edits, 403 refused, 404, 405, 411, 413, 415, 500), file-route errors plain text. Files get their
type by extension (``.html``, ``.js``, ``.css``, ``.json``, ``.png``, ``.svg`` and a few text
types with ``charset=utf-8``; anything else ``application/octet-stream``). Every response has
``X-Content-Type-Options: nosniff``. Requests are not logged (``logging`` at DEBUG level,
``ADAG_LOG=DEBUG``, shows them).

Safety rules:

- Binds 127.0.0.1 unless told otherwise; :func:`serve` warns on stderr for a non-loopback
  address (anyone who can reach the machine can read the run, and save edits unless
  ``--read-only``).
- Paths: the request path is percent-decoded exactly once, then split on ``/``. A segment that is
  empty (``//``), ``.`` or ``..``, or holds ``\\`` or NUL, is refused (403), so are paths that
  resolve (symlinks followed) outside the run directory or the static folder (403). Hidden
  segments (``.name``: temp files ``.x.json.1a2b3c4d.tmp``, ``.git``), missing files and
  directories are 404 (no listings). ``%252e%252e`` decodes once to the literal segment
  ``%2e%2e``, which does not exist: 404.
- ``/run/`` files are sent with ``Content-Security-Policy: sandbox``: an HTML or SVG file of the
  run (``report.html`` has no script anyway) renders, but runs no script with this server's
  origin.
- DNS rebinding: a server bound to a loopback address answers only requests whose ``Host``
  header is ``localhost`` or an IP address (403 otherwise).
- Writes: refused with 403 under ``--read-only``; refused with 403 when the request has an
  ``Origin`` header whose host:port is not the ``Host`` the request was sent to (another site's
  page cannot save; a cross-site ``fetch`` with a JSON body needs a CORS preflight, which is
  answered 405, so this is the second lock); the body must have a ``Content-Length`` (411) of at
  most 1 MiB (413, checked before reading) and ``Content-Type: application/json`` (415); an
  unknown key, a wrong type or a node id the graph lacks is 400 and nothing is written. The file
  is rewritten whole, atomically, under a per-file lock (:meth:`adag.viewer.data.RunData.save_qparams`).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import shutil
import socket
import socketserver
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from adag.errors import AdagError
from adag.io import shown
from adag.viewer.data import DataError, RunData, safe_file, unit_query

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8046
MAX_BODY = 1 << 20
"""Largest request body a save accepts (1 MiB)."""
STATIC_DIR = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/index.html": "index.html", "/graph.html": "graph.html"}

_TEXT = "charset=utf-8"
CONTENT_TYPES = {
    ".html": f"text/html; {_TEXT}",
    ".js": f"text/javascript; {_TEXT}",
    ".mjs": f"text/javascript; {_TEXT}",
    ".css": f"text/css; {_TEXT}",
    ".json": f"application/json; {_TEXT}",
    ".png": "image/png",
    ".svg": f"image/svg+xml; {_TEXT}",
    ".ico": "image/x-icon",
    ".txt": f"text/plain; {_TEXT}",
    ".md": f"text/plain; {_TEXT}",
    ".csv": f"text/plain; {_TEXT}",
    ".jsonl": f"text/plain; {_TEXT}",
    ".yaml": f"text/plain; {_TEXT}",
    ".yml": f"text/plain; {_TEXT}",
}
_JSON = f"application/json; {_TEXT}"
_PLAIN = f"text/plain; {_TEXT}"


def content_type(path: Path) -> str:
    """The ``Content-Type`` a file is served with, by its extension."""
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _json_bytes(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN in a hand-edited file
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def _host_port(netloc: str, default_port: int) -> tuple[str, int] | None:
    """``(hostname, port)`` of a ``Host`` header or an origin's netloc, or None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    return parts.hostname.lower(), default_port if port is None else port


def origin_allowed(origin: str, host_header: str | None, server_address: tuple[str, int]) -> bool:
    """Whether a write with this ``Origin`` header may go ahead: an ``http`` origin whose host
    and port are those the request was sent to (its ``Host`` header, else the server's own
    address). ``null`` and other schemes are refused."""
    parts = urlsplit(origin)
    if parts.scheme != "http" or parts.path not in ("", "/") or parts.query:
        return False
    got = _host_port(parts.netloc, 80)
    if host_header:
        want = _host_port(host_header, 80)
    else:
        want = (server_address[0].lower(), server_address[1])
    return got is not None and got == want


def host_allowed(host_header: str | None) -> bool:
    """Whether a loopback server answers a request with this ``Host`` header: none, ``localhost``
    or an IP address. Any other name could be a DNS-rebinding page that resolved its own name to
    127.0.0.1 to read the run."""
    if not host_header:
        return True
    hp = _host_port(host_header, 80)
    if hp is None:
        return False
    name = hp[0].strip("[]")
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def url_of(server: ThreadingHTTPServer) -> str:
    """The URL to open for a server: its address, 127.0.0.1 (or [::1]) when it listens on all
    addresses."""
    host, port = server.server_address[:2]
    host = str(host)
    if _is_wildcard(host):
        host = "::1" if ":" in host else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def exposure_warning(host: str, port: int, *, read_only: bool) -> str | None:
    """The warning :func:`serve` prints when ``host`` is not a loopback address, else None."""
    if _is_loopback(host):
        return None
    edits = (
        "(edits are off: --read-only)" if read_only else "and edit its graphs unless --read-only"
    )
    shown_host = f"[{host}]" if ":" in host else host
    return (
        f"warning: serving on {shown_host}:{port}, not a loopback address: anyone who can reach "
        f"this machine can read the run, {edits}"
    )


class _Server(ThreadingHTTPServer):
    """The viewer's server: the run, the static folder and the settings for its handlers."""

    daemon_threads = True  # Ctrl-C does not wait for open connections
    allow_reuse_port = False  # SO_REUSEPORT would let a second server share a busy port
    request_queue_size = 64  # a page opens several connections at once; 5 made them wait 1 s

    def __init__(
        self, address: tuple[str, int], data: RunData, *, read_only: bool, family: int
    ) -> None:
        self.address_family = family
        self.data = data
        self.read_only = read_only
        self.static_dir = STATIC_DIR
        super().__init__(address, _Handler)
        self.loopback = _is_loopback(str(self.server_address[0]))

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a bad resolver
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def _resolve_family(host: str, port: int) -> int:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise AdagError(
            f"cannot listen on {host}: not an address of this machine ({e}); pass --host 127.0.0.1"
        ) from None
    return int(infos[0][0])


def make_server(
    run_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
) -> ThreadingHTTPServer:
    """A viewer server for ``run_dir``, bound and listening but not yet serving (call
    ``serve_forever``; ``shutdown`` and ``server_close`` to stop). ``port`` 0 picks a free port
    (``server.server_address`` says which). Raises :class:`AdagError` when ``run_dir`` is no
    directory or has no viewer graphs, and when the address cannot be bound (a port in use
    names host:port and the fix)."""
    root = Path(run_dir)
    if not root.exists():
        raise AdagError(
            f"run directory {shown(root)} does not exist; give a directory made by "
            "`adag run` or `adag trace`"
        )
    if not root.is_dir():
        raise AdagError(f"{shown(root)} is not a directory; give a run directory")
    data = RunData(root)
    if not data.graph_files():
        raise AdagError(
            f"run directory {shown(root)} has no viewer graphs; run `adag trace` or `adag run` "
            "first"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AdagError(f"--port must be between 0 and 65535, got {port!r}")
    if not host:
        raise AdagError("--host is empty; give an address, e.g. --host 127.0.0.1")
    family = _resolve_family(host, port)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return _Server((host, port), data, read_only=read_only, family=family)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise AdagError(
                f"cannot listen on {where}: the port is in use; pass --port with another port, "
                "or --port 0 for a free one"
            ) from None
        if e.errno == errno.EACCES:
            raise AdagError(
                f"cannot listen on {where}: permission denied; pass --port with a port above "
                "1023, or --port 0 for a free one"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise AdagError(
                f"cannot listen on {where}: {host} is not an address of this machine; "
                "pass --host 127.0.0.1"
            ) from None
        raise AdagError(f"cannot listen on {where} ({e.strerror or e})") from None


def serve(
    run_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    quiet: bool = False,
) -> None:
    """Serve ``run_dir`` until Ctrl-C: :func:`make_server`, then the URL on stdout (unless
    ``quiet``) and, for a non-loopback ``host``, a warning on stderr (always). Ctrl-C stops it
    cleanly."""
    server = make_server(run_dir, host=host, port=port, read_only=read_only)
    try:
        bound = str(server.server_address[0])
        warning = exposure_warning(bound, int(server.server_address[1]), read_only=read_only)
        if warning:
            sys.stderr.write(warning + "\n")
            sys.stderr.flush()
        if not quiet:
            mode = " (read-only)" if read_only else ""
            sys.stdout.write(
                f"serving {shown(Path(run_dir))}{mode} at {url_of(server)}  (Ctrl-C to stop)\n"
            )
            sys.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            if not quiet:
                sys.stdout.write("stopped\n")
    finally:
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "adag-viewer"
    sys_version = ""
    timeout = 60  # a client that stops sending frees its thread
    # HTTP/1.0: one request per connection, so Ctrl-C and shutdown never wait on idle keep-alives

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def _srv(self) -> _Server:
        return cast(_Server, self.server)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, _json_bytes(obj), _JSON, {"Cache-Control": "no-store", **(headers or {})}
        )

    def _error(self, status: int, message: str, *, api: bool, **headers: str) -> None:
        if api:
            self._json(status, {"error": message}, headers)
        else:
            body = f"{status} {message}\n".encode()
            self._send(status, body, _PLAIN, {"Cache-Control": "no-store", **headers})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the base class's errors (a malformed request line, a header too long): plain text
        self.close_connection = True
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        self._send(code, f"{code} {message or short}\n".encode(), _PLAIN)

    def _file(self, path: Path, headers: dict[str, str]) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below; open errors answered first)
        except PermissionError:
            raise DataError(403, "the file is not readable") from None
        except OSError:
            raise DataError(404, "not found") from None
        with f:
            size = f.seek(0, 2)
            f.seek(0)
            self.send_response(200)
            self.send_header("Content-Type", content_type(path))
            self.send_header("Content-Length", str(size))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(f, self.wfile)

    def _split(self) -> tuple[str, str] | None:
        """The once-decoded path and the raw query, or None (answered 400)."""
        raw, _, query = self.path.partition("?")
        raw = raw.partition("#")[0]
        if not raw.startswith("/"):
            self._error(400, "the request path must start with /", api=False)
            return None
        try:
            return unquote(raw, errors="strict"), query
        except UnicodeDecodeError:
            self._error(400, "the request path is not UTF-8 after percent-decoding", api=False)
            return None

    def _host_ok(self, api: bool) -> bool:
        if self._srv.loopback and not host_allowed(self.headers.get("Host")):
            self._error(
                403,
                f"Host {self.headers.get('Host')!r} is not this server; open it by its IP "
                "address or localhost",
                api=api,
            )
            return False
        return True

    # -- methods -------------------------------------------------------------------------------

    def do_GET(self) -> None:
        split = self._split()
        if split is None:
            return
        path, query = split
        api = path.startswith("/api/")
        if not self._host_ok(api):
            return
        try:
            self._get(path, query, api)
        except DataError as e:
            self._error(e.status, str(e), api=api)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # one request must not take the server down
            logger.exception("viewer request %s failed", self.path)
            self._error(500, f"internal error ({type(e).__name__}: {e})", api=api)

    do_HEAD = do_GET

    def _get(self, path: str, query: str, api: bool) -> None:
        srv = self._srv
        if path in PAGES:
            self._static(PAGES[path])
        elif path.startswith("/static/"):
            self._static_path(path[len("/static/") :])
        elif path.startswith("/run/"):
            segments = path[len("/run/") :].split("/")
            if segments[-1] == "":  # a directory: no listings (403 still for a way out)
                safe_file(srv.data.root, segments[:-1])
                raise DataError(404, "not found")
            found = safe_file(srv.data.root, segments)
            self._file(found, {"Cache-Control": "no-store", "Content-Security-Policy": "sandbox"})
        elif path == "/api/run":
            self._json(200, srv.data.run_info(read_only=srv.read_only))
        elif path == "/api/clusters":
            self._json(200, srv.data.clusters())
        elif path == "/api/unit":
            params = dict(parse_qsl(query, keep_blank_values=True))
            kind, layer, index, limit = unit_query(params)
            self._json(200, srv.data.unit(kind, layer, index, limit))
        elif _qparams_slug(path) is not None:
            self._error(405, "save qParams with POST", api=True, Allow="POST")
        elif api:
            self._error(404, f"no API route {path}", api=True)
        else:
            self._error(404, "not found", api=False)

    def _static(self, name: str) -> None:
        self._file(safe_file(self._srv.static_dir.resolve(), [name]), {"Cache-Control": "no-cache"})

    def _static_path(self, rest: str) -> None:
        segments = rest.split("/")
        if segments[-1] == "":  # a directory: no listings (403 still for a way out)
            safe_file(self._srv.static_dir.resolve(), segments[:-1])
            raise DataError(404, "not found")
        if len(segments) != 1:
            safe_file(self._srv.static_dir.resolve(), segments)  # 403 for .., // and the like
            raise DataError(404, "not found")  # a subfolder: only plain files of the folder
        self._static(segments[0])

    def do_POST(self) -> None:
        split = self._split()
        if split is None:
            return
        path, _ = split
        api = path.startswith("/api/")
        if not self._host_ok(api):
            return
        slug = _qparams_slug(path)
        if slug is None:
            self._error(
                405, "only POST /api/graphs/<slug>/qparams writes", api=api, Allow="GET, HEAD"
            )
            return
        try:
            self._save(slug)
        except DataError as e:
            self._error(e.status, str(e), api=True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            logger.exception("viewer request %s failed", self.path)
            self._error(500, f"internal error ({type(e).__name__}: {e})", api=True)

    def _save(self, slug: str) -> None:
        srv = self._srv
        self.close_connection = True
        # the length is checked before anything is read; the body (at most 1 MiB) is read before
        # any other refusal, so the client is not cut off mid-send and always gets the answer
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            raise DataError(411, "send the body with a Content-Length header (no chunked bodies)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise DataError(400, "the Content-Length header is not a number") from None
        if length < 0:
            raise DataError(400, "the Content-Length header is negative")
        if length > MAX_BODY:
            raise DataError(
                413, f"the body has {length:,} bytes; at most {MAX_BODY:,} are accepted"
            )
        body = self.rfile.read(length)
        if len(body) < length:
            raise DataError(400, "the body is shorter than its Content-Length")
        origin = self.headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin,
            self.headers.get("Host"),
            (str(srv.server_address[0]), int(srv.server_address[1])),
        ):
            raise DataError(403, f"cross-site save from origin {origin!r} refused")
        if srv.read_only:
            raise DataError(
                403, "this server runs with --read-only; restart adag serve without it to save"
            )
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise DataError(
                415, f"the body must be Content-Type application/json, got {ctype or 'none'!r}"
            )
        try:
            edits = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(400, f"the body is not valid JSON ({e})") from None
        saved = srv.data.save_qparams(slug, edits)
        self._json(200, {"ok": True, "qParams": saved})

    def _not_allowed(self) -> None:
        split = self._split()
        api = split is not None and split[0].startswith("/api/")
        if split is not None:
            self._error(405, f"method {self.command} is not allowed", api=api, Allow="GET, HEAD")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed


def _qparams_slug(path: str) -> str | None:
    """The slug of ``/api/graphs/<slug>/qparams`` (checked later, by the save), else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "api", "graphs"] and parts[4] == "qparams":
        return parts[3]
    return None


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_BODY",
    "STATIC_DIR",
    "content_type",
    "exposure_warning",
    "host_allowed",
    "make_server",
    "origin_allowed",
    "serve",
    "url_of",
]
