"""libpq's parameters for an instance connection, none of them taken from the byod
machine's environment.

libpq fills each connection parameter a connection does not give from an environment
variable (``PGPASSWORD``, ``PGUSER``, ``PGSSLCERT``, …), a service file (``PGSERVICE``),
a password file (``~/.pgpass``) or a file under ``~/.postgresql``. That environment is the
operator's: right for the control plane, wrong for a tenant's server, which would receive
the operator's password, user or client certificate. So an instance connection gives
every such parameter itself: the URL's value, else a neutral one. The list comes from
libpq's own table of parameters (``PQconndefaults``), so a parameter a newer libpq reads
from the environment is covered too.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from sqlalchemy.engine import URL

from byod.errors import SettingsError

__all__ = ["NO_FILE", "instance_parameters"]

#: A file that cannot exist (a path below a device, not a folder): libpq skips it
#: without a word, where /dev/null itself makes it warn on every connection.
NO_FILE = os.path.join(os.devnull, "byod-none")

#: Neutral values where libpq's compiled default is "none" and an empty value would
#: make it look elsewhere (a file under ~/.postgresql) or is refused.
_NEUTRAL = {
    "password": "",
    "passfile": NO_FILE,
    "sslcert": NO_FILE,
    "sslkey": NO_FILE,
    "sslrootcert": NO_FILE,
    "sslcrl": NO_FILE,
    "sslcrldir": NO_FILE,
    "sslcertmode": "allow",
    "min_protocol_version": "3.0",
    "max_protocol_version": "3.0",
}
#: Parameters with no environment variable that a service file could still set.
_SERVICE_ONLY = ("sslpassword", "oauth_issuer", "oauth_client_id", "oauth_client_secret")
#: The service names a section of the operator's service file; every parameter it could
#: set is set here, so what is left is harmless (and an empty name is refused by libpq).
_LEFT_TO_LIBPQ = ("service",)
#: TLS modes under which the connection is encrypted whatever the server says.
_ENCRYPTED = ("require", "verify-ca", "verify-full")


@functools.cache
def _neutral_defaults() -> dict[str, str]:
    """Every parameter libpq would read from the environment, with the value it has when
    nothing is set (its compiled default, or a neutral one)."""
    from psycopg import pq

    values: dict[str, str] = {}
    for option in pq.Conninfo.get_defaults():
        keyword = option.keyword.decode()
        if option.envvar is None and keyword not in _SERVICE_ONLY:
            continue
        if keyword in _LEFT_TO_LIBPQ:
            continue
        compiled = option.compiled.decode() if option.compiled is not None else ""
        values[keyword] = _NEUTRAL.get(keyword, compiled)
    return values


def instance_parameters(url: URL, ssl_ca: str | None, address: str | None) -> dict[str, Any]:
    """libpq parameters for ``url``'s instance: its own host (and the checked
    ``address`` as ``hostaddr``, so no second DNS answer moves the connection; the name
    still serves TLS's SNI and ``verify-full``), port, user, password (possibly none) and
    database, and for everything else the URL does not give, the neutral value.

    The operator's CA (``ssl_ca``, or ``system``) verifies the server where the URL asks
    for verification; a server that asks for a clear-text password gets none unless the
    connection is encrypted (``require_auth``).
    """
    params: dict[str, Any] = {
        key: value for key, value in _neutral_defaults().items() if key not in url.query
    }
    params.update(
        host=url.host or "",
        hostaddr=address or "",
        port=str(url.port or 5432),
        user=url.username or "",
        password=url.password or "",
        dbname=url.database or url.username or "",
    )
    sslmode = str(url.query.get("sslmode", "prefer"))
    if sslmode == "verify-full":
        params["sslrootcert"] = ssl_ca or "system"
    elif sslmode == "verify-ca":
        if not ssl_ca or ssl_ca == "system":
            raise SettingsError(
                "sslmode=verify-ca needs the operator's CA file (BYOD_INSTANCE_SSL_CA); "
                "with the system's store use sslmode=verify-full"
            )
        params["sslrootcert"] = ssl_ca
    if sslmode not in _ENCRYPTED:
        params["require_auth"] = "!password"  # never a clear-text password in the open
    return params
