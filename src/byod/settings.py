"""Settings: where the control plane, the migrations and the encryption key live.

Each comes from a flag, else a ``BYOD_*`` environment variable, else the embedded default
(everything in the current folder). Settings are a frozen dataclass, built once at the
edge and passed down.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from byod.errors import SettingsError
from byod.instance_url import InstancePolicy, env_flag
from byod.redact import remember

__all__ = [
    "CONTROL_PLANE_KINDS",
    "DEFAULT_DATABASE_FILE",
    "DEFAULT_KEY_FILE",
    "LOCAL_MIGRATIONS",
    "Settings",
    "bundled_migrations_dir",
    "is_secret_option",
    "normalize_url",
    "safe_url",
]

DEFAULT_DATABASE_FILE = "byod.db"
#: Databases byod keeps its control plane in.
CONTROL_PLANE_KINDS = ("sqlite", "postgresql")
DEFAULT_KEY_FILE = "byod.key"
LOCAL_MIGRATIONS = "migrations"

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}
_DRIVERS.update({"mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"})


def bundled_migrations_dir() -> Path:
    """The example notes app's migrations, shipped inside the package."""
    return Path(__file__).parent / "example_migrations"


def normalize_url(url: str) -> URL:
    """Parse a database URL, choosing byod's drivers (psycopg 3, PyMySQL) when none is named.

    Raises :class:`SettingsError` for a URL that does not parse; the message never holds
    the URL itself, which may carry a password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise SettingsError(
            "not a database URL (expected e.g. sqlite:///path.db or postgresql://user@host/db)"
        ) from exc
    driver = _DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


#: Query options that carry a credential, whatever the driver (matched in lower case).
_SECRET_PARTS = ("pass", "secret", "token", "key", "auth", "credential")


def is_secret_option(name: str) -> bool:
    """Whether a URL query option carries a credential (``password``, ``sslpassword``...)."""
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_PARTS)


def safe_url(url: URL | str) -> str:
    """The URL with every credential hidden, fit for messages and logs.

    Hidden by structure: the password of the authority and the value of each query
    option that carries a credential become ``***``; nothing else is touched.
    """
    parsed = url if isinstance(url, URL) else normalize_url(url)
    base = parsed.set(query={}).render_as_string(hide_password=True)
    pairs = []
    for name, value in parsed.query.items():
        for one in (value,) if isinstance(value, str) else value:
            shown = "***" if is_secret_option(name) else quote_plus(one)
            pairs.append(f"{quote_plus(name)}={shown}")
    return f"{base}?{'&'.join(pairs)}" if pairs else base


@dataclass(frozen=True)
class Settings:
    """Where byod finds its control plane, migrations and encryption key.

    Migrations: ``--migrations``, else ``BYOD_MIGRATIONS``, else ``./migrations`` when it
    exists, else the bundled example app.

    ``encryption_key`` is the base64 text from BYOD_ENCRYPTION_KEY, or ``None`` to use
    (or create) the local key file ``key_file``.
    """

    database_url: str
    migrations_dir: Path
    migrations_configured: bool
    encryption_key: str | None
    key_file: Path
    notify_hook: str | None = None
    #: the task queue's broker (``redis://`` or ``amqp://``) for distributed runs
    broker_url: str | None = field(default=None, repr=False)
    #: Redis only: seconds before a task taken by a worker that vanished is handed out again
    broker_visibility_timeout: float = 600.0
    #: the queue of users whose config names none (several apps can share one broker)
    default_queue: str = "byod"
    #: what instance URLs may ask (BYOD_ALLOW_SQLITE_INSTANCES, BYOD_INSTANCE_SSL_CA)
    instance_policy: InstancePolicy = field(default_factory=InstancePolicy)
    #: with an Alembic history, each step also moves ``alembic_version`` in its own
    #: transaction (BYOD_KEEP_ALEMBIC_VERSION=1), for a changeover from Alembic
    keep_alembic_version: bool = False

    @classmethod
    def load(
        cls,
        *,
        database_url: str | None = None,
        migrations: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Settings:
        """Build settings from flags (given here), then the environment, then defaults."""
        env = os.environ if env is None else env
        cwd = Path.cwd() if cwd is None else cwd
        url = database_url or env.get("BYOD_DATABASE_URL") or ""
        if not url:
            url = f"sqlite:///{cwd / DEFAULT_DATABASE_FILE}"
        parsed = normalize_url(url)  # fail early on a malformed URL
        kind = parsed.get_backend_name()
        remember(parsed.password)  # a flag's password is masked like the environment's
        if kind not in CONTROL_PLANE_KINDS:
            raise SettingsError(
                f"the control plane cannot be a {kind!r} database: BYOD_DATABASE_URL "
                f"(or --database-url) must be a {' or '.join(CONTROL_PLANE_KINDS)} URL"
            )
        folder_text = str(migrations) if migrations else env.get("BYOD_MIGRATIONS", "")
        local = cwd / LOCAL_MIGRATIONS
        if not folder_text and local.is_dir():
            folder_text = str(local)  # an app's own ./migrations wins over the example
        folder = Path(folder_text) if folder_text else bundled_migrations_dir()
        key_file = Path(env.get("BYOD_KEY_FILE") or cwd / DEFAULT_KEY_FILE)
        return cls(
            database_url=url,
            migrations_dir=folder,
            migrations_configured=bool(folder_text),
            encryption_key=env.get("BYOD_ENCRYPTION_KEY") or None,
            key_file=key_file,
            notify_hook=env.get("BYOD_NOTIFY_HOOK") or None,
            broker_url=env.get("BYOD_BROKER_URL") or None,
            broker_visibility_timeout=_positive(env, "BYOD_BROKER_VISIBILITY_TIMEOUT", 600.0),
            default_queue=env.get("BYOD_QUEUE") or "byod",
            instance_policy=_with_convex_app(InstancePolicy.from_env(env), folder),
            keep_alembic_version=env_flag(env, "BYOD_KEEP_ALEMBIC_VERSION"),
        )


def _with_convex_app(policy: InstancePolicy, migrations: Path) -> InstancePolicy:
    """The Convex app's folder, when not configured: the one that holds both the
    migrations folder and a ``convex/`` folder (an app's usual layout)."""
    if policy.convex_app is not None:
        return policy
    app = migrations.resolve().parent
    if not (app / "convex").is_dir():
        return policy
    return dataclasses.replace(policy, convex_app=str(app))


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SettingsError(f"{name} must be a positive number of seconds, not {text!r}")
    return value
