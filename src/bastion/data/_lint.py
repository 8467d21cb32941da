"""Migration lint: revisions whose SQL would lock a large PostgreSQL table or break readers.

Each revision's upgrade is rendered offline (Alembic's ``--sql`` mode) with the
PostgreSQL dialect, whatever database is configured, because the lint is about
PostgreSQL's locks; no connection is made. The rendered statements are checked
against :data:`LINT_RULES`, each with a stable id, why it is dangerous and the
safer form. The field's linters (squawk, a Rust binary; strong_migrations, a
Ruby gem) cannot run here, so the rules are bastion's own, written for the SQL
Alembic renders and for what ``op.execute()`` passes through.

The pieces::

    lint_tree(tree)     LintFinding per dangerous statement of every revision, in upgrade order
    LINT_RULES          rule id -> LintRule (why, safer form)
    lint_ignore = [...] a revision's own suppressions (module level, rule ids)

Like every Alembic run, a lint drives Alembic's module-level ``context`` and
``op`` proxies: do not lint while a migration runs in the same process.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from alembic.runtime.environment import EnvironmentContext

from bastion.data._alembic_script import alembic_config, script_directory, upgrade_plan
from bastion.data._errors import MigrationError
from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext, RevisionStep
    from alembic.script import ScriptDirectory

    from bastion.data._migrations import MigrationTree

__all__ = ["LINT_RULES", "LintFinding", "LintRule", "lint_tree"]

LINT_URL: Final = "postgresql://lint"
"""What ``env.py`` renders for: only the dialect is used, nothing connects."""

IGNORE_MARKER: Final = "lint_ignore"
"""The module-level name a revision lists its suppressed rule ids under."""

_EXCERPT_LENGTH: Final = 160


@dataclass(frozen=True, slots=True)
class LintRule:
    """One thing the lint looks for.

    Attributes:
        id: the stable identifier, used by ``--ignore`` and ``lint_ignore``.
        why: what goes wrong on a large table or during a rolling deploy.
        safer: the form to write instead.
    """

    id: str
    why: str
    safer: str


@dataclass(frozen=True, slots=True)
class LintFinding:
    """One statement of one revision that a rule flags.

    Attributes:
        tree: the tree the revision belongs to.
        revision: the revision id.
        rule: the rule id (a key of :data:`LINT_RULES`).
        statement: the statement on one line, shortened; for
            ``offline-render-failed``, the error's first line.
        why: why it is dangerous.
        safer: the safer form.
    """

    tree: str
    revision: str
    rule: str
    statement: str
    why: str
    safer: str


_AUTOCOMMIT = "with op.get_context().autocommit_block():"

LINT_RULES: Final[Mapping[str, LintRule]] = {
    rule.id: rule
    for rule in (
        LintRule(
            "create-index-not-concurrently",
            "CREATE INDEX without CONCURRENTLY holds a SHARE lock on the table for the whole "
            "build: every INSERT, UPDATE and DELETE waits until the index is built.",
            f"{_AUTOCOMMIT} op.create_index(..., postgresql_concurrently=True)",
        ),
        LintRule(
            "drop-index-not-concurrently",
            "DROP INDEX takes an ACCESS EXCLUSIVE lock on the index's table: it queues behind "
            "running queries and every later query, reads included, queues behind it.",
            f"{_AUTOCOMMIT} op.drop_index(..., postgresql_concurrently=True)",
        ),
        LintRule(
            "requires-autocommit",
            "PostgreSQL refuses to run this statement inside a transaction block, and each "
            "revision runs in one: the migration fails.",
            f"run it inside `{_AUTOCOMMIT}`",
        ),
        LintRule(
            "add-column-not-null-without-default",
            "Adding a NOT NULL column without a default fails on a table that has rows, and "
            "the running version, which does not write the column, fails its inserts.",
            "add the column nullable (or with a constant server_default), backfill it in "
            "batches, then add CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT it in a "
            "later revision, and SET NOT NULL",
        ),
        LintRule(
            "add-column-volatile-default",
            "A volatile default (clock_timestamp(), random(), gen_random_uuid(), nextval() as "
            "in serial and identity columns) or a stored generated column is computed for "
            "every existing row: the table is rewritten under an ACCESS EXCLUSIVE lock. "
            "Constant and stable defaults, now() included, are instant since PostgreSQL 11.",
            "add the column without a default, ALTER COLUMN ... SET DEFAULT for new rows, "
            "then backfill existing rows in batches",
        ),
        LintRule(
            "alter-column-type",
            "Changing a column's type takes an ACCESS EXCLUSIVE lock and, unless the change "
            "is binary-coercible (varchar(n) to a longer varchar or to text), rewrites the "
            "table and its indexes while holding it.",
            "add a column of the new type, write both, backfill in batches, move reads, then "
            "drop the old column in a later release (lint_ignore a binary-coercible widening)",
        ),
        LintRule(
            "set-not-null",
            "SET NOT NULL scans the whole table under an ACCESS EXCLUSIVE lock, unless a "
            "validated CHECK (col IS NOT NULL) already proves it (PostgreSQL 12+).",
            "ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT in a "
            "later revision, then SET NOT NULL (instant) and drop the check",
        ),
        LintRule(
            "add-foreign-key-not-valid",
            "Adding a foreign key checks every existing row while holding a SHARE ROW "
            "EXCLUSIVE lock on both tables: writes to either wait.",
            "op.create_foreign_key(..., postgresql_not_valid=True), then "
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT name") in a later revision',
        ),
        LintRule(
            "add-check-not-valid",
            "Adding a CHECK constraint scans every row under an ACCESS EXCLUSIVE lock.",
            "op.create_check_constraint(..., postgresql_not_valid=True), then "
            'op.execute("ALTER TABLE t VALIDATE CONSTRAINT name") in a later revision',
        ),
        LintRule(
            "validate-constraint-same-transaction",
            "The constraint was added NOT VALID in this same transaction, whose lock is held "
            "until COMMIT, so the validation scan runs under that lock anyway.",
            "VALIDATE CONSTRAINT in a later revision (each revision is its own transaction)",
        ),
        LintRule(
            "add-unique-constraint",
            "Adding a UNIQUE constraint builds its index under an ACCESS EXCLUSIVE lock: "
            "reads and writes wait for the whole build.",
            f"{_AUTOCOMMIT} op.create_index(..., unique=True, postgresql_concurrently=True); "
            "then ALTER TABLE t ADD CONSTRAINT name UNIQUE USING INDEX index_name",
        ),
        LintRule(
            "add-primary-key",
            "Adding a primary key builds its unique index and checks NOT NULL under an ACCESS "
            "EXCLUSIVE lock: reads and writes wait for the whole build.",
            "make the columns NOT NULL safely (see set-not-null), CREATE UNIQUE INDEX "
            "CONCURRENTLY, then ALTER TABLE t ADD CONSTRAINT name PRIMARY KEY USING INDEX "
            "index_name",
        ),
        LintRule(
            "rename-column",
            "The running version still reads and writes the old name: its queries fail from "
            "the commit until every instance runs the new code.",
            "expand and contract: add the new column, write both, backfill, move reads, and "
            "drop the old column in a later release",
        ),
        LintRule(
            "rename-table",
            "The running version still queries the old name: its queries fail from the "
            "commit until every instance runs the new code.",
            "in the same revision, create a view under the old name "
            "(CREATE VIEW old AS SELECT * FROM new), and drop the view in a later release",
        ),
        LintRule(
            "drop-column",
            "The running version still selects and inserts the column (SQLAlchemy lists every "
            "mapped column): its queries fail until every instance runs the new code.",
            "release code that no longer reads or writes the column first (remove it from "
            "the model), then drop it in a later release",
        ),
        LintRule(
            "drop-table",
            "The running version still queries the table: its queries fail until every "
            "instance runs the new code, and the data is gone.",
            "release code that no longer uses the table first, then drop it in a later release",
        ),
        LintRule(
            "vacuum-full",
            "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock for the whole run.",
            "leave plain VACUUM to autovacuum, or reclaim space with pg_repack outside the "
            "migration",
        ),
        LintRule(
            "cluster",
            "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock for the whole run.",
            "reorder with pg_repack outside the migration",
        ),
        LintRule(
            "reindex-not-concurrently",
            "REINDEX without CONCURRENTLY blocks writes to the table, and reads that use the "
            "index, for the whole rebuild.",
            f"{_AUTOCOMMIT} REINDEX ... CONCURRENTLY (PostgreSQL 12+)",
        ),
        LintRule(
            "offline-render-failed",
            "The revision raised while rendered offline (it reads data through op.get_bind(), "
            "say), so its statements were not linted.",
            "keep upgrade() to operations that render offline (branch on "
            "context.is_offline_mode() for data reads), or lint_ignore this rule for a data "
            "migration you have reviewed",
        ),
    )
}
"""Every rule, by id."""

_RENDER_FAILED: Final = "offline-render-failed"


def lint_tree(tree: MigrationTree, *, ignore: Collection[str] = ()) -> list[LintFinding]:
    """Lint every revision of a tree for PostgreSQL lock hazards and breaking changes.

    Each revision's upgrade is rendered offline with the PostgreSQL dialect
    (nothing connects), and its statements are checked against
    :data:`LINT_RULES`. Tables a revision creates are exempt: they are empty,
    and no running version reads them yet. A revision silences rules for
    itself with a module-level ``lint_ignore = ["rule-id", ...]``. A revision
    that cannot be rendered offline yields one ``offline-render-failed``
    finding, and the revisions after it are still linted.

    Example:
        >>> findings = lint_tree(MigrationTree.from_location("app", "myapp:migrations", "v"))
        >>> [(f.revision, f.rule) for f in findings]
        [('0007', 'create-index-not-concurrently')]

    Args:
        tree: the tree to lint.
        ignore: rule ids to leave out, for every revision.

    Returns:
        The findings in upgrade order, then statement order; empty when the tree is clean.

    Raises:
        ConfigurationError: an unknown rule id in ``ignore``, or the tree's
            location is not an Alembic script directory.
        MigrationError: the tree's scripts cannot be read, a ``lint_ignore``
            is malformed or names an unknown rule, or ``env.py`` fails before
            any revision runs.
    """
    _check_rule_ids(ignore, "the ignore list")
    config = alembic_config(tree.directory(), tree.version_table, url=LINT_URL)
    # A plain Alembic env.py (not run_alembic_env) reads the URL from here.
    config.set_main_option("sqlalchemy.url", LINT_URL)
    try:
        script = script_directory(config)
        steps = upgrade_plan(script, "heads", ())
    except Exception as exc:
        raise MigrationError(
            f"cannot read the revisions of tree {tree.name!r}: {_first_line(exc)}", tree=tree.name
        ) from exc

    checker = _TreeChecker()
    findings: list[LintFinding] = []
    for rendered in _render(tree.name, config, script, steps):
        silenced = set(ignore) | _revision_ignores(tree.name, rendered.step)
        revision = rendered.step.revision.revision
        if rendered.error is not None:
            hits = [(_RENDER_FAILED, rendered.error)]
        else:
            hits = checker.check_revision(rendered.chunks)
        findings += [
            _finding(tree.name, revision, rule, excerpt)
            for rule, excerpt in hits
            if rule not in silenced
        ]
    return findings


# -- rendering --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rendered:
    step: RevisionStep
    chunks: list[str]
    error: str | None = None


class _StatementLog(io.StringIO):
    """An output buffer that keeps each write; Alembic writes one statement per write."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)


