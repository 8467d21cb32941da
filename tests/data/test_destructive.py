"""Destructive changes: refused without consent, applied with it, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from alembic.operations.base import AbstractOperations
from hypothesis import given
from hypothesis import strategies as st
from migration_support import table_names, version_rows
from sqlalchemy import inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from structlog.testing import capture_logs

from bastion.data import (
    Database,
    DestructiveChange,
    DestructiveChangeRefused,
    MigrationError,
    MigrationTree,
    Migrator,
)
from bastion.data._destructive import DestructiveGuard, narrows, sql_changes

Schema = dict[str, list[tuple[str, str]]]

WIDGETS_BODY = """\
op.create_table(
    "widgets",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("code", sa.String(200)),
    sa.Column("note", sa.Text),
)
op.execute("INSERT INTO widgets (id, name, code, note) VALUES (1, 'bolt', 'B-1', 'kept')")"""

BASE = ("a1", None, WIDGETS_BODY, 'op.drop_table("widgets")', "Create widgets.")

# Every destructive revision first creates a table, so a refusal that left
# anything of the revision behind would show.
EXTRAS = 'op.create_table("extras", sa.Column("id", sa.Integer, primary_key=True))\n'


async def schema(db: Database) -> Schema:
    """Every table but the version table, with its columns and their types."""

    def read(connection: sa.Connection) -> Schema:
        inspector = inspect(connection)
        return {
            table: [(c["name"], str(c["type"])) for c in inspector.get_columns(table)]
            for table in sorted(inspector.get_table_names())
            if table != "app_version"
        }

    async with db.engine.connect() as connection:
        return await connection.run_sync(read)


async def widget_rows(db: Database) -> list[tuple[object, ...]]:
    async with db.engine.connect() as connection:
        rows = await connection.execute(text("SELECT * FROM widgets ORDER BY id"))
        return [tuple(row) for row in rows]


def columns(state: Schema, table: str) -> list[str]:
    return [name for name, _ in state.get(table, [])]


def column_type(state: Schema, table: str, column: str) -> str:
    return dict(state[table])[column]


@dataclass(frozen=True)
class Case:
    id: str
    body: str
    target: str
    applied: Callable[[Schema], bool]
    """True when the schema shows the change was made."""


CASES = [
    Case(
        "drop_table",
        'op.drop_table("widgets")',
        "widgets",
        lambda s: "widgets" not in s,
    ),
    Case(
        "drop_column",
        'op.drop_column("widgets", "name")',
        "widgets.name",
        lambda s: ["id", "code", "note"] == columns(s, "widgets"),
    ),
    Case(
        "rename_table",
        'op.rename_table("widgets", "gizmos")',
        "widgets",
        lambda s: "widgets" not in s and "gizmos" in s,
    ),
    Case(
        "rename_column",
        'op.alter_column("widgets", "name", new_column_name="title")',
        "widgets.name",
        lambda s: ["id", "title", "code", "note"] == columns(s, "widgets"),
    ),
    Case(
        "narrow_existing_type",
        'with op.batch_alter_table("widgets") as batch:\n'
        '    batch.alter_column("code", type_=sa.String(20), existing_type=sa.String(200))',
        "widgets.code",
        lambda s: "VARCHAR(20)" == column_type(s, "widgets", "code"),
    ),
    Case(
        "narrow_reflected_type",
        'with op.batch_alter_table("widgets") as batch:\n'
        '    batch.alter_column("code", type_=sa.String(20))',
        "widgets.code",
        lambda s: "VARCHAR(20)" == column_type(s, "widgets", "code"),
    ),
    Case(
        "execute_drop_table",
        'op.execute("DROP TABLE widgets")',
        "widgets",
        lambda s: "widgets" not in s,
    ),
    Case(
        "batch_drop_column",
        'with op.batch_alter_table("widgets", recreate="always") as batch:\n'
        '    batch.drop_column("name")',
        "widgets.name",
        lambda s: ["id", "code", "note"] == columns(s, "widgets"),
    ),
]


@pytest.fixture
def app_migrator(database, make_tree):
    """Build a migrator over a host tree: widgets (a1), then one revision a2 on top."""

    def make(
        upgrade: str,
        *,
        downgrade: str = "pass",
        destroys: object = None,
        allow_destructive: bool = False,
    ) -> Migrator:
        revision = ("a2", "a1", upgrade, downgrade, "The change under test.")
        directory = make_tree(BASE, revision)
        if destroys is not None:
            with (directory / "versions" / "a2.py").open("a") as source:
                source.write(f"\ndestroys = {destroys!r}\n")
        tree = MigrationTree.from_location("app", str(directory), "app_version")
        return Migrator(database, [tree], allow_destructive=allow_destructive)

    return make


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
class TestDestructiveRevision:
    async def test_refused_without_consent(self, case, app_migrator, database):
        """Without consent nothing of the revision stays and the error names the target."""
        migrator = app_migrator(EXTRAS + case.body)
        await migrator.upgrade("a1")
        before = await schema(database)

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.upgrade()

        assert before == await schema(database)
        assert [(1, "bolt", "B-1", "kept")] == await widget_rows(database)
        assert ["a1"] == await version_rows(database, "app_version")
        assert [case.target] == [change.target for change in refused.value.changes]
        assert ("app", "a2") == (refused.value.tree, refused.value.revision)
        assert case.target in str(refused.value)

    async def test_applied_with_allow_destructive(self, case, app_migrator, database):
        """allow_destructive=True applies the revision."""
        migrator = app_migrator(EXTRAS + case.body)

        await migrator.upgrade(allow_destructive=True)

        state = await schema(database)
        assert (True, True) == (case.applied(state), "extras" in state)
        assert ["a2"] == await version_rows(database, "app_version")

    async def test_applied_with_matching_marker(self, case, app_migrator, database):
        """A destroys marker naming the target applies the revision without the flag."""
        migrator = app_migrator(EXTRAS + case.body, destroys=[case.target])

        await migrator.upgrade()

        assert case.applied(await schema(database))
        assert ["a2"] == await version_rows(database, "app_version")

    async def test_refused_with_marker_naming_something_else(self, case, app_migrator, database):
        """A destroys marker that names another target does not consent to this one."""
        migrator = app_migrator(EXTRAS + case.body, destroys=["gadgets", "widgets.other"])
        await migrator.upgrade("a1")
        before = await schema(database)

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.upgrade()

        assert before == await schema(database)
        assert ["a1"] == await version_rows(database, "app_version")
        assert [case.target] == [change.target for change in refused.value.changes]


WIDENINGS = [
    'with op.batch_alter_table("widgets") as batch:\n'
    '    batch.alter_column("code", type_=sa.String(400))',
    'with op.batch_alter_table("widgets") as batch:\n'
    '    batch.alter_column("code", type_=sa.Text, existing_type=sa.String(200))',
    'with op.batch_alter_table("widgets") as batch:\n'
    '    batch.alter_column("id", type_=sa.BigInteger)',
]


class TestSafeChanges:
    @pytest.mark.parametrize("body", WIDENINGS, ids=["longer", "to_text", "to_bigint"])
    async def test_widening_passes_without_consent(self, body, app_migrator, database):
        """A provable widening is applied with no consent and no warning."""
        migrator = app_migrator(body)

        with capture_logs() as logs:
            await migrator.upgrade()

        assert ["a2"] == await version_rows(database, "app_version")
        assert [] == [entry for entry in logs if entry["log_level"] == "warning"]

    async def test_dropping_what_the_revision_created_passes(self, app_migrator, database):
        """A table or column created earlier in the same revision may be dropped or renamed."""
        body = (
            'op.create_table("scratch", sa.Column("id", sa.Integer, primary_key=True))\n'
            'op.rename_table("scratch", "scratch2")\n'
            'op.drop_table("scratch2")\n'
            'op.add_column("widgets", sa.Column("tmp", sa.String(50)))\n'
            'op.alter_column("widgets", "tmp", new_column_name="tmp2")\n'
            'op.drop_column("widgets", "tmp2")\n'
            'op.execute("CREATE TABLE staging (id INTEGER)")\n'
            'op.execute("DROP TABLE staging")\n'
        )
        migrator = app_migrator(body)

        await migrator.upgrade()

        assert ["a2"] == await version_rows(database, "app_version")
        assert ["id", "name", "code", "note"] == columns(await schema(database), "widgets")

    @pytest.mark.parametrize("wrapper", ["sa.text", "sa.DDL"])
    async def test_sql_objects_are_read(self, wrapper, app_migrator):
        """op.execute(sa.text(...)) and op.execute(sa.DDL(...)) are read like a string."""
        migrator = app_migrator(f'op.execute({wrapper}("ALTER TABLE widgets DROP COLUMN note"))')

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.upgrade()

        assert ("drop_column", "widgets.note") == (
            refused.value.changes[0].kind,
            refused.value.changes[0].target,
        )

    async def test_interception_ends_with_the_run(self, app_migrator):
        """After a refused run, Alembic's invoke is Alembic's own again."""
        original = AbstractOperations.invoke
        migrator = app_migrator('op.drop_table("widgets")')

        with pytest.raises(DestructiveChangeRefused):
            await migrator.upgrade()

        assert original is AbstractOperations.invoke


class TestWatching:
    def test_a_connection_is_watched_once(self, tmp_path):
        """Watching a connection that a guard already watches is a programming error."""
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'watched.db'}")
        outer = DestructiveGuard(tree="app", direction="upgrade", allow=False)
        inner = DestructiveGuard(tree="app", direction="upgrade", allow=False)
        try:
            with (
                engine.connect() as connection,
                outer.watching(connection),
                pytest.raises(RuntimeError),
                inner.watching(connection),
            ):
                pass
        finally:
            engine.dispose()


class TestConsent:
    async def test_message_names_tree_revision_change_and_both_consents(self, app_migrator):
        """The refusal is one line with tree, revision, change and both ways to consent."""
        migrator = app_migrator(
            'with op.batch_alter_table("widgets") as batch:\n'
            '    batch.alter_column("code", type_=sa.String(20))'
        )

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.upgrade()

        message = str(refused.value)
        assert 1 == len(message.splitlines())
        expected = [
            "tree 'app'",
            "revision 'a2'",
            "narrow widgets.code VARCHAR(200) -> VARCHAR(20)",
            'destroys = ["widgets.code"]',
            "--allow-destructive",
        ]
        assert expected == [part for part in expected if part in message]

    @pytest.mark.parametrize("table", ["widgets", "nowhere"])
    async def test_unknown_current_type_counts_as_narrowing(self, table, app_migrator):
        """A type change whose current type cannot be read is refused, and says why."""
        migrator = app_migrator(f'op.alter_column("{table}", "missing", type_=sa.String(5))')

        with pytest.raises(DestructiveChangeRefused, match="current type cannot be read"):
            await migrator.upgrade()

    async def test_marker_must_name_every_target(self, app_migrator, database):
        """A marker naming one of two drops is refused at the undeclared one, naming it."""
        migrator = app_migrator(
            'op.drop_column("widgets", "name")\nop.drop_column("widgets", "note")',
            destroys=["widgets.name"],
        )

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.upgrade()

        assert ["widgets.note"] == [change.target for change in refused.value.changes]
        assert 'add "widgets.note" to the revision\'s destroys (it declares widgets.name)' in str(
            refused.value
        )
        assert ["id", "name", "code", "note"] == columns(await schema(database), "widgets")

    async def test_migrator_default_consents(self, app_migrator, database):
        """Migrator(allow_destructive=True), as set by migrations.allow_destructive, consents."""
        migrator = app_migrator('op.drop_table("widgets")', allow_destructive=True)

        await migrator.upgrade()

        assert "widgets" not in await table_names(database)

    async def test_explicit_false_overrides_the_migrator_default(self, app_migrator):
        """upgrade(allow_destructive=False) refuses even when the migrator allows."""
        migrator = app_migrator('op.drop_table("widgets")', allow_destructive=True)

        with pytest.raises(DestructiveChangeRefused):
            await migrator.upgrade(allow_destructive=False)

    @pytest.mark.parametrize(
        ("destroys", "complaint"),
        [("widgets", "must be a list"), (["widgets", 3], "must be a string")],
        ids=["string", "number"],
    )
    async def test_malformed_marker_is_an_error(self, destroys, complaint, app_migrator, database):
        """A destroys that is not a list of strings stops the run before the revision."""
        migrator = app_migrator('op.drop_table("widgets")', destroys=destroys)
        await migrator.upgrade("a1")

        with pytest.raises(MigrationError, match=complaint) as error:
            await migrator.upgrade()

        assert not isinstance(error.value, DestructiveChangeRefused)
        assert "widgets" in await table_names(database)

    @pytest.mark.parametrize(
        ("destroys", "allow", "consent"),
        [(["widgets.name"], False, ["destroys"]), (None, True, ["allow_destructive"])],
        ids=["marker", "flag"],
    )
    async def test_consented_change_is_logged(self, app_migrator, destroys, allow, consent):
        """A consented change logs one warning naming tree, revision, change and consent."""
        migrator = app_migrator('op.drop_column("widgets", "name")', destroys=destroys)

        with capture_logs() as logs:
            await migrator.upgrade(allow_destructive=allow)

        warnings = [entry for entry in logs if entry["event"] == "destructive change applied"]
        expected = {
            "tree": "app",
            "revision": "a2",
            "direction": "upgrade",
            "changes": ["drop column widgets.name"],
            "consent": consent,
            "log_level": "warning",
        }
        assert [expected] == [{k: v for k, v in w.items() if k != "event"} for w in warnings]

    async def test_refused_change_is_not_logged_as_applied(self, app_migrator):
        """A revision that fails after a consented change logs no 'applied' line."""
        migrator = app_migrator(
            'op.drop_column("widgets", "name")\nop.drop_table("widgets")',
            destroys=["widgets.name"],
        )

        with capture_logs() as logs, pytest.raises(DestructiveChangeRefused):
            await migrator.upgrade()

        assert [] == [entry for entry in logs if entry["event"] == "destructive change applied"]


class TestDowngrade:
    async def test_drop_refused_without_flag(self, app_migrator, database):
        """A downgrade that drops what its upgrade created is refused without the flag."""
        migrator = app_migrator(
            'op.add_column("widgets", sa.Column("extra", sa.String(20)))',
            downgrade='op.drop_column("widgets", "extra")',
            destroys=["widgets.extra"],
        )
        await migrator.upgrade()

        with pytest.raises(DestructiveChangeRefused) as refused:
            await migrator.downgrade("app", "a1")

        assert ["a2"] == await version_rows(database, "app_version")
        assert "extra" in columns(await schema(database), "widgets")
        assert "--allow-destructive" in str(refused.value)
        assert "destroys =" not in str(refused.value)

    async def test_drop_applied_with_flag(self, app_migrator, database):
        """With allow_destructive=True the downgrade drops and records the revision."""
        migrator = app_migrator(
            'op.add_column("widgets", sa.Column("extra", sa.String(20)))',
            downgrade='op.drop_column("widgets", "extra")',
        )
        await migrator.upgrade()

        reverted = await migrator.downgrade("app", "base", allow_destructive=True)

        assert ["a2", "a1"] == [step.revision for step in reverted]
        assert [] == await version_rows(database, "app_version")
        assert "widgets" not in await table_names(database)


class TestSqlChanges:
    @pytest.mark.parametrize(
        ("sql", "expected"),
        [
            (
                "DROP TABLE IF EXISTS a, public.b CASCADE",
                [("drop_table", "a"), ("drop_table", "public.b")],
            ),
            ('drop table "Odd ""Name"""', [("drop_table", 'Odd "Name"')]),
            ("DROP TABLE `a`, [b]", [("drop_table", "a"), ("drop_table", "b")]),
            ("TRUNCATE TABLE ONLY logs", [("truncate", "logs")]),
            ("ALTER TABLE t RENAME TO u", [("rename_table", "t")]),
            ("ALTER TABLE t RENAME COLUMN a TO b", [("rename_column", "t.a")]),
            (
                "ALTER TABLE t DROP COLUMN IF EXISTS a, DROP b",
                [("drop_column", "t.a"), ("drop_column", "t.b")],
            ),
            ("ALTER TABLE t ALTER COLUMN a SET DATA TYPE varchar(5)", [("alter_type", "t.a")]),
            ("ALTER TABLE t ALTER a TYPE int USING a::int", [("alter_type", "t.a")]),
            ("DO $$ BEGIN DROP TABLE x; END $$", [("drop_table", "x")]),
        ],
    )
    def test_destructive_sql_is_found(self, sql, expected):
        """Drops, truncates, renames and type changes in raw SQL are found with their targets."""
        assert expected == [(change.kind, change.target) for change in sql_changes(sql)]

    @pytest.mark.parametrize(
        "sql",
        [
            "-- DROP TABLE widgets\nSELECT 1",
            "/* drop table widgets */ SELECT 1",
            "INSERT INTO notes (body) VALUES ('drop table widgets; truncate logs')",
            "ALTER TABLE t DROP CONSTRAINT t_pkey",
            "ALTER TABLE t ALTER COLUMN a DROP DEFAULT, ALTER COLUMN b SET NOT NULL",
            "ALTER TABLE t RENAME CONSTRAINT c1 TO c2",
            "ALTER TABLE t ADD COLUMN a numeric(10, 2)",
            "SELECT truncate(x) FROM t",
            "DELETE FROM t WHERE id = 1",
            "REVOKE UPDATE, DELETE, TRUNCATE ON t FROM PUBLIC",
            "CREATE TRIGGER g BEFORE UPDATE OR TRUNCATE ON t EXECUTE FUNCTION f()",
            "CREATE TRIGGER g BEFORE TRUNCATE OR DELETE ON t EXECUTE FUNCTION f()",
        ],
    )
    def test_safe_sql_is_not_destructive(self, sql):
        """Comments, literals, constraints, additions, grants and trigger events do not destroy."""
        assert [] == sql_changes(sql)

    def test_change_reads_as_a_phrase(self):
        """A change prints as verb, target and detail."""
        change = DestructiveChange("narrow_type", "t.c", "VARCHAR(9) -> VARCHAR(3)")

        assert "narrow t.c VARCHAR(9) -> VARCHAR(3)" == str(change)


