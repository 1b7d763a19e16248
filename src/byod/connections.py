"""A user's instance credentials: sealing them on connect, unsealing them to reach it.

Plain credentials live only in memory, only as long as a run needs them. :class:`Secrets`
knows every secret of one config, so messages can be scrubbed of them before they reach
a log, the ledger or the operator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy.engine import URL

from byod.controlplane import Config, Directory
from byod.crypto import Sealer
from byod.errors import ByodError, SettingsError
from byod.settings import normalize_url, safe_url
from byod.targets import open_target
from byod.targets.sql import SqlTarget

__all__ = ["Credentials", "ReachResult", "connect_user", "open_instance", "unseal_config"]

SUPPORTED_KINDS = ("sqlite", "postgresql", "mysql", "mariadb")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Credentials:
    """Unsealed credentials of one instance."""

    url: URL = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False, default=())

    @property
    def where(self) -> str:
        """The URL with its password hidden."""
        return safe_url(self.url)

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this instance replaced by ``***``."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def _credentials(url_text: str, secret: str | None) -> Credentials:
    url = normalize_url(url_text)
    if secret:
        url = url.set(password=secret)
    secrets = tuple(s for s in (url.password, secret, url_text) if isinstance(s, str) and s)
    # the raw URL text is a secret only when it carries a password
    if not url.password:
        secrets = tuple(s for s in secrets if s != url_text)
    return Credentials(url, secrets)


def unseal_config(config: Config, sealer: Sealer) -> Credentials:
    """Open a config's sealed URL (and secret). Raises ``CredentialsError``."""
    url_text = sealer.unseal(
        config.sealed_url, user_id=config.user_id, field_name="url", key_id=config.key_id
    )
    secret = None
    if config.sealed_secret:
        secret = sealer.unseal(
            config.sealed_secret, user_id=config.user_id, field_name="secret", key_id=config.key_id
        )
    return _credentials(url_text, secret)


def open_instance(credentials: Credentials, *, timeout: float) -> SqlTarget:
    """Connect to the instance; ``UnreachableError`` messages are scrubbed of secrets."""
    try:
        return open_target(credentials.url, timeout=timeout)
    except ByodError as exc:
        exc.message = credentials.scrub(exc.message)
        raise


@dataclass(frozen=True)
class ReachResult:
    """Outcome of checking a freshly connected instance."""

    status: str
    schema_version: int
    error: str | None = None


def connect_user(
    directory: Directory,
    sealer: Sealer,
    user_id: int,
    url: str,
    *,
    secret: str | None = None,
    timeout: float = 10.0,
    queue: str | None = None,
) -> ReachResult:
    """Seal and store a user's instance credentials, then check the instance answers.

    The config is stored even when the instance is unreachable (status ``error``); the
    schema version recorded is what the instance's own stamp says. ``queue``: the task
    queue whose workers can reach the instance (distributed runs; default queue if None).
    """
    if queue is not None and not _QUEUE_NAME.fullmatch(queue):
        raise SettingsError(f"bad queue name {queue!r}: use 1-64 letters, digits, '.', '_' or '-'")
    credentials = _credentials(url, secret)
    kind = credentials.url.get_backend_name()
    if kind not in SUPPORTED_KINDS:
        raise SettingsError(
            f"instances of kind {kind!r} are not supported (use {', '.join(SUPPORTED_KINDS)})"
        )
    directory.save_config(
        user_id,
        target_kind=kind,
        sealed_url=sealer.seal(url, user_id=user_id, field_name="url"),
        sealed_secret=sealer.seal(secret, user_id=user_id, field_name="secret") if secret else None,
        key_id=sealer.key_id,
        queue=queue,
    )
    try:
        with open_instance(credentials, timeout=timeout) as target:
            stamp = target.read_stamp()
    except ByodError as exc:
        message = credentials.scrub(exc.message)
        directory.set_status(user_id, "error", error=message)
        return ReachResult("error", 0, message)
    version = stamp[-1].version if stamp else 0
    directory.set_status(user_id, "connected", schema_version=version)
    return ReachResult("connected", version)
