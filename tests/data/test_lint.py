"""``lint_tree`` and ``bastion migrate lint``: revisions rendered for PostgreSQL, then checked.

No database is needed: every revision is rendered offline, so these tests run
on trees written to disk and never connect.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from migration_support import WIDGETS, Revision
from typer.testing import CliRunner

import bastion.cli.migrate_lint  # noqa: F401 -- registers the lint verb
from bastion.cli import app
from bastion.data import LintFinding, MigrationError, MigrationTree, Migrator, lint_tree
from bastion.data._lint import LINT_RULES
from bastion.errors import ConfigurationError

# A table that exists before the revisions under test: linted revisions build on it.
USERS: Revision = (
    "r0",
    None,
    'op.create_table("users", sa.Column("id", sa.Integer), sa.Column("email", sa.String(200)),'
    ' sa.Column("team_id", sa.Integer), sa.Column("age", sa.Integer))\n'
    'op.create_table("teams", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.create_index("ix_users_email", "users", ["email"])',
    "pass",
    "Users and teams.",
)

AUTOCOMMIT = "with op.get_context().autocommit_block():\n"


def autocommit(body: str) -> str:
    """``body`` inside an autocommit block."""
    return AUTOCOMMIT + textwrap.indent(body, "    ")


def chain(*bodies: str) -> list[Revision]:
    """Revisions r1, r2, ... after USERS, one per upgrade body."""
    revisions: list[Revision] = [USERS]
    for number, body in enumerate(bodies, start=1):
        revisions.append((f"r{number}", revisions[-1][0], body, "pass", f"Step {number}."))
    return revisions


@pytest.fixture
def lint(make_tree):
    """Lint a tree of USERS then the given upgrade bodies; returns (revision, rule) pairs."""

    def run(*bodies: str, ignore: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        tree = MigrationTree("app", str(make_tree(*chain(*bodies))), "alembic_version")
        return [(finding.revision, finding.rule) for finding in lint_tree(tree, ignore=ignore)]

    return run


def add_marker(directory: Path, revision: str, line: str) -> None:
    """Append a module-level line to a revision file of a tree on disk."""
    path = directory / "versions" / f"{revision}.py"
    path.write_text(path.read_text() + f"\n{line}\n")


# (id, rule, dangerous form, safer forms: one upgrade body per revision)
RULE_CASES = [
    (
        "create-index-not-concurrently",
        'op.create_index("ix_users_age", "users", ["age"])',
        [
            autocommit(
                'op.create_index("ix_users_age", "users", ["age"], postgresql_concurrently=True)'
            )
        ],
    ),
    (
        "drop-index-not-concurrently",
        'op.drop_index("ix_users_email", table_name="users")',
        [
            autocommit(
                'op.drop_index("ix_users_email", table_name="users", postgresql_concurrently=True)'
            )
        ],
    ),
    (
        "requires-autocommit",
        'op.create_index("ix_users_age", "users", ["age"], postgresql_concurrently=True)',
        [
            autocommit(
                'op.create_index("ix_users_age", "users", ["age"], postgresql_concurrently=True)'
            )
        ],
    ),
    (
        "add-column-not-null-without-default",
        'op.add_column("users", sa.Column("score", sa.Integer, nullable=False))',
        [
            'op.add_column("users", sa.Column("score", sa.Integer, nullable=False,'
            ' server_default="0"))'
        ],
    ),
    (
        "add-column-volatile-default",
        'op.add_column("users", sa.Column("token", sa.Uuid,'
        ' server_default=sa.text("gen_random_uuid()")))',
        # now() is stable: PostgreSQL 11+ stores it once instead of rewriting the table.
        ['op.add_column("users", sa.Column("seen", sa.DateTime, server_default=sa.text("now()")))'],
    ),
    (
        "alter-column-type",
        'op.alter_column("users", "age", type_=sa.BigInteger, existing_type=sa.Integer)',
        ['op.add_column("users", sa.Column("age_big", sa.BigInteger))'],
    ),
    (
        "set-not-null",
        'op.alter_column("users", "age", nullable=False, existing_type=sa.Integer)',
        [
            'op.create_check_constraint("ck_users_age_nn", "users", "age IS NOT NULL",'
            " postgresql_not_valid=True)",
            'op.execute("ALTER TABLE users VALIDATE CONSTRAINT ck_users_age_nn")\n'
            'op.alter_column("users", "age", nullable=False, existing_type=sa.Integer)',
        ],
    ),
    (
        "add-foreign-key-not-valid",
        'op.create_foreign_key("fk_users_team", "users", "teams", ["team_id"], ["id"])',
        [
            'op.create_foreign_key("fk_users_team", "users", "teams", ["team_id"], ["id"],'
            " postgresql_not_valid=True)",
            'op.execute("ALTER TABLE users VALIDATE CONSTRAINT fk_users_team")',
        ],
    ),
    (
        "add-check-not-valid",
        'op.create_check_constraint("ck_users_age", "users", "age >= 0")',
        [
            'op.create_check_constraint("ck_users_age", "users", "age >= 0",'
            " postgresql_not_valid=True)",
            'op.execute("ALTER TABLE users VALIDATE CONSTRAINT ck_users_age")',
        ],
    ),
    (
        "validate-constraint-same-transaction",
        'op.create_check_constraint("ck_users_age", "users", "age >= 0",'
        " postgresql_not_valid=True)\n"
        'op.execute("ALTER TABLE users VALIDATE CONSTRAINT ck_users_age")',
        [
            'op.create_check_constraint("ck_users_age", "users", "age >= 0",'
            " postgresql_not_valid=True)",
            'op.execute("ALTER TABLE users VALIDATE CONSTRAINT ck_users_age")',
        ],
    ),
    (
        "add-unique-constraint",
        'op.create_unique_constraint("uq_users_email", "users", ["email"])',
        [
            autocommit(
                'op.create_index("ix_users_email_u", "users", ["email"], unique=True,'
                " postgresql_concurrently=True)"
            )
            + '\nop.execute("ALTER TABLE users ADD CONSTRAINT uq_users_email'
            ' UNIQUE USING INDEX ix_users_email_u")',
        ],
    ),
    (
        "add-primary-key",
        'op.create_primary_key("pk_users", "users", ["id"])',
        [
            autocommit(
                'op.create_index("ix_users_id", "users", ["id"], unique=True,'
                " postgresql_concurrently=True)"
            )
            + '\nop.execute("ALTER TABLE users ADD CONSTRAINT pk_users'
            ' PRIMARY KEY USING INDEX ix_users_id")',
        ],
    ),
    (
        "rename-column",
        'op.alter_column("users", "email", new_column_name="mail")',
        ['op.add_column("users", sa.Column("mail", sa.String(200)))'],
    ),
    (
        "rename-table",
        'op.rename_table("users", "members")',
        [
            'op.rename_table("users", "members")\n'
            'op.execute("CREATE VIEW users AS SELECT * FROM members")'
        ],
    ),
    (
        "drop-column",
        'op.drop_column("users", "email")',
        # Dropping a constraint is not dropping a column.
        [
            'op.create_check_constraint("ck_users_age", "users", "age >= 0",'
            " postgresql_not_valid=True)",
            'op.drop_constraint("ck_users_age", "users")',
        ],
    ),
    (
        "drop-table",
        'op.drop_table("teams")',
        ['op.execute("DROP VIEW IF EXISTS teams_view")'],
    ),
    (
        "vacuum-full",
        autocommit('op.execute("VACUUM FULL users")'),
        [autocommit('op.execute("VACUUM (ANALYZE) users")')],
    ),
    (
        "cluster",
        'op.execute("CLUSTER users USING ix_users_email")',
        # Only marks the index for a later CLUSTER: no rewrite.
        ['op.execute("ALTER TABLE users CLUSTER ON ix_users_email")'],
    ),
    (
        "reindex-not-concurrently",
        'op.execute("REINDEX INDEX ix_users_email")',
        [autocommit('op.execute("REINDEX INDEX CONCURRENTLY ix_users_email")')],
    ),
]


CASE_IDS = [case[0] for case in RULE_CASES]


class TestRules:
    @pytest.mark.parametrize(("rule", "dangerous", "_safer"), RULE_CASES, ids=CASE_IDS)
    def test_fires_on_the_dangerous_form(self, lint, rule, dangerous, _safer):
        """The rule flags its dangerous form, and nothing else does."""
        assert [("r1", rule)] == lint(dangerous)

    @pytest.mark.parametrize(("rule", "_dangerous", "safer"), RULE_CASES, ids=CASE_IDS)
    def test_quiet_on_the_safer_form(self, lint, rule, _dangerous, safer):
        """The safer form the rule recommends lints clean."""
        assert [] == lint(*safer)

    def test_every_rule_has_a_case(self):
        """Each rule but offline-render-failed (tested below) has a dangerous and a safer form."""
        assert sorted(set(LINT_RULES) - {"offline-render-failed"}) == sorted(
            case[0] for case in RULE_CASES
        )

    def test_vacuum_inside_a_transaction(self, lint):
        """VACUUM outside an autocommit block fails on PostgreSQL, so it is flagged."""
        assert [("r1", "requires-autocommit")] == lint('op.execute("VACUUM users")')

    def test_serial_column_rewrites(self, lint):
        """A serial column fills every row from a sequence: a volatile default."""
        body = 'op.execute("ALTER TABLE users ADD COLUMN seq BIGSERIAL")'

        assert [("r1", "add-column-volatile-default")] == lint(body)

    def test_primary_key_column(self, lint):
        """Adding a column that is the primary key builds the key's index under lock."""
        body = 'op.execute("ALTER TABLE users ADD COLUMN uid integer PRIMARY KEY")'

        assert [("r1", "add-primary-key")] == lint(body)

    @pytest.mark.parametrize(
        "body",
        [
            'op.add_column("users", sa.Column("code", sa.String(20), unique=True))',
            'op.execute("ALTER TABLE users ADD COLUMN code varchar(20) UNIQUE")',
        ],
        ids=["alembic", "sql"],
    )
    def test_unique_column(self, lint, body):
        """Adding a UNIQUE column builds its index under lock."""
        assert [("r1", "add-unique-constraint")] == lint(body)

    def test_set_not_null_needs_the_check_validated(self, lint):
        """A NOT VALID check that was never validated does not make SET NOT NULL safe."""
        findings = lint(
            'op.create_check_constraint("ck_users_age_nn", "users", "age IS NOT NULL",'
            " postgresql_not_valid=True)",
            'op.alter_column("users", "age", nullable=False, existing_type=sa.Integer)',
        )

        assert [("r2", "set-not-null")] == findings

    def test_several_actions_of_one_alter_table(self, lint):
        """Each action of a multi-action ALTER TABLE is checked."""
        body = (
            'op.execute("ALTER TABLE users ADD COLUMN a int NOT NULL, '
            'ALTER COLUMN age TYPE bigint, ADD CONSTRAINT ck CHECK (age > 0)")'
        )

        assert [
            ("r1", "add-column-not-null-without-default"),
            ("r1", "alter-column-type"),
            ("r1", "add-check-not-valid"),
        ] == lint(body)

    def test_several_statements_of_one_execute(self, lint):
        """Statements passed together to op.execute are checked one by one."""
        body = 'op.execute("CREATE INDEX ix_a ON users (age); DROP INDEX ix_users_email")'

        assert [("r1", "create-index-not-concurrently"), ("r1", "drop-index-not-concurrently")] == (
            lint(body)
        )

    def test_keywords_in_literals_and_function_bodies(self, lint):
        """SQL inside a string literal or a $$ body is data, not a statement."""
        body = (
            "op.execute(\"INSERT INTO users (email) VALUES ('x; CREATE INDEX i ON users (a)')\")\n"
            'op.execute("CREATE FUNCTION f() RETURNS void AS $$ BEGIN DROP TABLE users; END $$'
            ' LANGUAGE plpgsql")'
        )

        assert [] == lint(body)

    def test_keywords_in_literals_do_not_count(self, lint):
        """'NOT VALID' inside a string literal does not make a CHECK constraint NOT VALID."""
        body = "op.execute(\"ALTER TABLE users ADD CONSTRAINT ck CHECK (email <> 'NOT VALID')\")"

        assert [("r1", "add-check-not-valid")] == lint(body)

    def test_finding_carries_the_rule_text(self, make_tree):
        """A finding names its tree, revision and statement, with the rule's why and safer form."""
        tree = MigrationTree("app", str(make_tree(*chain('op.drop_column("users", "email")'))), "v")

        findings = lint_tree(tree)

        rule = LINT_RULES["drop-column"]
        assert [
            LintFinding(
                "app",
                "r1",
                "drop-column",
                "ALTER TABLE users DROP COLUMN email",
                rule.why,
                rule.safer,
            )
        ] == findings


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
class TestSaferFormsRunOnPostgres:
    @pytest.mark.parametrize(("_rule", "_dangerous", "safer"), RULE_CASES, ids=CASE_IDS)
    async def test_safer_form_applies(self, database, make_tree, _rule, _dangerous, safer):
        """The safer form the tests hold up is valid PostgreSQL under bastion's migrator."""
        tree = MigrationTree("app", str(make_tree(*chain(*safer))), "alembic_version")

        applied = await Migrator(database, [tree], allow_destructive=True).upgrade()

        assert [f"r{n}" for n in range(len(safer) + 1)] == [step.revision for step in applied]