class Code(sa.TypeDecorator):
    """A custom type: judged by the type it stores as."""

    impl = sa.String(10)
    cache_ok = True


INTEGERS = [sa.SmallInteger(), sa.Integer(), sa.BigInteger()]
lengths = st.integers(min_value=1, max_value=10_000)


class TestNarrows:
    @given(old=lengths, new=lengths)
    def test_string_length(self, old, new):
        """A shorter VARCHAR narrows; an equal or longer one does not."""
        assert (new < old) == narrows(sa.String(old), sa.String(new))
        assert (new < old) == narrows(postgresql.VARCHAR(old), sa.String(new))

    @given(length=lengths)
    def test_text_and_bounded_strings(self, length):
        """Text to a bounded String narrows; a bounded String to Text does not."""
        assert (True, False) == (
            narrows(sa.Text(), sa.String(length)),
            narrows(sa.String(length), sqlite.TEXT()),
        )

    @given(old=st.sampled_from(range(3)), new=st.sampled_from(range(3)))
    def test_integer_sizes(self, old, new):
        """A smaller integer type narrows; a larger or equal one does not."""
        assert (new < old) == narrows(INTEGERS[old], INTEGERS[new])

    @given(
        old=st.tuples(st.integers(1, 30), st.integers(0, 10)),
        new=st.tuples(st.integers(1, 30), st.integers(0, 10)),
    )
    def test_numeric_digits(self, old, new):
        """A Numeric narrows when it loses integer digits or decimals."""
        (old_p, old_s), (new_p, new_s) = old, new
        expected = new_s < old_s or new_p - new_s < old_p - old_s
        assert expected == narrows(sa.Numeric(old_p, old_s), sa.Numeric(new_p, new_s))

    @pytest.mark.parametrize(
        ("old", "new", "expected"),
        [
            (sa.DateTime(timezone=True), sa.DateTime(), True),
            (postgresql.TIMESTAMP(), sa.DateTime(timezone=True), False),
            (postgresql.DOUBLE_PRECISION(), sa.REAL(), True),
            (sa.REAL(), sa.Double(), False),
            (sa.String(50), sa.Integer(), True),
            (sa.Float(), sa.Integer(), True),
            (sa.Integer(), sa.Numeric(20, 0), True),
            (sa.Numeric(10, 2), sa.Numeric(), False),
            (sa.Numeric(), sa.Numeric(10, 2), True),
            (sa.Enum("a", "b"), sa.Enum("a", "b", "c"), False),
            (sa.Enum("a", "b"), sa.Enum("a"), True),
            (sa.Enum("long", "b"), sa.String(3), True),
            (sa.Boolean(), sa.Boolean(), False),
            (postgresql.ARRAY(sa.Integer()), postgresql.ARRAY(sa.SmallInteger()), True),
            (sa.Uuid(), sa.String(36), True),
            (sa.LargeBinary(10), sa.LargeBinary(), False),
            (postgresql.INET(), postgresql.INET(), False),
            (postgresql.INET(), postgresql.CIDR(), True),
            (Code(), sa.String(5), True),
            (sa.String(5), Code(), False),
        ],
    )
    def test_families(self, old, new, expected):
        """Timezones, floats, enums and changes of family are judged as documented."""
        assert expected == narrows(old, new)
