"""Users in bulk: ``byod users import FILE`` (and ``byod connect --check --all``).

Rows (JSON lines or CSV with a header: ``clerk_id``, ``url``, ``secret`` optional,
``email`` optional) are upserted idempotently, a page at a time: a new clerk id is a new
user; a known one whose URL or secret differ gets the new config; the same row again
changes nothing. Each URL goes through the checks ``connect`` makes that need no network
(the instance URL policy); configs are sealed and stored with status ``pending``, no
instance contacted: ``connect --check`` checks them afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from byod.controlplane import Config, ExistingUser, NewConfig, User
from byod.controlplane.schema import control_plane_id
from byod.credentials import check_connectable, open_instance, reached_stamp, unseal_config
from byod.errors import ByodError, CredentialsError, InputError
from byod.instance_url import InstancePolicy
from byod.text import clerk_id_problem

if TYPE_CHECKING:
    from byod.workspace import Workspace

__all__ = ["Checked", "ImportReport", "ImportRow", "check_pending", "import_users", "read_import"]

_PAGE = 1000
RowOutcome = Literal["added", "updated", "unchanged", "refused"]


@dataclass(frozen=True)
class ImportRow:
    """One row of an import file: its line, and its fields."""

    line: int
    clerk_id: str
    url: str
    secret: str | None = field(default=None, repr=False)
    email: str | None = None


@dataclass
class ImportReport:
    """What an import did (or, dry, would do): counts, and each refused row's line,
    clerk id and reason (never a URL or a secret)."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    dry_run: bool = False


def read_import(path: str) -> Iterator[ImportRow]:
    """The rows of ``path`` (``-``: standard input), JSON lines or CSV with a header.
    :class:`InputError` for a file other users may read (it holds credentials), or one
    that cannot be read."""
    if path == "-":
        import sys

        yield from _rows(sys.stdin.read())
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"{path} is readable by other users, and it holds credentials: `chmod 600 {path}` first"
        )
    yield from _rows(Path(path).read_text(encoding="utf-8"))


def _rows(text: str) -> Iterator[ImportRow]:
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"line {number}: not a JSON object ({exc.msg})") from None
            if not isinstance(data, dict):
                raise InputError(f"line {number}: not a JSON object")
            yield _row(number, data)
        return
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "clerk_id" not in reader.fieldnames:
        raise InputError("a CSV import needs a header with clerk_id and url (secret, email)")
    for data in reader:
        yield _row(reader.line_num, data)


def _row(line: int, data: dict[str, object]) -> ImportRow:
    def text(name: str) -> str | None:
        value = data.get(name)
        return None if value in (None, "") else str(value)

    return ImportRow(line, text("clerk_id") or "", text("url") or "", text("secret"), text("email"))


def import_users(
    ws: Workspace, rows: Iterable[ImportRow], *, dry_run: bool = False
) -> ImportReport:
    """Upsert ``rows`` (see the module's docstring), a page per transaction."""
    ws.require_tables()
    report = ImportReport(dry_run=dry_run)
    page: list[ImportRow] = []
    for row in rows:
        page.append(row)
        if len(page) == _PAGE:
            _import_page(ws, page, report)
            page = []
    if page:
        _import_page(ws, page, report)
    return report