class TestNewTables:
    def test_tables_created_in_the_revision_are_exempt(self, lint):
        """Indexes, constraints and columns on a table created in the same revision are quiet."""
        body = (
            'op.create_table("notes", sa.Column("id", sa.Integer), sa.Column("body", sa.Text))\n'
            'op.create_index("ix_notes_body", "notes", ["body"])\n'
            'op.add_column("notes", sa.Column("rank", sa.Integer, nullable=False))\n'
            'op.create_foreign_key("fk_notes_user", "notes", "users", ["id"], ["id"])\n'
            'op.create_primary_key("pk_notes", "notes", ["id"])\n'
            'op.drop_index("ix_notes_body", table_name="notes")\n'
            'op.drop_table("notes")'
        )

        assert [] == lint(body)

    def test_quoted_names_match(self, lint):
        """A quoted, schema-qualified table name is the same table as its creation."""
        body = (
            'op.create_table("Big Notes", sa.Column("id", sa.Integer), schema="public")\n'
            'op.create_index("ix_big", "Big Notes", ["id"], schema="public")'
        )

        assert [] == lint(body)

    def test_tables_of_earlier_revisions_are_not(self, lint):
        """A table created by an earlier revision is an existing table."""
        findings = lint(
            'op.create_table("notes", sa.Column("id", sa.Integer))',
            'op.create_index("ix_notes_id", "notes", ["id"])',
        )

        assert [("r2", "create-index-not-concurrently")] == findings


