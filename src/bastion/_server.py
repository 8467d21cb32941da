"""Running an app under uvicorn with bastion's graceful shutdown.

``bastion serve`` is :func:`serve`. One worker runs :class:`BastionServer` in
this process; more run it in each process of uvicorn's multiprocess supervisor,
all accepting on one socket bound here.

On SIGTERM or SIGINT a server shuts down in the order load balancers need:

1. readiness turns 503 at once (:meth:`Lifecycle.begin_drain`);
2. the drain delay passes while the server still accepts and serves, so load
   balancers see the failing probe and stop sending;
3. the listener closes: new connections are refused, idle keep-alive
   connections close, and a connection with a request under way (even one whose
   body is still being uploaded) only loses keep-alive;
4. in-flight requests finish, up to the shutdown timeout; those still running
   then are cancelled, counted (``Lifecycle.cut_off``) and logged;
5. the lifespan shutdown runs the app's hooks, which close pools in order.

Under the supervisor, the parent takes the signal (within half a second: its
loop's period) and sends SIGTERM to every worker, each of which drains so.

The process then exits 0. A second signal during any of this forces the exit
(status 1): in-flight requests are cut off at once, and the shutdown hooks get
a short grace to close pools.

With several workers and metrics on, the supervisor gives the workers one
multiprocess metrics directory before it starts them (prometheus_client reads
``PROMETHEUS_MULTIPROC_DIR`` when a worker imports it), so a scrape of any
worker sees the whole instance; it forgets a worker's live gauges when the
worker exits, and empties the directory when it stops.

Two uvicorn behaviours are changed on purpose: uvicorn re-raises a captured
signal after shutting down, so a stock server dies *of* SIGTERM (status -15)
instead of exiting 0; and uvicorn logs every request it cancels at the timeout
as "Exception in ASGI application" with a traceback, which bastion replaces
with one count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import structlog
import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.lifespan.on import LifespanOn, LifespanSendMessage
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from bastion._doctor import Finding, check_workers
from bastion._loading import load_app
from bastion.errors import ConfigurationError
from bastion.lifecycle import Lifecycle
from bastion.observability import configure_logging
from bastion.observability._prometheus import MULTIPROCESS_ENV
from bastion.settings import LoggingSettings, MetricsSettings, ServerSettings, Settings

__all__ = ["EXIT_FORCED", "BastionServer", "lifecycle_of", "serve", "startup_warnings"]

logger = structlog.get_logger("bastion.server")

HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
EXIT_FORCED: Final = 1
"""Exit status after a second signal cut the graceful shutdown short."""

# How often the shutdown checks whether the last request has finished. uvicorn
# polls every 100 ms; half of that keeps shutdown latency small at no cost.
_POLL_SECONDS: Final = 0.05
# On a forced exit the shutdown hooks still run (they close pools) for at most this long.
_FORCED_HOOKS_GRACE_SECONDS: Final = 2.0
# Upper bound on waiting for cancelled requests to unwind, so that the middleware
# has counted them before the lifespan logs its "stopped" line. A task that
# swallows its cancellation must not hold the process up.
_CANCEL_GRACE_SECONDS: Final = 1.0


def lifecycle_of(app: Any) -> Lifecycle | None:
    """Return the :class:`Lifecycle` that ``bastion.install`` put on ``app``, if any.

    An app without bastion still serves; it just has no readiness to flip.
    """
    runtime = getattr(getattr(app, "state", None), "bastion", None)
    lifecycle = getattr(runtime, "lifecycle", None)
    return lifecycle if isinstance(lifecycle, Lifecycle) else None


class _Lifespan(LifespanOn):
    """uvicorn's lifespan, reporting a failed start-up as one structured line.

    Starlette reports a failing start-up with the formatted traceback as the
    message, which uvicorn writes as one opaque string. A
    :class:`ConfigurationError` is an operator's mistake, not a bug: it is kept
    so that ``bastion serve`` prints its one line and exits 2.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.configuration_error: ConfigurationError | None = None

    async def send(self, message: LifespanSendMessage) -> None:
        # Starlette sends a failure from inside its `except` block, so the failure is
        # still the exception being handled; other frameworks keep uvicorn's text.
        if message["type"] == "lifespan.startup.failed":
            error = sys.exc_info()[1]
            if isinstance(error, ConfigurationError):
                self.configuration_error = error
                logger.error("start-up failed: invalid configuration", error=str(error))
                message = {"type": "lifespan.startup.failed", "message": ""}
            elif error is not None:
                logger.error("start-up failed", exc_info=error)
                message = {"type": "lifespan.startup.failed", "message": ""}
        elif message["type"] == "lifespan.shutdown.failed":
            error = sys.exc_info()[1]
            if error is not None:
                logger.error("shutdown failed", exc_info=error)
                message = {"type": "lifespan.shutdown.failed", "message": ""}
        await super().send(message)


