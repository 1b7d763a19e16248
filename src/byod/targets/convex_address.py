"""A Convex deployment's address as a user gives it, checked and made canonical before
any request is sent (the instance policy then checks where it points)."""

from __future__ import annotations

import ipaddress
import re
from typing import NoReturn
from urllib.parse import SplitResult, urlsplit

from byod.errors import SettingsError
from byod.text import has_control

__all__ = ["deployment_base"]

_CLOUD = ".convex.cloud"
_SITE = ".convex.site"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")


def _refuse(problem: str) -> NoReturn:
    raise SettingsError(f"the Convex deployment URL {problem}")


def deployment_base(url: str) -> str:
    """The base URL byod posts ``/api/...`` under, from a Convex deployment URL as a user
    gives it, or a :class:`SettingsError` saying what is wrong with it.

    Accepted: ``https://NAME.convex.cloud`` (Convex's cloud, where functions are served;
    ``.convex.site`` serves HTTP actions and is refused), and ``convex+https://HOST[:PORT]
    [/PATH]`` or ``convex+http://HOST[:PORT][/PATH]`` for a self-hosted or local backend,
    whose path prefix is kept. ``convex+http`` sends the deploy key unencrypted: meant for
    a backend on the same machine or network. Never accepted: a user or password in the
    URL (the deploy key is a separate secret), a query or fragment, spaces or control
    characters. The result is lower-cased in scheme and host, without a default port or
    a trailing slash, so equal deployments give equal bases.
    """
    if not url:
        _refuse("is empty")
    if has_control(url) or any(char.isspace() for char in url):
        _refuse("holds spaces or control characters")
    if not url.isascii():
        _refuse("holds non-ASCII characters (write an international host in its xn-- form)")
    if "?" in url or "#" in url:
        _refuse("must not have a query (?...) or fragment (#...)")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in ("https", "convex+https", "convex+http"):
        _refuse(
            "must be https://NAME.convex.cloud, or convex+https://HOST[:PORT][/PATH] "
            "(convex+http:// on a local network) for a self-hosted deployment"
        )
    cloud = scheme == "https"
    real = scheme.removeprefix("convex+")
    try:
        parts = urlsplit(f"{real}://{rest}")
    except ValueError:
        _refuse("has a malformed IPv6 address")
    if "@" in parts.netloc:
        _refuse("must not hold a user or password: the deploy key is given separately")
    host = _host(parts)
    port = _port(parts)
    path = parts.path.rstrip("/")
    if not _PATH.fullmatch(path) or any(seg in (".", "..") for seg in path.split("/")):
        _refuse("has a path with characters or segments a base URL cannot have")
    if cloud:
        if host.endswith(_SITE):
            _refuse(f"ends with {_SITE}, which serves HTTP actions: functions are on {_CLOUD}")
        if not host.endswith(_CLOUD) or host == _CLOUD[1:]:
            _refuse(
                f"is not NAME{_CLOUD}: for a self-hosted deployment write "
                "convex+https://HOST[:PORT][/PATH]"
            )
        if path or port is not None:
            _refuse(f"of a {_CLOUD} deployment has no port or path")
    netloc = host if port is None else f"{host}:{port}"
    return f"{real}://{netloc}{path}"


def _host(parts: SplitResult) -> str:
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _refuse("has a malformed IPv6 address")
        return f"[{host}]"
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        _refuse("has no valid host name")
    return host


def _port(parts: SplitResult) -> int | None:
    try:
        port = parts.port
    except ValueError:
        _refuse("has a malformed port")
    if port == 0:
        _refuse("has port 0")
    default = {"https": 443, "http": 80}[parts.scheme]
    return None if port in (None, default) else port