class TestSuppression:
    def test_lint_ignore_marker(self, make_tree):
        """lint_ignore in a revision silences that rule for that revision only."""
        directory = make_tree(
            *chain('op.drop_column("users", "email")', 'op.drop_column("users", "age")')
        )
        add_marker(directory, "r1", 'lint_ignore = ["drop-column"]')

        findings = lint_tree(MigrationTree("app", str(directory), "v"))

        assert [("r2", "drop-column")] == [(f.revision, f.rule) for f in findings]

    def test_ignore_argument(self, lint):
        """ignore= silences a rule in every revision and leaves the others."""
        findings = lint(
            'op.drop_column("users", "email")',
            'op.drop_column("users", "age")\nop.drop_table("teams")',
            ignore=("drop-column",),
        )

        assert [("r2", "drop-table")] == findings

    def test_unknown_rule_in_ignore(self, lint):
        """An unknown rule id in ignore= is a configuration error, not a silent no-op."""
        with pytest.raises(ConfigurationError, match="unknown lint rule"):
            lint("pass", ignore=("drop-colum",))

    def test_unknown_rule_in_marker(self, make_tree):
        """An unknown rule id in lint_ignore names the revision."""
        directory = make_tree(*chain("pass"))
        add_marker(directory, "r1", 'lint_ignore = ["drop-colum"]')

        with pytest.raises(MigrationError, match="revision 'r1'") as caught:
            lint_tree(MigrationTree("app", str(directory), "v"))

        assert "r1" == caught.value.revision

    @pytest.mark.parametrize("value", ['"drop-column"', "7"], ids=["string", "number"])
    def test_marker_must_be_a_list(self, make_tree, value):
        """A lint_ignore that is not a list of rule ids is refused, not read letter by letter."""
        directory = make_tree(*chain("pass"))
        add_marker(directory, "r1", f"lint_ignore = {value}")

        with pytest.raises(MigrationError, match="must be a list of rule ids"):
            lint_tree(MigrationTree("app", str(directory), "v"))


