"""Errors as ``application/problem+json`` (RFC 9457): type, title, status, detail.

byod's errors are mapped to HTTP statuses here, once. Never a stack trace, never a
secret: an unexpected error answers 500 with a generic detail (and is logged).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from byod.errors import (
    AuthError,
    BrokerError,
    BusyError,
    ByodError,
    ControlPlaneError,
    ForbiddenError,
    InputError,
    KeysUnavailableError,
    NotConnectedError,
    NotFoundError,
    UnavailableError,
    UnknownUserError,
)

__all__ = ["install", "problem"]

log = logging.getLogger("byod.api")
PROBLEM = "application/problem+json"


_STATUS: list[tuple[type[ByodError], int, str]] = [
    (AuthError, 401, "unauthorized"),
    (KeysUnavailableError, 503, "keys-unavailable"),
    (ForbiddenError, 403, "forbidden"),
    (NotFoundError, 404, "not-found"),
    (UnknownUserError, 404, "unknown-user"),
    (NotConnectedError, 404, "not-connected"),
    (BusyError, 409, "busy"),
    (InputError, 400, "bad-input"),
    (ControlPlaneError, 503, "control-plane-unavailable"),
    (BrokerError, 503, "broker-unavailable"),
    (UnavailableError, 503, "unavailable"),
    (ByodError, 500, "failed"),
]


def problem(status: int, kind: str, title: str, detail: str) -> JSONResponse:
    """A problem document."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"type": f"urn:byod:problem:{kind}", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM,
        headers=headers,
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    @app.exception_handler(ByodError)
    async def _byod(_request: Request, exc: ByodError) -> JSONResponse:
        for kind, status, name in _STATUS:
            if isinstance(exc, kind):
                return problem(status, name, kind.__doc__ or name, exc.message)
        return problem(500, "failed", "failed", exc.message)  # pragma: no cover

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, "http", str(exc.detail), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return problem(422, "invalid-request", "the request is not valid", where)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", type(exc).__name__)
        return problem(500, "internal", "internal error", "an unexpected error; see the log")