def _render(
    tree: str, config: Config, script: ScriptDirectory, steps: Sequence[RevisionStep]
) -> Iterator[_Rendered]:
    """Render ``steps`` offline, yielding each step's statements as it completes.

    One environment run renders every step; Alembic asks for the next step only
    after the previous one was written, so the writes between two requests are
    one revision's. A step that raises ends that run: it is reported, and a new
    run starts with the steps after it.
    """
    remaining = list(steps)
    while remaining:
        follower = _StepFollower(remaining)
        config.output_buffer = follower.log
        failure: Exception | None = None
        try:
            with EnvironmentContext(
                config,
                script,
                fn=follower,
                as_sql=True,
                starting_rev=None,
                destination_rev="heads",
            ):
                script.run_env()
        except Exception as exc:  # noqa: BLE001 -- any error of a revision is a finding, see below
            failure = exc
        yield from follower.done
        if failure is None:
            return
        failed = follower.running
        if failed is None:
            raise MigrationError(
                f"cannot render tree {tree!r} offline: {_first_line(failure)}", tree=tree
            ) from failure
        yield _Rendered(failed, [], _first_line(failure))
        remaining = remaining[remaining.index(failed) + 1 :]


class _StepFollower:
    """The ``fn`` of an offline run: hands Alembic the steps and cuts the output per step."""

    def __init__(self, steps: Sequence[RevisionStep]) -> None:
        self.steps = steps
        self.log = _StatementLog()
        self.done: list[_Rendered] = []
        self.running: RevisionStep | None = None

    def __call__(self, _heads: Sequence[str], _context: MigrationContext) -> Iterator[RevisionStep]:
        for step in self.steps:
            start = len(self.log.chunks)
            self.running = step
            yield step
            self.running = None
            self.done.append(_Rendered(step, self.log.chunks[start:]))


