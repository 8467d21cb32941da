"""Migration history and checksums: rows per revision, verify, accept, failures leave no trace."""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from migration_support import (
    BASTION_APPLIED,
    BASTION_REVISIONS,
    GADGETS,
    WIDGETS,
    Revision,
    execute,
    history_rows,
    schema_snapshot,
    version_rows,
    with_database,
)
from prometheus_client import REGISTRY

from bastion.data import (
    HistoryRecord,
    MigrationError,
    MigrationTree,
    Migrator,
    RevisionCheck,
    VerificationReport,
)

# Creates a table, fills it, alters and indexes another, then fails: every kind of
# change a half-applied revision could leave behind.
HALF_WAY: Revision = (
    "a2",
    "a1",
    'op.create_table("half", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.bulk_insert(sa.table("half", sa.column("id")), [{"id": 1}, {"id": 2}])\n'
    'op.add_column("widgets", sa.Column("note", sa.String(20)))\n'
    'op.create_index("ix_widgets_note", "widgets", ["note"])\n'
    'raise RuntimeError("boom half-way")',
    "pass",
    "Fail half-way.",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def edit(path: Path) -> None:
    """Change an applied revision file the way a careless fix would."""
    path.write_text(path.read_text() + "\n# fixed a typo after release\n")


def applied_count(tree: str, direction: str) -> float:
    labels = {"tree": tree, "direction": direction}
    return REGISTRY.get_sample_value("bastion_migrations_applied_total", labels) or 0.0


@pytest.fixture
def tree_dir(make_tree):
    return make_tree(WIDGETS, GADGETS)


@pytest.fixture
def migrator(database, tree_dir):
    app_tree = MigrationTree.from_location("app", str(tree_dir), "app_version")
    return Migrator(database, [MigrationTree.bastion(), app_tree], tool="test suite")


class TestHistoryRows:
    async def test_each_applied_revision_has_a_row(self, migrator, database, tree_dir):
        """Each applied revision gets one upgrade row: checksum, who, which tool, when, how long."""
        before = datetime.now(UTC)

        await migrator.upgrade()

        rows = await history_rows(database)
        assert [*BASTION_APPLIED, ("app", "a1"), ("app", "a2")] == [
            (row["tree"], row["revision"]) for row in rows
        ]
        a1 = rows[len(BASTION_APPLIED)]
        assert ("upgrade", "test suite", "app_version") == (
            a1["direction"],
            a1["tool"],
            a1["version_table"],
        )
        assert sha256(tree_dir / "versions" / "a1.py") == a1["checksum"]
        assert f"@{socket.gethostname()} pid {os.getpid()}" in a1["applied_by"]
        assert all(row["duration_ms"] >= 0 for row in rows)
        records = await migrator.applied_history()
        assert before - timedelta(seconds=1) <= records[-1].applied_at <= datetime.now(UTC)

    async def test_applied_history_is_newest_first_and_filtered(self, migrator):
        """applied_history() returns HistoryRecords newest first, by tree, up to the limit."""
        await migrator.upgrade()

        records = await migrator.applied_history(tree="app", limit=1)

        assert 1 == len(records)
        assert isinstance(records[0], HistoryRecord)
        assert ("app", "a2", "upgrade") == (
            records[0].tree,
            records[0].revision,
            records[0].direction,
        )
        assert ["a2", "a1", *reversed(BASTION_REVISIONS)] == [
            record.revision for record in await migrator.applied_history()
        ]

    async def test_applied_history_before_any_run_is_empty(self, migrator):
        """Before the first run there is no history table and no row."""
        assert [] == await migrator.applied_history()

    async def test_downgrade_adds_a_downgrade_row(self, migrator, database):
        """Reverting a revision appends a downgrade row and keeps the upgrade row."""
        await migrator.upgrade()

        await migrator.downgrade("app", "a1", allow_destructive=True)

        rows = await history_rows(database)
        assert [("a2", "upgrade"), ("a2", "downgrade")] == [
            (row["revision"], row["direction"]) for row in rows if row["revision"] == "a2"
        ]

    async def test_metric_counts_applied_and_reverted_revisions(self, migrator):
        """bastion_migrations_applied_total counts each revision by tree and direction."""
        up, down = applied_count("app", "upgrade"), applied_count("app", "downgrade")

        await migrator.upgrade()
        await migrator.downgrade("app", "base", allow_destructive=True)

        assert (up + 2, down + 2) == (
            applied_count("app", "upgrade"),
            applied_count("app", "downgrade"),
        )

    def test_plain_alembic_command_records_too(self, tree_dir, db_url, monkeypatch):
        """`alembic upgrade` through run_alembic_env writes rows with tool ``alembic``."""
        monkeypatch.setenv("BASTION_DATABASE__URL", db_url)
        config = Config()
        config.set_main_option("script_location", str(tree_dir))

        command.upgrade(config, "head")

        rows = with_database(db_url, history_rows)
        assert [("a1", "alembic", "alembic_version"), ("a2", "alembic", "alembic_version")] == [
            (row["revision"], row["tool"], row["version_table"]) for row in rows
        ]
        assert sha256(tree_dir / "versions" / "a2.py") == rows[1]["checksum"]


class TestFailureLeavesNoTrace:
    async def test_half_applied_revision_leaves_everything_as_before(self, make_tree, database):
        """A revision failing half-way leaves schema, version table and history as they were."""
        tree = MigrationTree.from_location("app", str(make_tree(WIDGETS, HALF_WAY)), "app_version")
        migrator = Migrator(database, [MigrationTree.bastion(), tree])
        await migrator.upgrade("a1")
        before = await schema_snapshot(database)

        with pytest.raises(MigrationError, match="boom half-way") as caught:
            await migrator.upgrade()

        assert ("app", "a2") == (caught.value.tree, caught.value.revision)
        assert before == await schema_snapshot(database)

    async def test_snapshot_sees_what_the_revision_does(self, make_tree, database):
        """The snapshot compared above does change when the same changes are committed."""
        tree = MigrationTree.from_location("app", str(make_tree(WIDGETS)), "app_version")
        await Migrator(database, [MigrationTree.bastion(), tree]).upgrade()
        before = await schema_snapshot(database)

        await execute(
            database,
            "ALTER TABLE widgets ADD COLUMN note VARCHAR(20)",
            "CREATE INDEX ix_widgets_note ON widgets (note)",
        )

        assert before != await schema_snapshot(database)


class TestVerify:
    async def test_freshly_applied_revisions_are_ok(self, migrator):
        """Right after an upgrade every applied revision matches its recorded checksum."""
        await migrator.upgrade()

        report = await migrator.verify()

        assert isinstance(report, VerificationReport)
        expected = [(*step, "ok") for step in (*BASTION_APPLIED, ("app", "a1"), ("app", "a2"))]
        assert expected == [(check.tree, check.revision, check.state) for check in report.checks]
        assert report.ok

    async def test_edited_revision_is_modified(self, migrator, tree_dir):
        """Editing an applied revision file makes verify report it modified, by name."""
        await migrator.upgrade()
        edit(tree_dir / "versions" / "a1.py")

        report = await migrator.verify()

        assert ["app:a1"] == [check.name for check in report.modified]
        assert not report.ok
        [check] = report.modified
        assert isinstance(check, RevisionCheck)
        assert sha256(tree_dir / "versions" / "a1.py") == check.checksum
        assert check.record is not None
        assert check.checksum != check.record.checksum

    async def test_crlf_checkout_is_not_an_edit(self, migrator, tree_dir):
        """The same file with CRLF line endings (git on Windows) verifies ok."""
        await migrator.upgrade()
        path = tree_dir / "versions" / "a1.py"
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))

        assert (await migrator.verify()).ok

    async def test_pending_revision_may_change(self, migrator, tree_dir):
        """Only applied revisions are checked: editing a pending one is normal work."""
        await migrator.upgrade("a1")
        edit(tree_dir / "versions" / "a2.py")

        report = await migrator.verify()

        assert (True, [*BASTION_REVISIONS, "a1"]) == (
            report.ok,
            [check.revision for check in report.checks],
        )

    async def test_revision_without_history_is_unrecorded_not_failed(self, migrator, database):
        """A revision applied with no history row is reported unrecorded and does not fail."""
        await migrator.upgrade()
        await execute(database, "DELETE FROM bastion_migration_history WHERE revision = 'a1'")

        report = await migrator.verify()

        assert (["app:a1"], True) == ([check.name for check in report.unrecorded], report.ok)

    async def test_reapplied_revision_is_compared_with_its_newest_run(self, migrator, tree_dir):
        """After a downgrade, an edit and a new upgrade, the newest upgrade's checksum counts."""
        await migrator.upgrade()
        await migrator.downgrade("app", "a1", allow_destructive=True)
        edit(tree_dir / "versions" / "a2.py")
        await migrator.upgrade()

        assert (await migrator.verify()).ok

    async def test_one_tree(self, migrator, tree_dir):
        """verify(tree=) checks that tree only."""
        await migrator.upgrade()
        edit(tree_dir / "versions" / "a1.py")

        report = await migrator.verify(tree="bastion")

        assert (True, ["bastion"]) == (report.ok, sorted({c.tree for c in report.checks}))

    async def test_upgrade_refuses_when_an_applied_revision_was_modified(
        self, migrator, tree_dir, database
    ):
        """upgrade() names the modified revision and `verify`, and applies nothing."""
        await migrator.upgrade("a1")
        edit(tree_dir / "versions" / "a1.py")

        with pytest.raises(MigrationError, match=r"app:a1.*bastion migrate verify") as caught:
            await migrator.upgrade()

        assert ("app", "a1") == (caught.value.tree, caught.value.revision)
        assert ["a1"] == await version_rows(database, "app_version")

    def test_raise_for_modified_is_silent_when_ok(self):
        """A report with nothing modified raises nothing."""
        VerificationReport(()).raise_for_modified()


