"""Destructive changes: drops, renames and narrowed types, refused unless consented to.

A revision is judged by the operations it runs, not by its name or message.
Alembic has no hook before an operation runs, but every ``op.*`` and
``batch_op.*`` call goes through ``AbstractOperations.invoke``; while a
:class:`DestructiveGuard` watches a connection, that method is wrapped so each
operation on the connection is classified before it executes::

    DropTableOp                      drop_table     table
    DropColumnOp                     drop_column    table.column
    RenameTableOp                    rename_table   table (the old name)
    AlterColumnOp(modify_name=)      rename_column  table.column (the old name)
    AlterColumnOp(modify_type=)      narrow_type    table.column, unless a provable widening
    ExecuteSQLOp                     drop_table, drop_column, rename_table, rename_column,
                                     alter_type, truncate: read from the SQL text

Consent is ``allow`` (``--allow-destructive``) or, for an upgrade, a
module-level ``destroys = ["table", "table.column"]`` in the revision naming
every target. An undeclared change raises :class:`DestructiveChangeRefused`
before it executes, so the revision's transaction rolls back whole. A change
applied with consent is logged as a warning once its revision has committed.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog
from alembic.operations import ops
from alembic.operations.base import AbstractOperations
from sqlalchemy import inspect, types
from sqlalchemy.exc import CompileError, NoSuchTableError
from sqlalchemy.sql.elements import ClauseElement, TextClause

from bastion.data._errors import MigrationError

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep
    from sqlalchemy.engine import Connection, Dialect

__all__ = [
    "DestructiveChange",
    "DestructiveChangeRefused",
    "DestructiveGuard",
    "narrows",
    "sql_changes",
]

logger = structlog.get_logger("bastion.migrations")

MARKER: Final = "destroys"
"""The module-level name a revision declares its destructive targets under."""

_TABLE_KINDS: Final = frozenset({"drop_table", "rename_table", "truncate"})

_VERBS: Final = {
    "drop_table": "drop table",
    "drop_column": "drop column",
    "rename_table": "rename table",
    "rename_column": "rename column",
    "narrow_type": "narrow",
    "alter_type": "alter type of",
    "truncate": "truncate table",
}


@dataclass(frozen=True, slots=True)
class DestructiveChange:
    """One operation of a revision that loses data or breaks readers of the old schema.

    Attributes:
        kind: ``drop_table``, ``drop_column``, ``rename_table``, ``rename_column``,
            ``narrow_type``; from raw SQL also ``alter_type`` (a type change whose
            direction the SQL text does not tell) and ``truncate``.
        target: what it destroys: ``table`` or ``table.column`` (``schema.table``,
            ``schema.table.column`` when the operation names a schema); a rename
            names the old name.
        detail: one line for people, e.g. ``VARCHAR(200) -> VARCHAR(50)``; empty
            when the kind and target say it all.
    """

    kind: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        described = f"{_VERBS.get(self.kind, self.kind)} {self.target}"
        return f"{described} {self.detail}" if self.detail else described


class DestructiveChangeRefused(MigrationError):
    """A revision would destroy data and nobody consented; nothing of it was applied.

    Attributes:
        changes: what it would have destroyed and was not declared.
    """

    def __init__(
        self,
        message: str,
        *,
        tree: str,
        revision: str,
        changes: tuple[DestructiveChange, ...],
    ) -> None:
        super().__init__(message, tree=tree, revision=revision)
        self.changes = changes


def _key(name: str) -> str:
    # Unquoted identifiers are case-insensitive on both databases, and a marker
    # should not fail over `Documents` versus `documents`.
    return name.casefold()


def _qualified(schema: str | None, *names: str) -> str:
    return ".".join([schema, *names] if schema else names)


@dataclass(slots=True)
class _Step:
    """What the guard knows about the revision now running."""

    revision: str
    declared: frozenset[str] | None
    created_tables: set[str] = field(default_factory=set)
    added_columns: set[str] = field(default_factory=set)
    consented: list[tuple[DestructiveChange, str]] = field(default_factory=list)


class DestructiveGuard:
    """Watches the operations of a migration run and refuses undeclared destruction.

    Args:
        tree: the tree being migrated, for messages.
        direction: ``upgrade`` or ``downgrade``.
        allow: consent for the whole run (``--allow-destructive``).
    """

    def __init__(
        self, *, tree: str, direction: Literal["upgrade", "downgrade"], allow: bool
    ) -> None:
        self.tree = tree
        self.direction = direction
        self.allow = allow
        self._step: _Step | None = None

    @contextmanager
    def watching(self, connection: Connection) -> Iterator[None]:
        """Check every operation run on ``connection`` while the block runs.

        Raises:
            DestructiveChangeRefused: from inside the block, when an operation
                would destroy something without consent; it has not run.
        """
        _watch(connection, self)
        try:
            yield
        finally:
            _unwatch(connection)
        # Reached only when the run succeeded: its last revision has committed.
        self._finish_step()

    def begin_step(self, step: RevisionStep) -> None:
        """Note that ``step``'s revision starts; its own declaration now applies.

        Alembic asks for a step only once the previous one has committed, so
        the previous revision's consented changes are logged here.

        Raises:
            MigrationError: the revision's ``destroys`` is not a list of names.
        """
        self._finish_step()
        script = step.revision
        declared = _declared(self.tree, script.revision, script.module)
        self._step = _Step(
            revision=script.revision,
            declared=declared if self.direction == "upgrade" else None,
        )

    def check(self, operations: AbstractOperations, operation: ops.MigrateOperation) -> None:
        """Refuse ``operation`` if it destroys something the run has no consent for.

        Raises:
            DestructiveChangeRefused: the operation would destroy something
                undeclared; it has not run.
        """
        step = self._step
        if step is None:
            # An env.py may run operations before Alembic starts the first
            # revision; no revision means no declaration to judge them by.
            return
        for change in self._classify(step, operations, operation):
            consent = self._consent(step, change)
            if consent is None:
                raise self._refusal(step, change)
            step.consented.append((change, consent))

    def _consent(self, step: _Step, change: DestructiveChange) -> str | None:
        if step.declared is not None and _key(change.target) in step.declared:
            return MARKER
        return "allow_destructive" if self.allow else None

    def _refusal(self, step: _Step, change: DestructiveChange) -> DestructiveChangeRefused:
        if self.direction == "downgrade":
            outcome = "nothing of the revision was reverted"
            how = (
                "run it with --allow-destructive (or migrations.allow_destructive=true); "
                "a revision's declaration covers its upgrade only"
            )
        elif step.declared:
            outcome = "nothing of the revision was applied"
            how = (
                f'add "{change.target}" to the revision\'s {MARKER} (it declares '
                f"{', '.join(sorted(step.declared))}), or run with --allow-destructive"
            )
        else:
            outcome = "nothing of the revision was applied"
            how = (
                f'declare it in the revision: {MARKER} = ["{change.target}"], '
                "or run with --allow-destructive"
            )
        message = (
            f"refused: {self.direction} of tree {self.tree!r} revision {step.revision!r} "
            f"would {change}; {outcome}; to consent, {how}"
        )
        return DestructiveChangeRefused(
            message, tree=self.tree, revision=step.revision, changes=(change,)
        )

    def _finish_step(self) -> None:
        step, self._step = self._step, None
        if step is None or not step.consented:
            return
        logger.warning(
            "destructive change applied",
            tree=self.tree,
            revision=step.revision,
            direction=self.direction,
            changes=[str(change) for change, _ in step.consented],
            consent=sorted({consent for _, consent in step.consented}),
        )

    def _classify(
        self, step: _Step, operations: AbstractOperations, operation: ops.MigrateOperation
    ) -> list[DestructiveChange]:
        context = operations.migration_context
        current_type = functools.partial(_current_type, context.connection)
        changes = _changes(operation, context.dialect, current_type)
        _remember_creations(step, operation, context.dialect)
        return [change for change in changes if not _made_here(step, change)]


def _made_here(step: _Step, change: DestructiveChange) -> bool:
    """Whether the revision itself created what the change destroys (nothing was there)."""
    target = _key(change.target)
    if change.kind in _TABLE_KINDS:
        return target in step.created_tables
    table = target.rsplit(".", 1)[0]
    return target in step.added_columns or table in step.created_tables


def _remember_creations(step: _Step, operation: ops.MigrateOperation, dialect: Dialect) -> None:
    if isinstance(operation, ops.CreateTableOp) and not operation.if_not_exists:
        step.created_tables.add(_key(_qualified(operation.schema, operation.table_name)))
    elif isinstance(operation, ops.AddColumnOp) and not operation.if_not_exists:
        step.added_columns.add(
            _key(_qualified(operation.schema, operation.table_name, operation.column.name))
        )
    elif isinstance(operation, ops.AlterColumnOp) and operation.modify_name is not None:
        old = _key(_qualified(operation.schema, operation.table_name, operation.column_name))
        if old in step.added_columns:
            step.added_columns.add(
                _key(_qualified(operation.schema, operation.table_name, operation.modify_name))
            )
    elif isinstance(operation, ops.RenameTableOp):
        old = _key(_qualified(operation.schema, operation.table_name))
        if old in step.created_tables:
            step.created_tables.add(_key(_qualified(operation.schema, operation.new_table_name)))
    elif isinstance(operation, ops.ExecuteSQLOp):
        sql = _sql_text(operation.sqltext, dialect)
        if sql is not None:
            step.created_tables.update(_key(name) for name in _created_by_sql(sql))


def _declared(tree: str, revision: str, module: object) -> frozenset[str]:
    value = getattr(module, MARKER, ())
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise MigrationError(
            f"revision {revision!r} of tree {tree!r}: {MARKER} must be a list of "
            f'"table" or "table.column" names, e.g. {MARKER} = ["widgets.legacy_title"]',
            tree=tree,
            revision=revision,
        )
    if not all(isinstance(name, str) for name in value):
        raise MigrationError(
            f"revision {revision!r} of tree {tree!r}: every name in {MARKER} must be a string",
            tree=tree,
            revision=revision,
        )
    return frozenset(_key(name) for name in value)


CurrentType = Callable[[str | None, str, str], types.TypeEngine[Any] | None]


def _changes(
    operation: ops.MigrateOperation, dialect: Dialect, current_type: CurrentType
) -> list[DestructiveChange]:
    if isinstance(operation, ops.DropTableOp):
        return [DestructiveChange("drop_table", _qualified(operation.schema, operation.table_name))]
    if isinstance(operation, ops.DropColumnOp):
        target = _qualified(operation.schema, operation.table_name, operation.column_name)
        return [DestructiveChange("drop_column", target)]
    if isinstance(operation, ops.RenameTableOp):
        target = _qualified(operation.schema, operation.table_name)
        return [DestructiveChange("rename_table", target, f"-> {operation.new_table_name}")]
    if isinstance(operation, ops.AlterColumnOp):
        return _alter_changes(operation, dialect, current_type)
    if isinstance(operation, ops.ExecuteSQLOp):
        sql = _sql_text(operation.sqltext, dialect)
        return [] if sql is None else sql_changes(sql)
    return []


def _alter_changes(
    operation: ops.AlterColumnOp, dialect: Dialect, current_type: CurrentType
) -> list[DestructiveChange]:
    target = _qualified(operation.schema, operation.table_name, operation.column_name)
    changes: list[DestructiveChange] = []
    if operation.modify_name is not None and operation.modify_name != operation.column_name:
        changes.append(DestructiveChange("rename_column", target, f"-> {operation.modify_name}"))
    if operation.modify_type is not None:
        new = types.to_instance(operation.modify_type)
        if operation.existing_type is not None:
            old: types.TypeEngine[Any] | None = types.to_instance(operation.existing_type)
        else:
            old = current_type(operation.schema, operation.table_name, operation.column_name)
        if old is None:
            detail = f"? -> {_render(new, dialect)} (its current type cannot be read)"
            changes.append(DestructiveChange("narrow_type", target, detail))
        elif narrows(old, new):
            detail = f"{_render(old, dialect)} -> {_render(new, dialect)}"
            changes.append(DestructiveChange("narrow_type", target, detail))
    return changes


def _current_type(
    connection: Connection | None, schema: str | None, table: str, column: str
) -> types.TypeEngine[Any] | None:
    if connection is None:
        return None
    try:
        columns = inspect(connection).get_columns(table, schema=schema)
    except NoSuchTableError:
        return None
    for reflected in columns:
        if reflected["name"] == column:
            return reflected["type"]
    return None


def _render(type_: types.TypeEngine[Any], dialect: Dialect) -> str:
    try:
        return str(type_.compile(dialect=dialect))
    except CompileError:
        return repr(type_)


# --- Narrowing -------------------------------------------------------------------------

_DOUBLE_BITS: Final = 53
_REAL_BITS: Final = 24


def narrows(old: types.TypeEngine[Any], new: types.TypeEngine[Any]) -> bool:  # noqa: PLR0911 -- one return per type family reads as a table
    """Whether changing a column from ``old`` to ``new`` can lose or reject stored values.

    Only provable widenings return ``False``: a longer or unbounded string or
    binary, a larger integer, more integer digits and no fewer decimals, a
    float of no fewer bits, keeping or adding a timezone, an enum gaining
    values, or no change at all. Any change of type family is narrowing.

    Args:
        old: the column's current type (dialect-specific types are compared as
            their generic SQLAlchemy type).
        new: the type it is changed to.

    Returns:
        ``True`` when the change narrows or cannot be shown to widen.
    """
    old_bits, new_bits = _float_bits(old), _float_bits(new)
    old, new = _generic(old), _generic(new)
    if isinstance(new, types.Enum):
        return not (isinstance(old, types.Enum) and set(old.enums) <= set(new.enums))
    if isinstance(old, types.Enum):
        widest = max((len(value) for value in old.enums), default=0)
        return not isinstance(new, types.String) or _shorter(new.length, widest)
    if isinstance(old, types.String) and isinstance(new, types.String):
        return _shorter(new.length, old.length)
    if isinstance(old, types.LargeBinary) and isinstance(new, types.LargeBinary):
        return _shorter(new.length, old.length)
    if old_bits is not None and new_bits is not None:
        return new_bits < old_bits
    if isinstance(old, types.Numeric) and isinstance(new, types.Numeric):
        return _numeric_narrows(old, new)
    if isinstance(old, types.Integer) and isinstance(new, types.Integer):
        return _integer_rank(new) < _integer_rank(old)
    if isinstance(old, types.DateTime) and isinstance(new, types.DateTime):
        return bool(old.timezone) and not new.timezone
    # A change of family, or a family with nothing to compare: only an unchanged
    # type is provably safe.
    return type(old) is not type(new) or repr(old) != repr(new)


def _generic(type_: types.TypeEngine[Any]) -> types.TypeEngine[Any]:
    if isinstance(type_, types.TypeDecorator):
        type_ = type_.impl_instance
    try:
        return type_.as_generic()
    except NotImplementedError:
        # SQLAlchemy's own signal for a dialect type with no generic counterpart
        # (PostgreSQL's INET, say): compare it as it is.
        return type_


def _shorter(new: int | None, old: int | None) -> bool:
    """Whether a length limit ``new`` admits less than ``old`` (``None`` is unbounded)."""
    return new is not None and (old is None or new < old)


def _float_bits(type_: types.TypeEngine[Any]) -> int | None:
    """Binary precision of a floating type, ``None`` when it is not one."""
    if isinstance(type_, types.TypeDecorator):
        type_ = type_.impl_instance
    if not isinstance(type_, types.Float):
        return None
    if isinstance(type_, types.Double):
        return _DOUBLE_BITS
    if isinstance(type_, types.REAL):
        return _REAL_BITS
    # A bare FLOAT is double precision on PostgreSQL and SQLite.
    return type_.precision or _DOUBLE_BITS


def _numeric_narrows(old: types.Numeric[Any], new: types.Numeric[Any]) -> bool:
    if new.precision is None:
        return False
    if old.precision is None:
        return True
    old_scale, new_scale = old.scale or 0, new.scale or 0
    # NUMERIC(10,2) -> NUMERIC(10,4) keeps the precision but loses two integer digits.
    return new_scale < old_scale or new.precision - new_scale < old.precision - old_scale


def _integer_rank(type_: types.Integer) -> int:
    if isinstance(type_, types.BigInteger):
        return 3
    return 1 if isinstance(type_, types.SmallInteger) else 2


# --- Raw SQL ---------------------------------------------------------------------------

# Comments and string literals are blanked first so that `-- drop table x` or an
# INSERT of the text 'drop table x' is not a drop. Dollar-quoted bodies are kept:
# a DO block that drops a table drops it.
_NOISE: Final = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.DOTALL)
_IDENT: Final = r'(?:"(?:[^"]|"")+"|`[^`]+`|\[[^\]]+\]|[A-Za-z_][\w$]*)'
_NAME: Final = rf"{_IDENT}(?:\s*\.\s*{_IDENT})*"
_NAMES: Final = rf"{_NAME}(?:\s*\*)?(?:\s*,\s*(?:ONLY\s+)?{_NAME}(?:\s*\*)?)*"
_FLAGS: Final = re.IGNORECASE | re.DOTALL

_DROP_TABLE: Final = re.compile(rf"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?({_NAMES})", _FLAGS)
# Not when TRUNCATE is a privilege or a trigger event: "REVOKE DELETE, TRUNCATE ON t",
# "BEFORE UPDATE OR TRUNCATE ON t", "BEFORE TRUNCATE OR DELETE ON t".
_TRUNCATE: Final = re.compile(
    rf"\bTRUNCATE\s+(?!(?:ON|OR)\b)(?:TABLE\s+)?(?:ONLY\s+)?({_NAMES})(?!\s*\()", _FLAGS
)
_CREATE_TABLE: Final = re.compile(
    rf"\bCREATE\s+(?:(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+(?!IF\b)({_NAME})", _FLAGS
)
_ALTER_TABLE: Final = re.compile(
    rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({_NAME})\s+(.*)", _FLAGS
)
_RENAME_TABLE: Final = re.compile(rf"RENAME\s+TO\s+({_NAME})", _FLAGS)
_RENAME_COLUMN: Final = re.compile(
    rf"RENAME\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)({_IDENT})\s+TO\s+({_IDENT})", _FLAGS
)
_DROP_COLUMN: Final = re.compile(
    rf"DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?"
    rf"(?!(?:CONSTRAINT|PRIMARY|FOREIGN|INDEX|KEY|CHECK|UNIQUE)\b)({_IDENT})",
    _FLAGS,
)
_ALTER_TYPE: Final = re.compile(
    rf"ALTER\s+(?:COLUMN\s+)?({_IDENT})\s+(?:SET\s+DATA\s+)?TYPE\b\s*(.*)", _FLAGS
)


def sql_changes(sql: str) -> list[DestructiveChange]:
    """Return the destructive changes a raw SQL script makes, in order.

    Recognises ``DROP TABLE``, ``TRUNCATE`` and the ``ALTER TABLE`` actions
    ``DROP [COLUMN]``, ``RENAME TO``, ``RENAME [COLUMN] a TO b`` and
    ``ALTER [COLUMN] c [SET DATA] TYPE t``; from text alone a type change cannot
    be shown to widen, so every one is reported (kind ``alter_type``).

    Args:
        sql: one or more statements; comments and string literals are ignored.

    Returns:
        The changes, each naming its target as ``table`` or ``table.column``.
    """
    changes: list[DestructiveChange] = []
    for statement in _NOISE.sub(" ", sql).split(";"):
        for match in _DROP_TABLE.finditer(statement):
            changes += [DestructiveChange("drop_table", n) for n in _split_names(match[1])]
        for match in _TRUNCATE.finditer(statement):
            changes += [DestructiveChange("truncate", n) for n in _split_names(match[1])]
        for match in _ALTER_TABLE.finditer(statement):
            changes += _alter_table_changes(_name(match[1]), match[2])
    return changes


def _alter_table_changes(table: str, actions: str) -> list[DestructiveChange]:
    changes: list[DestructiveChange] = []
    for action in _top_level_split(actions):
        if match := _RENAME_TABLE.match(action):
            changes.append(DestructiveChange("rename_table", table, f"-> {_name(match[1])}"))
        elif match := _RENAME_COLUMN.match(action):
            target = f"{table}.{_name(match[1])}"
            changes.append(DestructiveChange("rename_column", target, f"-> {_name(match[2])}"))
        elif match := _DROP_COLUMN.match(action):
            changes.append(DestructiveChange("drop_column", f"{table}.{_name(match[1])}"))
        elif match := _ALTER_TYPE.match(action):
            detail = f"to {' '.join(match[2].split())} (by SQL: direction unknown)"
            changes.append(DestructiveChange("alter_type", f"{table}.{_name(match[1])}", detail))
    return changes


def _created_by_sql(sql: str) -> list[str]:
    cleaned = _NOISE.sub(" ", sql)
    return [_name(match[1]) for match in _CREATE_TABLE.finditer(cleaned)]


def _top_level_split(actions: str) -> list[str]:
    """Split ``ALTER TABLE`` actions on the commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in actions:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return parts