def _import_page(ws: Workspace, page: list[ImportRow], report: ImportReport) -> None:
    policy = ws.settings.instance_policy
    valid: dict[str, tuple[ImportRow, str]] = {}
    for row in page:
        problem, kind = _refusal(row, policy, valid)
        if kind is None:
            report.refused.append((row.line, row.clerk_id, problem or "refused"))
            continue
        valid[row.clerk_id] = (row, kind)
    existing = ws.directory.existing_users(list(valid))
    new_users: list[tuple[str, str | None]] = []
    changed: list[tuple[ImportRow, str, ExistingUser | None]] = []
    for clerk_id, (row, kind) in valid.items():
        known = existing.get(clerk_id)
        if known is None:
            new_users.append((clerk_id, row.email))
            changed.append((row, kind, None))
        elif known.leased:
            report.refused.append((row.line, clerk_id, "being migrated: try again later"))
        elif _same(ws, known, row):
            report.unchanged += 1
        else:
            changed.append((row, kind, known))
    report.added += sum(1 for *_, known in changed if known is None)
    report.updated += sum(1 for *_, known in changed if known is not None)
    if report.dry_run or not changed:
        return
    sealer = ws.sealer

    def configs_for(ids: dict[str, int]) -> list[NewConfig]:
        made = []
        for row, kind, known in changed:
            uid = known.user_id if known is not None else ids[row.clerk_id]
            made.append(
                NewConfig(
                    uid,
                    kind,
                    sealer.seal(row.url, user_id=uid, field_name="url"),
                    sealer.seal(row.secret, user_id=uid, field_name="secret")
                    if row.secret
                    else None,
                    sealer.key_id,
                    replaces=known is not None and known.sealed_url is not None,
                )
            )
        return made

    ws.directory.import_page(new_users, configs_for)


def _refusal(
    row: ImportRow, policy: InstancePolicy, seen: dict[str, tuple[ImportRow, str]]
) -> tuple[str | None, str | None]:
    """(why the row cannot be imported — its URL and secret never named —, None), or
    (None, the instance's kind)."""
    if not row.clerk_id:
        return "no clerk_id", None
    problem = clerk_id_problem(row.clerk_id)
    if problem is not None:
        return problem, None
    if row.clerk_id in seen:
        return f"clerk id given twice (first on line {seen[row.clerk_id][0].line})", None
    if not row.url:
        return "no url", None
    try:
        return None, check_connectable(row.url, row.secret, policy)
    except ByodError as exc:
        return exc.message, None


def _same(ws: Workspace, known: ExistingUser, row: ImportRow) -> bool:
    """Whether the user's stored config is this row's URL and secret."""
    if known.sealed_url is None or known.key_id is None:
        return False
    sealer, uid, key = ws.sealer, known.user_id, known.key_id
    try:
        url = sealer.unseal(known.sealed_url, user_id=uid, field_name="url", key_id=key)
        secret = None
        if known.sealed_secret:
            secret = sealer.unseal(
                known.sealed_secret, user_id=uid, field_name="secret", key_id=key
            )
    except CredentialsError:
        return False  # another key or a broken seal: the row's values replace it
    return url == row.url and secret == row.secret


@dataclass(frozen=True)
class Checked:
    """One user's instance checked by ``connect --check``."""

    user_id: int
    clerk_id: str
    status: str
    schema_version: int
    error: str | None = None
    #: see :attr:`byod.credentials.ReachResult.note`
    note: str | None = None


def check_pending(
    ws: Workspace, *, concurrency: int = 8, timeout: float = 10.0, only: str | None = None
) -> list[Checked]:
    """Check each user whose config is ``pending`` (imported, not yet contacted), or
    the one user ``only`` names, ``concurrency`` at a time: the instance is reached and
    its version recorded (``connected``), or the error kept (``error``)."""
    ws.require_tables()
    directory = ws.directory
    users: list[tuple[User, Config]] = []
    if only is not None:
        found = directory.find_user(only)
        users = [(found, directory.get_config(found.id))]  # NotConnectedError if none
    for user_id in [] if only is not None else directory.configured_user_ids():
        config = directory.get_config(user_id)
        if config.connection_status == "pending":
            users.append((directory.get_user(user_id), config))
    control_plane = control_plane_id(ws.engine)

    def check(item: tuple[User, Config]) -> Checked:
        user, config = item
        try:
            credentials = unseal_config(
                config, ws.sealer, policy=ws.settings.instance_policy, control_plane=control_plane
            )
            with open_instance(credentials, timeout=timeout) as target:
                stamp, note = reached_stamp(target)
        except ByodError as exc:
            directory.set_status(user.id, "error", error=exc.message)
            return Checked(user.id, user.clerk_id, "error", config.schema_version, exc.message)
        version = stamp[-1].version if stamp else 0
        directory.set_status(user.id, "connected", schema_version=version)
        return Checked(user.id, user.clerk_id, "connected", version, note=note)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(check, users))
