"""The documentation runs and cannot drift from the code: each page's blocks run in a fresh
folder (see :mod:`tests.docs_blocks`), the blocks that do not run use only options their
commands have, the site builds with ``mkdocs build --strict`` and shows every command and
option, the README's links resolve, and the settings and errors pages name every setting
and error the code has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.core
import typer.main

try:  # Typer 0.29 carries its own copy of Click; earlier Typers use Click itself
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

from byod.cli import app
from tests.docs_blocks import Block, blocks, byod_lines, inline_byod_commands, script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
BIN = Path(sys.executable).parent
#: what the docs' examples may take in all (the issue's budget: about three minutes)
PAGE_SECONDS = 240


def _runnable(page: Path) -> bool:
    return any(b.runs and b.language in ("sh", "python") for b in blocks(page))


def _docs_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _runnable(p)], ids=lambda p: str(p.relative_to(DOCS))
)
def test_a_pages_examples_run_in_a_fresh_folder(page: Path, tmp_path: Path) -> None:
    """What a page tells a reader to type works, in order, from an empty folder."""
    folder = tmp_path / "reader"
    folder.mkdir()
    text = script(blocks(page))
    done = subprocess.run(
        ["bash", "-c", text],
        cwd=folder,
        env=_docs_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=PAGE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, (
        f"{page.relative_to(ROOT)}: exit {done.returncode}\n--- stdout\n"
        f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )


def _all_blocks() -> list[Block]:
    readme = blocks(ROOT / "README.md")
    return readme + [b for page in PAGES for b in blocks(page)]


ROOT_COMMAND = typer.main.get_command(app)


def _options(command: click.Command) -> dict[str, bool]:
    """Each option string of a command and whether it takes a value."""
    found: dict[str, bool] = {}
    for param in command.get_params(click.Context(command)):
        if param.param_type_name == "option":
            takes = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
            for opt in [*param.opts, *param.secondary_opts]:
                found[opt] = takes
    return found


def check_byod_line(words: list[str]) -> str | None:
    """Why a ``byod`` command line would be refused for an unknown command or option
    (None when every option is one its command has)."""
    command: click.Command = ROOT_COMMAND
    path = ["byod"]
    options = _options(command)
    n = 0
    while n < len(words):
        word = words[n]
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if name not in options:
                return f"`{' '.join(path)}` has no option {name}"
            if options[name] and "=" not in word:
                n += 1
        elif isinstance(command, typer.core.TyperGroup):
            sub = command.get_command(click.Context(command), word)
            if sub is None:
                if re.fullmatch(r"[A-Z_.\[\]|()]+", word):
                    return None  # a placeholder of a synopsis, as in `byod COMMAND`
                return f"`{' '.join(path)}` has no command {word}"
            command, path = sub, [*path, word]
            options = _options(command)
        n += 1
    return None


def test_every_byod_command_line_in_the_docs_uses_options_its_command_has() -> None:
    """Blocks that do not run (a server, a remote database, a long run) still cannot name
    an option or a command byod does not have; nor can those that do."""
    wrong = []
    for block in _all_blocks():
        if block.language not in ("sh", "bash", "shell", "console"):
            continue
        for words in byod_lines(block):
            why = check_byod_line(words)
            if why:
                wrong.append(f"{block.page.relative_to(ROOT)}:{block.line}: {why}")
    for page in [ROOT / "README.md", *PAGES]:
        for line, words in inline_byod_commands(page):
            why = check_byod_line(words)
            if why:
                wrong.append(f"{page.relative_to(ROOT)}:{line}: {why}")
    assert wrong == []


def test_the_checker_refuses_what_byod_would() -> None:
    """The option check above can fail: an unknown option or command is named."""
    assert check_byod_line(["migrate", "--all", "--concurrency", "8"]) is None
    assert check_byod_line(["-v", "migrate", "--all"]) is None
    assert check_byod_line(["users", "add", "--clerk-id", "x"]) is None
    assert "no option --colour" in (check_byod_line(["migrate", "--all", "--colour"]) or "")
    assert "no command teleport" in (check_byod_line(["teleport"]) or "")
    assert "no option --clerk" in (check_byod_line(["users", "add", "--clerk", "x"]) or "")


def test_python_blocks_that_do_not_run_still_compile() -> None:
    """A Python example shown but not run is at least valid Python."""
    for block in _all_blocks():
        if block.language == "python" and not block.runs:
            compile(block.text, f"{block.page.name}:{block.line}", "exec")


def test_the_site_builds_strict_and_shows_every_command_and_option(tmp_path: Path) -> None:
    """`mkdocs build --strict` (a broken link, a missing page or an anchor that is not
    there fails it), offline; the generated commands page names every command and
    option of the command line."""
    site = tmp_path / "site"
    done = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "true"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    page = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    missing = []

    def walk(command: click.Command, path: str) -> None:
        if f"<code>{path}</code>" not in page and path not in page:
            missing.append(path)
        for opt in _options(command):
            if opt not in page:
                missing.append(f"{path} {opt}")
        if isinstance(command, typer.core.TyperGroup):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(ROOT_COMMAND, "byod")
    assert missing == []
    assert "fonts.googleapis.com" not in page  # nothing fetched from outside
    http = (site / "reference" / "http-api.html").read_text(encoding="utf-8")
    assert "/v1/me" in http and "/v1/fleet/runs" in http
    api = (site / "reference" / "python-api.html").read_text(encoding="utf-8")
    assert "MigrationContext" in api and "Backfill" in api


def test_every_link_of_the_readme_resolves() -> None:
    """A link of the README to a file of the repository names one that is there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (ROOT / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert broken == []
    assert len(text.splitlines()) <= 250


def test_the_readme_lists_every_command() -> None:
    """The README's table of commands has a row for every command (a group's commands in
    its group's row), so a new command cannot be left out of it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `byod ")]
    missing = []
    for name, command in ROOT_COMMAND.commands.items():  # type: ignore[attr-defined]
        if isinstance(command, typer.core.TyperGroup):
            row = next((r for r in rows if r.startswith(f"| `byod {name}")), "")
            missing += [
                f"{name} {sub}"
                for sub in command.commands
                if not any(
                    f"`{form}`" in row for form in (sub, f"{name} {sub}", f"byod {name} {sub}")
                )
            ]
            if not row:
                missing.append(name)
        elif not any(f"`byod {name}`" in r or f"`{name}`" in r for r in rows):
            missing.append(name)
    assert missing == []


def test_the_settings_page_names_every_setting_the_code_reads() -> None:
    """The settings page is made from :mod:`byod.settings_reference`, which names every
    ``BYOD_*`` variable byod's source reads, and none it does not."""
    from byod.settings_reference import SERVE_SETTINGS, SETTINGS

    page = (DOCS / "reference" / "settings.md").read_text(encoding="utf-8")
    assert "<!-- generated: the settings -->" in page
    assert "<!-- generated: the settings of byod serve -->" in page
    setting = re.compile(r"\bBYOD_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
    catalog = "\n".join(s.environment + s.what for s in SETTINGS + SERVE_SETTINGS)
    named = set(setting.findall(catalog))
    files = [p for p in (ROOT / "src" / "byod").rglob("*.py") if p.name != "settings_reference.py"]
    read = set(setting.findall("\n".join(p.read_text() for p in files)))
    # the error codes byod's Convex module throws are not settings
    module = (ROOT / "src" / "byod" / "convex_module" / "byod.ts").read_text()
    internal = {"BYOD_CONVEX_ADMIN_TOKEN"}  # byod hands it to the local server it starts
    read -= set(setting.findall(module)) | internal
    assert sorted(read - named) == []  # read but not documented
    assert sorted(named - read) == []  # documented but never read


def test_the_errors_page_names_every_error() -> None:
    """The error table is made from the error classes at build time: every class byod
    raises is a row, with its exit status, HTTP status and what to do."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import reference
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    assert reference.ERRORS_TABLE in (DOCS / "reference" / "errors.md").read_text()
    table = reference.errors_markdown()
    classes = reference.error_classes()
    assert len(classes) > 20
    assert [c.__name__ for c in classes if f"| `{c.__name__}`" not in table] == []
    assert "| `NotFoundError` (an `AccessError`) | 1 | 404 `not-found` |" in table
    assert "| `PlanError` (an `InputError`) | 2 | 400 `bad-input` |" in table


def test_the_benchmark_charts_are_the_figures_drawn() -> None:
    """The committed charts are what ``bench/charts.py`` draws from ``bench/figures.json``
    (a figure changed without its chart fails here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import charts
    finally:
        sys.path.remove(str(ROOT / "bench"))
    drawn = charts.charts()
    assert drawn
    for name, svg in drawn.items():
        assert (DOCS / "benchmarks" / name).read_text() == svg, name
        assert f"benchmarks/{name}" in (DOCS / "benchmarks.md").read_text()


def test_mkdocs_is_installed_where_the_tests_run() -> None:
    """The docs' build tool comes with the test set-up (pinned in pyproject.toml)."""
    assert shutil.which("mkdocs", path=str(BIN)) is not None