def _split_names(names: str) -> list[str]:
    found = re.findall(rf"(?:ONLY\s+)?({_NAME})", names, _FLAGS)
    return [_name(name) for name in found]


def _name(raw: str) -> str:
    parts = re.findall(_IDENT, raw)
    return ".".join(_unquote(part) for part in parts)


def _unquote(identifier: str) -> str:
    if identifier[0] == '"':
        return identifier[1:-1].replace('""', '"')
    if identifier[0] in "`[":
        return identifier[1:-1]
    return identifier


def _sql_text(sqltext: object, dialect: Dialect) -> str | None:
    if isinstance(sqltext, str):
        return sqltext
    if isinstance(sqltext, TextClause):
        return sqltext.text
    if isinstance(sqltext, ClauseElement):
        try:
            return str(sqltext.compile(dialect=dialect))
        except CompileError:
            # Alembic cannot run what does not compile either; it fails there.
            return None
    return None


# --- Interception ----------------------------------------------------------------------

# Guards by the connection they watch. Runs within one process are serialised by
# the migrator's environment lock (Alembic's `op` proxy is process-global), but
# keying by connection keeps a run in another thread from being judged by the
# wrong guard.
_guards: dict[Connection, DestructiveGuard] = {}
_guards_lock = threading.Lock()
_original_invoke: Final = AbstractOperations.invoke


def _checked_invoke(self: AbstractOperations, operation: ops.MigrateOperation) -> Any:
    connection = self.migration_context.connection
    # Only operations on a watched connection are judged: run_alembic_env always
    # migrates on the migrator's connection (an env.py that opens its own would
    # escape the migration lock and transaction too, and is not supported).
    guard = _guards.get(connection) if connection is not None else None
    if guard is not None:
        guard.check(self, operation)
    return _original_invoke(self, operation)


def _watch(connection: Connection, guard: DestructiveGuard) -> None:
    with _guards_lock:
        if connection in _guards:
            raise RuntimeError("a connection is already watched by a destructive-change guard")
        _guards[connection] = guard
        # Alembic has no hook before an operation runs; every op.* and batch_op.*
        # call goes through invoke, so it is wrapped while any guard watches.
        AbstractOperations.invoke = _checked_invoke  # type: ignore[method-assign]  # restored by _unwatch


def _unwatch(connection: Connection) -> None:
    with _guards_lock:
        _guards.pop(connection, None)
        if not _guards:
            AbstractOperations.invoke = _original_invoke  # type: ignore[method-assign]  # see _watch
