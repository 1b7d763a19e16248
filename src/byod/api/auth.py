"""Bearer-token authentication: JWTs verified with PyJWT against a configured key.

Keys: ``BYOD_JWT_SECRET`` (HS256, for development; at least 32 bytes),
``BYOD_JWT_PUBLIC_KEY`` (a PEM; RS256 or ES256 by key type) or ``BYOD_JWT_JWKS`` (a JWKS
file, or an ``https://`` URL such as Clerk's ``/.well-known/jwks.json``, fetched with
PyJWT's ``PyJWKClient`` and cached; the token's ``kid`` picks the key). ``exp`` is required
and ``nbf`` honoured; ``aud`` and ``iss`` are checked when ``BYOD_JWT_AUDIENCE`` /
``BYOD_JWT_ISSUER`` are set. Algorithm ``none`` is never accepted. ``sub`` is the user's
clerk id; the claim at ``BYOD_JWT_ROLE_CLAIM`` (a dotted path, default ``byod_role``) equal
to ``BYOD_JWT_ADMIN_VALUE`` (default ``admin``), or a list containing it, marks an operator.
A JWKS URL that cannot be fetched makes a request fail with :class:`KeysUnavailableError`
(503), never accept a token.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from byod.errors import (
    AuthError,
    KeysUnavailableError,
    SettingsError,
)

__all__ = ["AuthSettings", "Authenticator", "Principal", "mint_test_token"]

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
#: How long a fetched JWKS is used before it is fetched again (seconds).
JWKS_LIFESPAN = 300.0
#: How long one JWKS fetch may take (seconds).
JWKS_TIMEOUT = 5.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: their clerk id, and whether they are an operator."""

    clerk_id: str
    admin: bool