class _CancelledRequestFilter(logging.Filter):
    """Drops uvicorn's traceback for a request bastion cancelled at the shutdown timeout."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


class BastionServer(uvicorn.Server):
    """A uvicorn server with bastion's drain sequence and a clean exit status.

    Args:
        config: uvicorn's configuration; ``timeout_graceful_shutdown`` is the
            shutdown timeout.
        drain_delay: seconds between readiness turning 503 and the listener closing.
        lifecycle: the app's lifecycle, whose readiness turns 503 on the first signal.
        signals: the signals that start a graceful shutdown.

    Example:
        >>> config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=30)
        >>> server = BastionServer(config, drain_delay=5, lifecycle=lifecycle_of(app))
        >>> server.run()
        >>> server.exit_code
        0
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_delay: float = 0.0,
        lifecycle: Lifecycle | None = None,
        signals: Sequence[signal.Signals] = HANDLED_SIGNALS,
    ) -> None:
        super().__init__(config)
        self.drain_delay = drain_delay
        self.lifecycle = lifecycle
        self.signals = tuple(signals)
        self.requests_cut_off = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def exit_code(self) -> int:
        """0 after a graceful shutdown, :data:`EXIT_FORCED` after a forced one."""
        return EXIT_FORCED if self.force_exit else 0

    @property
    def configuration_error(self) -> ConfigurationError | None:
        """The configuration error that stopped the app's start-up, if one did."""
        lifespan = getattr(self, "lifespan", None)
        return lifespan.configuration_error if isinstance(lifespan, _Lifespan) else None

    def attach(self, app: Any) -> None:
        """Serve ``app`` (already loaded) and drain through its lifecycle."""
        self.config.app = app
        self.lifecycle = lifecycle_of(app)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Load the configuration and serve until a signal's shutdown completes."""
        self._loop = asyncio.get_running_loop()
        if not self.config.loaded:
            self.config.load()
        if self.config.lifespan != "off":
            self.config.lifespan_class = _Lifespan
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Run the app's start-up, then start accepting; logs the address once accepting."""
        await super().startup(sockets)
        if self.started:
            address = self.servers[0].sockets[0].getsockname() if self.servers else ("?", 0)
            logger.info("listening", url=_url(address), pid=os.getpid())

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route :attr:`signals` to :meth:`handle_exit` while serving.

        Unlike uvicorn, a captured signal is not raised again afterwards: the
        process did what the signal asked, and its exit status says how it went.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start the drain on the first signal; force the exit on the second.

        This runs as a signal handler, between two bytecodes of whatever the main
        thread was doing: it must not block, and must not log (the interrupted
        code may hold the logging locks). It only records and schedules.
        """
        if self._shutdown_requested:
            self.force_exit = True
            self.should_exit = True
            return
        self._shutdown_requested = True
        loop = self._loop
        if loop is None:
            self.should_exit = True
            return
        try:
            loop.call_soon_threadsafe(self._start_drain, sig)
        except RuntimeError:
            # The loop is already closed: nothing is left to drain.
            self.should_exit = True

    def _start_drain(self, sig: int) -> None:
        assert self._loop is not None  # noqa: S101 -- set before signals are captured
        self._drain_task = self._loop.create_task(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        lifecycle = self.lifecycle
        logger.info(
            "shutdown signal received",
            signal=signal.Signals(sig).name,
            in_flight=self._in_flight(),
            readiness="503" if lifecycle is not None else "not managed (no bastion installed)",
            drain_delay=self.drain_delay,
            shutdown_timeout=self.config.timeout_graceful_shutdown,
        )
        if lifecycle is not None:
            lifecycle.begin_drain()
        # During start-up there is nothing to drain yet: the server stops as soon
        # as start-up ends, without waiting for load balancers that never saw it.
        if self.drain_delay > 0 and self.started:
            logger.info(
                "drain delay: still serving while load balancers notice", seconds=self.drain_delay
            )
            await asyncio.sleep(self.drain_delay)
        self.should_exit = True

    def _in_flight(self) -> int:
        if self.lifecycle is not None:
            return self.lifecycle.in_flight
        return len(self.server_state.tasks)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the listener, let in-flight requests finish, then run the lifespan shutdown."""
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        if self.lifecycle is not None:
            # Also when shutdown did not start with a signal (max requests reached).
            self.lifecycle.begin_drain()

        for server in self.servers:
            server.close()
        for sock in sockets or ():
            sock.close()
        # Idle keep-alive connections close now. A connection whose request is under
        # way, including one whose body is still arriving, only loses keep-alive: it
        # closes after its response (h11 and httptools both behave so in uvicorn 0.54,
        # pinned by tests/lifecycle/test_server.py).
        for connection in list(self.server_state.connections):
            connection.shutdown()
        logger.info(
            "listener closed: new connections are refused",
            in_flight=self._in_flight(),
            open_connections=len(self.server_state.connections),
        )

        if not self.force_exit:
            await self._finish_requests()
        if self.force_exit:
            tasks = list(self.server_state.tasks)
            logger.warning(
                "forced exit: second signal; in-flight requests abandoned",
                requests=len(tasks),
            )
            await self._cut_off(tasks)
        await self._lifespan_shutdown()
        logger.info(
            "server stopped", requests_cut_off=self.requests_cut_off, forced=self.force_exit
        )

    async def _finish_requests(self) -> None:
        timeout = float(self.config.timeout_graceful_shutdown or 0.0)
        started = time.perf_counter()
        if self.server_state.tasks or self.server_state.connections:
            logger.info(
                "waiting for in-flight requests", in_flight=self._in_flight(), timeout=timeout
            )
        if await self._wait_idle(timeout):
            logger.info("in-flight requests finished", duration_ms=_ms_since(started))
            return
        if self.force_exit:
            return
        tasks = list(self.server_state.tasks)
        logger.warning(
            "shutdown timeout reached: cutting off requests",
            requests=len(tasks),
            shutdown_timeout=timeout,
        )
        await self._cut_off(tasks)

    async def _cut_off(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel request tasks and let them unwind, so the middleware counts them."""
        self.requests_cut_off += len(tasks)
        if not tasks:
            return
        quiet = _CancelledRequestFilter()
        uvicorn_logger = logging.getLogger("uvicorn.error")
        uvicorn_logger.addFilter(quiet)
        try:
            for task in tasks:
                task.cancel(msg="bastion: request cut off by shutdown")
            await asyncio.wait(tasks, timeout=_CANCEL_GRACE_SECONDS)
        finally:
            uvicorn_logger.removeFilter(quiet)

    async def _wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 -- the shutdown timeout
        # Idle means no request task and no open connection: a connection outlives
        # its task while the last bytes of the response are flushed.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        state = self.server_state
        while state.tasks or state.connections:
            remaining = deadline - loop.time()
            if self.force_exit or remaining <= 0:
                return False
            await asyncio.sleep(min(_POLL_SECONDS, remaining))
        return True

    async def _lifespan_shutdown(self) -> None:
        # The hooks close pools, so they run even on a forced exit; once forced they
        # get a short grace, so a hook that hangs cannot hold the process.
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.lifespan.shutdown())
        forced_at: float | None = None
        while not task.done():
            await asyncio.wait({task}, timeout=_POLL_SECONDS)
            if not self.force_exit or task.done():
                continue
            forced_at = forced_at or loop.time()
            if loop.time() - forced_at > _FORCED_HOOKS_GRACE_SECONDS:
                task.cancel()
                logger.warning(
                    "forced exit: shutdown hooks still running; leaving them",
                    grace=_FORCED_HOOKS_GRACE_SECONDS,
                )
                return
        task.result()


class _WorkerProcess(Process):
    """One worker of the supervisor: loads the app itself and runs a :class:`BastionServer`."""

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        *,
        drain_delay: float,
        logging_settings: LoggingSettings,
    ) -> None:
        self.drain_delay = drain_delay
        self.logging_settings = logging_settings
        self._bastion_server: BastionServer | None = None
        super().__init__(config, sockets)

    @property
    def server(self) -> BastionServer:
        """This worker's server, created in the worker process."""
        if self._bastion_server is None:
            # SIGTERM only: the supervisor turns a terminal's Ctrl+C into one SIGTERM
            # per worker, and a worker that also took the terminal's SIGINT (sent to
            # the whole process group) would count it as a second signal and force
            # its exit.
            self._bastion_server = BastionServer(
                self.config, drain_delay=self.drain_delay, signals=(signal.SIGTERM,)
            )
        return self._bastion_server

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        """Run in the worker process: load the app, serve, exit with the server's status."""
        # Coverage does not follow spawned workers; tests/lifecycle exercises this.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server = self.server
        try:
            if self.logging_settings.enabled:
                configure_logging(self.logging_settings)
            server.attach(load_app(str(self.config.app)))
            super().target(sockets)
        except ConfigurationError as exc:
            _exit_on_configuration_error(exc)
        except SystemExit:
            if server.configuration_error is not None:
                _exit_on_configuration_error(server.configuration_error)
            raise
        if server.exit_code:
            sys.exit(server.exit_code)


def _exit_on_configuration_error(error: ConfigurationError) -> None:  # pragma: no cover
    # A worker's stderr is the terminal's: one line, as the CLI would print it.
    # STARTUP_FAILURE tells the supervisor that restarting would fail the same way.
    sys.stderr.write(f"bastion: {error}\n")
    sys.stderr.flush()
    sys.exit(STARTUP_FAILURE)


class _Supervisor(Multiprocess):
    """uvicorn's multiprocess supervisor, running :class:`_WorkerProcess` workers.

    uvicorn builds its ``Process`` by name in four places; those methods are
    restated here with only that changed (they mirror uvicorn 0.54).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        sockets: list[socket.socket],
        *,
        drain_delay: float,
        logging_settings: LoggingSettings,
        metrics_dir: str | None = None,
    ) -> None:
        self._drain_delay = drain_delay
        self._logging_settings = logging_settings
        self._metrics_dir = metrics_dir
        self.exit_codes: list[int | None] = []
        super().__init__(config, sockets)

    def _forget(self, process: Process) -> None:
        """Drop an exited worker's live gauges (in flight, pool, readiness) from scrapes.

        Its counters and histograms stay: they are totals the instance served.
        """
        if self._metrics_dir is not None and process.pid is not None:
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]  # untyped upstream

    def _spawn(self) -> Process:
        process = _WorkerProcess(
            self.config,
            self.sockets,
            drain_delay=self._drain_delay,
            logging_settings=self._logging_settings,
        )
        process.start()
        return process

    @property
    def exit_code(self) -> int:
        """The supervisor's exit status, from its workers'.

        0 when every worker exited 0; uvicorn's start-up failure status (3) when
        one could not start; else :data:`EXIT_FORCED`.
        """
        if all(code == 0 for code in self.exit_codes):
            return 0
        if STARTUP_FAILURE in self.exit_codes:
            return STARTUP_FAILURE
        return EXIT_FORCED

    def init_processes(self) -> None:
        """Start the configured number of workers."""
        for _ in range(self.processes_num):
            self.processes.append(self._spawn())

    def restart_all(self) -> None:  # pragma: no cover -- SIGHUP, mirrors uvicorn
        """Replace each worker, bringing its replacement into service before retiring it."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(
                        "replacement worker not ready in time; restart aborted",
                        new_pid=new.pid,
                        kept_pid=old.pid,
                    )
                return
            old.terminate()
            old.join()
            self._forget(old)
            self.processes[index] = new

    def keep_subprocess_alive(self) -> None:
        """Replace a worker that died or hangs; stop everything if one cannot start."""
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            self._forget(process)
            if process.exitcode == STARTUP_FAILURE:
                # It would fail the same way on every restart (bad app, bad settings).
                logger.error("worker failed to start; stopping", pid=process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():  # pragma: no cover -- a signal raced the check
                return
            logger.warning("worker died; starting a new one", pid=process.pid)
            self.processes[index] = self._spawn()

    def handle_ttin(self) -> None:  # pragma: no cover -- SIGTTIN, mirrors uvicorn
        """Add one worker."""
        logger.info("SIGTTIN: adding a worker")
        self.processes_num += 1
        self.processes.append(self._spawn())

    def terminate_all(self) -> None:
        """Close the parent's copy of the listening socket, then SIGTERM every worker."""
        # While the parent holds the socket open the kernel keeps completing
        # handshakes into a backlog that no worker will accept once they have all
        # closed theirs: new clients would hang instead of being refused.
        for sock in self.sockets:
            sock.close()
        logger.info("stopping workers", workers=len(self.processes))
        super().terminate_all()

    def join_all(self) -> None:
        """Wait for every worker to drain; a further signal forces them out."""
        alive = [process for process in self.processes if process.exitcode is None]
        forced = False
        while alive:
            alive[0].process.join(timeout=_POLL_SECONDS * 2)
            if self.signal_queue and not forced:
                # A second SIGINT/SIGTERM: each worker takes this as its own second
                # signal and exits without waiting for its requests.
                self.signal_queue.clear()
                forced = True
                logger.warning("second signal: forcing workers to exit")
                for process in alive:
                    if process.pid is not None and process.exitcode is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGTERM)
            alive = [process for process in alive if process.exitcode is None]
        self.exit_codes = [process.exitcode for process in self.processes]
        for process in self.processes:
            self._forget(process)
        logger.info("workers stopped", exit_codes=self.exit_codes)


