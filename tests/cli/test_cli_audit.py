"""bastion audit: verify, verify-proof, checkpoint, export, keygen, erase and prune."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid

import pytest
from sqlalchemy import insert, select, text, update

from bastion.audit._bundle import proof_bundle
from bastion.audit._checkpoint import parse_checkpoint
from bastion.audit._listeners import SecurityEventRecorder, audit_event_for
from bastion.audit._note import NoteSigner, NoteVerifier
from bastion.audit._tables import entries, logs, pruned
from bastion.cli._app import load_runtime
from bastion.data import Database
from bastion.identity import SecurityEvent, SecurityEventKind, SecurityOutcome
from bastion.ratelimit._login import identifier_hash
from bastion.settings import DatabaseSettings

APP = ("--app", "tests.lifecycle.drain_app:create_app")
SIGNER = NoteSigner.generate("bastion")
VERIFIER = SIGNER.verifier().text()


@pytest.fixture(params=["sqlite", "postgres"])
def database_of_its_own(request, tmp_path, scratch_postgres):
    """A database no other test writes to (the trail's counts and checkpoints are exact)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
        return
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    with scratch_postgres(f"cli_audit_{secrets.token_hex(4)}") as url:
        yield url


@pytest.fixture
def audited(cli, monkeypatch, database_of_its_own, repo_root, tmp_path):
    """A migrated database, a known signing key, and one entry recorded (an erasure)."""
    database_url = database_of_its_own
    monkeypatch.setenv("BASTION_DATABASE__URL", database_url)
    monkeypatch.setenv("BASTION_LOGGING__ENABLED", "false")
    monkeypatch.setenv("BASTION_AUDIT__SIGNING_KEYS", json.dumps([SIGNER.private_text()]))
    monkeypatch.setenv("BASTION_AUDIT__ENCRYPTION_KEY", secrets.token_hex(32))
    monkeypatch.setenv("BASTION_AUDIT__CHECKPOINT_DIRECTORY", str(tmp_path / "checkpoints"))
    monkeypatch.syspath_prepend(str(repo_root))
    monkeypatch.chdir(tmp_path)  # development secrets land under ./var
    result = cli("migrate", "upgrade", *APP)
    assert 0 == result.exit_code, result.stderr
    result = cli("audit", "erase", "--user", "42", "--email", "a@example.com", *APP)
    assert 0 == result.exit_code, result.stderr
    return database_url


def _database(url: str, action):
    async def run():
        database = Database(DatabaseSettings(url=url))
        try:
            return await action(database)
        finally:
            await database.aclose()

    return asyncio.run(run())


class TestVerify:
    def test_an_intact_trail_exits_0(self, cli, audited):
        """A recorded and checkpointed trail verifies; --json says ok."""
        assert 0 == cli("audit", "checkpoint", *APP).exit_code
        result = cli("audit", "verify", "--json", *APP)
        assert 0 == result.exit_code, result.stderr
        report = json.loads(result.stdout)
        assert (True, []) == (report["ok"], report["problems"])
        assert report["entries"] >= 1

    def test_problems_exit_1_with_their_positions(self, cli, audited):
        """A rewritten head is reported with its kind and positions; exit status 1."""

        async def tamper(database):
            async with database.engine.begin() as connection:
                await connection.execute(update(logs).values(root_hash=bytes(32)))

        _database(audited, tamper)
        result = cli("audit", "verify", *APP)
        assert 1 == result.exit_code
        assert "global\thead_mismatch\t0" in result.stdout
        assert "1 problem(s)" in result.stderr, result.stdout

    def test_malformed_and_far_rows_are_all_reported(self, cli, audited):
        """A row that cannot be encoded and a pruned row far away: both printed, exit 1."""
        if not audited.startswith("sqlite"):
            pytest.skip("PostgreSQL enforces the column types")

        async def tamper(database):
            async with database.engine.begin() as connection:
                size = await connection.scalar(select(logs.c.size))
                await connection.execute(
                    text(
                        "INSERT INTO bastion_audit_entries (log_id, seq, id, occurred_at, action, "
                        "outcome, actor_type, details, leaf_hash) VALUES ('global', :seq, 'x', "
                        "'garbage', 'user.delete', 'success', 'user', '{}', x'00')"
                    ),
                    {"seq": size},
                )
                await connection.execute(update(logs).values(size=size + 1))
                await connection.execute(
                    insert(pruned).values(
                        log_id="global", seq=10**15, leaf_hash=bytes(32), segment_id=uuid.uuid4()
                    )
                )
            return size

        size = _database(audited, tamper)
        result = cli("audit", "verify", *APP)
        assert 1 == result.exit_code, result.stderr
        assert f"global\tmalformed\t{size}\t" in result.stdout
        assert f"global\tunexpected\t{10**15}\t" in result.stdout

    def test_checkpoints_of_another_origin_are_forged(self, cli, audited, monkeypatch):
        """Checkpoints signed for origin bastion do not count for a deployment named staging."""
        assert 0 == cli("audit", "checkpoint", *APP).exit_code
        monkeypatch.setenv("BASTION_AUDIT__ORIGIN", "staging")
        result = cli("audit", "verify", "--json", *APP)
        assert 1 == result.exit_code
        assert {"checkpoint_forged"} == {
            problem["kind"] for problem in json.loads(result.stdout)["problems"]
        }


class TestCheckpoint:
    def test_the_note_is_printed_and_exported(self, cli, audited, tmp_path):
        """The signed note verifies with the key, and is written to the checkpoint directory."""
        result = cli("audit", "checkpoint", "--log", "global", *APP)
        assert 0 == result.exit_code, result.stderr
        made = parse_checkpoint(result.stdout, [SIGNER.verifier()])
        assert "bastion/global" == made.origin
        assert [f"{made.size:020d}.checkpoint"] == [
            path.name for path in (tmp_path / "checkpoints" / "global").iterdir()
        ]

    def test_nothing_to_checkpoint_says_so(self, cli, audited):
        """A log with no head gives no note and a line on stderr."""
        result = cli("audit", "checkpoint", "--log", "system", *APP)
        assert (0, "") == (result.exit_code, result.stdout)
        assert "no log to checkpoint" in result.stderr


class TestVerifyProof:
    def _bundle(self, cli, audited, tmp_path):
        result = cli("audit", "checkpoint", "--log", "global", *APP)
        made = parse_checkpoint(result.stdout, [SIGNER.verifier()])

        async def bundle(database):
            async with database.session() as session:
                erasure = select(entries.c.id).where(entries.c.action == "audit.subject.erase")
                entry_id = (await session.execute(erasure)).scalar_one()
                return await proof_bundle(session, entry_id=entry_id, checkpoint=made)

        path = tmp_path / "bundle.json"
        path.write_text(json.dumps(_database(audited, bundle)))
        return path

    def test_a_good_bundle_verifies_offline(self, cli, audited, tmp_path, monkeypatch):
        """With only the verifier key (no app, no database) the entry is proven."""
        path = self._bundle(cli, audited, tmp_path)
        monkeypatch.setenv("BASTION_DATABASE__URL", "sqlite+aiosqlite:///nowhere/none.db")
        result = cli("audit", "verify-proof", str(path), "--key", VERIFIER, "--json")
        assert 0 == result.exit_code, result.stderr
        assert {"ok": True, "log_id": "global"}.items() <= json.loads(result.stdout).items()

    def test_a_changed_bundle_or_other_key_fails(self, cli, audited, tmp_path):
        """An edited entry exits 1; a key that did not sign exits 1; a bad key exits 2."""
        path = self._bundle(cli, audited, tmp_path)
        other = NoteSigner.generate("bastion").verifier().text()
        assert 1 == cli("audit", "verify-proof", str(path), "--key", other).exit_code
        bundle = json.loads(path.read_text())
        bundle["entry"]["outcome"] = "failure"
        path.write_text(json.dumps(bundle))
        failed = cli("audit", "verify-proof", str(path), "--key", VERIFIER)
        assert 1 == failed.exit_code
        assert "does not verify" in failed.stderr
        assert 2 == cli("audit", "verify-proof", str(path), "--key", "junk").exit_code
        assert 2 == cli("audit", "verify-proof", "absent.json", "--key", VERIFIER).exit_code


class TestExport:
    def test_jsonl_and_csv(self, cli, audited, tmp_path):
        """Entries export newest first as JSON lines or CSV; audit.export is recorded."""
        result = cli("audit", "export", *APP)
        assert 0 == result.exit_code, result.stderr
        actions = [json.loads(line)["action"] for line in result.stdout.splitlines()]
        assert "audit.export" == actions[0]
        assert "audit.subject.erase" in actions
        target = tmp_path / "out.csv"
        result = cli(
            "audit",
            "export",
            "--format",
            "csv",
            "--action",
            "audit.subject.*",
            "--output",
            str(target),
            *APP,
        )
        assert 0 == result.exit_code, result.stderr
        lines = target.read_text().splitlines()
        assert lines[0].startswith("id,occurred_at,log_id,seq,action")
        assert 2 == len(lines)

    def test_bad_options_exit_2(self, cli, audited):
        """An unknown format or a malformed tenant is refused before anything is read."""
        assert 2 == cli("audit", "export", "--format", "xml", *APP).exit_code
        assert 2 == cli("audit", "export", "--tenant", "acme", *APP).exit_code


class TestKeygen:
    def test_a_key_pair_is_printed(self, cli):
        """The private key and its verifier, one per line; the verifier matches the key."""
        result = cli("audit", "keygen", "--name", "audit.example.com")
        assert 0 == result.exit_code, result.stderr
        private, public = result.stdout.splitlines()
        assert NoteSigner.from_private(private).verifier() == NoteVerifier.from_text(public)
        assert "secret" in result.stderr


def _with_audit(action):
    """Run ``action(audit runtime)`` on the app the CLI loads (same settings), then close it."""

    async def run():
        audit = load_runtime(APP[1]).audit
        try:
            return await action(audit)
        finally:
            await audit.log.stop()
            await audit.database.aclose()

    return asyncio.run(run())


class TestErase:
    def test_erase_by_email_shreds_the_failed_logins(self, cli, audited):
        """--email destroys the key of that identifier's failed logins: their IP reads erased."""
        hashed = identifier_hash("Ann@Example.com")

        async def fail_login(audit):
            event = SecurityEvent(
                kind=SecurityEventKind.LOGIN_FAILED,
                outcome=SecurityOutcome.FAILURE,
                subject=hashed,
                ip="203.0.113.9",
            )
            await audit.log.start()
            await SecurityEventRecorder(audit.log, audit.pseudonyms)(event)
            await audit.log.flush()
            return audit_event_for(event, audit.pseudonyms).subject

        async def read_ip(audit):
            async with audit.database.session() as session:
                row = (
                    await session.execute(select(entries).where(entries.c.subject == subject))
                ).one()
            return row.ip, await audit.subject_keys.open(subject, "ip", row.ip)

        subject = _with_audit(fail_login)
        before = _with_audit(read_ip)
        result = cli("audit", "erase", "--user", "42", "--email", "ann@example.com", "--json", *APP)
        after = _with_audit(read_ip)

        assert 0 == result.exit_code, result.stderr
        assert {"user": "42", "keys_erased": 1} == json.loads(result.stdout)
        assert "203.0.113.9" == before[1]
        assert (before[0], None) == after
        assert hashed not in subject

    def test_erase_reports_keys_destroyed(self, cli, audited):
        """The subject keys made by the first erasure are gone, so a second erases none."""
        result = cli("audit", "erase", "--user", "42", "--json", *APP)
        assert 0 == result.exit_code, result.stderr
        assert {"user": "42", "keys_erased": 0} == json.loads(result.stdout)


class TestPrune:
    def test_prune_needs_an_archive_directory(self, cli, audited):
        """Without audit.archive_directory pruning is refused (exit 2)."""
        result = cli("audit", "prune", *APP)
        assert 2 == result.exit_code
        assert "archive_directory" in result.stderr

    def test_nothing_expired_prunes_nothing(self, cli, audited, monkeypatch, tmp_path):
        """Fresh entries are kept."""
        monkeypatch.setenv("BASTION_AUDIT__ARCHIVE_DIRECTORY", str(tmp_path / "archive"))
        result = cli("audit", "prune", "--json", *APP)
        assert 0 == result.exit_code, result.stderr
        assert {"entries": 0, "segments": []} == json.loads(result.stdout)
