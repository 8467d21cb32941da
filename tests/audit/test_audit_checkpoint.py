"""Checkpoints: signing log heads under their lock, storing, sinks, keys from settings."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from bastion.audit._checkpoint import (
    DEVELOPMENT_KEY_FILE,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    CheckpointRefused,
    DirectorySink,
    checkpoint_body,
    parse_checkpoint,
    signing_keys,
)
from bastion.audit._merkle import CompactRange, hash_leaf
from bastion.audit._note import NoteSigner, generate_signing_key
from bastion.audit._tables import checkpoints, logs, pruned
from bastion.data import run_transaction, transaction
from bastion.errors import ConfigurationError
from bastion.observability.metrics import (
    AUDIT_CHECKPOINT_INVALID,
    AUDIT_CHECKPOINT_LAG,
    AUDIT_CHECKPOINT_REFUSALS,
    AUDIT_CHECKPOINT_SINK_FAILURES,
    AUDIT_CHECKPOINTS,
)
from bastion.settings import Settings

NOW = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)
SIGNER = NoteSigner.generate("bastion")
VERIFIER = SIGNER.verifier()
TENANT_LOG = f"tenant/{uuid.UUID(int=7)}"
SEGMENT = uuid.UUID(int=1)


def _leaf(log_id: str, index: int) -> bytes:
    return hash_leaf(f"{log_id}:{index}".encode())


def _tree(log_id: str, size: int) -> CompactRange:
    compact = CompactRange()
    compact.extend(_leaf(log_id, index) for index in range(size))
    return compact


async def _store_leaves(session, log_id: str, start: int, end: int) -> None:
    """Store the leaf hashes ``start`` to ``end - 1`` (as pruned leaves: no entry columns)."""
    if start < end:
        await session.execute(
            pruned.insert(),
            [
                {"log_id": log_id, "seq": i, "leaf_hash": _leaf(log_id, i), "segment_id": SEGMENT}
                for i in range(start, end)
            ],
        )


async def _set_head(database, log_id: str, size: int) -> bytes:
    """Write the head row and leaves of a log of ``size`` leaves (as an appender leaves them)."""
    compact = _tree(log_id, size)
    values = {
        "size": size,
        "root_hash": compact.root(),
        "frontier": compact.to_bytes(),
        "updated_at": NOW,
    }
    async with transaction(database=database) as session:
        stored = await session.scalar(select(func.count()).where(pruned.c.log_id == log_id))
        await _store_leaves(session, log_id, stored, size)
        exists = await session.scalar(select(logs.c.log_id).where(logs.c.log_id == log_id))
        if exists is None:
            await session.execute(logs.insert().values(log_id=log_id, **values))
        else:
            await session.execute(logs.update().where(logs.c.log_id == log_id).values(**values))
    return compact.root()


async def _rewrite(database, log_id: str, index: int, size: int) -> bytes:
    """Forge leaf ``index`` and write the head of the forged log at ``size`` (DB write access)."""
    leaves = [_leaf(log_id, i) for i in range(size)]
    leaves[index] = hash_leaf(b"forged")
    compact = CompactRange()
    compact.extend(leaves)
    async with transaction(database=database) as session:
        stored = await session.scalar(select(func.count()).where(pruned.c.log_id == log_id))
        await _store_leaves(session, log_id, stored, size)
        await session.execute(
            pruned.delete().where(pruned.c.log_id == log_id, pruned.c.seq == index)
        )
        await session.execute(
            pruned.insert().values(
                log_id=log_id, seq=index, leaf_hash=leaves[index], segment_id=SEGMENT
            )
        )
        await session.execute(
            logs.update()
            .where(logs.c.log_id == log_id)
            .values(size=size, root_hash=compact.root(), frontier=compact.to_bytes())
        )
    return compact.root()


async def _store_row(
    database, log_id: str, note: str, size: int, root: bytes, *, created_at: datetime = NOW
) -> None:
    """Insert a checkpoint row as the app role may (nothing checks what it holds)."""
    async with transaction(database=database) as session:
        await session.execute(
            checkpoints.insert().values(
                id=uuid.uuid4(),
                log_id=log_id,
                tree_size=size,
                root_hash=root,
                created_at=created_at,
                key_name="bastion",
                note=note,
            )
        )


def _note(log_id: str, size: int, signer: NoteSigner = SIGNER, origin: str | None = None) -> str:
    """A well-formed checkpoint note of the honest log ``log_id`` at ``size``."""
    body = checkpoint_body(origin or f"bastion/{log_id}", size, _tree(log_id, size).root(), NOW)
    return signer.sign(body)


async def _count(database) -> int:
    async with transaction(database=database) as session:
        return await session.scalar(select(func.count()).select_from(checkpoints))


class RecordingSink:
    def __init__(self) -> None:
        self.written: list[tuple[str, int]] = []

    async def write(self, checkpoint: Checkpoint, log_id: str) -> None:
        self.written.append((log_id, checkpoint.size))


class FailingSink:
    async def write(self, checkpoint: Checkpoint, log_id: str) -> None:
        raise OSError("disk full at /secret/path")


@pytest.fixture
def clock():
    now = [NOW]

    def read() -> datetime:
        return now[0]

    read.now = now  # type: ignore[attr-defined]
    return read


@pytest.fixture
def checkpointer(database, clock):
    return Checkpointer(database=database, signer=SIGNER, origin_prefix="bastion", clock=clock)


class TestCheckpointBody:
    def test_format(self):
        """The body is origin, size, base64 root and a time line, each ending in a newline."""
        body = checkpoint_body("bastion/global", 12, b"\x00" * 32, NOW)
        expected = (
            "bastion/global\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
            f"time {int(NOW.timestamp())}\n"
        )
        assert expected == body

    def test_round_trip(self):
        """A signed body parses back to what was signed, with whole seconds."""
        root = _tree("global", 3).root()
        note = SIGNER.sign(checkpoint_body("bastion/global", 3, root, NOW))
        checkpoint = parse_checkpoint(note, [VERIFIER])
        expected = Checkpoint(
            "bastion/global", 3, root, NOW.replace(microsecond=0), note, "bastion"
        )
        assert expected == checkpoint
        assert "global" == checkpoint.log_id

    def test_untrusted_key(self):
        """A checkpoint signed by a key not trusted is refused."""
        note = NoteSigner.generate("bastion").sign(
            checkpoint_body("bastion/global", 1, b"\x01" * 32, NOW)
        )
        with pytest.raises(CheckpointError, match="no signature by a trusted key"):
            parse_checkpoint(note, [VERIFIER])

    @pytest.mark.parametrize(
        "body",
        [
            "bastion/global\n12\n",
            "bastion/global\n012\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime 1\n",
            "bastion/global\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime 1\n",
            "bastion/global\n12\nAAAA\ntime 1\n",
            "bastion/global\n12\nnot base64!\ntime 1\n",
            "bastion/global\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
            "bastion/global\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime soon\n",
            "bastion/global\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime 1\ntime 2\n",
            "\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\ntime 1\n",
        ],
    )
    def test_not_a_checkpoint(self, body):
        """A validly signed body that is not a bastion checkpoint is refused."""
        with pytest.raises(CheckpointError):
            parse_checkpoint(SIGNER.sign(body), [VERIFIER])

    def test_malformed_note(self):
        """A note without signatures is a checkpoint error too."""
        with pytest.raises(CheckpointError):
            parse_checkpoint("bastion/global\n1\n", [VERIFIER])

    @pytest.mark.parametrize(
        ("origin", "log_id"),
        [
            ("bastion/global", "global"),
            ("audit.example.com/prod/system", "system"),
            (f"bastion/{TENANT_LOG}", TENANT_LOG),
        ],
    )
    def test_log_id(self, origin, log_id):
        """The log id is read off the end of the origin, whatever the prefix."""
        checkpoint = Checkpoint(origin, 1, b"\x00" * 32, NOW, "", "bastion")
        assert log_id == checkpoint.log_id

    def test_log_id_unknown(self):
        """An origin that does not end in a bastion log id has none."""
        with pytest.raises(ValueError, match="does not end in a bastion log id"):
            _ = Checkpoint("example.com/log", 1, b"\x00" * 32, NOW, "", "x").log_id


class TestCheckpointer:
    async def test_no_head(self, checkpointer):
        """A log never appended to has no checkpoint."""
        assert None is await checkpointer.checkpoint("global")
        assert None is await checkpointer.latest("global")

    async def test_signs_and_stores_the_head(self, database, checkpointer):
        """The checkpoint states the head's size and root, signed and stored."""
        root = await _set_head(database, "global", 5)
        before = AUDIT_CHECKPOINTS._value.get()
        checkpoint = await checkpointer.checkpoint("global")
        assert checkpoint is not None
        assert (5, root, "bastion/global") == (
            checkpoint.size,
            checkpoint.root_hash,
            checkpoint.origin,
        )
        assert NOW.replace(microsecond=0) == checkpoint.timestamp
        assert checkpoint == parse_checkpoint(checkpoint.note, [VERIFIER])
        assert checkpoint == await checkpointer.latest("global")
        assert 1 == AUDIT_CHECKPOINTS._value.get() - before
        async with transaction(database=database) as session:
            row = (await session.execute(select(checkpoints))).one()
        assert ("global", 5, root, "bastion") == (
            row.log_id,
            row.tree_size,
            row.root_hash,
            row.key_name,
        )

    async def test_unchanged_size_reuses_latest(self, database, checkpointer, clock):
        """Signing again at the same size returns the stored checkpoint; nothing new is stored."""
        await _set_head(database, "global", 5)
        first = await checkpointer.checkpoint("global")
        clock.now[0] = NOW + timedelta(minutes=1)
        assert first == await checkpointer.checkpoint("global")
        assert 1 == await _count(database)

    async def test_growth_makes_a_new_checkpoint(self, database, checkpointer, clock):
        """A grown log gets a new checkpoint; at_least finds the smallest large enough."""
        await _set_head(database, "global", 5)
        small = await checkpointer.checkpoint("global")
        clock.now[0] = NOW + timedelta(minutes=1)
        root = await _set_head(database, "global", 9)
        large = await checkpointer.checkpoint("global")
        assert large is not None
        assert (9, root) == (large.size, large.root_hash)
        assert large == await checkpointer.latest("global")
        assert small == await checkpointer.at_least("global", 3)
        assert small == await checkpointer.at_least("global", 5)
        assert large == await checkpointer.at_least("global", 6)
        assert None is await checkpointer.at_least("global", 10)

    async def test_checkpoint_all_signs_grown_logs_only(self, database, checkpointer):
        """Only logs that grew since their latest checkpoint are signed."""
        await _set_head(database, "global", 3)
        await _set_head(database, TENANT_LOG, 4)
        assert [("global", 3), (TENANT_LOG, 4)] == [
            (c.log_id, c.size) for c in await checkpointer.checkpoint_all()
        ]
        assert [] == await checkpointer.checkpoint_all()
        await _set_head(database, TENANT_LOG, 6)
        assert [(TENANT_LOG, 6)] == [
            (c.log_id, c.size) for c in await checkpointer.checkpoint_all()
        ]

    async def test_sinks_get_new_checkpoints(self, database, clock):
        """Every sink gets each new checkpoint once; a failing sink fails nothing and is counted."""
        recording = RecordingSink()
        checkpointer = Checkpointer(
            database=database,
            signer=SIGNER,
            origin_prefix="bastion",
            sinks=[FailingSink(), recording],
            clock=clock,
        )
        await _set_head(database, "global", 2)
        before = AUDIT_CHECKPOINT_SINK_FAILURES.labels("FailingSink")._value.get()
        assert (await checkpointer.checkpoint("global")) is not None
        await checkpointer.checkpoint("global")
        assert [("global", 2)] == recording.written
        after = AUDIT_CHECKPOINT_SINK_FAILURES.labels("FailingSink")._value.get()
        assert 1 == after - before
        assert 1 == await _count(database)

    async def test_consistent_under_concurrent_appends(self, database, checkpointer):
        """Checkpoints taken while appenders run each state a size and its own root."""

        async def append(session, log_id: str) -> None:
            statement = select(logs).where(logs.c.log_id == log_id)
            if database.kind.value != "sqlite":
                statement = statement.with_for_update()
            head = (await session.execute(statement)).one()
            compact = CompactRange.from_bytes(head.size, head.frontier)
            compact.append(_leaf(log_id, head.size))
            await _store_leaves(session, log_id, head.size, head.size + 1)
            await session.execute(
                logs.update()
                .where(logs.c.log_id == log_id)
                .values(size=compact.size, root_hash=compact.root(), frontier=compact.to_bytes())
            )

        async def appender() -> None:
            for _ in range(30):
                await run_transaction(append, "global", database=database, attempts=50)

        async def signer() -> list[Checkpoint]:
            made = []
            for _ in range(15):
                checkpoint = await checkpointer.checkpoint("global")
                assert checkpoint is not None
                made.append(checkpoint)
                await asyncio.sleep(0)
            return made

        await _set_head(database, "global", 1)
        _, _, made = await asyncio.gather(appender(), appender(), signer())
        assert all(c.root_hash == _tree("global", c.size).root() for c in made)
        assert 61 == (await checkpointer.checkpoint("global")).size

    async def test_run_signs_on_schedule(self, database, clock):
        """The schedule signs grown logs after each (jittered) wait until cancelled."""
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 3:
                raise asyncio.CancelledError

        checkpointer = Checkpointer(
            database=database, signer=SIGNER, origin_prefix="bastion", clock=clock, sleep=sleep
        )
        await _set_head(database, "global", 2)
        with pytest.raises(asyncio.CancelledError):
            await checkpointer.run(10.0)
        assert all(9.0 <= wait <= 11.0 for wait in waits)
        assert 1 == await _count(database)


