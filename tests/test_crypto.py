"""Sealed credentials: AES-256-GCM bound to user and field; keys from env or a 0600 file."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from byod.crypto import KeySource, Sealer, load_sealer
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
    with pytest.raises(CredentialsError, match="the secret of user 1 does not open"):
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


#: A value sealed by byod 0.x for user 7's url, with the key bytes 0..31: its format, key
#: id and associated data must keep opening after every upgrade (known answer).
KNOWN_KEY = bytes(range(32))
KNOWN_KEY_ID = "1e30072a0999eede"
KNOWN_SEALED = (
    "v1.AAECAwQFBgcICQoLN22lb6KXp2j8La2knogIHbmltFeCHis8XAXL4GUIbcJtdYCfwKw97BHKHoP82B-8"
    "nBhVJZDMAa3q-e37Ks0P"
)
KNOWN_PLAIN = "postgresql://app:s3cret@db.example.com/tenant_7"


def test_a_value_sealed_by_an_earlier_byod_keeps_opening() -> None:
    """Known answer: the key id's derivation (sha256 of ``byod-key-id:`` + key, 16 hex
    digits), the ``v1.`` prefix, nonce-first layout and the associated data
    ``byod:v1:{user}:{field}`` are what stored credentials were sealed with."""
    sealer = Sealer(KNOWN_KEY)
    assert sealer.key_id == KNOWN_KEY_ID
    assert sealer.unseal(KNOWN_SEALED, user_id=7, field_name="url", key_id=KNOWN_KEY_ID) == (
        KNOWN_PLAIN
    )
    for user_id, field_name in ((8, "url"), (7, "secret")):
        with pytest.raises(CredentialsError, match="does not open"):
            sealer.unseal(KNOWN_SEALED, user_id=user_id, field_name=field_name, key_id=KNOWN_KEY_ID)
    fresh = sealer.seal(KNOWN_PLAIN, user_id=7, field_name="url")
    assert fresh.startswith("v1.") and fresh != KNOWN_SEALED  # a fresh nonce each time
    raw = base64.urlsafe_b64decode(fresh[3:])
    assert len(raw) == 12 + len(KNOWN_PLAIN.encode()) + 16  # nonce, ciphertext, tag


def test_the_environment_key_wins_over_a_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "byod.key"
    key_file.write_text(base64.b64encode(b"f" * 32).decode() + "\n")
    env = {
        "BYOD_ENCRYPTION_KEY": base64.b64encode(KNOWN_KEY).decode(),
        "BYOD_KEY_FILE": str(key_file),
    }
    sealer, source = load_sealer(Settings.load(database_url="sqlite://", env=env))
    assert sealer.key_id == KNOWN_KEY_ID and source.description == "BYOD_ENCRYPTION_KEY"
    only_file = {"BYOD_KEY_FILE": str(key_file)}
    sealer, source = load_sealer(Settings.load(database_url="sqlite://", env=only_file))
    assert sealer.key_id == Sealer(b"f" * 32).key_id and "key file" in source.description


def test_a_key_file_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "byod.key"
    folder.mkdir()  # a folder where the key file should be: it cannot be read
    with pytest.raises(SettingsError) as unreadable:
        load_sealer(Settings.load(env={"BYOD_KEY_FILE": str(folder)}, cwd=tmp_path))
    assert unreadable.value.message.startswith(f"cannot read the key file {folder}: ")
    bad = tmp_path / "bad.key"
    bad.write_text("not base64!\n")
    with pytest.raises(SettingsError) as malformed:
        load_sealer(Settings.load(env={"BYOD_KEY_FILE": str(bad)}, cwd=tmp_path))
    assert malformed.value.message == (
        f"the key file {bad} is not valid base64 (expected base64 of 32 bytes)"
    )


def test_the_environment_key_is_named_checked_strictly_and_masked(tmp_path: Path) -> None:
    from byod.redact import mask

    good = base64.b64encode(b"m" * 32).decode()
    for bad in (good[:10] + "!" + good[10:], "definitely-not-a-base64-key"):
        with pytest.raises(SettingsError) as refused:
            load_sealer(Settings.load(env={"BYOD_ENCRYPTION_KEY": bad}, cwd=tmp_path))
        assert refused.value.message.startswith("BYOD_ENCRYPTION_KEY ")
    load_sealer(Settings.load(env={"BYOD_ENCRYPTION_KEY": good}, cwd=tmp_path))
    assert good not in mask(f"a message that quotes {good}")


def test_a_key_file_is_created_with_its_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "byod.key"
    _, source = load_sealer(
        Settings.load(env={"BYOD_KEY_FILE": str(path)}, cwd=tmp_path), create=True
    )
    assert source.created and path.is_file()
    assert len(base64.b64decode(path.read_text().strip())) == 32


def test_where_the_key_came_from_is_said(tmp_path: Path) -> None:
    path = tmp_path / "byod.key"
    settings = Settings.load(env={"BYOD_KEY_FILE": str(path)}, cwd=tmp_path)
    created, made = load_sealer(settings, create=True)
    assert made.description == f"key file {path}" and made.created
    again, read = load_sealer(settings)
    assert read.description == f"key file {path}" and not read.created
    assert again.key_id == created.key_id
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    nowhere = Settings.load(env={"BYOD_KEY_FILE": str(blocked / "byod.key")}, cwd=tmp_path)
    with pytest.raises(SettingsError) as refused:
        load_sealer(nowhere, create=True)
    assert refused.value.message.startswith(f"cannot create the key file {blocked / 'byod.key'}: ")


def test_a_key_of_the_wrong_size_is_refused_by_name() -> None:
    """Kills crypto's ``Sealer.__post_init__`` message mutants (None, XX…XX, upper case)."""
    with pytest.raises(SettingsError) as refused:
        Sealer(b"k" * 31)
    assert refused.value.message == "the encryption key must be 32 bytes (base64 of 32 bytes)"


