"""Cross-origin calls to the API from the browser pages of an app on another origin
(``BYOD_CORS_ORIGINS``): Starlette's CORS handling, on ``/v1/`` only, never the
dashboard. Calls carry a bearer token, never a cookie, so credentials are not allowed."""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from byod.errors import SettingsError

__all__ = ["ApiCors", "parse_origins"]

_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def parse_origins(raw: str) -> tuple[str, ...]:
    """``BYOD_CORS_ORIGINS``: comma-separated origins (``https://app.example.com``,
    scheme and host and an optional port, nothing after) or ``*``; ``SettingsError`` for
    anything else, so a typo stops ``byod serve`` instead of blocking every browser."""
    origins = tuple(part.strip().rstrip("/") for part in raw.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise SettingsError(
                f"BYOD_CORS_ORIGINS: {origin!r} is not an origin "
                "(scheme://host[:port], e.g. https://app.example.com, or *)"
            )
    return origins


class ApiCors:
    """Answers the browser's preflight for ``/v1/`` calls from ``origins`` before any
    token is asked for, and marks their answers (errors too) readable by those pages."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
