"""Audit trail throughput on PostgreSQL: recording (async, sync), verifying, and the service.

One run against a scratch PostgreSQL database of its own (created, then dropped),
its tables made by ``audit_metadata.create_all`` (the same indexes as the
migration; no append-only guards, which cost nothing on INSERT). Every case
starts from empty tables, and the cases run in interleaved rounds (the order
rotates each round); the median of the rounds is printed. The figures:

1. **baseline batched INSERT**: the rows an audit append writes (the same
   columns and sizes: IP address and user agent sealed under the acting user's
   key, ~100 bytes of details, the leaf hash), prepared beforehand, written by one writer with
   ``executemany`` of a Core ``INSERT`` in batches of ``audit.batch_size``, one
   transaction per batch: what one ordered writer reaches without a Merkle tree.
   The same with ``COPY`` (the writer's own way of inserting) is printed beside it.
2. **baseline single-row INSERT**: ``--sync-concurrency`` tasks, each transaction
   one small "change" row and one entry row, committed: a request's transaction
   with a plain audit row.
3. **async**: :class:`bastion.audit.AuditLog` in ``async`` mode; ``--events``
   events recorded by ``--producers`` tasks as fast as they go, then ``flush()``:
   events per second from the first ``record()`` to the flush's return.
4. **sync**: the same recorder in ``sync`` mode; ``--sync-concurrency`` tasks,
   each transaction the same change row and ``record(event, session=...)``. Each
   append holds its log's head row until the transaction commits, so one log
   takes one such transaction at a time: the events spread over 8 tenants are
   also recorded with ``partition = "tenant"`` (8 logs) to show that.
5. **verify**: after each async case, a checkpoint signed by the
   :class:`Checkpointer`, then :func:`bastion.audit._verify.verify` of the log:
   entries per second.
6. **service**: Bastion Docs (``bastion_docs``) served by uvicorn on the same
   PostgreSQL (a database of its own, made by the service's migrations),
   ``PATCH /v1/documents/{id}`` driven by wrk, with the audit trail off
   (``BASTION_AUDIT__ENABLED=false``), on in ``async`` mode (the default: the
   target) and on in ``sync`` mode, interleaved: requests per second, their
   ratio, the server's and PostgreSQL's CPU per request, and the entries
   recorded per request (which checks that each variant did what its name says).

The targets of issue 8 are printed as met or not, never asserted.

Usage:
    .venv/bin/python bench/audit.py [--events 50000] [--rounds 3] [--sync-events 4000]
        [--producers 4] [--sync-concurrency 8] [--url postgresql+asyncpg://postgres@127.0.0.1:5432]
        [--skip-service] [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Column, MetaData, String, Table, Text, Uuid, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe, format_description, steal_percent, steal_ticks

from bastion.audit._catalogue import ActionCatalogue
from bastion.audit._checkpoint import Checkpointer
from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._event import Actor, AuditEvent, Resource
from bastion.audit._note import NoteSigner
from bastion.audit._prepare import EntryPreparer
from bastion.audit._subjects import NONCE_SIZE, SubjectKeys, seal_with
from bastion.audit._tables import audit_metadata, entries
from bastion.audit._verify import verify
from bastion.audit._writer import AuditLog
from bastion.data import Database, transaction
from bastion.settings import AuditMode, AuditPartition, AuditSettings, DatabaseSettings

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432"
ACTION = "document.update"
USERS = 200
"""Distinct acting users, so distinct data subjects (keys) in the log."""
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
_ENTRY_COLUMNS = (*ENCODED_COLUMNS, "leaf_hash")

# The request's own change in the sync cases: a small row in a table of the app's.
_bench_metadata = MetaData()
changes = Table(
    "bench_changes",
    _bench_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant_id", Uuid(), nullable=False),
    Column("body", Text(), nullable=False),
    Column("title", String(200), nullable=False),
)


def _version(package: str) -> str:
    from importlib import metadata  # noqa: PLC0415 -- only for the header

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _load_average() -> float:
    return os.getloadavg()[0]


class Workload:
    """The events every case records, and the rows the baselines insert, alike in content."""

    def __init__(self) -> None:
        self.tenants = [uuid.uuid4() for _ in range(8)]
        self.users = [str(uuid.uuid4()) for _ in range(USERS)]

    def events(self, count: int) -> list[AuditEvent]:
        """``count`` events of a user changing a document: what a write route records."""
        made = []
        for n in range(count):
            user = self.users[n % USERS]
            made.append(
                AuditEvent(
                    action=ACTION,
                    actor=Actor.user(user),
                    tenant_id=self.tenants[n % len(self.tenants)],
                    resource=Resource("document", str(uuid.uuid4())),
                    ip=f"203.0.113.{n % 250 + 1}",
                    user_agent=USER_AGENT,
                    request_id=secrets.token_hex(16),
                    trace_id=secrets.token_hex(16),
                    details={
                        "fields": ["title", "body"],
                        "version": n % 97 + 2,
                        "title": "Quarterly report draft",
                        "size": 4096 + n % 1000,
                    },
                )
            )
        return made

    def rows(self, log_id: str, count: int) -> list[tuple[Any, ...]]:
        """The same events as entry rows (sealed fields, leaf hash), numbered from 0 in ``log_id``.

        Prepared with the recorder's own preparer and sealing, so the baselines write
        the same bytes an append writes, only without the tree.
        """
        preparer = EntryPreparer(
            catalogue=ActionCatalogue({ACTION: "A document was changed"}),
            partition="global",
            details_max_bytes=4096,
            clock=lambda: dt.datetime.now(dt.UTC),
        )
        ciphers = {user: AESGCM(AESGCM.generate_key(256)) for user in self.users}
        rows = []
        for seq, event in enumerate(self.events(count)):
            entry = preparer.prepare(event)
            cipher = ciphers[entry.actor_id or ""]
            record = (
                log_id,
                seq,
                entry.id,
                entry.occurred_at,
                entry.action,
                entry.outcome,
                entry.actor_type,
                entry.actor_id,
                entry.tenant_id,
                entry.resource_type,
                entry.resource_id,
                entry.request_id,
                entry.trace_id,
                entry.subject,
                None,
                seal_with(cipher, os.urandom(NONCE_SIZE), entry.subject, "ip", entry.ip),
                seal_with(
                    cipher, os.urandom(NONCE_SIZE), entry.subject, "user_agent", entry.user_agent
                ),
                entry.details,
            )
            rows.append((*record, entry_leaf_hash(record)))
        return rows


class Bench:
    """The scratch database, the recorders, and one function per case."""

    def __init__(self, args: argparse.Namespace, url: str) -> None:
        self.args = args
        self.database = Database(
            DatabaseSettings(url=url, pool_size=max(5, args.sync_concurrency + 2))
        )
        self.workload = Workload()
        self.master_key = secrets.token_bytes(32)
        self.verify_rates: list[float] = []
        self.batch_size = AuditSettings().batch_size

    async def setup(self) -> None:
        async with self.database.engine.begin() as connection:
            await connection.run_sync(audit_metadata.create_all)
            await connection.run_sync(_bench_metadata.create_all)

    async def empty(self) -> None:
        """Empty every table, so each case starts from the same state."""
        names = ", ".join([*audit_metadata.tables, *_bench_metadata.tables])
        async with self.database.engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {names}"))
        async with self.database.engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM ANALYZE"))

    def _audit(self, mode: AuditMode, partition: AuditPartition = "global") -> AuditLog:
        settings = AuditSettings(mode=mode, partition=partition)
        keys = SubjectKeys(
            database=self.database,
            master_key=self.master_key,
            cache_ttl=settings.subject_key_cache_ttl,
        )
        return AuditLog(
            settings,
            database=self.database,
            subject_keys=keys,
            catalogue=ActionCatalogue({ACTION: "A document was changed"}),
        )

    async def baseline_batched(self) -> float:
        """Case 1: executemany of a Core INSERT, batches of audit.batch_size, one writer."""
        rows = self.workload.rows("baseline", self.args.events)
        statement = insert(entries)
        batches = [
            [dict(zip(_ENTRY_COLUMNS, row, strict=True)) for row in rows[at : at + self.batch_size]]
            for at in range(0, len(rows), self.batch_size)
        ]
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            async with self.database.engine.begin() as connection:
                await connection.execute(statement, batch)
        return _rate(len(rows), started, cpu)

    async def baseline_copy(self) -> float:
        """Case 1, COPY: the same rows and batches through asyncpg's copy_records_to_table."""
        rows = self.workload.rows("baseline", self.args.events)
        batches = [rows[at : at + self.batch_size] for at in range(0, len(rows), self.batch_size)]
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            async with self.database.engine.begin() as connection:
                raw = await connection.get_raw_connection()
                driver: Any = raw.driver_connection
                await driver.copy_records_to_table(
                    entries.name, records=batch, columns=_ENTRY_COLUMNS
                )
        return _rate(len(rows), started, cpu)

    async def baseline_single(self) -> float:
        """Case 2: per transaction one change row and one plain entry row, N tasks."""
        rows = self.workload.rows("baseline", self.args.sync_events)
        statement = insert(entries)
        dicts = iter([dict(zip(_ENTRY_COLUMNS, row, strict=True)) for row in rows])
        tenant = self.workload.tenants[0]

        async def worker() -> None:
            for row in dicts:
                async with transaction(database=self.database) as session:
                    await session.execute(insert(changes).values(_change(tenant)))
                    await session.execute(statement, row)

        return await _timed(worker, self.args.sync_concurrency, len(rows))

    async def async_mode(self) -> float:
        """Case 3 (and 5 after it): async recording by a few producers, then flush()."""
        events = self.workload.events(self.args.events)
        audit = self._audit("async")
        await audit.start()
        producers = self.args.producers
        shares = [events[n::producers] for n in range(producers)]
        try:
            gc.collect()
            started, cpu = time.perf_counter(), time.process_time()

            async def produce(share: list[AuditEvent]) -> None:
                record = audit.record
                for event in share:
                    await record(event)

            await asyncio.gather(*(produce(share) for share in shares))
            await audit.flush()
            rate = _rate(len(events), started, cpu)
        finally:
            await audit.stop()
        self.verify_rates.append(await self.verify_log(len(events)))
        return rate

    async def sync_mode(self, partition: AuditPartition = "global") -> float:
        """Case 4: per transaction one change row and record(event, session=...), N tasks."""
        events = iter(self.workload.events(self.args.sync_events))
        audit = self._audit("sync", partition)
        tenant = self.workload.tenants[0]

        async def worker() -> None:
            for event in events:
                async with transaction(database=self.database) as session:
                    await session.execute(insert(changes).values(_change(tenant)))
                    await audit.record(event, session=session)

        return await _timed(worker, self.args.sync_concurrency, self.args.sync_events)

    async def verify_log(self, expected: int) -> float:
        """Case 5: sign a checkpoint of the log just written, then verify it whole."""
        signer = NoteSigner.generate("bench")
        checkpointer = Checkpointer(database=self.database, signer=signer, origin_prefix="bench")
        checkpoint = await checkpointer.checkpoint("global")
        if checkpoint is None or checkpoint.size != expected:
            raise RuntimeError(f"the log holds {checkpoint and checkpoint.size}, not {expected}")
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        report = await verify(self.database, verifiers=[signer.verifier()], log_id="global")
        rate = _rate(report.entries, started, cpu)
        if not report.ok or report.entries != expected:
            raise RuntimeError(f"verify found problems: {report.problems[:3]}")
        return rate


