"""``bastion audit``: verify the trail, check proofs offline, checkpoint, export, erase, prune.

Every verb but ``keygen`` and ``verify-proof`` loads the app (``--app``) for its
settings and audit runtime. Exit status: 0 done (or verified), 1 problems found
or the request refused, 2 the app, its configuration, a file or a key cannot be
used, or the database cannot be reached or is not migrated.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar

import orjson
import typer

from bastion.audit._bundle import verify_bundle
from bastion.audit._event import AuditEvent, Resource
from bastion.audit._note import NoteError, NoteVerifier, generate_signing_key
from bastion.audit._proof import ProofError
from bastion.audit._query import AuditQuery, fetch_page, next_query
from bastion.audit._routes import EXPORT_COLUMNS, csv_cell, entry_items
from bastion.audit._subjects import subject_for_login, subject_for_user
from bastion.audit._verify import VerifyReport, verify
from bastion.cli import app
from bastion.cli._app import fail, load_runtime
from bastion.cli._identity import CLI_ACTOR, AppOption, JsonOption, run_database_command
from bastion.data import Database
from bastion.errors import ConfigurationError
from bastion.observability import configure_logging
from bastion.settings import DatabaseSettings, load_settings

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from bastion.audit._build import AuditRuntime
    from bastion.audit._checkpoint import Checkpoint
    from bastion.audit._retention import PruneReport

__all__ = [
    "audit_app",
    "checkpoint",
    "erase",
    "export",
    "keygen",
    "prune",
    "verify_proof",
    "verify_trail",
]

T = TypeVar("T")


audit_app = typer.Typer(
    name="audit",
    help="Verify, checkpoint, export and maintain the audit trail.",
    no_args_is_help=True,
)
app.add_typer(audit_app)

LogOption = Annotated[
    str | None,
    typer.Option("--log", metavar="LOG_ID", help="Only this log (global, system, tenant/<id>)."),
]


def _run_with_audit(spec: str | None, action: Callable[[AuditRuntime], Awaitable[T]]) -> T:
    """Load the app, run ``action`` with its audit runtime, then drain and close it.

    Raises:
        typer.Exit: 2 when the app cannot be loaded, has no audit trail, or the
            database is unusable; 1 when ``action`` is refused.
    """
    try:
        runtime = load_runtime(spec or load_settings().server.app)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    if runtime.settings.logging.enabled:
        configure_logging(runtime.settings.logging, stream=sys.stderr.buffer)
    audit = runtime.audit
    if audit is None:
        raise fail("the audit trail is off for this app (audit.enabled or database.enabled)")

    async def call() -> T:
        try:
            return await action(audit)
        finally:
            await audit.log.stop()
            await audit.database.aclose()

    async def quietly() -> T:
        # What the runtime logs while it works is not the command's result.
        with contextlib.redirect_stdout(sys.stderr):
            return await call()

    return run_database_command(quietly, refused=(OSError, ValueError))


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal's stderr; nothing otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress  # noqa: PLC0415 -- only on a terminal

    with Progress(transient=True) as bar:
        task = bar.add_task("verifying", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def _report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "logs": report.logs,
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "problems": [
            {
                "log_id": problem.log_id,
                "kind": problem.kind,
                "position": problem.position,
                "end": problem.end,
                "message": problem.message,
            }
            for problem in report.problems
        ],
    }


@audit_app.command("verify")
def verify_trail(
    *,
    log_id: LogOption = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints",
            metavar="DIR",
            help="Exported checkpoints to check too; default: audit.checkpoint_directory.",
        ),
    ] = None,
    archives: Annotated[
        Path | None,
        typer.Option(
            "--archives",
            metavar="DIR",
            help="Pruned segments' archive (audit.archive_directory): check each file's SHA-256.",
        ),
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-hash every entry, rebuild every log's tree and check it against the signed checkpoints.

    Only checkpoints signed for this deployment (``audit.origin``) count. Prints
    one line per problem (log, kind, positions, what is wrong) and exits 1 when
    there is any; 0 and a summary when the trail is intact.
    """

    async def run(audit: AuditRuntime) -> VerifyReport:
        directory = checkpoints or audit.settings.audit.checkpoint_directory
        with _progress_bar(not as_json) as progress:
            return await verify(
                audit.database,
                verifiers=audit.verifiers,
                origin_prefix=audit.settings.audit.origin,
                log_id=log_id,
                checkpoint_directory=directory,
                archive_directory=archives,
                progress=progress,
            )

    report = _run_with_audit(spec, run)
    if as_json:
        typer.echo(json.dumps(_report_json(report)))
    else:
        for problem in report.problems:
            span = problem.positions()
            where = (
                "-"
                if not span
                else f"{span.start}" + (f"..{span.stop - 1}" if len(span) > 1 else "")
            )
            typer.echo(f"{problem.log_id or '-'}\t{problem.kind}\t{where}\t{problem.message}")
        state = "intact" if report.ok else f"{len(report.problems)} problem(s)"
        typer.echo(
            f"{report.logs} log(s), {report.entries} entries, "
            f"{report.checkpoints} checkpoint(s): {state}",
            err=not report.ok,
        )
    if not report.ok:
        raise typer.Exit(1)