def _revision_ignores(tree: str, step: RevisionStep) -> set[str]:
    revision = step.revision.revision
    declared = getattr(step.revision.module, IGNORE_MARKER, ())
    if not isinstance(declared, list | tuple | set | frozenset) or not all(
        isinstance(rule, str) for rule in declared
    ):
        raise MigrationError(
            f"revision {revision!r} of tree {tree!r}: {IGNORE_MARKER} must be a list of rule ids",
            tree=tree,
            revision=revision,
        )
    try:
        _check_rule_ids(declared, f"{IGNORE_MARKER} of revision {revision!r}")
    except ConfigurationError as exc:
        raise MigrationError(f"tree {tree!r}: {exc}", tree=tree, revision=revision) from None
    return set(declared)


def _check_rule_ids(rules: Collection[str], where: str) -> None:
    unknown = sorted(set(rules) - LINT_RULES.keys())
    if unknown:
        raise ConfigurationError(
            f"{where} names unknown lint rule(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(LINT_RULES))}"
        )


def _finding(tree: str, revision: str, rule: str, excerpt: str) -> LintFinding:
    known = LINT_RULES[rule]
    return LintFinding(tree, revision, rule, excerpt, known.why, known.safer)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {lines[0]}" if lines else name


# -- reading SQL -------------------------------------------------------------------------

