"""``bastion flags``: list, read, write, toggle, import, export and evaluate feature flags.

Every verb loads the app (``--app``) for its settings and works on its database
through the flag store, as ``/admin/features`` does: every write is versioned
and audited (the actor is the system job ``cli``; ``--operator NAME``, by default
the OS user, is recorded beside it as the operator's claimed name: the audit
event's ``details.operator``, and ``system:cli (claimed: NAME)`` as the change's
who), and announced to the running
instances over Redis when one is configured (the store's change hook publishes
it); without Redis they see it at their next poll (``flags.poll_interval``).

Exit status: 0 done, 1 refused (no such flag, a version that moved, an invalid
flag or file), 2 the app, its configuration or its database cannot be used.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError

from bastion.cli import app
from bastion.cli._app import fail, load_runtime
from bastion.cli._identity import CLI_ACTOR, run_database_command
from bastion.errors import ConfigurationError, InvalidInput, NotFound
from bastion.flags._build import flags_environment
from bastion.flags._dependencies import context_from_mapping
from bastion.flags._document import (
    dump_document,
    import_fields,
    load_text,
    parse_document,
    validation_errors,
)
from bastion.flags._model import Flag
from bastion.flags._store import check_operator
from bastion.observability import configure_logging
from bastion.settings import load_settings

if TYPE_CHECKING:
    from bastion._stack import Bastion
    from bastion.flags._build import FlagsRuntime
    from bastion.flags._store import FlagStore, ImportReport, StoredFlag

__all__ = [
    "evaluate",
    "export",
    "flags_app",
    "get",
    "import_file",
    "list_flags",
    "operator_name",
    "read_document",
    "set_flag",
    "toggle",
]

T = TypeVar("T")


flags_app = typer.Typer(
    name="flags",
    help="List, change, import, export and evaluate feature flags.",
    no_args_is_help=True,
)
app.add_typer(flags_app)

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:ATTR",
        help="The app (or app factory) whose flags to use; default: server.app.",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
OperatorOption = Annotated[
    str | None,
    typer.Option(
        "--operator",
        metavar="NAME",
        help="Your name, recorded with the change as claimed (not checked); default: the OS user.",
        show_default=False,
    ),
]
IfVersion = Annotated[
    int | None,
    typer.Option(
        "--if-version",
        metavar="N",
        help="Change the flag only if it is still at version N (else exit 1).",
    ),
]


def operator_name(given: str | None) -> str | None:
    """The operator's name a write records: ``given``, else the OS user's, else none.

    Raises:
        typer.Exit: 2 when ``given`` is not a name (empty, several lines, over 128
            characters or unprintable).
    """
    if given is not None:
        try:
            return check_operator(given, field="--operator")
        except InvalidInput:
            raise fail("--operator is 1 to 128 printable characters on one line") from None
    try:
        return check_operator(getpass.getuser())
    except (OSError, KeyError, InvalidInput):
        # No user name to be had (a container's uid without a passwd entry), or one
        # that is not a name: the change is recorded without one, not refused.
        return None


def read_document(path: Path | str) -> Any:
    """Parse a JSON or YAML file (``-``: standard input).

    Raises:
        ValueError: it is neither (the message says why).
        OSError: it cannot be read.
    """
    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text("utf-8")
    return load_text(text, str(path))


def _run_with_store(spec: str | None, action: Callable[[Bastion, FlagStore], Awaitable[T]]) -> T:
    """Load the app, run ``action`` with its flag store, then announce, drain and close.

    Raises:
        typer.Exit: 2 when the app cannot be loaded, has no flag store, or the
            database is unusable; 1 when ``action`` is refused.
    """
    try:
        runtime = load_runtime(spec or load_settings().server.app)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    if runtime.settings.logging.enabled:
        configure_logging(runtime.settings.logging, stream=sys.stderr.buffer)
    flags = runtime.flags
    store = None if flags is None else flags.store
    if store is None:
        raise fail("feature flags are off for this app (flags.enabled or database.enabled)")

    async def call() -> T:
        try:
            return await action(runtime, store)
        finally:
            await _close(runtime)

    async def quietly() -> T:
        # What the runtime logs while it works is not the command's result.
        with contextlib.redirect_stdout(sys.stderr):
            return await call()

    return run_database_command(quietly)


async def _close(runtime: Bastion) -> None:
    notifier = runtime.flags.sync.notifier if runtime.flags is not None else None
    if notifier is not None and notifier.redis is not runtime.redis:
        # A client of flags.store_url's own; the shared one is closed below.
        with contextlib.suppress(Exception):
            await notifier.redis.aclose()
    if runtime.audit is not None:
        # The trail's writer batches: its last entries are committed before the exit.
        await runtime.audit.log.stop()
    if runtime.database is not None:
        await runtime.database.aclose()
    if runtime.redis is not None:
        with contextlib.suppress(Exception):
            await runtime.redis.aclose()


def _flags_runtime(runtime: Bastion) -> FlagsRuntime:
    flags = runtime.flags
    assert flags is not None  # noqa: S101 -- _run_with_store runs only with one
    return flags


def _row(stored: StoredFlag) -> dict[str, Any]:
    return {
        "flag": stored.flag.model_dump(mode="json"),
        "version": stored.version,
        "etag": stored.etag,
        "created_at": stored.created_at.isoformat(),
        "updated_at": stored.updated_at.isoformat(),
        "updated_by": stored.updated_by,
    }


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


@flags_app.command("list")
def list_flags(*, spec: AppOption = None, as_json: JsonOutput = False) -> None:
    """List every flag: key, type, switch, rules, visibility, version and last change."""

    async def run(_runtime: Bastion, store: FlagStore) -> list[StoredFlag]:
        return await store.list()

    stored = _run_with_store(spec, run)
    if as_json:
        _print_json([_row(item) for item in stored])
        return
    from rich.console import Console  # noqa: PLC0415 -- only for people
    from rich.table import Table  # noqa: PLC0415 -- only for people

    table = Table(show_edge=False, pad_edge=False)
    for column in ("key", "type", "on", "rules", "client", "version", "updated", "by"):
        table.add_column(column)
    for item in stored:
        flag = item.flag
        table.add_row(
            flag.key,
            str(flag.type),
            "on" if flag.enabled else "off",
            str(len(flag.rules)),
            "yes" if flag.client_visible else "",
            str(item.version),
            item.updated_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            item.updated_by or "",
        )
    Console(soft_wrap=True).print(table)
    if not stored:
        typer.echo("bastion: no flags", err=True)


@flags_app.command()
def get(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    *,
    spec: AppOption = None,
) -> None:
    """Print one flag, its version and ETag, as JSON."""

    async def run(_runtime: Bastion, store: FlagStore) -> StoredFlag:
        return await store.get(key)

    _print_json(_row(_run_with_store(spec, run)))


@flags_app.command("set")
def set_flag(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    *,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            metavar="FILE",
            help="The flag as JSON or YAML (bastion's format); - is stdin.",
        ),
    ] = None,
    document: Annotated[
        str | None, typer.Option("--data", metavar="JSON", help="The flag as a JSON object.")
    ] = None,
    if_version: IfVersion = None,
    operator: OperatorOption = None,
    spec: AppOption = None,
    as_json: JsonOutput = False,
) -> None:
    """Create the flag, or replace it whole.

    Without --if-version an existing flag is replaced whatever its version
    (said on stderr); with it, only if it is still at that version.
    """
    flag = _flag_from(key, file, document)
    claimed = operator_name(operator)

    async def run(_runtime: Bastion, store: FlagStore) -> tuple[StoredFlag, bool]:
        try:
            current = await store.get(key)
        except NotFound:
            if if_version is not None:
                raise
            return await store.create(flag, actor=CLI_ACTOR, operator=claimed), True
        if if_version is None:
            typer.echo(
                f"bastion: replacing {key!r} at version {current.version} without a version "
                "check (--if-version N makes it conditional)",
                err=True,
            )
        stored = await store.update(
            flag, expected_version=if_version, actor=CLI_ACTOR, operator=claimed
        )
        return stored, False

    stored, created = _run_with_store(spec, run)
    if as_json:
        _print_json(_row(stored))
        return
    typer.echo(f"{'created' if created else 'updated'} {key} (version {stored.version})")


def _flag_from(key: str, file: Path | None, document: str | None) -> Flag:
    if (file is None) == (document is None):
        raise fail("give the flag with --file FILE or --data '{...}' (one of them)")
    try:
        raw = read_document(file) if file is not None else orjson.loads(document or "")
    except orjson.JSONDecodeError:
        raise fail("--data is not valid JSON", 1) from None
    except (OSError, ValueError) as exc:
        raise fail(str(exc), 1) from None
    if not isinstance(raw, dict):
        raise fail("the flag must be an object (bastion's format)", 1)
    if raw.setdefault("key", key) != key:
        raise fail(f"the flag's key {raw['key']!r} is not {key!r}", 1)
    try:
        return Flag.model_validate(raw)
    except ValidationError as exc:
        shown = "; ".join(f"{e.field}: {e.message}" for e in validation_errors(exc, "flag"))
        raise fail(f"invalid flag: {shown}", 1) from None


@flags_app.command()
def toggle(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    state: Annotated[str, typer.Argument(metavar="on|off", help="Switch it on or off.")],
    *,
    if_version: IfVersion = None,
    operator: OperatorOption = None,
    spec: AppOption = None,
    as_json: JsonOutput = False,
) -> None:
    """Switch a flag on or off for everyone (its kill switch)."""
    if state not in ("on", "off"):
        raise fail(f"the state is on or off, not {state!r}")
    claimed = operator_name(operator)

    async def run(_runtime: Bastion, store: FlagStore) -> StoredFlag:
        return await store.toggle(
            key, state == "on", expected_version=if_version, actor=CLI_ACTOR, operator=claimed
        )

    stored = _run_with_store(spec, run)
    if as_json:
        _print_json(_row(stored))
        return
    typer.echo(f"{key} is {state} (version {stored.version})")


@flags_app.command("import")
def import_file(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="JSON or YAML, Unleash's or bastion's; - stdin.")
    ],
    *,
    replace: Annotated[
        bool, typer.Option("--replace", help="Delete the flags and segments the file lacks.")
    ] = False,
    if_revision: Annotated[
        int | None,
        typer.Option(
            "--if-revision",
            metavar="N",
            min=0,
            help="Import only if the flags are still at revision N, as exported (else exit 1).",
        ),
    ] = None,
    operator: OperatorOption = None,
    spec: AppOption = None,
    as_json: JsonOutput = False,
) -> None:
    """Import flags and segments in one transaction (an Unleash export or bastion's format).

    Merging an Unleash state changes only what Unleash describes: the type,
    default, tags and other fields of bastion's own stay as stored.
    """
    try:
        document = read_document(file)
    except (OSError, ValueError) as exc:
        raise fail(str(exc), 1) from None
    fields = import_fields(document)
    claimed = operator_name(operator)

    async def run(runtime: Bastion, store: FlagStore) -> tuple[ImportReport, int, int]:
        # The app's environment (its settings, code included) picks an export's part;
        # an unreadable document is refused (exit 1) by run_database_command.
        flags, segments = parse_document(
            document, field=str(file), environment=flags_environment(runtime.settings)
        )
        report = await store.import_flags(
            flags,
            segments,
            actor=CLI_ACTOR,
            replace=replace,
            fields=fields,
            expected_revision=if_revision,
            operator=claimed,
        )
        return report, len(flags), len(segments)

    report, flag_count, segment_count = _run_with_store(spec, run)
    summary = _report_json(report)
    if as_json:
        _print_json(summary)
        return
    typer.echo(
        f"imported {flag_count} flag(s) and {segment_count} segment(s) from {file}: "
        + ", ".join(f"{name} {value}" for name, value in summary.items())
    )


def _report_json(report: ImportReport) -> dict[str, Any]:
    return {**report.counts(), "revision": report.revision}


@flags_app.command()
def export(
    *,
    output_format: Annotated[
        str, typer.Option("--format", help="bastion (default) or unleash.")
    ] = "bastion",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write here, not stdout.")
    ] = None,
    spec: AppOption = None,
) -> None:
    """Write every flag and segment as JSON: bastion's document, or Unleash's client state.

    The revision exported is said on stderr: import --if-revision N refuses to
    import over changes made since.
    """
    if output_format not in ("bastion", "unleash"):
        raise fail(f"--format is bastion or unleash, not {output_format!r}")

    async def run(_runtime: Bastion, store: FlagStore) -> tuple[int, Any]:
        revision, flags, segments = await store.snapshot()
        return revision, dump_document(flags, segments, output_format)

    revision, document = _run_with_store(spec, run)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        typer.echo(f"bastion: revision {revision}", err=True)
        return
    try:
        output.write_text(text, "utf-8")
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror}", 1) from None
    typer.echo(f"wrote {output} (revision {revision})", err=True)


@flags_app.command()
def evaluate(
    key: Annotated[str, typer.Argument(help="The flag's key.")],
    *,
    context: Annotated[
        str,
        typer.Option(
            "--context",
            metavar="JSON",
            help='The context: {"userId": "u-1", "tenantId": "t-1", "roles": ["admin"], ...}.',
        ),
    ] = "{}",
    spec: AppOption = None,
    as_json: JsonOutput = False,
) -> None:
    """Evaluate a flag for a context, from the stored flags: value, variant, reason, rule, why."""
    try:
        raw = orjson.loads(context)
    except orjson.JSONDecodeError:
        raise fail("--context is not valid JSON", 1) from None
    if not isinstance(raw, dict):
        raise fail("--context must be a JSON object", 1)

    async def run(runtime: Bastion, store: FlagStore) -> dict[str, Any]:
        translated = context_from_mapping(raw, field="context")
        await store.get(key)  # 1 for a flag that does not exist
        revision, flags, segments = await store.snapshot()
        # Compiled as the app compiles it (environment, app name, regex bound).
        flag_set = _flags_runtime(runtime).compile(flags, segments, revision)
        return flag_set.explain(key, translated)

    explanation = _run_with_store(spec, run)
    if as_json:
        _print_json(explanation)
        return
    evaluation = explanation.get("evaluation", {})
    for name in ("value", "variant", "reason", "rule", "error_code", "error_message"):
        if name in evaluation and (evaluation[name] is not None or name in ("value", "reason")):
            typer.echo(f"{name}: {json.dumps(evaluation[name], default=str)}")
    rest = {name: value for name, value in explanation.items() if name != "evaluation"}
    if rest:
        typer.echo("explanation:")
        typer.echo(json.dumps(rest, indent=2, ensure_ascii=False, default=str))