class TestDirectorySink:
    async def test_writes_note_atomically(self, tmp_path):
        """The note lands under the log's directory, named by zero-padded size, mode 0644."""
        note = SIGNER.sign(checkpoint_body(f"bastion/{TENANT_LOG}", 42, b"\x02" * 32, NOW))
        checkpoint = parse_checkpoint(note, [VERIFIER])
        sink = DirectorySink(tmp_path / "checkpoints")
        await sink.write(checkpoint, TENANT_LOG)
        target = tmp_path / "checkpoints" / TENANT_LOG.replace("/", "_") / f"{42:020d}.checkpoint"
        assert note == target.read_text(encoding="utf-8")
        assert 0o644 == stat.S_IMODE(target.stat().st_mode)
        assert [target.name] == os.listdir(target.parent)

    async def test_failed_write_leaves_nothing(self, tmp_path):
        """A write that fails leaves no temporary file behind."""
        note = SIGNER.sign(checkpoint_body("bastion/global", 1, b"\x02" * 32, NOW))
        checkpoint = parse_checkpoint(note, [VERIFIER])
        sink = DirectorySink(tmp_path)
        target = sink.file_for("global", 1)
        target.mkdir(parents=True)  # a directory where the file goes: the rename fails
        with pytest.raises(IsADirectoryError):
            await sink.write(checkpoint, "global")
        assert [target.name] == os.listdir(target.parent)