# Literals and comments are blanked before matching, so a keyword inside a string
# or a function body ($$ ... $$) never fires a rule.
_TOKEN = re.compile(
    r"""
    (?P<literal>'(?:[^']|'')*')
    | (?P<identifier>"(?:[^"]|"")*")
    | (?P<dollar>\$(?P<tag>[A-Za-z_]\w*|)\$.*?\$(?P=tag)\$)
    | (?P<comment>--[^\n]*|/\*.*?\*/)
    | (?P<end>;)
    """,
    re.VERBOSE | re.DOTALL,
)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class _Statement:
    text: str
    """As written, on one line: what a finding shows."""
    sql: str
    """Literals emptied, comments removed, on one line: what the rules match."""


def _statements(chunk: str) -> Iterator[_Statement]:
    """Split one write of Alembic (``op.execute`` may pass several statements) into statements."""
    text: list[str] = []
    sql: list[str] = []
    position = 0

    def flush() -> _Statement | None:
        statement = _Statement(_one_line("".join(text)), _one_line("".join(sql)))
        text.clear()
        sql.clear()
        return statement if statement.sql else None

    for token in _TOKEN.finditer(chunk):
        plain = chunk[position : token.start()]
        text.append(plain)
        sql.append(plain)
        position = token.end()
        kind = token.lastgroup
        if kind == "end":
            statement = flush()
            if statement is not None:
                yield statement
            continue
        text.append(token.group())
        if kind == "literal":
            sql.append("''")
        elif kind == "dollar":
            sql.append("$$$$")
        elif kind == "identifier":
            sql.append(token.group())
        else:
            sql.append(" ")
    text.append(chunk[position:])
    sql.append(chunk[position:])
    statement = flush()
    if statement is not None:
        yield statement


def _one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def _excerpt(statement: _Statement) -> str:
    text = statement.text
    return text if len(text) <= _EXCERPT_LENGTH else text[: _EXCERPT_LENGTH - 3] + "..."