def test_a_key_file_made_meanwhile_by_another_process_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first runs at once: the one that loses the race reads the winner's key file.

    The other process is simulated by writing its key file between byod's check that the
    file is missing and its exclusive create (kills ``_read_key_file(None)`` and
    ``KeySource(None)`` in that branch).
    """
    import byod.crypto

    path = tmp_path / "byod.key"
    theirs = base64.b64encode(b"t" * 32).decode()
    draw = byod.crypto.secrets.token_bytes

    def the_other_process_writes_first(size: int) -> bytes:
        path.write_text(theirs + "\n")
        return draw(size)

    monkeypatch.setattr(byod.crypto.secrets, "token_bytes", the_other_process_writes_first)
    sealer, source = load_sealer(
        Settings.load(env={"BYOD_KEY_FILE": str(path)}, cwd=tmp_path), create=True
    )
    assert sealer.key_id == Sealer(b"t" * 32).key_id
    assert source == KeySource(f"key file {path}", created=False)
    assert path.read_text() == theirs + "\n"


def test_a_key_file_where_nothing_can_be_created_is_named(tmp_path: Path) -> None:
    """The folder exists but refuses a new file (/proc): the message names the path and why."""
    settings = Settings.load(env={"BYOD_KEY_FILE": "/proc/byod.key"}, cwd=tmp_path)
    with pytest.raises(SettingsError) as refused:
        load_sealer(settings, create=True)
    assert refused.value.message == (
        "cannot create the key file /proc/byod.key: No such file or directory"
    )


def test_a_generated_key_is_masked_from_then_on(tmp_path: Path) -> None:
    """The key byod writes to a new key file never appears in a later message."""
    from byod.redact import mask

    path = tmp_path / "byod.key"
    load_sealer(Settings.load(env={"BYOD_KEY_FILE": str(path)}, cwd=tmp_path), create=True)
    key = path.read_text().strip()
    assert mask(f"a message that quotes {key}") == "a message that quotes ***"
