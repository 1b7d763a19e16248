"""The HTTP front door, in front of every route: who calls, how much they may send, what
the answer carries, and one access-log line per request.

Order, for each request: ``/v1`` calls are authenticated from the ``Authorization``
header *before any body is read* (401 without reading it; the principal is kept in
``request.state.principal``); a body larger than ``max_body`` is refused with 413, from
its ``Content-Length`` before reading, or as soon as a chunked body passes the limit (a
body within the limit is read here, at most ``max_body`` bytes, and handed on); every
response gets the security headers (``nosniff``, no framing, ``no-referrer``, a CSP,
``no-store``); and the ``byod.api.access`` logger records method, path (never the query
string), status, duration, client and the caller's subject — never a token or cookie.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from byod.api.auth import Authenticator, Principal
from byod.api.cors import CorsPolicy, parse_origins
from byod.api.problems import ProblemKind, problem
from byod.errors import (
    AuthError,
    KeysUnavailableError,
    SettingsError,
)
from byod.text import printable

__all__ = ["DEFAULT_MAX_BODY", "Guard", "HttpSettings", "content_security_policy"]

access_log = logging.getLogger("byod.api.access")
DEFAULT_MAX_BODY = 64 * 1024
_API_PREFIX = "/v1/"
_METRICS = "/metrics"  # authenticated like the API: an operator's token
_DOCS = ("/docs", "/redoc")


@dataclass(frozen=True)
class HttpSettings:
    """How the server treats requests: body limit, trusted proxies."""

    #: Largest request body accepted, in bytes (JSON API bodies and the login form).
    max_body: int = DEFAULT_MAX_BODY
    #: Proxies whose ``X-Forwarded-Proto``/``-For`` are believed (IPs, CIDRs or ``*``);
    #: none by default, so a client cannot claim HTTPS or another address.
    forwarded_allow_ips: tuple[str, ...] = ()
    #: Origins whose browser pages may call ``/v1/`` (``BYOD_CORS_ORIGINS``); none by
    #: default: an app calls byod from its own server or from byod's origin.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_body < 1024:
            raise SettingsError("BYOD_API_MAX_BODY must be at least 1024 (bytes)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpSettings:
        """Read ``BYOD_API_MAX_BODY``, ``BYOD_FORWARDED_ALLOW_IPS`` and
        ``BYOD_CORS_ORIGINS``."""
        env = os.environ if env is None else env
        raw = env.get("BYOD_API_MAX_BODY") or str(DEFAULT_MAX_BODY)
        try:
            max_body = int(raw)
        except ValueError as exc:
            raise SettingsError(
                f"BYOD_API_MAX_BODY must be a number of bytes, not {raw!r}"
            ) from exc
        proxies = tuple(
            part.strip()
            for part in env.get("BYOD_FORWARDED_ALLOW_IPS", "").split(",")
            if part.strip()
        )
        return cls(
            max_body=max_body,
            forwarded_allow_ips=proxies,
            cors_origins=parse_origins(env.get("BYOD_CORS_ORIGINS", "")),
        )


def content_security_policy(style: str) -> str:
    """The dashboard's CSP: nothing but its own inline ``<style>`` (by hash) and forms."""
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


_API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_DOCS_CSP = "frame-ancestors 'none'"  # the interactive docs load their own scripts


class Guard:
    """ASGI middleware: authentication before bodies, body limit, headers, access log."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        settings: HttpSettings,
        dashboard_csp: str,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.settings = settings
        self.dashboard_csp = dashboard_csp
        self.cors = CorsPolicy(settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        state: dict[str, object] = scope.setdefault("state", {})
        outcome = {"status": 500}
        csp = self._csp(path)
        api = path.startswith(_API_PREFIX)
        origin = _header(scope, b"origin") if api else None  # CORS: the API only
        readable_by = [(k.encode(), v.encode()) for k, v in self.cors.answer_headers(origin)]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in (
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", csp.encode()),
                    *readable_by,
                ):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        try:
            requested = None
            if api and self.cors.origins and scope["method"] == "OPTIONS":
                requested = _header(scope, b"access-control-request-method")
            if requested is not None:  # a browser's preflight: answered before any token
                asked = _header(scope, b"access-control-request-headers")
                refused = self.cors.refusal(origin, requested, asked)
                if refused is not None:
                    readable_by.clear()  # a refused preflight lets the page read nothing
                answer = _preflight_answer(self.cors, origin, refused)
                await answer(scope, receive, send_with_headers)
                return
            refusal = await self._admit(scope, state)
            if refusal is not None:
                await _send_problem(scope, receive, send_with_headers, refusal)
                return
            body = await self._read_body(scope, receive)
            if isinstance(body, tuple):
                await _send_problem(scope, receive, send_with_headers, body)
                return
            if body is None:
                outcome["status"] = 499  # the client went away before its body was read
                return
            await self.app(scope, _replay(body, receive), send_with_headers)
        finally:
            principal = state.get("principal")
            client = scope.get("client")
            access_log.info(
                "%s %s %s %.1fms client=%s sub=%s",
                printable(str(scope["method"])),
                printable(path),  # a request's path and a token's subject come from outside
                outcome["status"],
                (time.perf_counter() - started) * 1000,
                client[0] if client else "-",
                printable(principal.clerk_id) if isinstance(principal, Principal) else "-",
            )

    def _csp(self, path: str) -> str:
        if path == "/dashboard" or path.startswith("/dashboard/"):
            return self.dashboard_csp
        if path in _DOCS or path.startswith("/docs/"):
            return _DOCS_CSP
        return _API_CSP

    async def _admit(self, scope: Scope, state: dict[str, object]) -> _Problem | None:
        """Authenticate an API call from its header alone (no body has been read)."""
        path = scope["path"]
        if not path.startswith(_API_PREFIX) and path != _METRICS:
            return None
        authorization = _header(scope, b"authorization")
        try:
            state["principal"] = await run_in_threadpool(
                self.authenticator.authenticate, authorization
            )
        except AuthError as exc:
            return 401, "unauthorized", exc.message
        except KeysUnavailableError as exc:
            return 503, "keys-unavailable", exc.message
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | _Problem | None:
        """The whole body, at most ``max_body`` bytes; a 413 problem beyond that."""
        limit = self.settings.max_body
        too_large: _Problem = (413, "too-large", f"request bodies are limited to {limit} bytes")
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return 400, "bad-request", "Content-Length is not a number"
            if int(declared) > limit:
                return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_Problem = tuple[int, ProblemKind, str]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then waits on the client."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _preflight_answer(cors: CorsPolicy, origin: str | None, refused: str | None) -> Response:
    if refused is not None:
        return problem(403, "origin-not-allowed", refused, {"vary": "Origin"})
    return Response(status_code=204, headers=dict(cors.preflight_headers(origin)))


async def _send_problem(scope: Scope, receive: Receive, send: Send, refusal: _Problem) -> None:
    response = problem(*refusal)
    response.headers["Connection"] = "close"  # the body was not read: this connection is done
    await response(scope, receive, send)
