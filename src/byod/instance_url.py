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

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import URL

from byod.errors import SettingsError, UnreachableError

__all__ = [
    "ALLOWED_OPTIONS",
    "MYSQL_SSL_MODES",
    "SUPPORTED_KINDS",
    "InstancePolicy",
    "address_refusal",
    "check_instance_url",
    "env_flag",
    "parse_networks",
    "private_address",
    "resolve_instance_host",
]

SUPPORTED_KINDS = ("sqlite", "postgresql", "mysql", "mariadb", "convex")

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
    "convex": {},
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
    """The operator's side of the policy, and the operator's settings for instances
    (``BYOD_ALLOW_SQLITE_INSTANCES``, ``BYOD_ALLOW_PRIVATE_INSTANCES``,
    ``BYOD_INSTANCE_SSL_CA``, ``BYOD_CONVEX_APP``, ``BYOD_CONVEX_DEPLOY``).

    ``allow_sqlite``: a ``sqlite`` instance is a file on the byod machine, fine for the
    embedded demo, refused where instances are remote. ``allow_private``: an instance
    (a PostgreSQL or MySQL/MariaDB server, a Convex deployment) may be at a loopback,
    private, link-local, CGNAT or unspecified address, and a Convex URL may use plain
    ``http`` (a local or self-hosted backend); off by default, so a tenant's URL never
    reaches into the operator's network. ``instance_networks``
    (``BYOD_INSTANCE_NETWORKS``): networks allowed although not public, for operators
    who host their tenants' databases in their own VPC. ``ssl_ca``: the CA file (or ``system``,
    the system's store) that verifies instances' TLS certificates. ``convex_app``: the
    Convex app's project folder (the one holding ``convex/``); ``convex_deploy``: the
    command that deploys it to one user's deployment (default ``npx convex deploy --yes``);
    ``convex_code`` (``BYOD_CONVEX_CODE``): ``git`` (each step on its own commit's code),
    ``folder`` (the app folder as it is, deployed once before the first step) or ``auto``
    (git when the app folder is in a git work tree); ``convex_allow_dirty``
    (``--allow-dirty``): uncommitted migrations run on the folder as it is, against local
    deployments only; ``convex_deploy_concurrency``
    (``BYOD_CONVEX_DEPLOY_CONCURRENCY``): how many deploys run at once in a process.
    ``app_convex_url`` and ``app_convex_key``: the app's own Convex deployment, which
    migrations reach as ``ctx.app`` (the operator's, so its URL is trusted as given).
    """

    allow_sqlite: bool = True
    ssl_ca: str | None = None
    allow_private: bool = False
    instance_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    convex_app: str | None = None
    convex_deploy: str | None = None
    convex_code: str = "auto"
    convex_allow_dirty: bool = False
    convex_deploy_concurrency: int = 4
    #: the app's own Convex deployment (``ctx.app``): its URL and deploy key
    app_convex_url: str | None = None
    app_convex_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InstancePolicy:
        """The policy the ``BYOD_*`` variables ask for."""
        return cls(
            allow_sqlite=env_flag(env, "BYOD_ALLOW_SQLITE_INSTANCES", default=True),
            ssl_ca=env.get("BYOD_INSTANCE_SSL_CA") or None,
            allow_private=env_flag(env, "BYOD_ALLOW_PRIVATE_INSTANCES", default=False),
            instance_networks=parse_networks(env.get("BYOD_INSTANCE_NETWORKS", "")),
            convex_app=env.get("BYOD_CONVEX_APP") or None,
            convex_deploy=env.get("BYOD_CONVEX_DEPLOY") or None,
            convex_code=_convex_code(env.get("BYOD_CONVEX_CODE", "auto")),
            convex_deploy_concurrency=_positive(env, "BYOD_CONVEX_DEPLOY_CONCURRENCY", 4),
            app_convex_url=env.get("BYOD_APP_CONVEX_URL") or None,
            app_convex_key=env.get("BYOD_APP_CONVEX_KEY") or None,
        )

    def allows_address(self, address: str) -> bool:
        """Whether an instance may be reached at IP ``address``: a public one, or any
        when the operator allows private instances, or one inside an allowed network."""
        if self.allow_private or not private_address(address):
            return True
        try:
            ip = _unmapped(ipaddress.ip_address(address.strip("[]")))
        except ValueError:
            return False  # a name (``localhost``) is not in a network
        return any(ip in network for network in self.instance_networks)


