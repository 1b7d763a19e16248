"""Every command a message of byod's names (a hint, an error, a notice: ```byod ...```
in the source) is a command that exists, with options it accepts; and the suite itself
never reads the caller's folder or settings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import byod
from tests.test_cli import Cli

SOURCE = Path(byod.__file__).parent
_MENTION = re.compile(r"`(byod(?: [^`{}]*)?)[`{]")
#: words of a mention that stand for a value, not a command
_PLACEHOLDER = re.compile(r"^([A-Z][A-Z_]*|-|\.\.\.|…)$")


def mentions() -> list[tuple[str, str]]:
    """(file, the command as written) for every ```byod ...``` in byod's source."""
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        for match in _MENTION.finditer(text):
            found.append((str(path.relative_to(SOURCE)), match.group(1)))
    return sorted(set(found))


def test_the_source_names_commands() -> None:
    assert len(mentions()) > 20  # the scan finds them (a broken pattern would find none)


@pytest.mark.parametrize(("where", "mention"), mentions())
def test_a_command_a_message_names_exists_with_its_options(
    where: str, mention: str, tmp_path: Path
) -> None:
    words = mention.split()[1:]
    command = []
    for word in words:
        if word.startswith("-") or _PLACEHOLDER.match(word) or not word.islower():
            break
        command.append(word)
    options = [w.split("=")[0] for w in words if w.startswith("--")]
    shown = Cli(tmp_path)(*command, "--help")
    assert shown.code == 0, f"{where}: `{mention}`: {shown.err}"
    for option in options:
        assert option in shown.out, f"{where}: `{mention}`: {option} is no option of it"


def test_the_suite_never_sees_the_callers_folder_or_settings(tmp_path: Path) -> None:
    """The fixtures read no ``./migrations`` or ``byod.db`` of the folder pytest was
    started in (a newcomer's `byod new` there broke `make test`), nor its BYOD_*."""
    assert Path.cwd() == tmp_path
    assert not [name for name in os.environ if name.startswith("BYOD_") and "TEST" not in name]
