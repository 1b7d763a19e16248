"""What a user's instance URL may ask of byod: the instance URL policy.

An instance URL comes from a user's world and is untrusted. Its query options go to the
database driver, and some of them act on the byod machine, not on the user's database:
PyMySQL's ``local_infile`` lets the server read any file byod can read (its environment
holds the encryption key), ``read_default_file``, ``sslrootcert`` or ``passfile`` read
local files, a host that is a path is a local socket. So only the few options a dialect
needs to reach a remote database are allowed (a TLS mode, a timeout, a character set);
everything else is refused with a :class:`SettingsError` that names the option and never
its value. Certificate authorities come from the operator (``BYOD_INSTANCE_SSL_CA``),
never from a URL.

The policy is checked when a URL is connected and again each time a sealed URL is opened
for a run (a config stored by an older byod may hold a URL refused today).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import URL

from byod.errors import SettingsError

__all__ = [
    "ALLOWED_OPTIONS",
    "MYSQL_SSL_MODES",
    "SUPPORTED_KINDS",
    "InstancePolicy",
    "check_instance_url",
]

SUPPORTED_KINDS = ("sqlite", "postgresql", "mysql", "mariadb")

#: PyMySQL has no TLS mode of its own: byod reads this one (the MySQL client's names)
#: and builds the TLS context itself (see :mod:`byod.targets.dialects`).
MYSQL_SSL_MODES = ("disabled", "preferred", "required", "verify_ca", "verify_identity")

_PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TIMEOUT = re.compile(r"[0-9]{1,6}")

_MYSQL_OPTIONS: Mapping[str, re.Pattern[str] | tuple[str, ...]] = {
    "ssl_mode": MYSQL_SSL_MODES + tuple(mode.upper() for mode in MYSQL_SSL_MODES),
    "charset": re.compile(r"[A-Za-z0-9_]{1,32}"),
    "connect_timeout": _TIMEOUT,
}
#: Per supported kind (the keys are :data:`SUPPORTED_KINDS`): the query options an
#: instance URL may carry, each with its check. ``connect_timeout`` is accepted for old
#: URLs but byod's own ``--timeout`` wins.
ALLOWED_OPTIONS: Mapping[str, Mapping[str, re.Pattern[str] | tuple[str, ...]]] = {
    "sqlite": {},
    "postgresql": {
        "sslmode": _PG_SSLMODES,
        "channel_binding": ("disable", "prefer", "require"),
        "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
        "target_session_attrs": (
            "any",
            "read-write",
            "read-only",
            "primary",
            "standby",
            "prefer-standby",
        ),
        "connect_timeout": _TIMEOUT,
    },
    "mysql": _MYSQL_OPTIONS,
    "mariadb": _MYSQL_OPTIONS,
}

_FILES = "reads a file of the byod machine (a CA file comes from BYOD_INSTANCE_SSL_CA)"
_SOCKET = "connects to a local socket of the byod machine, not to the URL's host"
_SECRET = "is a secret: put the password in the URL (user:password@host) or use --secret"
#: Why well-known dangerous options are refused; any other unknown option is refused too.
_REASONS = {
    "local_infile": "lets the database server read any file of the byod machine",
    "client_flag": "can switch on LOCAL INFILE (the server reading byod's files)",
    "read_default_file": _FILES,
    "read_default_group": _FILES,
    "passfile": _FILES,
    "service": _FILES,
    "servicefile": _FILES,
    "sslrootcert": _FILES,
    "sslcert": _FILES,
    "sslkey": _FILES,
    "sslcrl": _FILES,
    "sslcrldir": _FILES,
    "ssl_ca": _FILES,
    "ssl_capath": _FILES,
    "ssl_cert": _FILES,
    "ssl_key": _FILES,
    "sslkeylogfile": "writes a file on the byod machine",
    "init_command": "runs a command on every connection",
    "options": "sets server options on every connection",
    "unix_socket": _SOCKET,
    "host": _SOCKET,
    "hostaddr": _SOCKET,
    "bind_address": "binds a local address of the byod machine",
    "auth_plugin_map": "loads code on the byod machine",
    "password": _SECRET,
    "passwd": _SECRET,
    "sslpassword": _SECRET,
    "ssl_key_password": _SECRET,
}
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]+")


@dataclass(frozen=True)
class InstancePolicy:
    """The operator's side of the policy (``BYOD_ALLOW_SQLITE_INSTANCES``,
    ``BYOD_INSTANCE_SSL_CA``).

    ``allow_sqlite``: a ``sqlite`` instance is a file on the byod machine, fine for the
    embedded demo, refused where instances are remote. ``ssl_ca``: the CA file (or
    ``system``, the system's store) that verifies instances' TLS certificates.
    """

    allow_sqlite: bool = True
    ssl_ca: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InstancePolicy:
        """The policy the ``BYOD_*`` variables ask for."""
        text = env.get("BYOD_ALLOW_SQLITE_INSTANCES", "").strip().lower()
        if text not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"BYOD_ALLOW_SQLITE_INSTANCES must be 1 or 0, not {text!r}")
        return cls(
            allow_sqlite=text not in ("0", "false", "no"),
            ssl_ca=env.get("BYOD_INSTANCE_SSL_CA") or None,
        )


def check_instance_url(url: URL, policy: InstancePolicy) -> None:
    """Raise :class:`SettingsError` when ``url`` asks for something byod refuses.

    The message names the option (or part) refused, never a value, which may be secret.
    """
    kind = url.get_backend_name()
    if kind not in SUPPORTED_KINDS:
        raise SettingsError(
            f"instances of kind {kind!r} are not supported (use {', '.join(SUPPORTED_KINDS)})"
        )
    if kind == "sqlite":
        if not policy.allow_sqlite:
            raise SettingsError(
                "sqlite instances are refused here (BYOD_ALLOW_SQLITE_INSTANCES=0): "
                "a sqlite instance is a file on the byod machine",
                hint="Connect a PostgreSQL or MySQL/MariaDB database over the network.",
            )
    else:
        _check_host(url, kind)
    allowed = ALLOWED_OPTIONS[kind]
    for name, value in url.query.items():
        _check_option(kind, allowed, name, value)


def _check_host(url: URL, kind: str) -> None:
    host = url.host or ""
    if not host:
        raise SettingsError(
            f"a {kind} instance URL must name its host: without one the driver uses a "
            "local socket of the byod machine"
        )
    if not _HOST.fullmatch(host):
        raise SettingsError(
            f"the host of a {kind} instance URL must be a host name or an IP address, "
            "not a path or a list"
        )
    database = url.database or ""
    if kind == "postgresql" and ("=" in database or "://" in database):
        raise SettingsError("the database name of the instance URL holds connection options")


def _check_option(
    kind: str,
    allowed: Mapping[str, re.Pattern[str] | tuple[str, ...]],
    name: str,
    value: str | tuple[str, ...],
) -> None:
    check = allowed.get(name)
    if check is None:
        reason = _REASONS.get(name.lower())
        if reason is None:
            reason = (
                f"is not one a {kind} instance URL may carry ({', '.join(allowed)})"
                if allowed
                else f"is not allowed: a {kind} instance URL carries no options"
            )
        raise SettingsError(
            f"instance URL option {name!r} is refused: it {reason}",
            hint="Remove the option from the URL (see Security in the README).",
        )
    if not isinstance(value, str):
        raise SettingsError(f"instance URL option {name!r} is given more than once")
    good = check.fullmatch(value) if isinstance(check, re.Pattern) else value in check
    if not good:
        expected = "a number" if check is _TIMEOUT else "a name"
        if isinstance(check, tuple):
            expected = "one of " + ", ".join(c for c in check if not c.isupper())
        raise SettingsError(f"instance URL option {name!r} has a bad value (use {expected})")
