"""Retention: expired entries archived as sealed segments, pruned, and the log still verifies."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from audit_guard_support import guarded_postgres, migrate
from sqlalchemy import func, select, text

from bastion.audit._checkpoint import Checkpointer
from bastion.audit._event import Actor, AuditEvent
from bastion.audit._note import NoteSigner
from bastion.audit._proof import verify_consistency
from bastion.audit._retention import PruneRefused, prune, verify_segment
from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import entries, pruned, segments
from bastion.audit._verify import verify
from bastion.audit._writer import AuditLog
from bastion.data import Database
from bastion.settings import AuditSettings, DatabaseSettings

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=500)
RECENT = NOW - dt.timedelta(days=10)
SIGNER = NoteSigner.generate("bastion-test")
VERIFIERS = [SIGNER.verifier()]
RETENTION = {"default": 400, "auth": 400, "admin": 2557}

EVENTS = [
    ("auth.login.success", OLD),
    ("admin.migration.apply", OLD),
    ("document.update", OLD),
    ("auth.login.failure", OLD),
    ("document.update", RECENT),
    ("auth.login.success", RECENT),
    ("admin.lockout.unlock", OLD),
    ("document.update", OLD),
    ("auth.logout", OLD),
] * 3
"""Expired: the old auth and document events (5 of every 9); admin is kept seven years."""
EXPIRED = 15


@dataclass
class Stack:
    database: Database
    maintenance: Database
    log: AuditLog
    checkpointer: Checkpointer
    archive: Path

    async def run(self, **options) -> object:
        arguments = {
            "database": self.database,
            "maintenance_database": self.maintenance,
            "audit": self.log,
            "checkpointer": self.checkpointer,
            "retention_days": RETENTION,
            "archive_directory": self.archive,
            "now": NOW,
            "batch_size": 4,
        }
        return await prune(**(arguments | options))

    async def count(self, table=entries) -> int:
        async with self.database.engine.connect() as connection:
            return await connection.scalar(select(func.count()).select_from(table))


async def _stack(
    url: str, maintenance_url: str, archive: Path, tenant: uuid.UUID | None = None
) -> Stack:
    database = Database(DatabaseSettings(url=url))
    maintenance = (
        database if maintenance_url == url else Database(DatabaseSettings(url=maintenance_url))
    )
    keys = SubjectKeys(database=database, master_key=b"m" * 32, cache_ttl=60)
    settings = AuditSettings(mode="sync", partition="global" if tenant is None else "tenant")
    log = AuditLog(settings, database=database, subject_keys=keys)
    log.register_actions({"document.update": "A document was changed."})
    await log.start()
    for number, (action, when) in enumerate(EVENTS):
        await log.record(
            AuditEvent(
                action=action,
                tenant_id=tenant if number % 2 else None,
                actor=Actor.user("7", email="someone@example.com"),
                occurred_at=when,
                ip="192.0.2.1",
            )
        )
    checkpointer = Checkpointer(database=database, signer=SIGNER, origin_prefix="bastion")
    return Stack(database, maintenance, log, checkpointer, archive)


async def _close(stack: Stack) -> None:
    await stack.log.stop()
    if stack.maintenance is not stack.database:
        await stack.maintenance.aclose()
    await stack.database.aclose()


@pytest.fixture(params=["sqlite", "postgres"])
def urls(request, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A migrated database: the application role's URL and the maintenance role's."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        asyncio.run(migrate(url))
        yield url, url
        return
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    with guarded_postgres() as guarded:
        yield guarded.owner_url, guarded.maintenance_url


@pytest.fixture
async def stack(urls: tuple[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    """The events above, with the app's and the maintenance role's engines."""
    built = await _stack(*urls, tmp_path / "archive")
    try:
        yield built
    finally:
        await _close(built)


class TestPrune:
    async def test_prunes_expired_entries_and_keeps_the_rest(self, stack):
        """Expired auth and default-class entries go; admin and recent ones, and the event, stay."""
        report = await stack.run()

        async with stack.database.engine.connect() as connection:
            kept = sorted((await connection.execute(select(entries.c.action).distinct())).scalars())
            event = (
                await connection.execute(
                    select(entries.c.details).where(entries.c.action == "audit.prune")
                )
            ).scalar_one()
        assert EXPIRED == report.entries
        assert len(EVENTS) - EXPIRED + 1 == await stack.count()
        assert EXPIRED == await stack.count(pruned)
        assert [
            "admin.lockout.unlock",
            "admin.migration.apply",
            "audit.prune",
            "auth.login.success",
            "document.update",
        ] == kept
        segment = report.segments[0]
        assert {
            "log_id": "global",
            "segment_id": str(segment.segment_id),
            "first_seq": segment.first_seq,
            "last_seq": segment.last_seq,
            "entry_count": EXPIRED,
            "tree_size": segment.checkpoint.size,
            "archive_sha256": segment.sha256.hex(),
        } == json.loads(event)

    async def test_log_verifies_after_pruning(self, stack):
        """bastion audit verify finds nothing wrong once entries are pruned."""
        await stack.run()

        report = await verify(
            stack.database,
            verifiers=VERIFIERS,
            origin_prefix="bastion",
            archive_directory=stack.archive,
        )

        assert [] == report.problems

    async def test_tenant_logs_verify_after_pruning(self, urls, tmp_path):
        """With the prune events in the system log, that log is checkpointed and proves them."""
        stack = await _stack(*urls, tmp_path / "archive", tenant=uuid.uuid4())
        try:
            await stack.run()
            report = await verify(stack.database, verifiers=VERIFIERS, origin_prefix="bastion")
        finally:
            await _close(stack)
        assert [] == report.problems

    async def test_a_changed_or_lost_archive_is_reported(self, stack):
        """With the archive directory, a segment file rewritten or gone is reported."""
        report = await stack.run()
        segment = report.segments[0]
        segment.path.write_bytes(b"rewritten")

        changed = await verify(stack.database, verifiers=VERIFIERS, archive_directory=stack.archive)
        segment.path.unlink()
        lost = await verify(stack.database, verifiers=VERIFIERS, archive_directory=stack.archive)

        span = (segment.first_seq, segment.last_seq + 1)
        assert [("archive_mismatch", *span)] == [
            (p.kind, p.position, p.end) for p in changed.problems
        ]
        assert [("archive_missing", *span)] == [(p.kind, p.position, p.end) for p in lost.problems]

    async def test_prune_events_never_expire(self, stack):
        """A second run, long after, keeps the audit.prune entries verify relies on."""
        await stack.run()
        await stack.run(now=NOW + dt.timedelta(days=5000))

        async with stack.database.engine.connect() as connection:
            kept = await connection.scalar(
                select(func.count()).where(entries.c.action == "audit.prune")
            )
        assert 2 == kept
        assert [] == (await verify(stack.database, verifiers=VERIFIERS)).problems

    async def test_segment_verifies_offline(self, stack):
        """The segment file proves every archived entry against its signed checkpoint."""
        report = await stack.run()
        (segment,) = report.segments
        async with stack.database.engine.connect() as connection:
            recorded = (await connection.execute(select(segments.c.archive_sha256))).scalar_one()

        result = verify_segment(segment.path, VERIFIERS, sha256=recorded)

        assert (True, EXPIRED, "global") == (result.ok, result.entries, result.log_id)

    async def test_continuation_extends_the_archived_log(self, stack):
        """The checkpoint after pruning is consistent with the segment's checkpoint."""
        report = await stack.run()
        (segment,) = report.segments

        verify_consistency(
            segment.checkpoint.size,
            segment.continuation.size,
            segment.checkpoint.root_hash,
            segment.continuation.root_hash,
            segment.consistency_proof,
        )
        assert len(EVENTS) + 1 == segment.continuation.size

    async def test_tampered_segment_line_is_detected(self, stack):
        """Changing one archived entry in the file names its line."""
        report = await stack.run(compress=False)
        path = report.segments[0].path
        lines = path.read_text().splitlines()
        line = json.loads(lines[3])
        line["entry"]["outcome"] = "failure" if line["entry"]["outcome"] == "success" else "success"
        lines[3] = json.dumps(line)
        path.write_text("\n".join(lines) + "\n")

        result = verify_segment(path, VERIFIERS)

        assert not result.ok
        assert 1 == len(result.problems)
        assert result.problems[0].startswith("line 4: entry ")

    async def test_truncated_segment_is_detected(self, stack):
        """A segment missing its last line disagrees with its header's count."""
        report = await stack.run()
        path = report.segments[0].path
        lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
        path.write_bytes(gzip.compress(b"".join(lines[:-1])))

        result = verify_segment(path, VERIFIERS)

        assert [f"{EXPIRED - 1} entries, the header says {EXPIRED}"] == result.problems

    async def test_segment_of_another_origin_is_refused(self, stack):
        """With origin_prefix, a segment whose checkpoint names another deployment fails."""
        path = (await stack.run()).segments[0].path

        assert verify_segment(path, VERIFIERS, origin_prefix="bastion").ok
        assert ["line 1: the header disagrees with its checkpoint"] == verify_segment(
            path, VERIFIERS, origin_prefix="staging"
        ).problems

    async def test_untrusted_checkpoint_is_rejected(self, stack):
        """A segment signed by a key not trusted does not verify."""
        report = await stack.run()

        result = verify_segment(report.segments[0].path, [NoteSigner.generate("other").verifier()])

        assert not result.ok
        assert result.problems[0].startswith("line 1: the checkpoint does not verify")

    async def test_nothing_expired(self, stack):
        """A run with nothing past retention writes nothing and records no event."""
        report = await stack.run(now=OLD + dt.timedelta(days=1))

        assert (0, [], []) == (report.entries, report.event_ids, report.segments)
        assert len(EVENTS) == await stack.count()

    async def test_progress_reports_entries(self, stack):
        """The progress callback ends at (total, total)."""
        seen: list[tuple[int, int]] = []

        await stack.run(progress=lambda done, total: seen.append((done, total)))

        assert (EXPIRED, EXPIRED) == seen[-1]