def _convex_code(text: str) -> str:
    value = text.strip().lower() or "auto"
    if value not in ("auto", "git", "folder"):
        raise SettingsError(f"BYOD_CONVEX_CODE must be auto, git or folder, not {text!r}")
    return value


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"{name} must be a whole number of 1 or more, not {text!r}")
    return value


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``BYOD_INSTANCE_NETWORKS``: networks in CIDR form, separated by commas."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=True))
        except ValueError:
            raise SettingsError(
                f"BYOD_INSTANCE_NETWORKS: {part!r} is not a network "
                "(use CIDR forms separated by commas, e.g. 10.20.0.0/16,fd00::/8)"
            ) from None
    return tuple(networks)


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def env_flag(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    """A yes/no setting: ``1``/``0`` (or true/false, yes/no); unset is ``default``."""
    text = env.get(name, "").strip().lower()
    if text not in ("", "0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{name} must be 1 or 0, not {text!r}")
    return default if not text else text in ("1", "true", "yes")


def check_instance_url(url: URL, policy: InstancePolicy) -> None:
    """Raise :class:`SettingsError` when ``url`` asks for something byod refuses.

    The message names the option (or part) refused, never a value, which may be secret.
    """
    kind = url.get_backend_name()
    if kind not in SUPPORTED_KINDS:
        raise SettingsError(
            f"instances of kind {kind!r} are not supported (use {', '.join(SUPPORTED_KINDS)})"
        )
    if kind == "convex":
        _check_convex(url, policy)
    elif kind == "sqlite":
        if not policy.allow_sqlite:
            raise SettingsError(
                "sqlite instances are refused here (BYOD_ALLOW_SQLITE_INSTANCES=0): "
                "a sqlite instance is a file on the byod machine",
                hint="Connect a PostgreSQL or MySQL/MariaDB database over the network.",
            )
    else:
        _check_host(url, kind)
        host = (url.host or "").strip("[]")
        if not policy.allows_address(host):
            raise address_refusal(kind, host)
    allowed = ALLOWED_OPTIONS[kind]
    for name, value in url.query.items():
        _check_option(kind, allowed, name, value)


def private_address(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is one a tenant's URL may not reach
    unless the operator allows it: loopback, private, link-local, or otherwise not a
    public address (``localhost`` and ``*.localhost`` count as loopback)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if ":" not in name and not name.replace(".", "").isdigit():
        return False  # a name (an IP address is digits and dots, or has a colon)
    try:
        address = _unmapped(ipaddress.ip_address(name))
    except ValueError:
        return False
    return not address.is_global or address.is_multicast


#: What the operator can set to reach instances that are not at public addresses.
_ALLOWANCE = (
    "An operator who hosts tenants' databases in their own network can allow it with "
    "BYOD_INSTANCE_NETWORKS (e.g. 10.20.0.0/16) or BYOD_ALLOW_PRIVATE_INSTANCES=1."
)


def address_refusal(kind: str, what: str) -> SettingsError:
    """The error for an instance whose host ``what`` (a name or an address) is not
    public and not allowed; it names the settings that allow it."""
    return SettingsError(
        f"the {kind} instance URL's host {what} is a loopback, private or otherwise "
        "internal address: refused, so a tenant's URL never reaches the operator's own "
        "network (BYOD_INSTANCE_NETWORKS, BYOD_ALLOW_PRIVATE_INSTANCES)",
        hint=_ALLOWANCE,
    )


def resolve_instance_host(url: URL, policy: InstancePolicy) -> str:
    """The one IP address byod connects to for a server instance's host, resolved once
    and checked against the policy: every address the name resolves to must be allowed
    (:class:`SettingsError` otherwise, naming the settings); a name that does not
    resolve is :class:`UnreachableError`. The caller connects to this address, never to
    the name again, so a second DNS answer cannot move the connection."""
    kind = url.get_backend_name()
    host = (url.host or "").strip("[]")
    if not policy.allows_address(host):
        raise address_refusal(kind, host)
    try:
        found = socket.getaddrinfo(host, url.port or 0, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise UnreachableError(
            f"the {kind} instance's host {host} does not resolve ({type(exc).__name__})"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    for address in addresses:
        if not policy.allows_address(address):
            raise address_refusal(kind, f"{host} ({address})" if address != host else host)
    if not addresses:
        raise UnreachableError(f"the {kind} instance's host {host} does not resolve")
    return addresses[0]


def _check_convex(url: URL, policy: InstancePolicy) -> None:
    if url.username or url.password:
        raise SettingsError(
            "a Convex deployment URL holds no user or password: give the deploy key with --secret"
        )
    if policy.allow_private:
        return
    if url.get_driver_name() != "https":
        raise SettingsError(
            "a Convex deployment URL must use https (convex+http:// sends the deploy key "
            "unencrypted): refused here",
            hint="An operator can allow local backends with BYOD_ALLOW_PRIVATE_INSTANCES=1.",
        )
    if not policy.allows_address(url.host or ""):
        raise SettingsError(
            "the Convex deployment URL names a loopback or private address: refused here, "
            "so a deploy key never goes to an internal address",
            hint=_ALLOWANCE,
        )


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
    if kind == "postgresql" and not url.username:
        raise SettingsError(
            "a postgresql instance URL must name its user (postgresql://USER[:PASSWORD]@HOST/DB): "
            "without one the driver would use the byod machine's own user name"
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
            hint="Remove the option from the URL (see docs/how-to/security.md).",
        )
    if not isinstance(value, str):
        raise SettingsError(f"instance URL option {name!r} is given more than once")
    good = check.fullmatch(value) if isinstance(check, re.Pattern) else value in check
    if not good:
        expected = "a number" if check is _TIMEOUT else "a name"
        if isinstance(check, tuple):
            expected = "one of " + ", ".join(c for c in check if not c.isupper())
        raise SettingsError(f"instance URL option {name!r} has a bad value (use {expected})")
