"""Sealed credentials: AES-256-GCM bound to user and field; keys from env or a 0600 file."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from byod.crypto import Sealer, load_sealer
from byod.errors import CredentialsError, SettingsError
from byod.settings import Settings

SECRET = "postgresql://app:hunter2-very-secret@db.example/notes"


def sealer(byte: bytes = b"k") -> Sealer:
    return Sealer(byte * 32)


@given(st.text(max_size=500), st.integers(1, 10**9), st.sampled_from(["url", "secret"]))
def test_seal_then_unseal_gives_the_plaintext_back(text: str, user_id: int, field: str) -> None:
    s = sealer()
    token = s.seal(text, user_id=user_id, field_name=field)
    assert s.unseal(token, user_id=user_id, field_name=field, key_id=s.key_id) == text


def test_each_seal_uses_a_fresh_nonce() -> None:
    s = sealer()
    assert s.seal(SECRET, user_id=1, field_name="url") != s.seal(
        SECRET, user_id=1, field_name="url"
    )


def test_wrong_key_is_told_apart_and_names_no_secret() -> None:
    token = sealer(b"a").seal(SECRET, user_id=1, field_name="url")
    wrong = sealer(b"b")
    with pytest.raises(CredentialsError, match="wrong encryption key") as caught:
        wrong.unseal(token, user_id=1, field_name="url", key_id=sealer(b"a").key_id)
    assert "hunter2" not in str(caught.value)


def test_ciphertext_moved_to_another_user_does_not_open() -> None:
    s = sealer()
    token = s.seal(SECRET, user_id=1, field_name="url")
    with pytest.raises(CredentialsError, match="moved from another user"):
        s.unseal(token, user_id=2, field_name="url", key_id=s.key_id)


def test_ciphertext_moved_to_another_field_does_not_open() -> None:
    s = sealer()
    token = s.seal(SECRET, user_id=1, field_name="url")
    with pytest.raises(CredentialsError):
        s.unseal(token, user_id=1, field_name="secret", key_id=s.key_id)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"),
        lambda t: t[:10],
        lambda t: "v1.%%%%",
        lambda t: "garbage",
    ],
)
def test_corrupt_ciphertext_is_a_clear_error(mangle: object) -> None:
    s = sealer()
    token = s.seal(SECRET, user_id=1, field_name="url")
    with pytest.raises(CredentialsError) as caught:
        s.unseal(mangle(token), user_id=1, field_name="url", key_id=s.key_id)  # type: ignore[operator]
    assert "hunter2" not in str(caught.value)
    assert "user 1" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "words"),
    [("not base64!!", "not valid base64"), (base64.b64encode(b"short").decode(), "32 bytes")],
)
def test_malformed_key_is_a_settings_error(tmp_path: Path, key: str, words: str) -> None:
    settings = Settings.load(env={"BYOD_ENCRYPTION_KEY": key}, cwd=tmp_path)
    with pytest.raises(SettingsError, match=words):
        load_sealer(settings)


def test_missing_key_says_how_to_get_one(tmp_path: Path) -> None:
    settings = Settings.load(env={}, cwd=tmp_path)
    with pytest.raises(SettingsError, match="BYOD_ENCRYPTION_KEY"):
        load_sealer(settings)


def test_local_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    settings = Settings.load(env={}, cwd=tmp_path)
    first, source = load_sealer(settings, create=True)
    assert source.created
    mode = stat.S_IMODE((tmp_path / "byod.key").stat().st_mode)
    assert mode == 0o600
    again, source_again = load_sealer(settings, create=True)
    assert not source_again.created
    assert again.key_id == first.key_id
