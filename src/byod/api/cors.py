"""Cross-origin calls to the API from the browser pages of an app on another origin
(``BYOD_CORS_ORIGINS``), applied by the Guard: it answers a preflight itself (before any
token is asked for, with the usual headers and access-log line; a refusal is a problem
document) and marks the answers of ``/v1/`` calls (errors too) readable by those pages.
Calls carry a bearer token, never a cookie, so credentials are never allowed."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from byod.errors import SettingsError

__all__ = ["CorsPolicy", "parse_origins"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_METHODS = ("GET", "POST")
_HEADERS = ("authorization", "content-type")


def _origin(value: str) -> str:
    """``value`` as a browser writes an origin (lower case, no default port, no slash);
    SettingsError when it is not one."""
    refused = SettingsError(
        f"BYOD_CORS_ORIGINS: {value!r} is not an origin "
        "(scheme://host[:port], e.g. https://app.example.com, or * alone)"
    )
    parts = urlsplit(value.rstrip("/"))
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or "*" in value
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
        or " " in value
    ):
        raise refused
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise refused from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown_port = "" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}"
    return f"{parts.scheme}://{host.lower()}{shown_port}"


def parse_origins(raw: str) -> tuple[str, ...]:
    """``BYOD_CORS_ORIGINS``: comma-separated origins, or ``*`` alone; SettingsError for
    anything else, so a typo stops ``byod serve`` instead of blocking every browser."""
    values = [part.strip() for part in raw.split(",") if part.strip()]
    if "*" in values:
        if len(values) > 1:
            raise SettingsError("BYOD_CORS_ORIGINS: * allows every origin: give it alone")
        return ("*",)
    return tuple(dict.fromkeys(_origin(value) for value in values))


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins' pages may call ``/v1/`` (none: no cross-origin call at all)."""

    origins: tuple[str, ...] = ()

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    def refusal(
        self, origin: str | None, requested_method: str, requested_headers: str | None
    ) -> str | None:
        """Why a preflight of this call is refused (None: it is allowed)."""
        if not self.allows(origin):
            return f"origin {origin!r} may not call this API"
        if requested_method.strip().upper() not in _METHODS:
            return f"method {requested_method!r} is not allowed"
        asked = {h.strip().lower() for h in (requested_headers or "").split(",") if h.strip()}
        if not asked <= set(_HEADERS):
            return f"headers {sorted(asked - set(_HEADERS))} are not allowed"
        return None

    def preflight_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """An allowed preflight's answer headers."""
        return [
            *self.answer_headers(origin),
            ("access-control-allow-methods", ", ".join(_METHODS)),
            ("access-control-allow-headers", ", ".join(_HEADERS)),
            ("access-control-max-age", "600"),
        ]

    def answer_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """What makes an answer readable by a page of ``origin`` (nothing if not allowed)."""
        if not self.allows(origin):
            return []
        assert origin is not None
        allowed = "*" if "*" in self.origins else origin
        return [("access-control-allow-origin", allowed), ("vary", "Origin")]