_CPU: list[float] = []
"""CPU seconds of this process per item of each timed run, in the order they ran: steadier
than a rate on a shared machine (PostgreSQL's own time is not in it)."""


def _rate(count: int, started: float, cpu: float) -> float:
    _CPU.append((time.process_time() - cpu) / count)
    return count / (time.perf_counter() - started)


def _change(tenant: uuid.UUID) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "tenant_id": tenant, "title": "Report", "body": "x" * 200}


async def _timed(worker: Callable[[], Awaitable[None]], tasks: int, count: int) -> float:
    gc.collect()
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return _rate(count, started, cpu)


SERVICE_VARIANTS = {
    "service, audit off": {"BASTION_AUDIT__ENABLED": "false"},
    "service, audit async": {"BASTION_AUDIT__ENABLED": "true", "BASTION_AUDIT__MODE": "async"},
    "service, audit sync": {"BASTION_AUDIT__ENABLED": "true", "BASTION_AUDIT__MODE": "sync"},
}
"""Server environments: audit off is the baseline, async (the default) the target, sync to see."""
DOCUMENTS = 512
"""Documents the load patches, round robin: few enough to stay cached, enough to avoid row waits."""
STARTUP_TIMEOUT = 60.0


def _service_environment(url: str, workdir: Path) -> dict[str, str]:
    """What the in-process set-up and every server share: database, keys, quiet logs, no limit."""
    return {
        "BASTION_DATABASE__URL": url,
        "BASTION_MIGRATIONS__MODE": "auto",
        # One directory, so a token signed in the set-up verifies in every server.
        "BASTION_SECRETS__DEVELOPMENT_DIRECTORY": str(workdir / "secrets"),
        "BASTION_CONFIG_FILE": str(workdir / "absent.toml"),
        "BASTION_LOGGING__LEVEL": "ERROR",
        "BASTION_LOGGING__FORMAT": "json",
        # The load comes from one address: the service's default limit would answer 429.
        "BASTION_RATELIMIT__DEFAULT": "1000000/second",
    }