class TestOfflineRenderFailure:
    def test_reported_and_later_revisions_still_linted(self, lint):
        """A revision that reads data is one finding; the revisions after it are still linted."""
        findings = lint(
            'count = op.get_bind().execute(sa.text("SELECT count(*) FROM users")).scalar()',
            'op.create_index("ix_users_age", "users", ["age"])',
        )

        assert [("r1", "offline-render-failed"), ("r2", "create-index-not-concurrently")] == (
            findings
        )

    def test_error_first_line_is_the_excerpt(self, make_tree):
        """The finding shows the error's type and first line."""
        body = 'raise RuntimeError("needs the data\\nsecond line")'
        tree = MigrationTree("app", str(make_tree(*chain(body))), "v")

        (finding,) = lint_tree(tree)

        assert "RuntimeError: needs the data" == finding.statement

    def test_can_be_ignored(self, lint):
        """A reviewed data migration can silence offline-render-failed."""
        body = 'raise RuntimeError("data migration")'

        assert [] == lint(body, ignore=("offline-render-failed",))

    def test_unreadable_revision_is_a_migration_error(self, make_tree):
        """A revision file that does not import is an error about the tree, not a finding."""
        directory = make_tree(*chain("pass"))
        (directory / "versions" / "r1.py").write_text("revision = (\n")

        with pytest.raises(MigrationError, match="cannot read the revisions of tree 'app'"):
            lint_tree(MigrationTree("app", str(directory), "v"))

    def test_broken_env_is_a_migration_error(self, make_tree):
        """An env.py that fails before any revision runs is an error about the tree."""
        directory = make_tree(WIDGETS, env="raise RuntimeError('no env')\n")

        with pytest.raises(MigrationError, match="cannot render tree 'app' offline"):
            lint_tree(MigrationTree("app", str(directory), "v"))