class TestSigningKeys:
    def test_configured_keys(self):
        """The first signing key signs; all signing keys and the trusted keys verify."""
        first, _ = generate_signing_key("bastion")
        second, _ = generate_signing_key("bastion")
        _, retired = generate_signing_key("old")
        settings = Settings(audit={"signing_keys": [first, second], "trusted_keys": [retired]})
        signer, verifiers = signing_keys(settings)
        assert NoteSigner.from_private(first) == signer
        assert [
            NoteSigner.from_private(first).verifier(),
            NoteSigner.from_private(second).verifier(),
            retired,
        ] == [verifiers[0], verifiers[1], verifiers[2].text()]

    def test_development_key_is_generated_once(self, tmp_path):
        """Development without a key generates one, keeps it (0600) and reuses it."""
        settings = Settings(
            secrets={"development_directory": str(tmp_path)}, audit={"origin": "audit example"}
        )
        signer, verifiers = signing_keys(settings)
        again, _ = signing_keys(settings)
        path = tmp_path / DEVELOPMENT_KEY_FILE
        assert signer == again
        assert "audit_example" == signer.name
        assert [signer.verifier()] == verifiers
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert signer.private_text() == path.read_text(encoding="utf-8").strip()

    def test_production_without_key(self, tmp_path):
        """Production without a signing key refuses to start, naming the variable."""
        settings = Settings(
            environment="production", secrets={"development_directory": str(tmp_path)}
        )
        with pytest.raises(ConfigurationError, match="BASTION_AUDIT__SIGNING_KEYS"):
            signing_keys(settings)
        assert [] == os.listdir(tmp_path)

    def test_malformed_key_is_not_quoted(self):
        """A malformed signing key is refused without its text in the message."""
        private, _ = generate_signing_key("bastion")
        broken = private[:-4] + "AAAA"
        with pytest.raises(ConfigurationError, match=r"SIGNING_KEYS\[0\]") as caught:
            signing_keys(Settings(audit={"signing_keys": [broken]}))
        assert broken.rpartition("+")[2] not in str(caught.value)


