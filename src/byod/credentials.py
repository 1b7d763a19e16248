"""A user's instance credentials: sealing them on connect, unsealing them to reach it.

Plain credentials live only in memory, only as long as a run needs them. :class:`Credentials`
knows every secret of one config, so messages can be scrubbed of them before they reach
a log, the ledger or the operator. Every URL is checked against the instance URL policy
(:mod:`byod.instance_url`) when it is connected and again each time it is unsealed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus, urlsplit

from sqlalchemy.engine import URL

from byod.controlplane import Config, Directory
from byod.controlplane.schema import control_plane_file, control_plane_id
from byod.errors import ByodError, DeployError, InputError, SettingsError
from byod.instance_url import InstancePolicy, check_instance_url, resolve_instance_host
from byod.redact import mask
from byod.settings import is_secret_option, normalize_url, safe_url
from byod.targets import Target, open_target
from byod.targets.base import StampEntry, control_plane_refusal
from byod.targets.convex_deploy import Deploy

if TYPE_CHECKING:
    from byod.crypto import Sealer

__all__ = [
    "Credentials",
    "ReachResult",
    "check_connectable",
    "checked_address",
    "connect_user",
    "open_instance",
    "unseal_config",
]

_QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Credentials:
    """Unsealed credentials of one instance, and what opening it must respect.

    ``control_plane``: the id of the control plane this byod works for; an instance that
    holds it is that control plane, and is refused. ``ssl_ca``: the operator's CA.
    """

    url: URL = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False, default=())
    control_plane: str | None = None
    ssl_ca: str | None = None
    #: the whole URL text as the user gave it, when it holds a secret
    url_text: str | None = field(repr=False, default=None)
    #: a Convex deployment's deploy key (SQL instances keep their password in ``url``)
    secret: str | None = field(repr=False, default=None)
    #: what the instance policy allows beyond URLs (private addresses, the deploy step)
    policy: InstancePolicy = field(repr=False, default_factory=InstancePolicy)

    @property
    def kind(self) -> str:
        """The instance's kind: ``sqlite``, ``postgresql``, ``mysql``, ``mariadb``, ``convex``."""
        return self.url.get_backend_name()

    @property
    def where(self) -> str:
        """The URL with every credential hidden."""
        return safe_url(self.url)

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this instance replaced by ``***``.

        The URL as given is replaced whole; then each secret of the instance and every
        operator secret is masked (see :mod:`byod.redact`: anywhere from 8 characters
        on, else only where it stands as a whole token, so a password ``1`` leaves
        ``127.0.0.1`` alone).
        """
        if self.url_text:
            text = text.replace(self.url_text, safe_url(self.url))
        return mask(text, self.secrets)


def check_connectable(url: str, secret: str | None, policy: InstancePolicy) -> str:
    """Check ``url`` (and ``secret``) as ``connect`` does, without the network: the
    instance URL policy, what each kind needs (a Convex deploy key). Returns the
    instance's kind; :class:`SettingsError` names what is refused."""
    if _is_convex(url):
        return _credentials(url, secret, policy).kind
    parsed = normalize_url(url)
    check_instance_url(parsed, policy)
    return parsed.get_backend_name()


def _credentials(
    url_text: str,
    secret: str | None,
    policy: InstancePolicy,
    control_plane: str | None = None,
) -> Credentials:
    if _is_convex(url_text):
        return _convex_credentials(url_text, secret, policy, control_plane)
    url = normalize_url(url_text)
    check_instance_url(url, policy)
    if secret:
        url = url.set(password=secret)
    found = [url.password, secret]
    found += [
        one
        for name, value in url.query.items()
        if is_secret_option(name)
        for one in ((value,) if isinstance(value, str) else value)
    ]
    return Credentials(
        url,
        _variants(found),
        control_plane=control_plane,
        ssl_ca=policy.ssl_ca,
        url_text=url_text if any(found) else None,
        policy=policy,
    )


def _is_convex(url_text: str) -> bool:
    scheme = url_text.partition("://")[0].strip().lower()
    return scheme in ("http", "https", "convex") or scheme.startswith("convex+")


