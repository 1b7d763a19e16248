"""Secrets masked out of text before byod keeps or shows it.

Text that comes back from an instance (a driver's error, a server's message, a deploy's
output) may echo a secret: the tenant's own password, or one of the operator's that
reached the server by mistake. Before such text is stored (``last_error``, the ledger,
a run's records), logged or shown, every secret byod knows is masked:

- the operator's, read from the environment each time (``PGPASSWORD``, ``MYSQL_PWD``,
  ``BYOD_ENCRYPTION_KEY``, ``BYOD_JWT_SECRET``, the Convex keys, the passwords in
  ``BYOD_DATABASE_URL`` and ``BYOD_BROKER_URL``), and those byod learnt as it loaded
  (:func:`remember`: a key file's key, a control-plane URL given as a flag);
- the one instance's own, given by the caller (its password, its deploy key).

A secret of 8 characters or more is masked wherever it stands; a shorter one only where
it stands as a whole token (so a password ``1`` leaves ``127.0.0.1`` alone).
Re-encoded echoes (base64 of a secret, a secret cut in half) are not recognised.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

__all__ = ["MASK", "mask", "operator_secrets", "remember"]

MASK = "***"
#: From this length on a secret is masked wherever it stands.
_ANYWHERE = 8
#: What may stand on either side of a short secret for it to count as one whole token.
_EDGE = r"""\s'"`:@=/,;()\[\]{}<>?&"""
_PLAIN = (
    "PGPASSWORD",
    "MYSQL_PWD",
    "BYOD_ENCRYPTION_KEY",
    "BYOD_JWT_SECRET",
    "BYOD_APP_CONVEX_KEY",
    "BYOD_CONVEX_ADMIN_TOKEN",
)
_URLS = ("BYOD_DATABASE_URL", "BYOD_BROKER_URL")

_remembered: set[str] = set()
_lock = threading.Lock()


def remember(*secrets: str | None) -> None:
    """Mask these from now on, in this process (a key read from a file, a URL's
    password given as a flag)."""
    with _lock:
        _remembered.update(s for s in secrets if s)


def url_password(url: str) -> str | None:
    """The password in a URL's authority, if any (as given, and unquoted)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def operator_secrets() -> tuple[str, ...]:
    """Every operator secret known now: the environment's and the remembered ones."""
    found = [os.environ.get(name) for name in _PLAIN]
    for name in _URLS:
        text = os.environ.get(name)
        if text:
            password = url_password(text)
            found += [password, urlsplit(text).password if password else None]
    with _lock:
        found += sorted(_remembered)
    return tuple(dict.fromkeys(s for s in found if s))


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and every operator secret replaced by ``***``."""
    for secret in sorted({*secrets, *operator_secrets()}, key=len, reverse=True):
        if not secret or secret == MASK:
            continue
        if len(secret) >= _ANYWHERE:
            text = text.replace(secret, MASK)
        else:
            pattern = rf"(?:(?<=[{_EDGE}])|^){re.escape(secret)}(?=$|[{_EDGE}]|\.(?:\s|$))"
            text = re.sub(pattern, MASK, text)
    return text