class TestRefusal:
    async def test_rewritten_history_is_refused(self, database, checkpointer):
        """A head whose tree rewrites signed leaves is not signed; refusal is counted and kept."""
        await _set_head(database, "global", 5)
        signed = await checkpointer.checkpoint("global")
        await _rewrite(database, "global", 2, 8)
        before = AUDIT_CHECKPOINT_REFUSALS.labels("inconsistent")._value.get()
        with pytest.raises(CheckpointRefused, match="does not extend the checkpoint of 5"):
            await checkpointer.checkpoint("global")
        assert 1 == AUDIT_CHECKPOINT_REFUSALS.labels("inconsistent")._value.get() - before
        assert {"global": "inconsistent"} == checkpointer.refused
        assert 1 == await _count(database)
        assert signed == await checkpointer.latest("global")

    async def test_rewrite_of_unsigned_growth_is_signed(self, database, checkpointer):
        """Leaves after the latest checkpoint are not committed to yet; rewriting them is signed."""
        await _set_head(database, "global", 5)
        await checkpointer.checkpoint("global")
        root = await _rewrite(database, "global", 6, 8)
        assert (8, root) == _size_root(await checkpointer.checkpoint("global"))

    async def test_refusal_survives_deleted_checkpoints(self, database, checkpointer):
        """Deleting the checkpoint rows does not reset the check: the signer remembers its last."""
        await _set_head(database, "global", 5)
        await checkpointer.checkpoint("global")
        async with transaction(database=database) as session:
            await session.execute(checkpoints.delete())
        await _rewrite(database, "global", 2, 8)
        with pytest.raises(CheckpointRefused, match="does not extend"):
            await checkpointer.checkpoint("global")
        assert 0 == await _count(database)

    async def test_other_instance_refuses_from_stored_checkpoint(self, database, checkpointer):
        """A fresh checkpointer refuses a rewrite from the stored checkpoint that verifies."""
        await _set_head(database, "global", 5)
        await checkpointer.checkpoint("global")
        await _rewrite(database, "global", 0, 6)
        fresh = Checkpointer(database=database, signer=SIGNER, origin_prefix="bastion")
        with pytest.raises(CheckpointRefused) as caught:
            await fresh.checkpoint("global")
        assert ("global", "inconsistent") == (caught.value.log_id, caught.value.reason)

    async def test_retired_trusted_key_checkpoint_is_a_base(self, database):
        """A checkpoint signed by a retired key still binds when that key is trusted."""
        retired = NoteSigner.generate("retired")
        await _set_head(database, "global", 5)
        await _store_row(
            database, "global", _note("global", 5, retired), 5, _tree("global", 5).root()
        )
        await _rewrite(database, "global", 1, 7)
        checkpointer = Checkpointer(
            database=database,
            signer=SIGNER,
            verifiers=[retired.verifier()],
            origin_prefix="bastion",
        )
        with pytest.raises(CheckpointRefused):
            await checkpointer.checkpoint("global")

    async def test_rollback_is_refused(self, database, checkpointer):
        """A head smaller than a signed checkpoint is refused, by memory and by the stored row."""
        await _set_head(database, "global", 8)
        await checkpointer.checkpoint("global")
        async with transaction(database=database) as session:
            compact = _tree("global", 5)
            await session.execute(
                logs.update()
                .where(logs.c.log_id == "global")
                .values(size=5, root_hash=compact.root(), frontier=compact.to_bytes())
            )
        fresh = Checkpointer(database=database, signer=SIGNER, origin_prefix="bastion")
        for signer in (checkpointer, fresh):
            with pytest.raises(CheckpointRefused, match="has 5 leaves but 8 were signed"):
                await signer.checkpoint("global")
        assert {"global": "rollback"} == fresh.refused

    async def test_first_head_must_be_the_stored_root(self, database, checkpointer):
        """With nothing signed yet, a head root that is not the stored leaves' root is refused."""
        await _set_head(database, "global", 4)
        async with transaction(database=database) as session:
            await session.execute(
                logs.update().where(logs.c.log_id == "global").values(root_hash=b"\x07" * 32)
            )
        with pytest.raises(CheckpointRefused, match="not the root of the stored leaves"):
            await checkpointer.checkpoint("global")
        assert 0 == await _count(database)

    async def test_missing_leaves_are_refused(self, database, checkpointer):
        """A head whose leaves are not stored is refused as incomplete."""
        await _set_head(database, "global", 3)
        async with transaction(database=database) as session:
            await session.execute(pruned.delete().where(pruned.c.seq == 1))
        with pytest.raises(CheckpointRefused) as caught:
            await checkpointer.checkpoint("global")
        assert "incomplete" == caught.value.reason

    async def test_success_clears_the_refusal(self, database, checkpointer):
        """A log signed again after a refusal is no longer reported as refused."""
        await _set_head(database, "global", 3)
        async with transaction(database=database) as session:
            await session.execute(
                logs.update().where(logs.c.log_id == "global").values(root_hash=b"\x07" * 32)
            )
        with pytest.raises(CheckpointRefused):
            await checkpointer.checkpoint("global")
        await _set_head(database, "global", 3)
        assert 3 == (await checkpointer.checkpoint("global")).size
        assert {} == checkpointer.refused

    async def test_checkpoint_all_skips_and_reports_lag(self, database, checkpointer, clock):
        """checkpoint_all skips a refused log; its lag runs from its latest verified checkpoint."""
        await _set_head(database, "global", 5)
        await _set_head(database, TENANT_LOG, 2)
        await checkpointer.checkpoint_all()
        await _rewrite(database, "global", 2, 8)
        await _set_head(database, TENANT_LOG, 3)
        clock.now[0] = NOW + timedelta(minutes=10)
        made = await checkpointer.checkpoint_all()
        assert [(TENANT_LOG, 3)] == [(c.log_id, c.size) for c in made]
        waited = clock() - NOW.replace(microsecond=0)
        assert waited.total_seconds() == AUDIT_CHECKPOINT_LAG._value.get()