def _convex_credentials(
    url_text: str, secret: str | None, policy: InstancePolicy, control_plane: str | None
) -> Credentials:
    """A Convex deployment: its URL (as ``convex+https://HOST[:PORT][/PATH]``) and its
    deploy key, which is required."""
    from byod.targets.convex_address import deployment_base

    parts = urlsplit(deployment_base(url_text))
    url = URL.create(
        f"convex+{parts.scheme}",
        host=parts.hostname,
        port=parts.port,
        database=parts.path.lstrip("/") or None,
    )
    check_instance_url(url, policy)
    if not secret:
        raise SettingsError(
            "a Convex deployment needs its deploy key: give it with --secret (`--secret -` "
            "reads it from standard input); it is sealed like a password, never put in the URL",
            hint="Create a deploy key in the Convex dashboard (Settings, Deploy keys).",
        )
    _, _, token = secret.partition("|")
    return Credentials(
        url,
        _variants([secret, token if len(token) >= 8 else None]),
        control_plane=control_plane,
        ssl_ca=policy.ssl_ca,
        secret=secret,
        policy=policy,
    )


def _variants(found: list[str | None]) -> tuple[str, ...]:
    """Each secret as given and as it appears percent-encoded in a URL."""
    secrets: list[str] = []
    for plain in (s for s in found if isinstance(s, str) and s):
        secrets += [plain, quote_plus(plain), quote(plain, safe="")]
    return tuple(dict.fromkeys(secrets))


def convex_base(url: URL) -> str:
    """A Convex instance URL as text (``convex+https://HOST[:PORT][/PATH]``)."""
    netloc = f"[{url.host}]" if url.host and ":" in url.host else (url.host or "")
    if url.port is not None:
        netloc += f":{url.port}"
    path = f"/{url.database}" if url.database else ""
    return f"{url.drivername}://{netloc}{path}"


def unseal_config(
    config: Config,
    sealer: Sealer,
    *,
    policy: InstancePolicy | None = None,
    control_plane: str | None = None,
) -> Credentials:
    """Open a config's sealed URL (and secret). Raises ``CredentialsError``, and
    ``SettingsError`` for a URL the instance URL policy refuses (stored by an older byod)."""
    url_text = sealer.unseal(
        config.sealed_url, user_id=config.user_id, field_name="url", key_id=config.key_id
    )
    secret = None
    if config.sealed_secret:
        secret = sealer.unseal(
            config.sealed_secret, user_id=config.user_id, field_name="secret", key_id=config.key_id
        )
    return _credentials(url_text, secret, policy or InstancePolicy(), control_plane)


def checked_address(credentials: Credentials) -> str | None:
    """The address a server instance is reached at, resolved once and checked against
    the instance policy (:class:`SettingsError` naming the settings when refused,
    :class:`UnreachableError` when the host does not resolve); None for a SQLite file,
    and for a Convex deployment (checked as it is opened)."""
    if credentials.kind in ("sqlite", "convex"):
        if credentials.kind == "convex" and not credentials.policy.allow_private:
            resolve_instance_host(credentials.url, credentials.policy)
        return None
    return resolve_instance_host(credentials.url, credentials.policy)


def open_instance(
    credentials: Credentials, *, timeout: float, hold_seconds: float = 30.0
) -> Target:
    """Connect to the instance; ``UnreachableError`` messages are scrubbed of secrets.

    ``hold_seconds``: how long a Convex deployment's lock is held before it is renewed
    (a runner that vanished frees it after that long). Raises :class:`SettingsError`,
    nothing touched, when the instance is byod's own control plane: here, or, where the
    target asks in its first round trip (a server), from that first use.
    """
    target: Target
    try:
        if credentials.kind == "convex":
            from byod.targets.convex import open_convex  # httpx: only for Convex users

            assert credentials.secret is not None  # required when it was parsed
            policy = credentials.policy
            target = open_convex(
                convex_base(credentials.url),
                credentials.secret,
                timeout=timeout,
                hold_seconds=hold_seconds,
                policy=policy,
                ssl_ca=credentials.ssl_ca,
                deploy=Deploy.of(policy),
            )
        else:
            target = open_target(
                credentials.url,
                timeout=timeout,
                ssl_ca=credentials.ssl_ca,
                address=checked_address(credentials),
            )
    except ByodError as exc:
        exc.message = credentials.scrub(exc.message)
        raise
    if credentials.control_plane is None:
        return target
    try:
        refused = _is_control_plane(target, credentials)
    except ByodError as exc:
        target.close()
        exc.message = credentials.scrub(exc.message)
        raise
    if refused:
        target.close()
        raise control_plane_refusal(credentials.where)
    return target


