"""Sealing credentials: AES-256-GCM, a fresh 96-bit nonce per field, bound to its owner.

A sealed value is ``v1.<base64url(nonce || ciphertext || tag)>``. The associated data is
``byod:v1:<user id>:<field>``, so a ciphertext copied to another user or field does not
open. The key id (a hash of the key, never the key) is stored beside each sealed value, so
a wrong key is told apart from a corrupt ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from byod.errors import CredentialsError, SettingsError
from byod.redact import remember
from byod.settings import Settings

__all__ = ["KeySource", "Sealer", "load_sealer"]

_PREFIX = "v1."
_NONCE_BYTES = 12
_KEY_BYTES = 32


@dataclass(frozen=True)
class Sealer:
    """Seals and unseals one user's credential fields with one AES-256 key."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != _KEY_BYTES:
            raise SettingsError("the encryption key must be 32 bytes (base64 of 32 bytes)")

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the key; stored beside every sealed value."""
        return hashlib.sha256(b"byod-key-id:" + self.key).hexdigest()[:16]

    def seal(self, plaintext: str, *, user_id: int, field_name: str) -> str:
        """Encrypt ``plaintext`` for this user and field with a fresh nonce."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.key).encrypt(
            nonce, plaintext.encode(), _associated_data(user_id, field_name)
        )
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def unseal(self, token: str, *, user_id: int, field_name: str, key_id: str) -> str:
        """Decrypt a value sealed for this user and field.

        Raises :class:`CredentialsError` for a wrong key, a corrupt ciphertext or one
        moved from another user or field. The message names the user and field only.
        """
        where = f"the {field_name} of user {user_id}"
        if key_id != self.key_id:
            raise CredentialsError(
                f"{where} was sealed with key {key_id}, but the configured key is "
                f"{self.key_id}: wrong encryption key"
            )
        if not token.startswith(_PREFIX):
            raise CredentialsError(f"{where} is not a sealed value (unknown format): corrupt")
        try:
            raw = base64.urlsafe_b64decode(token[len(_PREFIX) :].encode())
        except (binascii.Error, ValueError) as exc:
            raise CredentialsError(f"{where} is corrupt (not base64)") from exc
        if len(raw) < _NONCE_BYTES + 16:
            raise CredentialsError(f"{where} is corrupt (too short)")
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        try:
            plain = AESGCM(self.key).decrypt(nonce, sealed, _associated_data(user_id, field_name))
        except InvalidTag as exc:
            raise CredentialsError(
                f"{where} does not open: the ciphertext is corrupt or was moved from "
                "another user or field"
            ) from exc
        return plain.decode()


def _associated_data(user_id: int, field_name: str) -> bytes:
    return f"byod:v1:{user_id}:{field_name}".encode()


@dataclass(frozen=True)
class KeySource:
    """Where the key came from: the environment, or a local key file (maybe just created)."""

    description: str
    created: bool = False


def load_sealer(settings: Settings, *, create: bool = False) -> tuple[Sealer, KeySource]:
    """The sealer for the configured key.

    BYOD_ENCRYPTION_KEY wins. Without it the local key file is used; ``create=True``
    (``byod init`` and ``byod demo``) writes a new one with mode 0600 when it is missing.
    """
    if settings.encryption_key is not None:
        return _from_base64(settings.encryption_key, "BYOD_ENCRYPTION_KEY"), KeySource(
            "BYOD_ENCRYPTION_KEY"
        )
    path = settings.key_file
    if path.exists():
        return _read_key_file(path), KeySource(f"key file {path}")
    if not create:
        raise SettingsError(
            f"no encryption key: set BYOD_ENCRYPTION_KEY (base64 of 32 bytes) or run "
            f"`byod init` to create the local key file {path}"
        )
    text = base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where its folder should be, no permission
        raise SettingsError(f"cannot create the key file {path}: {exc.strerror}") from exc
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another process: use that one
        return _read_key_file(path), KeySource(f"key file {path}")
    except OSError as exc:
        raise SettingsError(f"cannot create the key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    return _from_base64(text, str(path)), KeySource(f"key file {path}", created=True)


def _read_key_file(path: Path) -> Sealer:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read the key file {path}: {exc.strerror}") from exc
    return _from_base64(text, f"the key file {path}")


def _from_base64(text: str, origin: str) -> Sealer:
    remember(text.strip())  # masked from every message from now on
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SettingsError(f"{origin} is not valid base64 (expected base64 of 32 bytes)") from exc
    if len(key) != _KEY_BYTES:
        raise SettingsError(f"{origin} decodes to {len(key)} bytes; it must be 32 bytes")
    return Sealer(key)