def _split_actions(actions: str) -> list[str]:
    """Split an ALTER TABLE's actions at the commas outside parentheses and quotes."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for index, char in enumerate(actions):
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(actions[start:index].strip())
            start = index + 1
    parts.append(actions[start:].strip())
    return [part for part in parts if part]


_I = re.IGNORECASE
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_NAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT})*"
_NAMES = rf"{_NAME}(?:\s*,\s*{_NAME})*"


def _name(raw: str) -> str:
    """The bare object name of a possibly qualified, possibly quoted identifier."""
    last: str = re.findall(_IDENT, raw)[-1]
    if last.startswith('"'):
        return last[1:-1].replace('""', '"')
    return last.lower()


_BEGIN = re.compile(r"^(?:BEGIN|START\s+TRANSACTION)\b", _I)
_END = re.compile(r"^(?:COMMIT|END|ROLLBACK|ABORT)\b", _I)
_CREATE_TABLE = re.compile(
    r"^CREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?(?:(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?(?P<table>{_NAME})",
    _I,
)
_CREATE_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?P<concurrently>CONCURRENTLY\s+)?"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?(?:(?P<index>{_NAME})\s+)?ON\s+(?:ONLY\s+)?(?P<table>{_NAME})",
    _I,
)
_CREATE_VIEW = re.compile(
    rf"^CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:TEMP|TEMPORARY)\s+)?VIEW\s+(?P<view>{_NAME})", _I
)
_DROP_INDEX = re.compile(
    rf"^DROP\s+INDEX\s+(?P<concurrently>CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(?P<indexes>{_NAMES})",
    _I,
)
_DROP_TABLE = re.compile(rf"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?P<tables>{_NAMES})", _I)
_REINDEX = re.compile(
    r"^REINDEX\s+(?:\((?P<options>[^)]*)\)\s*)?(?P<kind>INDEX|TABLE|SCHEMA|DATABASE|SYSTEM)\s+"
    rf"(?P<concurrently>CONCURRENTLY\s+)?(?P<target>{_NAME})?",
    _I,
)
_VACUUM = re.compile(r"^VACUUM\b(?:\s*\((?P<options>[^)]*)\)|(?P<words>(?:\s+\w+)*))", _I)
_VACUUM_FULL = re.compile(r"\bFULL\b(?!\s+(?:FALSE|OFF|0)\b)", _I)
_CLUSTER = re.compile(rf"^CLUSTER\b(?:\s+VERBOSE\b)?(?:\s+(?P<table>{_NAME}))?", _I)
_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b(?!\s+(?:FALSE|OFF|0)\b)", _I)
_ALTER_TABLE = re.compile(
    rf"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<table>{_NAME})\s*\*?\s+(?P<actions>.+)$",
    _I,
)

_RENAME_TABLE = re.compile(r"^RENAME\s+TO\b", _I)
_RENAME_COLUMN = re.compile(rf"^RENAME\s+(?:COLUMN\s+)?(?!CONSTRAINT\b){_IDENT}\s+TO\b", _I)
_ADD_CONSTRAINT = re.compile(
    rf"^ADD\s+(?:CONSTRAINT\s+(?P<name>{_IDENT})\s+)?"
    r"(?P<kind>FOREIGN\s+KEY|CHECK|UNIQUE|PRIMARY\s+KEY|EXCLUDE)\b",
    _I,
)
_ADD_COLUMN = re.compile(
    rf"^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?{_IDENT}\s+(?P<definition>.*)$", _I
)
_ALTER_TYPE = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?{_IDENT}\s+(?:SET\s+DATA\s+)?TYPE\b", _I)
_SET_NOT_NULL = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?(?P<column>{_IDENT})\s+SET\s+NOT\s+NULL\b", _I)
_VALIDATE = re.compile(rf"^VALIDATE\s+CONSTRAINT\s+(?P<name>{_IDENT})", _I)
_DROP_COLUMN = re.compile(rf"^DROP\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)(?:IF\s+EXISTS\s+)?{_IDENT}", _I)

_NOT_VALID = re.compile(r"\bNOT\s+VALID\b", _I)
_USING_INDEX = re.compile(r"\bUSING\s+INDEX\b", _I)
_NOT_NULL = re.compile(r"\bNOT\s+NULL\b", _I)
_DEFAULT = re.compile(r"\bDEFAULT\b", _I)
_PRIMARY_KEY = re.compile(r"\bPRIMARY\s+KEY\b", _I)
_UNIQUE = re.compile(r"\bUNIQUE\b", _I)
_NOT_NULL_CHECK = re.compile(rf"\bCHECK\s*\(\s*(?P<column>{_IDENT})\s+IS\s+NOT\s+NULL\s*\)", _I)
# Values computed per row: volatile functions (now() and CURRENT_TIMESTAMP are
# stable, so PostgreSQL 11+ stores them once), serial and identity columns
# (nextval), and stored generated columns.
_PER_ROW_VALUE = re.compile(
    r"\b(?:clock_timestamp|random|gen_random_uuid|uuidv4|uuidv7|uuid_generate_v1|"
    r"uuid_generate_v1mc|uuid_generate_v4|timeofday|nextval|txid_current)\s*\("
    r"|^(?:small|big)?serial[248]?\b"
    r"|\bGENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\s+AS\s+IDENTITY\b"
    r"|\bGENERATED\s+ALWAYS\s+AS\s*\(.*\)\s*STORED\b",
    _I,
)

_Hit = tuple[str, str]
"""(rule id, statement excerpt)."""


@dataclass
class _TreeChecker:
    """Checks revisions in upgrade order, remembering what earlier ones proved.

    A ``CHECK (col IS NOT NULL)`` validated in an earlier revision (or earlier
    in the same one) makes a later ``SET NOT NULL`` on that column safe.
    """

    not_null_checks: dict[tuple[str, str], str] = field(default_factory=dict)
    """(table, constraint) -> column, for CHECK (column IS NOT NULL) constraints."""
    proven_not_null: set[tuple[str, str]] = field(default_factory=set)
    """(table, column) with a validated not-null check."""

    def check_revision(self, chunks: Sequence[str]) -> list[_Hit]:
        """Return the hits of one revision's rendered writes."""
        revision = _RevisionChecker(self)
        for chunk in chunks:
            for statement in _statements(chunk):
                revision.check(statement)
        return revision.result()