async def _service_setup(environment: dict[str, str], workdir: Path) -> tuple[str, list[str]]:
    """Migrate, make an owner and their documents in process; return the token and paths."""
    os.environ.update(environment)
    # Development keys land under the working directory (var/keys): the run's own.
    os.chdir(workdir)
    from bastion.testing import create_member, lifespan_client  # noqa: PLC0415
    from bastion_docs.app import create_app  # noqa: PLC0415 -- only for the service figure

    app = create_app()
    async with lifespan_client(app) as client:
        owner = await create_member(
            app, tenant_slug="bench", email="owner@bench.example", role="owner"
        )
        paths = []
        for n in range(DOCUMENTS):
            response = await client.post(
                "/v1/documents",
                json={"title": f"Report {n}", "body": "x" * 400, "tags": ["bench"]},
                headers=owner.headers,
            )
            response.raise_for_status()
            paths.append(f"/v1/documents/{response.json()['id']}")
    return owner.token, paths


def _wrk_script(workdir: Path, token: str, paths: list[str]) -> Path:
    """A wrk script sending pre-formatted PATCHes round robin, then the JSON summary.

    Every PATCH needs ``If-Match``; the load sends ``*`` ("whatever version is
    current", RFC 9110), which the service accepts as an explicit choice to
    overwrite. Each request therefore stays pre-formatted (no ETag to track per
    document across connections), and the ``UPDATE`` is the same statement the
    service runs for a versioned ``If-Match`` minus one comparison on the row.
    """
    listed = ",".join(f'"{path}"' for path in paths)
    script = workdir / "patch.lua"
    script.write_text(
        f"local paths = {{{listed}}}\n"
        f'local headers = {{["Authorization"] = "Bearer {token}", '
        '["Content-Type"] = "application/json", ["If-Match"] = "*"}\n'
        'local body = \'{"title":"Quarterly report, revised","tags":["bench","q4"]}\'\n'
        "local requests = {}\n"
        "local n = 0\n"
        "init = function(args)\n"
        "  for i, path in ipairs(paths) do\n"
        '    requests[i] = wrk.format("PATCH", path, headers, body)\n'
        "  end\n"
        "end\n"
        "request = function()\n"
        "  n = n % #requests + 1\n"
        "  return requests[n]\n"
        "end\n" + (Path(__file__).resolve().parent / "wrk_report.lua").read_text()
    )
    return script


