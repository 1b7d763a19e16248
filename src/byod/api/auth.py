"""Bearer-token authentication: JWTs verified with PyJWT against a configured key.

Keys: ``BYOD_JWT_SECRET`` (HS256, for development), ``BYOD_JWT_PUBLIC_KEY`` (a PEM;
RS256 or ES256 by key type) or ``BYOD_JWT_JWKS`` (a JWKS file; the token's ``kid``
picks the key). ``exp`` is required and ``nbf`` honoured; ``aud`` and ``iss`` are checked
when ``BYOD_JWT_AUDIENCE`` / ``BYOD_JWT_ISSUER`` are set. Algorithm ``none`` is never
accepted. ``sub`` is the user's clerk id; ``byod_role: admin`` marks an operator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from byod.errors import ByodError, SettingsError

__all__ = ["AuthError", "AuthSettings", "Authenticator", "Principal"]


class AuthError(ByodError):
    """The request carries no valid token: sign in again."""


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
    audience: str | None = None
    issuer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AuthSettings:
        """Read the ``BYOD_JWT_*`` variables."""
        env = os.environ if env is None else env
        jwks = env.get("BYOD_JWT_JWKS")
        settings = cls(
            secret=env.get("BYOD_JWT_SECRET") or None,
            public_key_pem=env.get("BYOD_JWT_PUBLIC_KEY") or None,
            jwks_path=Path(jwks) if jwks else None,
            audience=env.get("BYOD_JWT_AUDIENCE") or None,
            issuer=env.get("BYOD_JWT_ISSUER") or None,
        )
        if not (settings.secret or settings.public_key_pem or settings.jwks_path):
            raise SettingsError(
                "no token key: set BYOD_JWT_PUBLIC_KEY (PEM), BYOD_JWT_JWKS (file) "
                "or, for development, BYOD_JWT_SECRET"
            )
        return settings


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._keys: list[tuple[object, str]] = []  # (key, algorithm)
        self._jwks: jwt.PyJWKSet | None = None
        if settings.secret:
            self._keys.append((settings.secret, "HS256"))
        if settings.public_key_pem:
            key = load_pem_public_key(settings.public_key_pem.encode())
            if isinstance(key, rsa.RSAPublicKey):
                self._keys.append((key, "RS256"))
            elif isinstance(key, ec.EllipticCurvePublicKey):
                self._keys.append((key, "ES256"))
            else:
                raise SettingsError("BYOD_JWT_PUBLIC_KEY must be an RSA or EC public key")
        if settings.jwks_path:
            try:
                self._jwks = jwt.PyJWKSet.from_json(settings.jwks_path.read_text())
            except (OSError, jwt.PyJWTError) as exc:
                raise SettingsError(f"cannot read the JWKS file {settings.jwks_path}") from exc

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
        algorithm = header.get("alg")
        for key, allowed in self._candidates(header.get("kid")):
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
            return Principal(subject, claims.get("byod_role") == "admin")
        raise AuthError(f"tokens signed with {algorithm!r} are not accepted here")

    def _candidates(self, kid: object) -> list[tuple[object, str]]:
        keys = list(self._keys)
        if self._jwks is not None:
            for jwk in self._jwks.keys:
                if kid is None or jwk.key_id == kid:
                    keys.append((jwk.key, jwk.algorithm_name))
        return keys