@dataclass
class _RevisionChecker:
    tree: _TreeChecker
    hits: list[_Hit] = field(default_factory=list)
    in_transaction: bool = False
    new_tables: set[str] = field(default_factory=set)
    new_indexes: set[str] = field(default_factory=set)
    not_valid_in_transaction: set[tuple[str, str]] = field(default_factory=set)
    renamed_tables: dict[str, int] = field(default_factory=dict)
    """Old table name -> index of its rename-table hit, until a view takes the old name."""
    covered: set[int] = field(default_factory=set)
    statement: _Statement = _Statement("", "")

    def hit(self, rule: str) -> None:
        self.hits.append((rule, _excerpt(self.statement)))

    def result(self) -> list[_Hit]:
        return [hit for index, hit in enumerate(self.hits) if index not in self.covered]

    def check(self, statement: _Statement) -> None:
        self.statement = statement
        sql = statement.sql
        if _BEGIN.match(sql) or _END.match(sql):
            self.in_transaction = bool(_BEGIN.match(sql))
            self.not_valid_in_transaction.clear()
            return
        for pattern, check in self._checks():
            match = pattern.match(sql)
            if match is not None:
                check(match)
                return

    def _checks(self) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], None]]]:
        return [
            (_CREATE_TABLE, self._create_table),
            (_CREATE_INDEX, self._create_index),
            (_CREATE_VIEW, self._create_view),
            (_DROP_INDEX, self._drop_index),
            (_DROP_TABLE, self._drop_table),
            (_REINDEX, self._reindex),
            (_VACUUM, self._vacuum),
            (_CLUSTER, self._cluster),
            (_ALTER_TABLE, self._alter_table),
        ]

    def _is_new(self, table: str | None) -> bool:
        return table is not None and _name(table) in self.new_tables

    def _needs_autocommit(self) -> None:
        if self.in_transaction:
            self.hit("requires-autocommit")

    def _create_table(self, match: re.Match[str]) -> None:
        self.new_tables.add(_name(match["table"]))

    def _create_view(self, match: re.Match[str]) -> None:
        # A view under the old name keeps the running version's queries working.
        renamed = self.renamed_tables.get(_name(match["view"]))
        if renamed is not None:
            self.covered.add(renamed)

    def _create_index(self, match: re.Match[str]) -> None:
        if match["index"]:
            self.new_indexes.add(_name(match["index"]))
        if match["concurrently"]:
            self._needs_autocommit()
        elif not self._is_new(match["table"]):
            self.hit("create-index-not-concurrently")

    def _drop_index(self, match: re.Match[str]) -> None:
        if match["concurrently"]:
            self._needs_autocommit()
            return
        indexes = {_name(index) for index in match["indexes"].split(",")}
        if not indexes <= self.new_indexes:
            self.hit("drop-index-not-concurrently")

    def _drop_table(self, match: re.Match[str]) -> None:
        tables = {_name(table) for table in match["tables"].split(",")}
        if not tables <= self.new_tables:
            self.hit("drop-table")

    def _reindex(self, match: re.Match[str]) -> None:
        if match["concurrently"] or _CONCURRENTLY.search(match["options"] or ""):
            self._needs_autocommit()
        elif not (match["kind"].upper() == "TABLE" and self._is_new(match["target"])):
            self.hit("reindex-not-concurrently")

    def _vacuum(self, match: re.Match[str]) -> None:
        self._needs_autocommit()
        if _VACUUM_FULL.search(match["options"] or match["words"] or ""):
            self.hit("vacuum-full")

    def _cluster(self, match: re.Match[str]) -> None:
        if not self._is_new(match["table"]):
            self.hit("cluster")

    def _alter_table(self, match: re.Match[str]) -> None:
        table = _name(match["table"])
        if table in self.new_tables:
            return
        actions = match["actions"]
        if _RENAME_TABLE.match(actions):
            self.renamed_tables[table] = len(self.hits)
            self.hit("rename-table")
            return
        if _RENAME_COLUMN.match(actions):
            self.hit("rename-column")
            return
        for action in _split_actions(actions):
            self._alter_action(table, action)

    def _alter_action(self, table: str, action: str) -> None:
        if constraint := _ADD_CONSTRAINT.match(action):
            self._add_constraint(table, action, constraint)
        elif column := _ADD_COLUMN.match(action):
            self._add_column(column["definition"])
        elif _ALTER_TYPE.match(action):
            self.hit("alter-column-type")
        elif not_null := _SET_NOT_NULL.match(action):
            if (table, _name(not_null["column"])) not in self.tree.proven_not_null:
                self.hit("set-not-null")
        elif validate := _VALIDATE.match(action):
            self._validate(table, _name(validate["name"]))
        elif _DROP_COLUMN.match(action):
            self.hit("drop-column")

    def _add_constraint(self, table: str, action: str, match: re.Match[str]) -> None:
        kind = _SPACE.sub(" ", match["kind"].upper())
        not_valid = bool(_NOT_VALID.search(action))
        name = _name(match["name"]) if match["name"] else None
        if kind in {"UNIQUE", "PRIMARY KEY"} and not _USING_INDEX.search(action):
            self.hit("add-unique-constraint" if kind == "UNIQUE" else "add-primary-key")
        elif kind == "FOREIGN KEY" and not not_valid:
            self.hit("add-foreign-key-not-valid")
        elif kind == "CHECK" and not not_valid:
            self.hit("add-check-not-valid")
        if not (not_valid and name):
            return
        self.not_valid_in_transaction.add((table, name))
        if check := _NOT_NULL_CHECK.search(action):
            self.tree.not_null_checks[table, name] = _name(check["column"])

    def _validate(self, table: str, name: str) -> None:
        if (table, name) in self.not_valid_in_transaction:
            self.hit("validate-constraint-same-transaction")
        column = self.tree.not_null_checks.get((table, name))
        if column is not None:
            self.tree.proven_not_null.add((table, column))

    def _add_column(self, definition: str) -> None:
        if _PRIMARY_KEY.search(definition):
            self.hit("add-primary-key")
        elif _PER_ROW_VALUE.search(definition):
            self.hit("add-column-volatile-default")
        elif _NOT_NULL.search(definition) and not _DEFAULT.search(definition):
            self.hit("add-column-not-null-without-default")
        if _UNIQUE.search(definition):
            self.hit("add-unique-constraint")
