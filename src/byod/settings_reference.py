"""Every setting byod reads, in one table: what it is, its flag, its environment
variable and its default. The documentation's settings page is generated from it, and a
test holds it to the code: every ``BYOD_*`` variable byod's source reads is here.
Nothing in byod reads this table; each setting is read where it is used."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SERVE_SETTINGS", "SETTINGS", "Setting"]


@dataclass(frozen=True)
class Setting:
    """One setting, as the settings page shows it (Markdown in each field)."""

    what: str
    environment: str
    default: str = ""
    flag: str = ""


#: The settings of every command (the control plane, migrations, keys, logs, queues,
#: instance policy, Convex).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        what="control plane",
        environment="`BYOD_DATABASE_URL`",
        default=(
            "`sqlite:///./byod.db` (beside it SQLite's `-wal` and `-shm` files and byod's "
            "`-writer` lock file, which queues writers across processes)"
        ),
        flag="`--database-url`",
    ),
    Setting(
        what=(
            "migrations folder (a byod folder, or an Alembic `alembic.ini`, script location or "
            "`versions/`)"
        ),
        environment="`BYOD_MIGRATIONS`",
        default=(
            "`./migrations` if it exists, else the bundled example app "
            "(`src/byod/example_migrations`)"
        ),
        flag="`--migrations`",
    ),
    Setting(
        what="encryption key",
        environment="`BYOD_ENCRYPTION_KEY` (base64 of 32 bytes)",
        default="`./byod.key`, created by `init`/`demo`",
        flag="",
    ),
    Setting(
        what="key file location",
        environment="`BYOD_KEY_FILE`",
        default="`./byod.key`",
        flag="",
    ),
    Setting(
        what="notification hook",
        environment="`BYOD_NOTIFY_HOOK=package.module:function`",
        default="log a warning",
        flag="",
    ),
    Setting(
        what="log level on stderr",
        environment="`BYOD_LOG_LEVEL` (`debug` … `critical`)",
        default=(
            "none: nothing is logged on stderr (errors and summaries are printed anyway); `INFO` "
            "with `--log-format json`"
        ),
        flag="`-v` (INFO)",
    ),
    Setting(
        what="log file (every step appended)",
        environment="`BYOD_LOG_FILE`",
        default="none",
        flag="`--log-file FILE`",
    ),
    Setting(
        what="log format on stderr (and in the log file)",
        environment="`BYOD_LOG_FORMAT`",
        default="`text`",
        flag="`--log-format text|json`",
    ),
    Setting(
        what="where worker processes' metrics are added up",
        environment="`PROMETHEUS_MULTIPROC_DIR`",
        default="a fresh temporary folder per `byod worker --metrics-port`",
        flag="",
    ),
    Setting(
        what="task-queue broker (distributed runs)",
        environment="`BYOD_BROKER_URL` (`redis://…`, `amqp://…`)",
        default="none",
        flag="",
    ),
    Setting(
        what="default task queue",
        environment="`BYOD_QUEUE`",
        default="`byod`",
        flag="",
    ),
    Setting(
        what="Redis visibility timeout",
        environment="`BYOD_BROKER_VISIBILITY_TIMEOUT` (seconds)",
        default="600",
        flag="",
    ),
    Setting(
        what="allow `sqlite` instances",
        environment="`BYOD_ALLOW_SQLITE_INSTANCES` (`1`/`0`)",
        default="`1` (the embedded demo needs them); set `0` where instances are remote",
        flag="",
    ),
    Setting(
        what=(
            "allow instances (PostgreSQL, MySQL/MariaDB, Convex) at loopback, private, "
            "link-local, CGNAT or unspecified addresses, and Convex URLs on `http`"
        ),
        environment="`BYOD_ALLOW_PRIVATE_INSTANCES` (`1`/`0`)",
        default="`0`",
        flag="",
    ),
    Setting(
        what="networks instances may be in although not public (your VPC)",
        environment="`BYOD_INSTANCE_NETWORKS` (CIDRs, comma-separated: `10.20.0.0/16,fd00::/8`)",
        default="none",
        flag="",
    ),
    Setting(
        what=(
            "keep `alembic_version` in step with each step (an Alembic history, during a "
            "changeover)"
        ),
        environment="`BYOD_KEEP_ALEMBIC_VERSION` (`1`/`0`)",
        default="`0`",
        flag="",
    ),
    Setting(
        what="Convex app folder (the one holding `convex/`)",
        environment="`BYOD_CONVEX_APP`",
        default="the migrations folder's parent, when it holds `convex/`",
        flag="",
    ),
    Setting(
        what="Convex deploy command (run in that folder, key in its environment)",
        environment="`BYOD_CONVEX_DEPLOY`",
        default="`npx convex deploy --yes`",
        flag="",
    ),
    Setting(
        what="which app code each Convex step runs on",
        environment=(
            "`BYOD_CONVEX_CODE` (`auto`, `git`: its migration's commit; `folder`: the folder as "
            "it is)"
        ),
        default="`auto`: `git` when the app folder is in a git work tree",
        flag="",
    ),
    Setting(
        what="Convex deploys at once in one byod process",
        environment="`BYOD_CONVEX_DEPLOY_CONCURRENCY`",
        default="4",
        flag="",
    ),
    Setting(
        what="byod's cache (each commit's Convex app code, npm packages per lock file, "
        "the local Convex backend's packages)",
        environment="`BYOD_CACHE_DIR`",
        default="`$XDG_CACHE_HOME/byod`, else `~/.cache/byod`",
        flag="",
    ),
    Setting(
        what="the app's own Convex deployment (`ctx.app` in migrations)",
        environment="`BYOD_APP_CONVEX_URL`, `BYOD_APP_CONVEX_KEY` (its deploy key)",
        default="none",
        flag="",
    ),
    Setting(
        what="CA that verifies instances' TLS certificates",
        environment="`BYOD_INSTANCE_SSL_CA` (a file, or `system`)",
        default=(
            "the system's store (PostgreSQL `sslmode=verify-full` uses `sslrootcert=system`; "
            "`verify-ca` needs this file); never a file of the operator's `~/.postgresql`"
        ),
        flag="",
    ),
)

#: The settings of ``byod serve`` (tokens, limits, browsers, proxies).
SERVE_SETTINGS: tuple[Setting, ...] = (
    Setting(
        what="PEM public key; RS256 for an RSA key, ES256 for an EC key",
        environment="`BYOD_JWT_PUBLIC_KEY`",
    ),
    Setting(
        what=(
            "path of a JWKS file, or an `https://` URL such as Clerk's "
            "`https://<your-domain>/.well-known/jwks.json` (PyJWT's `PyJWKClient`: fetched on "
            "first use, kept 5 minutes, fetched again for an unknown `kid` at most every 30 s, 5 "
            "s timeout); the token's `kid` picks the key. `http://` is refused"
        ),
        environment="`BYOD_JWT_JWKS`",
    ),
    Setting(
        what=(
            "PEM bundle of the CAs trusted for the JWKS URL (a private CA); default: the system's"
            " trust store"
        ),
        environment="`BYOD_JWT_JWKS_CA`",
    ),
    Setting(
        what="HS256 shared secret (development); at least 32 bytes (`openssl rand -hex 32`)",
        environment="`BYOD_JWT_SECRET`",
    ),
    Setting(
        what="when set, `aud` / `iss` must match",
        environment="`BYOD_JWT_AUDIENCE`, `BYOD_JWT_ISSUER`",
    ),
    Setting(
        what=(
            "the claim that marks an operator, a dotted path into the token (default `byod_role`;"
            " with Clerk e.g. `public_metadata.byod_role` or `org_role`)"
        ),
        environment="`BYOD_JWT_ROLE_CLAIM`",
    ),
    Setting(
        what=(
            "the value of that claim (or an element, when it is a list) that makes an operator "
            "(default `admin`; with Clerk's `org_role` e.g. `org:admin`)"
        ),
        environment="`BYOD_JWT_ADMIN_VALUE`",
    ),
    Setting(
        what="largest request body in bytes (default 65536); larger is 413",
        environment="`BYOD_API_MAX_BODY`",
    ),
    Setting(
        what="browser origins allowed to call `/v1/` (comma-separated, or `*`); default none",
        environment="`BYOD_CORS_ORIGINS`",
    ),
    Setting(
        what=(
            "proxies whose `X-Forwarded-For`/`-Proto` are believed (IPs or networks, `*`); "
            "default none"
        ),
        environment="`BYOD_FORWARDED_ALLOW_IPS`",
    ),
)
