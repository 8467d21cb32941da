"""`bastion serve` on the command line: one-line configuration errors, and a clean run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bastion._server import BastionServer

MISCONFIGURED = "tests.lifecycle.startup_apps:create_misconfigured_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestConfigurationErrors:
    def test_invalid_setting_is_one_line_and_exit_2(self, cli, monkeypatch):
        """An invalid BASTION_SERVER__ value stops serve before anything starts."""
        monkeypatch.setenv("BASTION_SERVER__DRAIN_DELAY", "-1")
        result = cli("serve")
        assert 2 == result.exit_code
        assert [
            "bastion: invalid setting BASTION_SERVER__DRAIN_DELAY: "
            "Input should be greater than or equal to 0"
        ] == result.stderr.splitlines()

    def test_app_that_cannot_be_imported(self, cli, monkeypatch, sqlite_url):
        """A module that does not exist is one line naming it, exit 2."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        result = cli("serve", "no_such_module_anywhere:app", "--port", str(free_port()))
        assert 2 == result.exit_code
        assert 1 == len(result.stderr.splitlines())
        assert result.stderr.startswith("bastion: cannot import 'no_such_module_anywhere'")

    def test_port_in_use(self, cli, monkeypatch, sqlite_url):
        """A port another process listens on is one line naming it, exit 2."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = cli("serve", "tests.lifecycle.served_app:app", "--port", str(port))
        assert 2 == result.exit_code
        assert [
            f"bastion: cannot listen on 127.0.0.1:{port}: Address already in use "
            "(set --port or BASTION_SERVER__PORT)"
        ] == result.stderr.splitlines()

    def test_configuration_error_at_start_up(self, cli, monkeypatch, sqlite_url, repo_root):
        """A ConfigurationError raised by a start-up hook is one line and exit 2."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        result = cli(
            "serve", MISCONFIGURED, "--port", str(free_port()), "--app-dir", str(repo_root)
        )
        assert 2 == result.exit_code
        assert [
            "bastion: pending migrations (migrations.mode=check): bastion:0002; "
            "run `bastion migrate upgrade`"
        ] == result.stderr.splitlines()


class TestServe:
    def test_serves_until_sigterm_and_exits_0(self, cli, monkeypatch, sqlite_url, repo_root):
        """The command serves the app, and SIGTERM makes it return with status 0."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        port = free_port()
        seen: list[int] = []

        def stop_when_ready() -> None:
            # Real time: the server starts on this process's main thread. SIGTERM is
            # only sent once it is this server's handler that will receive it.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                handler = signal.getsignal(signal.SIGTERM)
                if isinstance(getattr(handler, "__self__", None), BastionServer):
                    try:
                        seen.append(
                            httpx.get(f"http://127.0.0.1:{port}/slow?seconds=0").status_code
                        )
                    except httpx.TransportError:
                        time.sleep(0.05)
                        continue
                    signal.raise_signal(signal.SIGTERM)
                    return
                time.sleep(0.05)

        stopper = threading.Thread(target=stop_when_ready)
        stopper.start()
        result = cli(
            "serve",
            "tests.lifecycle.drain_app:create_app",
            "--port",
            str(port),
            "--app-dir",
            str(repo_root),
        )
        stopper.join(timeout=5)
        assert (0, [200]) == (result.exit_code, seen), (result.exception, result.output)


@pytest.mark.slow
class TestConsoleScript:
    def test_invalid_setting_from_the_installed_command(self, tmp_path: Path):
        """The real `bastion` executable prints the one line and exits 2, no traceback."""
        script = Path(sys.executable).with_name("bastion")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "bastion.cli"]
        completed = subprocess.run(
            [*command, "serve"],
            env={"BASTION_SERVER__PORT": "99999", "BASTION_CONFIG_FILE": str(tmp_path / "no.toml")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 2 == completed.returncode
        assert "" == completed.stdout
        assert [
            "bastion: invalid setting BASTION_SERVER__PORT: Input should be less than or equal "
            "to 65535"
        ] == completed.stderr.splitlines()
