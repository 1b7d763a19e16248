"""The code blocks of byod's documentation, as the docs tests run them.

A page's blocks run as one shell script in a fresh folder, in the order the page gives
them, state carried from one to the next:

- a ``sh`` block runs as written;
- a ``python`` block with ``title="path"`` is a file the reader writes: it is written there;
- any other ``python`` block runs with ``python -`` (the folder's state, nothing else);
- a block right after an HTML comment ``<!-- not run: why -->`` does not run (it starts a
  server, needs one this page did not set up, or takes long); the ``byod`` command lines
  in it are checked instead, each option against its command's own options.

Blocks in other languages (``text``, ``json``, ``console``, ``ts``…) are shown, not run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "blocks", "byod_lines", "inline_byod_commands", "script"]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")
_TITLE = re.compile(r'title="([^"]+)"')
_NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->")
#: a word after which the next one is a command
_BEFORE_A_COMMAND = {"|", "&&", "||", ";", "time", "nohup", "exec", "sudo"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    language: str
    title: str | None
    text: str
    runs: bool


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").split("\n")
    n = 0
    last_text = ""
    while n < len(lines):
        opening = _FENCE.match(lines[n])
        if not opening:
            if lines[n].strip():
                last_text = lines[n].strip()
            n += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = opening["info"].strip()
        language = info.split()[0] if info else ""
        title = _TITLE.search(info)
        body: list[str] = []
        start = n + 1
        n += 1
        while n < len(lines) and not lines[n].strip().startswith(fence):
            body.append(lines[n][indent:] if lines[n][:indent].isspace() else lines[n])
            n += 1
        found.append(
            Block(
                page,
                start,
                language,
                title.group(1) if title else None,
                "\n".join(body) + "\n",
                not _NOT_RUN.search(last_text),
            )
        )
        last_text = ""
        n += 1
    return found


def script(page_blocks: list[Block]) -> str:
    """The shell script that runs a page's runnable blocks, in order."""
    parts = ["set -euo pipefail"]
    for block in page_blocks:
        if not block.runs:
            continue
        where = f"# {block.page.name}:{block.line}"
        if block.language in ("sh", "bash", "shell"):
            parts += [where, block.text]
        elif block.language == "python" and block.title:
            target = shlex.quote(block.title)
            parts += [
                where,
                f'mkdir -p "$(dirname {target})"',
                f"cat > {target} <<'BYOD_DOCS_EOF'\n{block.text}BYOD_DOCS_EOF",
            ]
        elif block.language == "python":
            parts += [where, f"python - <<'BYOD_DOCS_EOF'\n{block.text}BYOD_DOCS_EOF"]
    return "\n".join(parts) + "\n"


def byod_lines(block: Block) -> list[list[str]]:
    """The ``byod`` command lines of a block, as words (continuations joined, comments
    and what follows a pipe or ``&&`` left out)."""
    text = block.text.replace("\\\n", " ")
    found = []
    for line in text.split("\n"):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for start, word in enumerate(words):
            command_word = word.rsplit("$(", 1)[-1]  # TOKEN=$(byod token …)
            if command_word != "byod" and not command_word.endswith("/byod"):
                continue
            if start == 0 or words[start - 1] in _BEFORE_A_COMMAND or "$(" in word:
                command: list[str] = []
                for rest in words[start + 1 :]:
                    if rest in ("|", "&&", "||", ";", ">", ">>", "<", "2>&1", "&"):
                        break
                    command.append(rest)
                found.append(command)
                break
    return found


def inline_byod_commands(page: Path) -> list[tuple[int, list[str]]]:
    """The ``byod …`` commands a page's prose shows in code spans (a span may wrap onto
    the next line), outside its blocks, as words (a synopsis's brackets, bars and
    ellipses dropped), with their line."""
    prose = []
    in_block = False
    for line in page.read_text(encoding="utf-8").split("\n"):
        if _FENCE.match(line):
            in_block = not in_block
            prose.append("")
            continue
        prose.append("" if in_block else line)
    text = "\n".join(prose)
    found = []
    for match in re.finditer(r"`(byod [^`]+)`", text):
        words_text = re.sub(r"[()\[\]|]|\.\.\.|…", " ", match.group(1))
        try:
            words = shlex.split(words_text, comments=True)
        except ValueError:
            continue
        found.append((text.count("\n", 0, match.start()) + 1, words[1:]))
    return found