class TestShippedTrees:
    def test_bastion_tree_is_clean(self):
        """bastion's own revisions lint clean."""
        assert [] == lint_tree(MigrationTree.bastion())

    def test_reference_service_tree_is_clean(self):
        """The reference service's revisions lint clean (its indexes are built CONCURRENTLY)."""
        tree = MigrationTree.from_location("app", "bastion_docs:migrations", "alembic_version")

        assert [] == lint_tree(tree)


APP = "migrate_cli_app:create_app"


@pytest.fixture
def cli(tmp_path, make_tree, monkeypatch):
    """Invoke ``bastion migrate lint ...`` for the test app, whose host tree the test writes."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("BASTION_DATABASE__URL", f"sqlite+aiosqlite:///{tmp_path}/lint.db")
    monkeypatch.setenv("BASTION_MIGRATIONS__APP_VERSION_TABLE", "app_version")
    monkeypatch.setenv("BASTION_MIGRATIONS__MODE", "check")
    monkeypatch.setenv("BASTION_LOGGING__FORMAT", "json")
    runner = CliRunner()

    def invoke(*bodies: str, args: tuple[str, ...] = ()):
        monkeypatch.setenv("BASTION_MIGRATIONS__APP_TREE", str(make_tree(*chain(*bodies))))
        return runner.invoke(app, ["migrate", "lint", *args, "--app", APP])

    return invoke


class TestCli:
    def test_findings_exit_1_with_a_table(self, cli):
        """Findings are a table of revision, rule, statement and safer form; exit status 1."""
        result = cli('op.create_index("ix_users_age", "users", ["age"])')

        assert 1 == result.exit_code, result.output
        assert "create-index-not-concurrently" in result.stdout
        assert "CREATE INDEX ix_users_age ON users (age)" in result.stdout
        assert "postgresql_concurrently=True" in result.stdout
        assert "1 finding(s)" in result.stdout

    def test_clean_exit_0(self, cli):
        """A clean tree exits 0 and says so."""
        result = cli('op.add_column("users", sa.Column("score", sa.Integer))')

        assert 0 == result.exit_code, result.output
        assert "No findings." in result.stdout

    def test_json(self, cli):
        """--json prints every finding with why and the safer form."""
        result = cli('op.drop_column("users", "email")', args=("--json",))

        payload = json.loads(result.stdout)
        assert 1 == result.exit_code
        assert False is payload["clean"]
        assert [("app", "r1", "drop-column")] == [
            (f["tree"], f["revision"], f["rule"]) for f in payload["findings"]
        ]
        assert LINT_RULES["drop-column"].why == payload["findings"][0]["why"]

    def test_ignore_option(self, cli):
        """--ignore RULE, repeatable, leaves those rules out."""
        result = cli(
            'op.drop_column("users", "email")\nop.drop_table("teams")',
            args=("--ignore", "drop-column", "--ignore", "drop-table", "--json"),
        )

        assert 0 == result.exit_code, result.output
        assert {"clean": True, "findings": []} == json.loads(result.stdout)

    def test_unknown_rule_exits_2(self, cli):
        """An unknown rule id is one line on stderr and exit status 2."""
        result = cli("pass", args=("--ignore", "no-such-rule"))

        errors = [line for line in result.stderr.splitlines() if line.startswith("bastion: ")]
        assert 2 == result.exit_code
        assert 1 == len(errors)
        assert "the ignore list names unknown lint rule(s) no-such-rule" in errors[0]

    def test_tree_option(self, cli):
        """--tree lints only that tree."""
        result = cli('op.drop_column("users", "email")', args=("--tree", "bastion"))

        assert 0 == result.exit_code, result.output

    def test_unknown_tree_exits_2(self, cli):
        """An unknown tree is named on stderr with exit status 2."""
        result = cli("pass", args=("--tree", "nope"))

        assert 2 == result.exit_code
        assert "no migration tree named 'nope'" in result.stderr

    def test_needs_no_database(self, cli, monkeypatch):
        """With PostgreSQL configured and unreachable, the lint still runs (nothing connects)."""
        # Port 1 on loopback: nothing listens, so any connection attempt would fail at once.
        monkeypatch.setenv("BASTION_DATABASE__URL", "postgresql+asyncpg://lint@127.0.0.1:1/none")

        result = cli('op.drop_column("users", "email")', args=("--json",))

        assert 1 == result.exit_code, result.output
        assert ["drop-column"] == [f["rule"] for f in json.loads(result.stdout)["findings"]]