def _process_cpu(pid: int) -> float:
    """CPU seconds every thread of ``pid`` has used (Linux schedstat; 0 elsewhere)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return total / 1e9


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds of every local PostgreSQL process, by pid (empty when none is local)."""
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True, check=False)
    return {int(word): _process_cpu(int(word)) for word in found.stdout.split()}


def _postgres_cpu_since(before: dict[int, float]) -> float:
    """PostgreSQL's CPU seconds since ``before``; a process started since counts whole."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in _postgres_cpu().items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SERVER_CPUS: set[int] | None = None
"""With ``--pin``: the CPUs of the service; wrk and PostgreSQL get the others."""
OTHER_CPUS: set[int] | None = None


def _pinned(cpus: set[int] | None) -> list[str]:
    """The ``taskset`` prefix that starts a command (and its threads) on ``cpus``; none unpinned."""
    if cpus is None:
        return []
    return ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus))]


def _pin_postgres(cpus: set[int]) -> dict[int, set[int]]:
    """Pin every local PostgreSQL process (new backends inherit it); return what to restore."""
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True, check=False)
    before: dict[int, set[int]] = {}
    for pid in (int(word) for word in found.stdout.split()):
        try:
            before[pid] = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, cpus)
        except OSError:
            continue  # gone, or not ours to pin
    return before


def _serve(environment: dict[str, str], workdir: Path, variant: str) -> tuple[Any, int]:
    port = _free_port()
    log = workdir / f"{variant.replace(' ', '_').replace(',', '')}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                *_pinned(SERVER_CPUS),
                sys.executable,
                "-m",
                "uvicorn",
                "bastion_docs.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                *(["--loop", "uvloop"] if importlib.util.find_spec("uvloop") else []),
                *(["--http", "httptools"] if importlib.util.find_spec("httptools") else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **environment},
            cwd=workdir,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{variant} exited during start-up:\n{log.read_text()[-2000:]}")
        try:
            url = f"http://127.0.0.1:{port}/health/live"
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return process, port
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"{variant} not ready after {STARTUP_TIMEOUT:.0f} s")


def _wrk(port: int, script: Path, duration: float, connections: int) -> dict[str, Any]:
    completed = subprocess.run(
        [
            *_pinned(OTHER_CPUS),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise RuntimeError(f"no summary from wrk: {completed.stdout} {completed.stderr}")
    errors = {key: value for key, value in result.items() if key.endswith("_errors") and value}
    if errors:
        raise RuntimeError(f"errors under load (non-2xx or socket): {errors}")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


async def _service_cases(args: argparse.Namespace, url: str) -> tuple[dict[str, list[float]], str]:
    """Case 6: the service's PATCH throughput with the audit trail off, async and sync."""
    if shutil.which("wrk") is None:
        return {}, "wrk is not installed (apt-get install -y wrk)"
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as directory:
        workdir = Path(directory)
        environment = _service_environment(url, workdir)
        try:
            token, paths = await _service_setup(environment, workdir)
        except Exception as exc:  # noqa: BLE001 -- say why, keep the database figures
            return {}, f"the service could not be set up: {type(exc).__name__}: {exc}"
        script = _wrk_script(workdir, token, paths)
        names = list(SERVICE_VARIANTS)
        samples: dict[str, list[float]] = {name: [] for name in names}
        p99: dict[str, list[float]] = {name: [] for name in names}
        audited: dict[str, list[float]] = {name: [] for name in names}
        server_cpu: dict[str, list[float]] = {name: [] for name in names}
        postgres_cpu: dict[str, list[float]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                before = await _count(url, "SELECT count(*) FROM bastion_audit_entries")
                process, port = _serve({**environment, **SERVICE_VARIANTS[name]}, workdir, name)
                try:
                    warmup = _wrk(port, script, 2, args.connections)  # pool, caches
                    cpu_before = _process_cpu(process.pid)
                    postgres_before = _postgres_cpu()
                    result = _wrk(port, script, args.duration, args.connections)
                    cpu_used = _process_cpu(process.pid) - cpu_before
                    postgres_used = _postgres_cpu_since(postgres_before)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                # What the variant really did: one entry per PATCH with audit on, none off.
                recorded = await _count(url, "SELECT count(*) FROM bastion_audit_entries") - before
                audited[name].append(recorded / (warmup["requests"] + result["requests"]))
                samples[name].append(result["rps"])
                server_cpu[name].append(cpu_used / result["requests"] * 1e6)
                postgres_cpu[name].append(postgres_used / result["requests"] * 1e6)
                p99[name].append(result["latency_p99_us"] / 1000)
                print(f"  round {round_no + 1} {name}: {result['rps']:,.0f} req/s", flush=True)
    rates = {name: statistics.median(values) for name, values in samples.items()}
    lines = [
        f"service: Bastion Docs on this PostgreSQL, one uvicorn process, wrk -t1 "
        f"-c{args.connections} -d{args.duration:g}s PATCH /v1/documents/{{id}} over "
        f"{DOCUMENTS} documents, median of {args.rounds} interleaved round(s), "
        + ("pinned (see below)" if args.pin else "no core pinning (PostgreSQL shares the cores)"),
        f"{'variant':<28}{'req/s':>12}{'ratio':>9}{'p99 ms':>9}{'CPU µs/req':>12}"
        f"{'PG µs/req':>11}{'entries/req':>13}",
    ]
    off = rates["service, audit off"]
    for name in names:
        lines.append(
            f"{name:<28}{rates[name]:>12,.0f}{rates[name] / off:>8.2f}x"
            f"{statistics.median(p99[name]):>9.1f}{statistics.median(server_cpu[name]):>12,.0f}"
            f"{statistics.median(postgres_cpu[name]):>11,.0f}{min(audited[name]):>13.2f}"
        )
    lines.append(
        "(CPU µs/req: the server process's CPU per request; PG µs/req: every local "
        "PostgreSQL process's, 0 when the server is remote)"
    )
    # Paired by round: each round runs every variant back to back, so a round's ratio
    # shares that round's machine weather; the median of the pairs drifts far less than
    # the ratio of the medians when the load of the shared cores wanders.
    paired = [
        with_audit / without
        for with_audit, without in zip(
            samples["service, audit async"], samples["service, audit off"], strict=True
        )
    ]
    lines.append(
        "async / off by round: "
        + ", ".join(f"{value:.2f}" for value in paired)
        + f"; median {statistics.median(paired):.2f}x"
    )
    samples["service ratio"] = paired
    return samples, "\n".join(lines)


async def _count(url: str, query: str) -> int:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        return int(await connection.fetchval(query))
    finally:
        await connection.close()


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _database_cases(
    args: argparse.Namespace, url: str
) -> tuple[dict[str, list[float]], dict[str, float]]:
    bench = Bench(args, url)
    cases: dict[str, Callable[[], Awaitable[float]]] = {
        "baseline batched INSERT": bench.baseline_batched,
        "baseline batched COPY": bench.baseline_copy,
        "baseline single-row INSERT": bench.baseline_single,
        "async": bench.async_mode,
        "sync": bench.sync_mode,
        "sync, tenant logs": lambda: bench.sync_mode("tenant"),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in (*cases, "verify")}
    try:
        await bench.setup()
        names = list(cases)
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                await bench.empty()
                mark = len(_CPU)
                samples[name].append(await cases[name]())
                cpu[name].append(_CPU[mark])
                if name == "async":
                    cpu["verify"].append(_CPU[mark + 1])
                print(f"  round {round_no + 1} {name}: {samples[name][-1]:,.0f}/s", flush=True)
    finally:
        await bench.database.aclose()
    samples["verify"] = bench.verify_rates
    return samples, {name: statistics.median(values) * 1e6 for name, values in cpu.items()}


def _print_targets(rates: dict[str, float | None]) -> None:
    def ratio(name: str, base: str) -> float | None:
        value, baseline = rates.get(name), rates.get(base)
        return value / baseline if value is not None and baseline else None

    targets = [
        ("async / baseline batched INSERT", ratio("async", "baseline batched INSERT"), 0.4, "x"),
        ("async events/s", rates.get("async"), 20_000, "/s"),
        ("verify entries/s", rates.get("verify"), 100_000, "/s"),
        ("service with audit / without", rates.get("service ratio"), 0.9, "x"),
    ]
    print(f"{'target':<36}{'wanted':>12}{'measured':>14}  verdict")
    for label, value, goal, unit in targets:
        wanted = f">= {goal:g}{unit}" if unit == "x" else f">= {goal:,.0f}{unit}"
        if value is None:
            print(f"{label:<36}{wanted:>12}{'-':>14}  not measured")
            continue
        shown = f"{value:.2f}{unit}" if unit == "x" else f"{value:,.0f}{unit}"
        print(f"{label:<36}{wanted:>12}{shown:>14}  {'met' if value >= goal else 'NOT MET'}")


async def _main(args: argparse.Namespace) -> int:
    steal_before, wall_before = steal_ticks(), time.monotonic()
    load_before = _load_average()
    base = args.url.rstrip("/")
    name = f"bastion_bench_audit_{os.getpid()}_{secrets.token_hex(3)}"
    await _admin(f"{base}/postgres", f'CREATE DATABASE "{name}"')
    try:
        samples: dict[str, list[float]] = {}
        cpu_us: dict[str, float] = {}
        if not args.service_only:
            samples, cpu_us = await _database_cases(args, f"{base}/{name}")
        service: dict[str, list[float]] = {}
        service_note = "skipped (--skip-service)"
        if not args.skip_service:
            # A database of its own: the service's migrations make the audit tables.
            await _admin(f"{base}/postgres", f'CREATE DATABASE "{name}_service"')
            service, service_note = await _pinned_service_cases(args, f"{base}/{name}_service")
    finally:
        for database in (name, f"{name}_service"):
            await _admin(f"{base}/postgres", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    load_after = _load_average()
    stolen = steal_percent(steal_before, steal_ticks(), time.monotonic() - wall_before)

    print(
        format_description(
            describe(
                sqlalchemy=_version("sqlalchemy"),
                asyncpg=_version("asyncpg"),
                cryptography=_version("cryptography"),
            )
        )
    )
    server = await _server_version(f"{base}/postgres")
    print(f"PostgreSQL {server} at {base.rpartition('@')[2]}")
    rates: dict[str, float | None] = {
        case: statistics.median(values) for case, values in {**samples, **service}.items() if values
    }
    print(
        f"median of {args.rounds} interleaved round(s); async {args.events:,} events from "
        f"{args.producers} producers, sync {args.sync_events:,} events from "
        f"{args.sync_concurrency} tasks; batch size {AuditSettings().batch_size}"
    )
    rows = [
        ("baseline batched INSERT", None, "executemany, batches of batch_size, one writer"),
        ("baseline batched COPY", "baseline batched INSERT", "COPY, the same batches"),
        ("async", "baseline batched INSERT", "AuditLog async: record() x N, flush()"),
        ("async (to COPY)", "baseline batched COPY", "the same, to the COPY baseline"),
        ("baseline single-row INSERT", None, "change row + entry row, commit, per task"),
        ("sync", "baseline single-row INSERT", "change row + record(session=), commit"),
        ("sync, tenant logs", "baseline single-row INSERT", "the same, partition tenant (8 logs)"),
        ("verify", None, "verify() of the async log, after a checkpoint"),
    ]
    print(f"{'case':<28}{'per second':>12}{'ratio':>9}{'CPU µs':>9}  what")
    for case, base_case, what in rows:
        measured = case.removesuffix(" (to COPY)")
        value = rates.get(measured)
        if value is None:
            continue
        baseline = rates.get(base_case) if base_case else None
        ratio = f"{value / baseline:>8.2f}x" if baseline else f"{'':>9}"
        print(f"{case:<28}{value:>12,.0f}{ratio}{cpu_us[measured]:>9.1f}  {what}")
    print("(CPU µs: this process's CPU time per row, event or entry; PostgreSQL's not included)")
    if service:
        print(service_note)
    else:
        print(f"service: not measured: {service_note}")
    _print_targets(rates)
    print(f"load average (1 min): before {load_before:.2f}, after {load_after:.2f}")
    if stolen is not None:
        print(f"the hypervisor stole {stolen:.0f}% of the machine's CPU time during the run")
    return 0


async def _pinned_service_cases(
    args: argparse.Namespace, url: str
) -> tuple[dict[str, list[float]], str]:
    """The service cases; with ``--pin``, the service on the first CPU, the rest for the others."""
    global SERVER_CPUS, OTHER_CPUS
    if not args.pin:
        return await _service_cases(args, url)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    SERVER_CPUS, OTHER_CPUS = {cpus[0]}, set(cpus[1:])
    restore = _pin_postgres(OTHER_CPUS)
    try:
        samples, note = await _service_cases(args, url)
    finally:
        for pid, previous in restore.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, previous)
    return samples, (
        f"{note}\npinned: the service on CPU {cpus[0]}, wrk and PostgreSQL on CPU "
        f"{cpus[1:]} (PostgreSQL off the service's core, as on a database host of its own)"
    )


async def _server_version(url: str) -> str:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per async case")
    parser.add_argument("--sync-events", type=int, default=4_000, help="events per sync case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--producers", type=int, default=4, help="tasks recording (async)")
    parser.add_argument("--sync-concurrency", type=int, default=8, help="tasks (sync cases)")
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL server, no database")
    parser.add_argument("--skip-service", action="store_true", help="skip the wrk figure")
    parser.add_argument(
        "--service-only", action="store_true", help="only the wrk figure (no database cases)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="service on CPU 0, wrk and a local PostgreSQL on the others (Linux, as root)",
    )
    args = parser.parse_args()
    # Slow-query warnings and checkpoint notices would interleave with the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        import uvloop  # noqa: PLC0415 -- optional, as in the server
    except ImportError:
        return asyncio.run(_main(args))
    return uvloop.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
