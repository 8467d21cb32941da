"""promtool passes on a real scrape of the reference service under load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

# The process helpers are shared with the shutdown tests (tests/ has no __init__.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lifecycle"))

from shutdown_support import REPO, ServedProcess, bastion_command, free_port

pytestmark = pytest.mark.slow

APP = "bastion_docs.app:create_app"
ROUNDS = 60  # x 6 requests: a few hundred over the service's routes, errors included
PASSWORD = "promtool-scrape-lantern-7"


@pytest.fixture
def reference_service(tmp_path: Path):
    """`bastion serve` of the reference service on a fresh SQLite database."""
    port = free_port()
    environment = {
        **os.environ,
        "BASTION_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'docs.db'}",
        "BASTION_MIGRATIONS__MODE": "auto",
        "BASTION_LOGGING__FORMAT": "json",
        # The load below is 360 requests at once from one address.
        "BASTION_RATELIMIT__DEFAULT": "100000/second",
    }
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    served = ServedProcess([APP, "--port", str(port)], environment, tmp_path, port)
    try:
        served.wait_until_ready()
        # The operator's bootstrap: a tenant and its owner from the command line.
        owner = ["--email", "owner@example.com", "--tenant", "acme", "--role", "owner"]
        for command, stdin in (
            (["tenants", "create", "Acme", "--slug", "acme"], None),
            (["users", "create", *owner, "--password-stdin"], PASSWORD + "\n"),
        ):
            subprocess.run(
                [*bastion_command(), *command],
                input=stdin,
                cwd=REPO,
                env=environment,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        yield served
    finally:
        served.kill()


async def load(url: str) -> list[int]:
    """Concurrent requests over several routes: 2xx, 401, 403, 404, 405, 409, 422."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        login = await client.post(
            "/v1/auth/login", json={"email": "owner@example.com", "password": PASSWORD}
        )
        owner = {"Authorization": f"Bearer {login.json()['access_token']}"}

        async def one_round(index: int) -> list[int]:
            responses = await asyncio.gather(
                client.get("/v1/documents", headers=owner),
                client.get("/v1/documents"),
                client.get(f"/v1/no-such-thing/{index}"),
                client.delete("/health/live"),
                client.post("/v1/documents", json={"title": 5}, headers=owner),
                client.post("/v1/tenants", json={"name": "Acme", "slug": "acme"}, headers=owner),
            )
            return [response.status_code for response in responses]

        rounds = await asyncio.gather(*(one_round(index) for index in range(ROUNDS)))
    return [login.status_code, *(status for statuses in rounds for status in statuses)]


class TestPromtool:
    def test_scrape_under_load_passes_promtool(self, reference_service, promtool):
        """`promtool check metrics` exits 0 with no lint output on a scrape under load."""
        statuses = asyncio.run(load(reference_service.url))
        scrape = httpx.get(reference_service.url + "/metrics", timeout=10.0).text
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=scrape,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert {200, 401, 404, 405, 409, 422} == set(statuses)
        assert (0, "", "") == (checked.returncode, checked.stdout, checked.stderr)
        assert 'http_route="/v1/documents"' in scrape
        assert "/v1/no-such-thing/1" not in scrape

    def test_openmetrics_scrape_parses(self, reference_service):
        """The OpenMetrics scrape of the loaded service parses and ends with # EOF."""
        asyncio.run(load(reference_service.url))
        response = httpx.get(
            reference_service.url + "/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
            timeout=10.0,
        )
        families = {family.name for family in text_string_to_metric_families(response.text)}
        assert response.text.endswith("# EOF\n")
        assert {"http_server_request_duration_seconds", "db_client_operation_duration_seconds"} <= (
            families
        )