@pytest.mark.postgres
@pytest.mark.parametrize("urls", ["postgres"], indirect=True)
class TestRefused:
    async def test_prune_without_the_maintenance_role_is_refused(self, stack):
        """Pruning through the application's own role is refused by the database; nothing goes."""

        with pytest.raises(PruneRefused, match="bastion_audit_maintenance"):
            await stack.run(maintenance_database=stack.database)

        assert (len(EVENTS), 0) == (await stack.count(), await stack.count(pruned))


@pytest.mark.parametrize("urls", ["sqlite"], indirect=True)
class TestTampered:
    async def test_logs_pruned_before_a_failure_are_recorded(self, urls, tmp_path):
        """When a later log is refused, the earlier one stays pruned and the event says failure."""
        tenant = uuid.uuid4()
        stack = await _stack(*urls, tmp_path / "archive", tenant=tenant)
        try:
            async with stack.database.engine.begin() as connection:
                await connection.execute(text("DROP TRIGGER bastion_audit_entries_no_update"))
                await connection.execute(
                    text(
                        "UPDATE bastion_audit_entries SET outcome = 'denied' "
                        "WHERE log_id <> 'system'"
                    )
                )

            with pytest.raises(PruneRefused, match=f"tenant/{tenant}"):
                await stack.run()

            async with stack.database.engine.connect() as connection:
                event = (
                    await connection.execute(
                        select(entries.c.outcome, entries.c.details).where(
                            entries.c.action == "audit.prune"
                        )
                    )
                ).one()
        finally:
            await _close(stack)
        details = json.loads(event[1])
        assert ("failure", "system", 8) == (
            event[0],
            details["log_id"],
            details["entry_count"],
        )

    async def test_tampered_entry_is_not_pruned(self, stack):
        """An expired entry that no longer matches the checkpoint stops the run before deleting."""
        async with stack.database.engine.begin() as connection:
            await connection.execute(text("DROP TRIGGER bastion_audit_entries_no_update"))
            await connection.execute(
                text("UPDATE bastion_audit_entries SET outcome = 'denied' WHERE seq = 2")
            )

        with pytest.raises(PruneRefused, match="global/2"):
            await stack.run()

        assert (len(EVENTS), 0) == (await stack.count(), await stack.count(pruned))