class TestStoredCheckpoints:
    async def test_forged_huge_row_does_not_stop_signing(self, database, checkpointer):
        """A garbage row of a huge size neither stops checkpoint_all nor breaks reads."""
        await _set_head(database, "global", 3)
        await checkpointer.checkpoint_all()
        await _store_row(database, "global", "garbage", 2**62, b"\x00" * 32)
        root = await _set_head(database, "global", 5)
        made = await checkpointer.checkpoint_all()
        assert [(5, root)] == [_size_root(c) for c in made]
        assert made[0] == await checkpointer.latest("global")
        assert made[0] == await checkpointer.at_least("global", 4)

    async def test_malformed_note_is_skipped_and_counted(self, database, checkpointer, clock):
        """A malformed note at the head's size is skipped by every read, and counted."""
        await _set_head(database, "global", 3)
        signed = await checkpointer.checkpoint("global")
        later = NOW + timedelta(minutes=1)
        await _store_row(database, "global", "garbage", 3, b"\x00" * 32, created_at=later)
        before = AUDIT_CHECKPOINT_INVALID._value.get()
        assert signed == await checkpointer.latest("global")
        assert signed == await checkpointer.at_least("global", 3)
        assert signed == await checkpointer.checkpoint("global")
        assert 3 == AUDIT_CHECKPOINT_INVALID._value.get() - before

    @pytest.mark.parametrize(
        "forge",
        [
            pytest.param(
                lambda: _note("global", 3, NoteSigner.generate("bastion")), id="untrusted"
            ),
            pytest.param(lambda: _note("global", 3, origin="bastion/system"), id="other-origin"),
            pytest.param(lambda: _note("global", 2), id="row-differs-from-note"),
        ],
    )
    async def test_invalid_rows_are_not_served(self, database, checkpointer, forge):
        """A note by an untrusted key, of another origin, or unlike its row is never returned."""
        await _set_head(database, "global", 3)
        signed = await checkpointer.checkpoint("global")
        later = NOW + timedelta(minutes=1)
        root = _tree("global", 3).root()
        await _store_row(database, "global", forge(), 3, root, created_at=later)
        assert signed == await checkpointer.latest("global")
        assert signed == await checkpointer.at_least("global", 2)

    async def test_only_invalid_rows_means_none(self, database, checkpointer):
        """A log whose only rows are invalid has no checkpoint, and gets a real one signed."""
        root = await _set_head(database, "global", 3)
        await _store_row(database, "global", "garbage", 3, root)
        assert None is await checkpointer.latest("global")
        assert (3, root) == _size_root(await checkpointer.checkpoint("global"))

    async def test_checkpoint_above_the_head_is_not_served(self, database, checkpointer):
        """A verified checkpoint larger than the head is not returned by latest or at_least."""
        await _set_head(database, "global", 3)
        signed = await checkpointer.checkpoint("global")
        await _store_row(database, "global", _note("global", 9), 9, _tree("global", 9).root())
        assert signed == await checkpointer.latest("global")
        assert None is await checkpointer.at_least("global", 4)


def _size_root(checkpoint: Checkpoint | None) -> tuple[int, bytes] | None:
    return None if checkpoint is None else (checkpoint.size, checkpoint.root_hash)