def startup_warnings(settings: Settings) -> list[Finding]:
    """Return what is risky about serving with these settings; empty when nothing is.

    The risks are those of several workers: per-process state, and SQLite.
    """
    return check_workers(settings)


def serve(settings: Settings) -> int:
    """Serve ``settings.server.app`` until SIGTERM or SIGINT; the ``bastion serve`` verb.

    Args:
        settings: the effective settings; ``settings.server`` says what to run,
            where, with how many workers, and how to shut down.

    Returns:
        The exit status: 0 after a graceful shutdown, even when the timeout cut
        requests off; 1 when a second signal forced the exit; 3 when a worker
        failed to start.

    Raises:
        ConfigurationError: the app cannot be loaded, the address cannot be bound,
            or the app's start-up rejected its configuration.

    Example:
        >>> raise SystemExit(serve(load_settings(server={"app": "myservice:app"})))
    """
    server_settings = settings.server
    if settings.logging.enabled:
        configure_logging(settings.logging)
    sock = _bind(server_settings)
    try:
        if server_settings.workers > 1:
            return _serve_workers(settings, sock)
        return _serve_one(settings, sock)
    finally:
        sock.close()


def _serve_one(settings: Settings, sock: socket.socket) -> int:
    server_settings = settings.server
    app = load_app(server_settings.app)
    config = _uvicorn_config(app, server_settings)
    server = BastionServer(
        config, drain_delay=server_settings.drain_delay, lifecycle=lifecycle_of(app)
    )
    _log_starting(sock, server_settings)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:
        if server.configuration_error is not None:
            raise server.configuration_error from None
        return exc.code if isinstance(exc.code, int) else STARTUP_FAILURE
    return server.exit_code