@pytest.mark.parametrize("urls", ["sqlite"], indirect=True)
class TestArguments:
    async def test_other_log_only(self, stack):
        """A run limited to one log leaves the others alone."""
        report = await stack.run(log_id="tenant/none")

        assert (0, len(EVENTS)) == (report.entries, await stack.count())

    async def test_naive_now_is_refused(self, stack):
        """``now`` must be aware."""
        with pytest.raises(ValueError, match="aware"):
            await stack.run(now=NOW.replace(tzinfo=None))

    async def test_batch_size_must_be_positive(self, stack):
        """A batch holds at least one entry."""
        with pytest.raises(ValueError, match="batch_size"):
            await stack.run(batch_size=0)


@pytest.mark.parametrize("urls", ["sqlite"], indirect=True)
class TestVerifySegment:
    @pytest.fixture
    async def segment(self, stack) -> Path:
        """An uncompressed segment of the expired entries."""
        return (await stack.run(compress=False)).segments[0].path

    def rewrite(self, path: Path, number: int, change) -> None:
        lines = path.read_text().splitlines()
        lines[number - 1] = change(lines[number - 1])
        path.write_text("\n".join(lines) + "\n")

    async def test_recorded_hash_mismatch(self, segment):
        """A file whose SHA-256 is not the recorded one is reported."""
        result = verify_segment(segment, VERIFIERS, sha256=bytes(32))

        assert ["the file's SHA-256 is not the one recorded"] == result.problems

    async def test_malformed_line(self, segment):
        """A line that is not an entry is named."""
        self.rewrite(segment, 2, lambda _line: "{}")

        assert ["line 2: malformed entry line"] == verify_segment(segment, VERIFIERS).problems

    async def test_header_disagreeing_with_checkpoint(self, segment):
        """A header whose tree size is not its checkpoint's is reported."""

        def change(line: str) -> str:
            header = json.loads(line)
            header["tree_size"] += 1
            return json.dumps(header)

        self.rewrite(segment, 1, change)

        assert ["line 1: the header disagrees with its checkpoint"] == verify_segment(
            segment, VERIFIERS
        ).problems

    async def test_entries_out_of_order(self, segment):
        """Two entries swapped are reported where the order breaks."""
        lines = segment.read_text().splitlines()
        lines[2], lines[3] = lines[3], lines[2]
        segment.write_text("\n".join(lines) + "\n")

        assert ["line 4: entries out of order"] == verify_segment(segment, VERIFIERS).problems


class TestSegmentFile:
    def test_not_a_segment(self, tmp_path):
        """A file that is not a segment says so on line 1."""
        path = tmp_path / "x.jsonl"
        path.write_text('{"format": "something else"}\n')

        result = verify_segment(path, VERIFIERS)

        assert (False, ["line 1: not a bastion-audit-segment/1 header"]) == (
            result.ok,
            result.problems,
        )

    def test_unreadable_file(self, tmp_path):
        """Bytes that are not JSON lines are reported, not raised."""
        path = tmp_path / "x.jsonl.gz"
        path.write_bytes(b"\x1f\x8b garbage")

        assert ["line 1: not a segment file (unreadable)"] == verify_segment(
            path, VERIFIERS
        ).problems
