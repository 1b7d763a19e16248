"""Loading and validating a migrations folder; plans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from byod.errors import PlanError, RegistryError
from byod.registry import Backfill, Migration, Plan, Registry, Step
from byod.settings import bundled_migrations_dir
from tests.conftest import write_migrations


def source(mid: str, version: int, *, down: bool = True, extra: str = "") -> str:
    return f"""
        from byod import Migration
        {extra}
        def up(ctx):
            pass

        def down(ctx):
            pass

        migration = Migration(id="{mid}", version={version}, name="n", description="d",
                              up=up, down={"down" if down else "None"})
        """


def test_bundled_example_loads_with_head_derived_from_files() -> None:
    registry = Registry.load(bundled_migrations_dir())
    assert [m.id for m in registry] == ["001_initial", "002_add_tags", "003_word_counts"]
    assert registry.head == 3
    assert registry.get("002_add_tags") is not None
    assert registry.get("004_nope") is None
    assert [m.id for m in registry.after(1)] == ["002_add_tags", "003_word_counts"]
    assert registry.after(3) == []
    words = registry.get("003_word_counts")
    assert words is not None and words.phased and words.reversible
    assert all(len(m.checksum) == 64 for m in registry)
    assert not registry.get("001_initial").reversible  # type: ignore[union-attr]


def test_checksum_follows_the_code_not_its_layout(tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "m", {"001_a.py": source("001_a", 1)})
    path = folder / "001_a.py"
    first = Registry.load(folder).get("001_a")
    assert first is not None
    path.write_text("# a comment\n\n" + path.read_text().replace("(", "( ") + "\n\n")
    relaid = Registry.load(folder).get("001_a")
    assert relaid is not None and relaid.checksum == first.checksum  # layout: not drift
    assert relaid.legacy_checksum != first.legacy_checksum  # the bytes did change
    path.write_text(path.read_text() + "\nEDITED = True\n")
    edited = Registry.load(folder).get("001_a")
    assert edited is not None and edited.checksum != first.checksum  # code: drift


@pytest.mark.parametrize(
    ("files", "named", "words"),
    [
        (
            {
                "001_a.py": source("001_a", 1),
                "002_b.py": source("002_b", 2),
                "002_c.py": source("002_c", 2),
            },
            "002_c.py",
            "duplicate version 2 (also 002_b.py)",
        ),
        ({"001_a.py": source("001_a", 2)}, "001_a.py", "must equal the file's number"),
        ({"001_a.py": source("001_a", 1), "003_c.py": source("003_c", 3)}, "003_c.py", "gap"),
        ({"002_b.py": source("002_b", 2)}, "002_b.py", "gap"),
        ({"001_a.py": source("001_x", 1)}, "001_a.py", "must equal the file name"),
        ({"001_a.py": source("001_a", 1).replace("up=up", "up=42")}, "001_a.py", "`up`"),
        ({"001_a.py": source("001_a", 1).replace("down=down", "down='x'")}, "001_a.py", "`down`"),
        ({"001_a.py": "def broken(:\n"}, "001_a.py", "syntax error on line 1"),
        ({"001_a.py": "import no_such_module_here\n"}, "001_a.py", "import failed"),
        ({"001_a.py": "x = 1\n"}, "001_a.py", "must define `migration"),
        ({"1_a.py": source("1_a", 1)}, "1_a.py", "NNN_slug.py"),
        ({"001_A.py": source("001_A", 1)}, "001_A.py", "NNN_slug.py"),
    ],
)
def test_broken_folder_is_refused_naming_the_file(
    tmp_path: Path, files: dict[str, str], named: str, words: str
) -> None:
    folder = write_migrations(tmp_path / "m", files)
    with pytest.raises(RegistryError) as caught:
        Registry.load(folder)
    assert named in str(caught.value)
    assert words in str(caught.value)
    assert caught.value.exit_code == 2


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.load(tmp_path / "nowhere")


def test_duplicate_id_is_refused() -> None:
    def up(ctx: object) -> None:
        pass

    a = Migration("001_a", 1, "a", "", up)
    b = Migration("001_a", 2, "b", "", up)
    with pytest.raises(RegistryError, match="duplicate migration id"):
        Registry([a, b])


def test_private_files_are_ignored(tmp_path: Path) -> None:
    folder = write_migrations(
        tmp_path / "m",
        {"001_a.py": source("001_a", 1), "_helpers.py": "X = 1\n", "__init__.py": ""},
    )
    assert Registry.load(folder).head == 1


def _registry(n: int) -> Registry:
    def up(ctx: object) -> None:
        pass

    return Registry([Migration(f"{v:03d}_m", v, "m", "", up, up) for v in range(1, n + 1)])


@given(st.integers(0, 12), st.data())
def test_plan_up_runs_each_missing_version_once_in_order(head: int, data: st.DataObject) -> None:
    registry = _registry(head)
    current = data.draw(st.integers(0, head))
    target = data.draw(st.integers(current, head))
    plan = registry.plan_up(current, target)
    assert [s.migration.version for s in plan.steps] == list(range(current + 1, target + 1))
    assert {s.direction for s in plan.steps} <= {"up"}


@given(st.integers(1, 12), st.data())
def test_plan_down_runs_newest_first_to_the_target(head: int, data: st.DataObject) -> None:
    registry = _registry(head)
    current = data.draw(st.integers(0, head))
    target = data.draw(st.integers(0, current))
    plan = registry.plan_down(current, target)
    assert [s.migration.version for s in plan.steps] == list(range(current, target, -1))
    assert plan.steps == () or plan.steps[-1].version_after == target


def test_plans_refuse_the_wrong_direction_and_unknown_versions() -> None:
    registry = _registry(3)
    with pytest.raises(PlanError, match="use rollback"):
        registry.plan_up(3, 1)
    with pytest.raises(PlanError, match="use migrate"):
        registry.plan_down(1, 3)
    with pytest.raises(PlanError, match="not known"):
        registry.plan_up(0, 9)
    with pytest.raises(PlanError, match="versions start at 0"):
        registry.plan_down(2, -1)


def test_a_plan_mixing_up_and_down_is_rejected() -> None:
    registry = _registry(2)
    first, second = list(registry)
    with pytest.raises(PlanError, match="mix"):
        Plan("up", 0, 2, (Step(first, "up"), Step(second, "down")))


def test_undo_pages_are_convex_pages_run_last_first() -> None:
    first = Backfill(table="documents", page="documents:tagPage", down_page="documents:untag")
    plain = Backfill(table="documents", page="documents:countPage")
    second = Backfill(table="tags", page="tags:fill", down_page="tags:empty")
    migration = Migration(
        id="002_x",
        version=2,
        name="x",
        description="x",
        up=lambda ctx: None,
        backfills=[first, plain, second],
    )
    undo = migration.reverse_backfills
    assert [(b.table, b.page) for b in undo] == [
        ("tags", "tags:empty"),
        ("documents", "documents:untag"),
    ]
    assert migration.backfills_for("up") == (first, plain, second)
    assert migration.backfills_for("down") == undo
    for bad in ("byod:runBatch", "no colon", ""):
        with pytest.raises(RegistryError, match="down_page"):
            Backfill(table="documents", page="documents:tagPage", down_page=bad)
    with pytest.raises(RegistryError, match="down_page undoes a Convex page"):
        Backfill(table="t", key="id", apply=lambda ctx, rows: None, down_page="t:undo")


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"table": ""}, "needs a table"),
        ({"table": "t", "key": "id", "apply": lambda c, r: None, "batch_size": 0}, "at least 1"),
        (
            {"table": "t", "key": "id", "apply": lambda c, r: None, "batch_size": True},
            "whole number",
        ),
        ({"table": "t", "page": "byod:runBatch"}, "one of byod's functions"),
        (
            {"table": "t", "page": "docs:page", "columns": ("body",)},
            "give no apply, key or columns",
        ),
        ({"table": "t", "page": "docs"}, '"module:function"'),
        ({"table": "t", "key": "id"}, "apply must be a function"),
        ({"table": "t"}, "give a key column (SQL) or a page mutation (Convex)"),
        (
            {"table": "t", "key": "id", "apply": lambda c, r: None, "columns": "body"},
            "a bare string",
        ),
    ],
)
def test_a_mistaken_backfill_declaration_is_refused_naming_the_mistake(
    kwargs: dict[str, object], says: str
) -> None:
    with pytest.raises(RegistryError, match=re.escape(says)):
        Backfill(**kwargs)  # type: ignore[arg-type]


def test_a_non_callable_finalize_or_gated_flag_is_refused_at_load(tmp_path: Path) -> None:
    template = """
        from byod import Migration
        migration = Migration(id="001_x", version=1, name="x", description="x",
                              up=lambda ctx: None, {extra})
    """
    for extra, says in (
        ('finalize="no"', "`finalize` must be a function"),
        ('down="no"', "`down` must be a function"),
        ('gated="yes"', "`gated` must be True or False"),
        ('code_ref="-x --upload-pack=evil"', "`code_ref` must be a git ref"),
    ):
        folder = write_migrations(
            tmp_path / extra.split("=")[0], {"001_x.py": template.format(extra=extra)}
        )
        with pytest.raises(RegistryError, match=re.escape(says)):
            Registry.load(folder)


def test_an_instance_ahead_of_the_registry_has_nothing_pending_not_a_negative_count() -> None:
    registry = Registry(
        [Migration(id="001_x", version=1, name="x", description="", up=lambda c: None)]
    )
    assert registry.pending_count(5) == 0
    assert registry.pending_count(-1) == 1
    assert registry.pending_count(0) == 1


def test_a_convex_backfill_names_its_page_as_module_function_and_takes_no_sql_parts() -> None:
    with pytest.raises(RegistryError) as bad_page:
        Backfill(table="docs", page="nocolon")
    assert bad_page.value.message == (
        'backfill of docs: page must name the app\'s page mutation as "module:function", '
        'e.g. "documents:tagPage"'
    )
    with pytest.raises(RegistryError) as bad_undo:
        Backfill(table="docs", page="docs:page", down_page="nocolon")
    assert bad_undo.value.message == (
        "backfill of docs: down_page must name the app's undo page mutation as "
        '"module:function", e.g. "documents:untagPage"'
    )
    for extra in ({"apply": lambda ctx, rows: None}, {"key": "id"}, {"columns": ("a",)}):
        with pytest.raises(RegistryError) as mixed:
            Backfill(table="docs", page="docs:page", **extra)  # type: ignore[arg-type]
        assert mixed.value.message == (
            "backfill of docs: a Convex backfill (page=...) does its work in the page "
            "mutation: give no apply, key or columns"
        )


def test_a_plan_down_says_where_it_starts_and_ends() -> None:
    registry = Registry(
        [
            Migration(id=f"00{v}_x", version=v, name="x", description="", up=lambda c: None)
            for v in (1, 2, 3)
        ]
    )
    plan = registry.plan_down(3, 1)
    assert (plan.direction, plan.from_version, plan.to_version) == ("down", 3, 1)
    assert [(s.migration.id, s.direction) for s in plan.steps] == [
        ("003_x", "down"),
        ("002_x", "down"),
    ]


def test_backfill_declarations_say_exactly_what_is_wrong_and_keep_what_is_right() -> None:
    with pytest.raises(RegistryError) as no_table:
        Backfill(table="")
    assert no_table.value.message == "a backfill needs a table (its name, as text)"
    with pytest.raises(RegistryError) as sql_undo:
        Backfill(table="t", key="id", apply=lambda ctx, rows: None, down_page="t:undo")
    assert sql_undo.value.message == (
        "backfill of t: down_page undoes a Convex page (page=...); a SQL backfill's undo "
        "belongs in the migration's down"
    )
    one = Backfill(table="t", key="id", apply=lambda ctx, rows: None, columns=["a"], batch_size=1)
    assert one.batch_size == 1 and one.columns == ("a",), "one row a batch, a list of columns"


def test_registry_at_plans_and_their_messages() -> None:
    registry = Registry(
        [
            Migration(id=f"00{v}_x", version=v, name="x", description="", up=lambda c: None)
            for v in (1, 2, 3)
        ]
    )
    assert [registry.at(v) for v in (0, 4, -1)] == [None, None, None]
    assert [m.id for m in (registry.at(1), registry.at(2), registry.at(3)) if m] == [
        "001_x",
        "002_x",
        "003_x",
    ]
    up = registry.plan_up(1)
    assert (up.direction, up.from_version, up.to_version) == ("up", 1, 3)
    with pytest.raises(PlanError) as mixed:
        Plan("up", 0, 1, (Step(registry.at(1), "down"),))  # type: ignore[arg-type]
    assert mixed.value.message == "a plan cannot mix up and down steps"


def test_a_migration_context_carries_what_it_was_given() -> None:
    import logging

    import sqlalchemy as sa

    from byod.registry import MigrationContext

    engine = sa.create_engine("sqlite://")
    log = logging.LoggerAdapter(logging.getLogger("byod.migration"), {})
    calls = object()
    ctx = MigrationContext(
        kind="convex",
        main=engine,
        user_id=7,
        clerk_id="ana",
        log=log,
        convex=calls,
        app=calls,  # type: ignore[arg-type]
    )
    assert (ctx.kind, ctx.main, ctx.user_id, ctx.clerk_id, ctx.log) == (
        "convex",
        engine,
        7,
        "ana",
        log,
    )
    assert ctx.convex is calls and ctx.app is calls


def _noop(ctx: object) -> None:
    pass


def test_a_folders_mistakes_are_named_exactly(tmp_path: Path) -> None:
    """Each refusal says the file and what to do, word for word."""
    cases = {
        "1_a.py": (
            source("1_a", 1),
            "a migration file must be named NNN_slug.py (three or more digits, then "
            "lowercase words joined by _)",
        ),
        "001_a.py": (
            "import no_such_module_here\n",
            "import failed: ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        "002_b.py": (
            "import sys\nsys.exit(3)\n",
            "exits while loading (SystemExit 3): a migration file must only define `migration`",
        ),
        "003_c.py": (
            source("003_c", 3).replace("up=up,", "up=up, backfills=[42],"),
            "`backfills` must be Backfill(...) entries",
        ),
    }
    for name, (text, says) in cases.items():
        folder = write_migrations(tmp_path / name.removesuffix(".py"), {name: text})
        if name != "001_a.py":  # the numbers before it, so the file itself is what is wrong
            for n in range(1, int(name.split("_")[0]) if name[0] == "0" else 1):
                (folder / f"{n:03d}_x{n}.py").write_text(
                    source(f"{n:03d}_x{n}", n).replace("\n        ", "\n")
                )
        with pytest.raises(RegistryError) as refused:
            Registry.load(folder)
        assert refused.value.message == f"{folder / name}: {says}", name
    folder = tmp_path / "dir"
    (folder / "001_a.py").mkdir(parents=True)
    with pytest.raises(RegistryError) as refused:
        Registry.load(folder)
    assert refused.value.message == (
        f"{folder / '001_a.py'}: a migration must be a file (this is a folder)"
    )


def test_a_folder_loads_as_itself_with_what_each_file_is(tmp_path: Path) -> None:
    """The registry knows its folder; each migration its file; each folder's modules are its
    own while they load (two folders with the same file names never share one), and none
    is left behind in sys.modules; a migration file may define dataclasses."""
    import sys

    loaded = []
    for name in ("one", "two"):
        folder = write_migrations(
            tmp_path / name,
            {
                "001_a.py": source(
                    "001_a",
                    1,
                    extra="import dataclasses\n        @dataclasses.dataclass\n"
                    "        class Row:\n            n: int\n",
                )
            },
        )
        registry = Registry.load(folder)
        assert registry.source == folder and registry.keep_alembic_version is False
        (migration,) = list(registry)
        assert migration.source_path == str((folder / "001_a.py").resolve())
        loaded.append(migration.up.__module__)
    assert loaded[0] != loaded[1]
    assert all(m.startswith("byod_migrations_") and m.endswith(".001_a") for m in loaded)
    assert not [m for m in sys.modules if m in loaded]
    assert Registry([], keep_alembic_version=True).keep_alembic_version is True


def test_backfills_are_kept_as_a_tuple_and_one_alone_is_refused() -> None:
    fill = Backfill(table="t", key="id", apply=lambda ctx, rows: None)
    given_list = Migration("001_a", 1, "a", "", _noop, backfills=[fill])  # type: ignore[arg-type]
    assert given_list.backfills == (fill,) and isinstance(given_list.backfills, tuple)
    with pytest.raises(RegistryError) as refused:
        Migration("001_a", 1, "a", "", _noop, backfills=fill)  # type: ignore[arg-type]
    assert refused.value.message == "001_a: backfills must be a list: [Backfill(...)]"


def test_a_migration_file_that_cannot_be_read_is_named_with_why(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "001_a.py").symlink_to("/proc/self/mem")  # a file whose reading fails (EIO)
    with pytest.raises(RegistryError) as refused:
        Registry.load(folder)
    assert refused.value.message == f"{folder / '001_a.py'}: cannot be read: Input/output error"