def _serve_workers(settings: Settings, sock: socket.socket) -> int:
    server_settings = settings.server
    for finding in startup_warnings(settings):
        logger.warning(finding.detail, check=finding.check, fix=finding.fix)
    # Workers are spawned, not forked: each imports the app from its name.
    config = _uvicorn_config(server_settings.app, server_settings)
    sock.set_inheritable(True)
    with _metrics_directory(settings.metrics) as metrics_dir:
        supervisor = _Supervisor(
            config,
            [sock],
            drain_delay=server_settings.drain_delay,
            logging_settings=settings.logging,
            metrics_dir=metrics_dir,
        )
        _log_starting(sock, server_settings)
        supervisor.run()
    return supervisor.exit_code


@contextlib.contextmanager
def _metrics_directory(settings: MetricsSettings) -> Iterator[str | None]:
    """Give the workers about to be spawned one empty multiprocess metrics directory.

    ``metrics.multiprocess_dir``, else ``PROMETHEUS_MULTIPROC_DIR``, else a fresh
    temporary directory that is removed afterwards. A given directory is emptied
    of metric files before and after: files a previous run left would be summed
    into this run's counters.
    """
    if not settings.enabled:
        yield None
        return
    given = settings.multiprocess_dir or os.environ.get(MULTIPROCESS_ENV)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        _remove_metric_files(directory)
    else:
        directory = Path(tempfile.mkdtemp(prefix="bastion-metrics-"))
    previous = os.environ.get(MULTIPROCESS_ENV)
    # Workers are spawned: they inherit this environment and import prometheus_client
    # afresh, which is when it decides to write to files. This process keeps its own
    # in-memory values (it imported the library already), and records nothing.
    os.environ[MULTIPROCESS_ENV] = str(directory)
    logger.info("multiprocess metrics", directory=str(directory))
    try:
        yield str(directory)
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_ENV, None)
        else:
            os.environ[MULTIPROCESS_ENV] = previous
        if given:
            _remove_metric_files(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _remove_metric_files(directory: Path) -> None:
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def _uvicorn_config(app: Any, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        # bastion.install routes uvicorn's loggers through its own renderer, and
        # writes its own access line (uvicorn's would be a second, slower one).
        log_config=None,
        access_log=False,
        lifespan="on",
        # Passed through as given: uvicorn annotates int, but only ever awaits it
        # with asyncio.wait_for, and BastionServer reads it as float seconds.
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]
        proxy_headers=settings.proxy_headers,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # No "server: uvicorn" header: advertising the stack only helps scanners.
        server_header=False,
    )


def _bind(settings: ServerSettings) -> socket.socket:
    # Bound here rather than by uvicorn so that a busy port is one clear line and
    # exit 2, not a log record and exit 3; and so that one socket serves every worker.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
            "(set --port or BASTION_SERVER__PORT)"
        ) from None
    return sock


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_starting(sock: socket.socket, settings: ServerSettings) -> None:
    logger.info(
        "starting",
        url=_url(sock.getsockname()),
        app=settings.app,
        workers=settings.workers,
        pid=os.getpid(),
        drain_delay=settings.drain_delay,
        shutdown_timeout=settings.shutdown_timeout,
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