class TestAccept:
    async def test_accept_records_the_new_checksum(self, migrator, tree_dir, database):
        """Accepting an edited revision writes an accept row and verify passes again."""
        await migrator.upgrade()
        path = tree_dir / "versions" / "a1.py"
        edit(path)

        [record] = await migrator.accept("app", ["a1"])

        assert ("app", "a1", "accept", sha256(path), 0.0, "test suite") == (
            record.tree,
            record.revision,
            record.direction,
            record.checksum,
            record.duration_ms,
            record.tool,
        )
        assert (await migrator.verify()).ok
        assert "accept" == (await history_rows(database))[-1]["direction"]
        assert record == (await migrator.applied_history(limit=1))[0]

    async def test_accept_records_an_unrecorded_revision(self, migrator, database):
        """Accepting a revision applied without history gives it a checksum to compare with."""
        await migrator.upgrade()
        await execute(database, "DELETE FROM bastion_migration_history")

        await migrator.accept("bastion", list(BASTION_REVISIONS))

        assert [] == [check.name for check in (await migrator.verify(tree="bastion")).unrecorded]

    async def test_accept_refuses_a_revision_not_applied(self, migrator):
        """Only applied revisions can be accepted; the error names the revision."""
        await migrator.upgrade("a1")

        with pytest.raises(MigrationError, match="'a2' of tree 'app' is not applied"):
            await migrator.accept("app", ["a2"])

    async def test_accept_refuses_an_unknown_revision(self, migrator):
        """A revision that is not on disk is a MigrationError naming it."""
        await migrator.upgrade()

        with pytest.raises(MigrationError, match="zzz"):
            await migrator.accept("app", ["zzz"])