def _verifiers(keys: Sequence[str]) -> list[NoteVerifier]:
    found: list[NoteVerifier] = []
    for key in keys:
        text = key
        if key.startswith("@"):
            try:
                text = Path(key[1:]).read_text("utf-8").strip()
            except OSError as exc:
                raise fail(f"cannot read the key file {key[1:]}: {exc.strerror}") from None
        try:
            found.append(NoteVerifier.from_text(text))
        except NoteError as exc:
            raise fail(f"not a verifier key: {exc}") from None
    return found


@audit_app.command("verify-proof")
def verify_proof(
    bundle: Annotated[
        str, typer.Argument(metavar="BUNDLE.json", help="The proof bundle; - reads stdin.")
    ],
    key: Annotated[
        list[str],
        typer.Option(
            "--key",
            metavar="VKEY",
            help="A trusted verifier key (<name>+<hash>+<key>, or @FILE); repeatable.",
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Check a proof bundle offline: no app, no database, only the verifier key(s).

    The bundle (``GET /admin/audit/entries/{id}/proof``) holds the entry, its
    inclusion proof and the signed checkpoint; nothing else is needed. Exits 0
    when the entry is proven in the log, 1 when any check fails.
    """
    verifiers = _verifiers(key)
    try:
        text = sys.stdin.read() if bundle == "-" else Path(bundle).read_text("utf-8")
        parsed = json.loads(text)
    except OSError as exc:
        raise fail(f"cannot read {bundle}: {exc.strerror}") from None
    except ValueError:
        raise fail(f"{bundle} is not JSON") from None
    try:
        checkpoint = verify_bundle(parsed, verifiers)
    except (ProofError, NoteError) as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": str(exc)}))
        raise fail(f"the proof does not verify: {exc}", 1) from None
    entry = parsed["entry"]
    record = {
        "ok": True,
        "id": entry["id"],
        "log_id": parsed["log_id"],
        "leaf_index": parsed["leaf_index"],
        "tree_size": checkpoint.size,
        "origin": checkpoint.origin,
        "signed_at": checkpoint.timestamp.isoformat(),
        "key": checkpoint.key_name,
    }
    typer.echo(
        json.dumps(record)
        if as_json
        else f"entry {entry['id']} is at position {parsed['leaf_index']} of {checkpoint.origin}, "
        f"in the tree of {checkpoint.size} entries signed by {checkpoint.key_name} "
        f"at {checkpoint.timestamp.isoformat()}"
    )


@audit_app.command()
def checkpoint(
    *, log_id: LogOption = None, spec: AppOption = None, as_json: JsonOption = False
) -> None:
    """Sign a checkpoint now (of one log, or of every log that grew) and print its note."""

    async def run(audit: AuditRuntime) -> list[Checkpoint]:
        if log_id is None:
            return await audit.checkpointer.checkpoint_all()
        made = await audit.checkpointer.checkpoint(log_id)
        return [] if made is None else [made]

    made = _run_with_audit(spec, run)
    if as_json:
        typer.echo(
            json.dumps([{"origin": one.origin, "size": one.size, "note": one.note} for one in made])
        )
        return
    if not made:
        typer.echo("bastion: no log to checkpoint (none grew, or the log is empty)", err=True)
    for index, one in enumerate(made):
        typer.echo(("\n" if index else "") + one.note, nl=False)


def _parse_instant(name: str, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        instant = dt.datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{name} must be an ISO 8601 time, not {value!r}") from None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=dt.UTC)


async def _export_items(audit: AuditRuntime, query: AuditQuery) -> AsyncIterator[dict[str, Any]]:
    """Every entry ``query`` matches, newest first, personal fields decrypted (None if erased)."""
    current: AuditQuery | None = query
    while current is not None:
        async with audit.database.session() as session:
            page = await fetch_page(session, current)
        for item in await entry_items(audit.subject_keys, page.rows):
            yield item
        current = next_query(current, page)


@audit_app.command()
def export(
    *,
    since: Annotated[
        str | None, typer.Option(help="From this instant (ISO 8601; UTC if naive).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this instant (ISO 8601).")] = None,
    action: Annotated[
        str | None, typer.Option(help="An exact action, or a prefix ending in * (auth.*).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's entries (UUID).")] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="jsonl (default) or csv.")
    ] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    spec: AppOption = None,
) -> None:
    """Export the entries that match, newest first, personal fields decrypted; records audit.export.

    Entries whose subject was erased export with those fields empty and ``erased`` true.
    """
    if output_format not in {"jsonl", "csv"}:
        raise fail(f"--format must be jsonl or csv, not {output_format!r}")
    tenant_id = None
    if tenant is not None:
        try:
            tenant_id = uuid.UUID(tenant)
        except ValueError:
            raise fail(f"--tenant must be a UUID, not {tenant!r}") from None
    prefix = action[:-1] if action is not None and action.endswith("*") else None
    query = AuditQuery(
        action=None if prefix is not None else action,
        action_prefix=prefix,
        tenant_id=tenant_id,
        since=_parse_instant("--since", since),
        until=_parse_instant("--until", until),
        limit=1000,
    )

    async def run(audit: AuditRuntime) -> int:
        # Recorded first: an export the trail cannot record does not happen.
        await audit.log.record(
            AuditEvent(
                action="audit.export",
                actor=CLI_ACTOR,
                details={"format": output_format, "filters": query.filters()},
            )
        )
        await audit.log.flush()
        with _opened(output, stdout) as stream:
            return await _write_export(audit, query, output_format, stream)

    stdout = sys.stdout  # the runtime's own output goes to stderr while it runs
    count = _run_with_audit(spec, run)
    typer.echo(f"bastion: exported {count} entries", err=True)


@contextmanager
def _opened(path: Path | None, stdout: TextIO) -> Iterator[TextIO]:
    if path is None:
        yield stdout
        return
    with path.open("w", encoding="utf-8", newline="") as stream:
        yield stream


async def _write_export(
    audit: AuditRuntime, query: AuditQuery, output_format: str, stream: TextIO
) -> int:
    count = 0
    writer = csv.writer(stream, lineterminator="\r\n") if output_format == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_COLUMNS)
    async for item in _export_items(audit, query):
        if writer is None:
            stream.write(orjson.dumps(item).decode() + "\n")
        else:
            writer.writerow([csv_cell(item[column]) for column in EXPORT_COLUMNS])
        count += 1
    return count


@audit_app.command()
def keygen(
    name: Annotated[
        str | None,
        typer.Option("--name", help="The key's name; default: audit.origin."),
    ] = None,
) -> None:
    """Print a new checkpoint signing key (a secret) and its verifier key (public).

    The first line goes in ``BASTION_AUDIT__SIGNING_KEYS`` (first in the list to
    sign with it); the second to whoever verifies checkpoints and proof bundles.
    """
    try:
        private, public = generate_signing_key(name or load_settings().audit.origin)
    except NoteError as exc:
        raise fail(str(exc)) from None
    typer.echo(private)
    typer.echo(public)
    typer.echo(
        "bastion: the first line is a private key: store it as a secret "
        "(BASTION_AUDIT__SIGNING_KEYS), never in the repository; publish the second",
        err=True,
    )


@audit_app.command()
def erase(
    *,
    user: Annotated[str, typer.Option("--user", help="The user's id.")],
    email: Annotated[
        str | None, typer.Option("--email", help="Their login identifier (e-mail), if any.")
    ] = None,
    spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Destroy a data subject's keys: their entries stay, their personal fields become unreadable.

    Erases ``user:<id>`` and, with ``--email``, the key of the entries about that
    login identifier (failed logins, lockouts, unlocks: ``login:<pseudonym>``, the
    same keyed pseudonym they were recorded under); records ``audit.subject.erase``.
    Instances that cached the key use it for at most ``audit.subject_key_cache_ttl``
    more seconds.
    """

    async def run(audit: AuditRuntime) -> dict[str, bool]:
        subjects = [subject_for_user(user)]
        if email is not None:
            subjects.append(subject_for_login(audit.pseudonyms.of_identifier(email)))
        erased = {subject: await audit.subject_keys.erase(subject) for subject in subjects}
        await audit.log.record(
            AuditEvent(
                action="audit.subject.erase",
                actor=CLI_ACTOR,
                resource=Resource("user", user),
                details={"keys_erased": sum(erased.values())},
            )
        )
        await audit.log.flush()
        return erased

    erased = _run_with_audit(spec, run)
    count = sum(erased.values())
    if as_json:
        typer.echo(json.dumps({"user": user, "keys_erased": count}))
    else:
        typer.echo(f"erased {count} key(s) of user {user}")


@audit_app.command()
def prune(*, log_id: LogOption = None, spec: AppOption = None, as_json: JsonOption = False) -> None:
    """Archive the entries past retention as sealed segments, then delete them (maintenance role).

    Needs ``audit.archive_directory``, and ``audit.maintenance_url`` on PostgreSQL
    (a member of ``bastion_audit_maintenance``).
    """
    from bastion.audit._retention import prune as prune_entries  # noqa: PLC0415 -- keeps start-up light

    async def run(audit: AuditRuntime) -> PruneReport:
        section = audit.settings.audit
        if section.archive_directory is None:
            raise ConfigurationError("audit.archive_directory is required to prune")
        maintenance = (
            audit.database
            if section.maintenance_url is None
            else Database(DatabaseSettings(url=section.maintenance_url))
        )
        try:
            return await prune_entries(
                database=audit.database,
                maintenance_database=maintenance,
                audit=audit.log,
                checkpointer=audit.checkpointer,
                retention_days=section.retention_days,
                archive_directory=section.archive_directory,
                now=dt.datetime.now(dt.UTC),
                log_id=log_id,
            )
        finally:
            if maintenance is not audit.database:
                await maintenance.aclose()

    report = _run_with_audit(spec, run)
    segments = [
        {
            "log_id": segment.log_id,
            "entries": segment.entry_count,
            "first_seq": segment.first_seq,
            "last_seq": segment.last_seq,
            "path": str(segment.path),
            "sha256": segment.sha256.hex(),
        }
        for segment in report.segments
    ]
    if as_json:
        typer.echo(json.dumps({"entries": report.entries, "segments": segments}))
        return
    for segment in segments:
        typer.echo(
            f"{segment['log_id']}\t{segment['entries']} entries "
            f"({segment['first_seq']}..{segment['last_seq']})\t{segment['path']}"
        )
    typer.echo(f"pruned {report.entries} entries", err=True)
