"""A migration's checksum follows its code, never its layout, on every Python byod
supports: pinned by a committed table of sample files (tests/checksums)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from byod.checksums import bytes_checksum, source_checksum
from byod.registry import Registry
from tests.conftest import write_migrations

SAMPLES = Path(__file__).parent / "checksums"
TABLE = json.loads((SAMPLES / "checksums.json").read_text())
RUFF = Path(sys.executable).parent / "ruff"


def test_the_samples_have_their_committed_checksums() -> None:
    assert len(TABLE) == 3
    for name, expected in TABLE.items():
        assert source_checksum((SAMPLES / name).read_bytes()) == expected, name


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_other_pythons_give_the_same_checksums(version: str) -> None:
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
    python = str(found[-1]) if found else shutil.which(f"python{version}")
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv)")
    module = Path(__file__).parents[1] / "src" / "byod" / "checksums.py"
    code = (
        "import importlib.util, json, pathlib, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(module)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"folder = pathlib.Path({str(SAMPLES)!r})\n"
        "print(json.dumps({p.name: m.source_checksum(p.read_bytes())"
        " for p in sorted(folder.glob('sample_*.py'))}))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == TABLE


def test_ruff_format_comments_and_blank_lines_are_not_drift(tmp_path: Path) -> None:
    for name, expected in TABLE.items():
        copy = tmp_path / name
        text = (SAMPLES / name).read_text()
        copy.write_text("# a comment on top\n\n\n" + text + "\n\n# a note at the end\n")
        subprocess.run([str(RUFF), "format", "-q", str(copy)], check=True)
        assert copy.read_bytes() != (SAMPLES / name).read_bytes()
        assert source_checksum(copy.read_bytes()) == expected, name


def test_a_change_to_code_or_to_a_string_literal_is_drift() -> None:
    text = (SAMPLES / "sample_everything.py").read_text()
    base = source_checksum(text.encode())
    edits = [
        text.replace("WHERE id > :low", "WHERE id >= :low"),  # SQL text
        text.replace("factor: int = 2", "factor: int = 3"),
        text.replace("case 1 if label:", "case 2 if label:"),
        text.replace("nullable=True", "nullable=False"),
    ]
    for edited in edits:
        assert edited != text
        assert source_checksum(edited.encode()) != base
    reflowed = text.replace("Docstring of a class.", "Docstring of\n    a class.")
    assert source_checksum(reflowed.encode()) == base  # a docstring's words, not its lines
    assert (
        source_checksum(text.replace("Docstring of a class.", "Docstring of the class.").encode())
        != base
    )


def test_a_stamp_recorded_by_an_older_byod_is_accepted_while_the_file_is_unchanged(
    tmp_path: Path,
) -> None:
    folder = write_migrations(
        tmp_path / "m",
        {
            "001_a.py": (SAMPLES / "sample_everything.py")
            .read_text()
            .replace("001_everything", "001_a")
        },
    )
    migration = Registry.load(folder).get("001_a")
    assert migration is not None
    raw = bytes_checksum((folder / "001_a.py").read_bytes())
    assert migration.legacy_checksum == raw != migration.checksum
    assert migration.checksum_matches(raw) and migration.checksum_matches(migration.checksum)
    assert not migration.checksum_matches(bytes_checksum(b"something else"))


def test_a_change_made_to_an_applied_migration_is_accepted_once_and_recorded(
    tmp_path: Path,
) -> None:
    """Stamps an older byod wrote (the file's bytes) meet a reformatted file: drift, once;
    `verify --accept MIGRATION` restamps the instances and the fleet's record, with who,
    when, the old and the new checksum; then the runs go on."""
    import sqlalchemy as sa

    from tests.conftest import TEST_KEY
    from tests.migration_sets import counter_migrations
    from tests.test_cli import Cli

    migrations = counter_migrations(tmp_path / "migrations")
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, BYOD_MIGRATIONS=str(migrations))
    assert cli("init").code == 0
    for name in ("a", "b"):
        (tmp_path / f"{name}.db").touch()
        assert cli("users", "add", "--clerk-id", name).code == 0
        assert cli("connect", name, "--url", f"sqlite:///{tmp_path / name}.db").code == 0
    assert cli("migrate", "--all", "--to", "2").code == 0
    bump = migrations / "002_bump.py"
    old_bytes = bytes_checksum(bump.read_bytes())
    for name in ("a", "b"):  # as an older byod stamped them: the checksum of the bytes
        engine = sa.create_engine(f"sqlite:///{tmp_path / name}.db")
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE byod_schema_stamp SET checksum = :c WHERE id = '002_bump'"),
                {"c": old_bytes},
            )
        engine.dispose()
    assert cli("verify", "--all").code == 0  # the old checksum, the same file: fine
    bump.write_text("# reformatted by a tool\n" + bump.read_text().replace("    ", "    "))
    bump.write_text(bump.read_text() + "\n\n")
    assert cli("verify", "--all").code == 1  # old stamps cannot tell: reported
    accepted = cli("verify", "--accept", "002_bump", "--json")
    assert accepted.code == 0, accepted.err
    assert [a["old"] for a in accepted.json()] == [old_bytes, old_bytes]  # type: ignore[index]
    assert cli("verify", "--all").code == 0
    assert cli("migrate", "--all").code == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'byod.db'}")
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM byod_accepted_checksums")).one()
    engine.dispose()
    assert (row.migration_id, row.old_checksum, row.users) == ("002_bump", old_bytes, 2)
    assert row.accepted_by and row.accepted_at and row.new_checksum != old_bytes


def test_old_byte_checksum_stamps_take_the_syntax_checksum_at_the_next_step(
    tmp_path: Path,
) -> None:
    """Upgraded lazily, under the next step's lock: after that a reformat is no drift."""
    import sqlalchemy as sa

    from tests.conftest import TEST_KEY
    from tests.migration_sets import counter_migrations
    from tests.test_cli import Cli

    migrations = counter_migrations(tmp_path / "migrations")
    cli = Cli(tmp_path, BYOD_ENCRYPTION_KEY=TEST_KEY, BYOD_MIGRATIONS=str(migrations))
    assert cli("init").code == 0
    (tmp_path / "a.db").touch()
    assert cli("users", "add", "--clerk-id", "a").code == 0
    assert cli("connect", "a", "--url", f"sqlite:///{tmp_path / 'a.db'}").code == 0
    assert cli("migrate", "a", "--to", "2").code == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    create = migrations / "001_create.py"
    with engine.begin() as conn:  # as an older byod stamped it
        conn.execute(
            sa.text("UPDATE byod_schema_stamp SET checksum = :c WHERE id = '001_create'"),
            {"c": bytes_checksum(create.read_bytes())},
        )
    assert cli("migrate", "a").code == 0  # the next step restamps 001 in its transaction
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT checksum FROM byod_schema_stamp WHERE id = '001_create'")
        ).scalar_one()
    engine.dispose()
    assert stored == source_checksum(create.read_bytes())
    create.write_text("# reformatted\n\n" + create.read_text() + "\n\n")
    assert cli("verify", "a").code == 0  # no drift now