def _is_control_plane(target: Target, credentials: Credentials) -> bool:
    """Whether the instance is this control plane: never when one is a SQLite file and
    the other a server; for two SQLite files, whether they are the same file (no query
    either way); for two servers, by the id the instance holds, if any (False here when
    the target asks that itself, before anything else)."""
    assert credentials.control_plane is not None
    own = control_plane_file(credentials.control_plane)
    if own is not None and bool(own) != (credentials.kind == "sqlite"):
        return False  # a file and a server are never one database
    if credentials.kind == "sqlite" and own is not None:
        instance = credentials.url.database or ""
        if not own or not instance or instance == ":memory:":
            return False
        try:
            return os.path.samefile(instance, own)
        except OSError:
            return False  # a missing instance file is reported as unreachable
    if target.defer_control_plane_check(credentials.control_plane):
        return False  # asked by the target itself, before it does anything else
    return target.holds_control_plane(credentials.control_plane)


@dataclass(frozen=True)
class ReachResult:
    """Outcome of checking a freshly connected instance."""

    status: str
    schema_version: int
    error: str | None = None
    #: the class of the error (``UnreachableError``, ``InstanceTimeoutError``, …)
    error_type: str | None = None
    #: False when the new config failed and the user's working one was kept
    stored: bool = True
    #: what the operator should know about a connected instance (a Convex deployment
    #: without byod's module yet)
    note: str | None = None


MODULE_ARRIVES = (
    "byod's module is not deployed there yet: it arrives with the first deploy "
    "(`byod migrate` deploys the app before the first step)"
)


def reached_stamp(target: Target) -> tuple[list[StampEntry], str | None]:
    """The stamp of an instance just reached, and a note: a Convex deployment that
    answered with its deploy key but has no byod module yet (a fresh deployment) is at
    version 0, the module coming with the first deploy; any other failure is raised."""
    try:
        return target.read_stamp(), None
    except DeployError:
        if target.kind != "convex":
            raise
        return [], MODULE_ARRIVES


def _works(directory: Directory, user_id: int) -> bool:
    """Whether the user has a stored config that last connected."""
    try:
        return directory.get_config(user_id).connection_status == "connected"
    except ByodError:
        return False  # none yet


def connect_user(
    directory: Directory,
    sealer: Sealer,
    user_id: int,
    url: str,
    *,
    secret: str | None = None,
    timeout: float = 10.0,
    queue: str | None = None,
    policy: InstancePolicy | None = None,
    replace: bool = False,
) -> ReachResult:
    """Check the instance answers, then seal and store the user's credentials.

    A first config is stored even when the instance is unreachable (status ``error``);
    a user whose stored config works (``connected``) keeps it when the new one fails,
    unless ``replace`` (the result says ``stored=False``). The schema version recorded
    is what the instance's own stamp says. ``queue``: the task
    queue whose workers can reach the instance (distributed runs; default queue if None).
    A URL the instance URL ``policy`` refuses, or byod's own control plane, raises
    :class:`SettingsError` and nothing is stored.
    """
    if queue is not None and not _QUEUE_NAME.fullmatch(queue):
        raise SettingsError(f"bad queue name {queue!r}: use 1-64 letters, digits, '.', '_' or '-'")
    credentials = _credentials(
        url, secret, policy or InstancePolicy(), control_plane_id(directory.engine)
    )
    # reached before anything is stored: a refused instance (the control plane) leaves
    # the user's config as it was; an unreachable one is stored with status ``error``
    error = error_type = note = None
    try:
        with open_instance(credentials, timeout=timeout) as target:
            stamp, note = reached_stamp(target)
    except InputError:
        raise
    except ByodError as exc:
        error, error_type = credentials.scrub(exc.message), type(exc).__name__
    if error is not None and not replace and _works(directory, user_id):
        return ReachResult("error", 0, error, error_type, stored=False)
    directory.save_config(
        user_id,
        target_kind=credentials.kind,
        sealed_url=sealer.seal(url, user_id=user_id, field_name="url"),
        sealed_secret=sealer.seal(secret, user_id=user_id, field_name="secret") if secret else None,
        key_id=sealer.key_id,
        queue=queue,
    )
    if error is not None:
        directory.set_status(user_id, "error", error=error)
        return ReachResult("error", 0, error, error_type)
    version = stamp[-1].version if stamp else 0
    directory.set_status(user_id, "connected", schema_version=version)
    return ReachResult("connected", version, note=note)