@dataclass(frozen=True)
class AuthSettings:
    """How tokens are verified."""

    secret: str | None = field(default=None, repr=False)
    public_key_pem: str | None = None
    jwks_path: Path | None = None
    jwks_url: str | None = None
    #: A PEM bundle of CAs trusted for the JWKS URL (default: the system's trust store).
    jwks_ca_file: Path | None = None
    audience: str | None = None
    issuer: str | None = None
    role_claim: str = "byod_role"
    admin_value: str = "admin"

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"BYOD_JWT_SECRET is {len(self.secret.encode())} bytes; HS256 needs at least "
                f"{MIN_SECRET_BYTES}: make one with `openssl rand -hex 32`"
            )
        if self.jwks_url is not None and urlsplit(self.jwks_url).scheme != "https":
            raise SettingsError("BYOD_JWT_JWKS must be a file path or an https:// URL")
        if not self.role_claim or any(not part for part in self.role_claim.split(".")):
            raise SettingsError("BYOD_JWT_ROLE_CLAIM must be a claim name or a dotted path")
        if not (self.secret or self.public_key_pem or self.jwks_path or self.jwks_url):
            raise SettingsError(
                "no token key: set BYOD_JWT_PUBLIC_KEY (PEM), BYOD_JWT_JWKS (file or https "
                "URL) or, for development, BYOD_JWT_SECRET"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthSettings:
        """Read the ``BYOD_JWT_*`` variables."""
        env = os.environ if env is None else env
        jwks = env.get("BYOD_JWT_JWKS") or None
        remote = jwks is not None and "://" in jwks
        ca = env.get("BYOD_JWT_JWKS_CA") or None
        return cls(
            secret=env.get("BYOD_JWT_SECRET") or None,
            public_key_pem=env.get("BYOD_JWT_PUBLIC_KEY") or None,
            jwks_path=Path(jwks) if jwks and not remote else None,
            jwks_url=jwks if remote else None,
            jwks_ca_file=Path(ca) if ca else None,
            audience=env.get("BYOD_JWT_AUDIENCE") or None,
            issuer=env.get("BYOD_JWT_ISSUER") or None,
            role_claim=env.get("BYOD_JWT_ROLE_CLAIM") or "byod_role",
            admin_value=env.get("BYOD_JWT_ADMIN_VALUE") or "admin",
        )


def mint_test_token(
    settings: AuthSettings, sub: str, *, admin: bool = False, seconds: int = 3600
) -> str:
    """A token ``byod serve`` accepts with these settings, signed HS256 with
    ``BYOD_JWT_SECRET``: for developers and tests. Its subject is ``sub`` exactly;
    ``admin`` puts the operator's role in the role claim (a dotted path is nested). The
    audience and issuer are the configured ones. :class:`SettingsError` where tokens
    are verified with a public key or a JWKS (their issuer signs them, not byod)."""
    if settings.public_key_pem or settings.jwks_path or settings.jwks_url:
        raise SettingsError(
            "tokens are verified with BYOD_JWT_PUBLIC_KEY or BYOD_JWT_JWKS here: get one "
            "from your identity provider (byod signs test tokens with BYOD_JWT_SECRET only)"
        )
    if not settings.secret:
        raise SettingsError("no BYOD_JWT_SECRET: set one (`openssl rand -hex 32`) to sign tokens")
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + seconds}
    if settings.audience:
        claims["aud"] = settings.audience
    if settings.issuer:
        claims["iss"] = settings.issuer
    if admin:
        *parents, last = settings.role_claim.split(".")
        holder = claims
        for part in parents:
            holder = holder.setdefault(part, {})  # type: ignore[assignment]
        holder[last] = settings.admin_value
    return jwt.encode(claims, settings.secret, algorithm="HS256")


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`.

    With a JWKS URL, :meth:`verify` may fetch the keys (blocking, at most
    ``JWKS_TIMEOUT`` seconds): call it from a worker thread, not the event loop.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._keys: list[tuple[object, str]] = []  # (key, algorithm)
        self._jwks: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if settings.secret:
            self._keys.append((settings.secret, "HS256"))
        if settings.public_key_pem:
            self._keys.append(_public_key(settings.public_key_pem))
        if settings.jwks_path:
            self._jwks = _jwks_file(settings.jwks_path)
        if settings.jwks_url:
            self._client = jwt.PyJWKClient(
                settings.jwks_url,
                cache_jwk_set=True,
                lifespan=JWKS_LIFESPAN,
                timeout=JWKS_TIMEOUT,
                ssl_context=_tls_context(settings.jwks_ca_file),
            )

    @property
    def operator_rule(self) -> str:
        """How an operator is recognised, for messages."""
        return f"{self.settings.role_claim}: {self.settings.admin_value}"

    def authenticate(self, authorization: str | None) -> Principal:
        """Verify ``Authorization: Bearer <token>``."""
        if not authorization:
            raise AuthError("missing Authorization header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """Verify a bare token."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed token") from exc
        algorithm, kid = header.get("alg"), header.get("kid")
        candidates = self._candidates(kid)
        if kid is not None and not any(allowed == algorithm for _, allowed in candidates):
            raise AuthError(f"no {algorithm} signing key here has the token's kid {kid!r}")
        for key, allowed in candidates:
            if algorithm != allowed:
                continue
            try:
                claims = jwt.decode(
                    token,
                    key,  # type: ignore[arg-type]
                    algorithms=[allowed],
                    audience=self.settings.audience,
                    issuer=self.settings.issuer,
                    options={"require": ["exp", "sub"], "verify_aud": bool(self.settings.audience)},
                )
            except jwt.ExpiredSignatureError as exc:
                raise AuthError("the token has expired") from exc
            except jwt.ImmatureSignatureError as exc:
                raise AuthError("the token is not valid yet (nbf)") from exc
            except jwt.PyJWTError as exc:
                raise AuthError(f"invalid token: {type(exc).__name__}") from exc
            subject = claims.get("sub")
            if not isinstance(subject, str) or not subject:
                raise AuthError("the token has no subject")
            return Principal(subject, self._is_admin(claims))
        raise AuthError(f"tokens signed with {algorithm!r} are not accepted here")

    def _is_admin(self, claims: Mapping[str, object]) -> bool:
        value: object = claims
        for part in self.settings.role_claim.split("."):
            if not isinstance(value, Mapping):
                return False
            value = value.get(part)
        wanted = self.settings.admin_value
        return value == wanted or (isinstance(value, list) and wanted in value)

    def _candidates(self, kid: object) -> list[tuple[object, str]]:
        keys = list(self._keys)
        if self._jwks is not None:
            for jwk in self._jwks.keys:
                if kid is None or jwk.key_id == kid:
                    keys.append((jwk.key, jwk.algorithm_name))
        if self._client is not None and isinstance(kid, str):
            remote = self._remote_key(self._client, kid)
            if remote is not None:
                keys.append((remote.key, remote.algorithm_name))
        return keys

    def _remote_key(self, client: jwt.PyJWKClient, kid: str) -> jwt.PyJWK | None:
        """The key ``kid`` of the JWKS URL (cached; fetched again for an unknown kid)."""
        try:
            client.get_jwk_set()  # a fetch failure or a broken key set: the server's problem
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, ValueError) as exc:
            raise KeysUnavailableError(
                f"cannot fetch the token keys from {client.uri}: {type(exc).__name__}"
            ) from exc
        try:
            return client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise KeysUnavailableError(
                f"cannot fetch the token keys from {client.uri}: {type(exc).__name__}"
            ) from exc
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, ValueError):
            return None  # no such kid: the token is refused (401)


def _public_key(pem: str) -> tuple[object, str]:
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SettingsError(
            "BYOD_JWT_PUBLIC_KEY is not a PEM public key "
            "(expected '-----BEGIN PUBLIC KEY-----' ... '-----END PUBLIC KEY-----')"
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, "ES256"
    raise SettingsError("BYOD_JWT_PUBLIC_KEY must be an RSA or EC public key")


def _jwks_file(path: Path) -> jwt.PyJWKSet:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the JWKS file {path}: {type(exc).__name__}") from exc
    except ValueError as exc:
        raise SettingsError(f"the JWKS file {path} is not JSON") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"the JWKS file {path} is not a JSON object with 'keys'")
    try:
        return jwt.PyJWKSet.from_dict(data)
    except jwt.PyJWTError as exc:
        raise SettingsError(f"the JWKS file {path} has no usable key: {exc}") from exc


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"cannot read BYOD_JWT_JWKS_CA {ca_file}: {type(exc).__name__}"
        ) from exc
