"""Errors as ``application/problem+json`` (RFC 9457): type, title, status, detail.

byod's errors are mapped to HTTP statuses here, once. Never a stack trace, never a
secret: an unexpected error answers 500 with a generic detail (and is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal, get_args

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
from byod.redact import mask

__all__ = ["PROBLEM_TYPES", "TITLES", "ProblemKind", "install", "problem"]

log = logging.getLogger("byod.api")
PROBLEM = "application/problem+json"

#: Every kind of problem byod answers; a document's ``type`` is ``urn:byod:problem:KIND``.
ProblemKind = Literal[
    "unauthorized",
    "keys-unavailable",
    "forbidden",
    "not-found",
    "unknown-user",
    "not-connected",
    "busy",
    "bad-input",
    "bad-request",
    "too-large",
    "invalid-request",
    "method-not-allowed",
    "origin-not-allowed",
    "control-plane-unavailable",
    "broker-unavailable",
    "unavailable",
    "failed",
    "internal",
]
#: each kind's title: short, the same for every document of that kind (``detail`` says
#: what happened this time)
TITLES: dict[ProblemKind, str] = {
    "unauthorized": "no valid token",
    "keys-unavailable": "the keys that check tokens are unavailable",
    "forbidden": "operators only",
    "not-found": "not found",
    "unknown-user": "no such user",
    "not-connected": "no database connected",
    "busy": "a run is already under way",
    "bad-input": "bad input",
    "bad-request": "bad request",
    "too-large": "the request body is too large",
    "invalid-request": "the request is not valid",
    "method-not-allowed": "method not allowed",
    "origin-not-allowed": "this page's origin may not call the API",
    "control-plane-unavailable": "the control plane is unavailable",
    "broker-unavailable": "the task-queue broker is unavailable",
    "unavailable": "this server is not set up for that",
    "failed": "the operation failed",
    "internal": "internal error",
}
_URN = "urn:byod:problem:"
#: the ``type`` values of problem documents (what the OpenAPI document enumerates)
PROBLEM_TYPES: tuple[str, ...] = tuple(_URN + kind for kind in get_args(ProblemKind))


_STATUS: list[tuple[type[ByodError], int, ProblemKind]] = [
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


def http_status(error: type[ByodError]) -> tuple[int, ProblemKind]:
    """The status and problem kind the HTTP API answers an error of this class with."""
    for kind, status, name in _STATUS:
        if issubclass(error, kind):
            return status, name
    return 500, "failed"


def problem(
    status: int,
    kind: ProblemKind,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A problem document (with ``headers``, e.g. a 405's ``Allow``); secrets byod
    knows are masked out of ``detail``."""
    detail = mask(detail)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"type": _URN + kind, "title": TITLES[kind], "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM,
        headers=headers,
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""

    @app.exception_handler(ByodError)
    async def _byod(_request: Request, exc: ByodError) -> JSONResponse:
        status, name = http_status(type(exc))
        return problem(status, name, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds: dict[int, ProblemKind] = {404: "not-found", 405: "method-not-allowed"}
        kind = kinds.get(exc.status_code, "bad-request")
        return problem(exc.status_code, kind, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return problem(422, "invalid-request", where)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", type(exc).__name__)
        return problem(500, "internal", "an unexpected error; see the log")
