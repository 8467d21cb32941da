"""One scrape of a multi-worker `bastion serve` sees every worker's metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP = "tests.cluster.metrics_app:app"
# Real time: the kernel hands new connections to whichever worker accepts first,
# so requests go out until both workers have served some, within this bound.
SPREAD_SECONDS = 20.0

pytestmark = pytest.mark.slow


def served_pids(url: str) -> dict[int, int]:
    """Requests on fresh connections until two workers answered; requests per pid."""
    counts: dict[int, int] = {}
    deadline = time.monotonic() + SPREAD_SECONDS
    while len(counts) < 2 or sum(counts.values()) < 20:
        if time.monotonic() > deadline:
            pytest.fail(f"requests never reached two workers: {counts}")
        # A new client each time: a kept-alive connection would stay on one worker.
        pid = httpx.get(url + "/pid", timeout=5.0).json()["pid"]
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def pid_requests_scraped(url: str) -> float:
    """The instance-wide count of /pid requests in one scrape."""
    text = httpx.get(url + "/metrics", timeout=5.0).text
    for family in text_string_to_metric_families(text):
        if family.name == "http_server_request_duration_seconds":
            return sum(
                sample.value
                for sample in family.samples
                if sample.name.endswith("_count") and sample.labels["http_route"] == "/pid"
            )
    return 0.0


class TestMultiprocessScrape:
    def test_every_scrape_sees_both_workers(self, serve_cluster):
        """Whichever worker answers a scrape, it reports the requests both workers served."""
        served = serve_cluster(APP, "--workers", "2")
        counts = served_pids(served.url)
        scraped = [pid_requests_scraped(served.url) for _ in range(8)]
        assert [float(sum(counts.values()))] * 8 == scraped

    def test_fresh_directory_is_removed_on_exit(self, serve_cluster):
        """The directory bastion serve made for the workers' metrics is gone after it stops."""
        served = serve_cluster(APP, "--workers", "2")
        directory = next(
            event["directory"]
            for event in served.events()
            if event["event"] == "multiprocess metrics"
        )
        existed = Path(directory).is_dir()
        served.signal()
        assert (True, 0, False) == (existed, served.wait(), Path(directory).exists())

    def test_given_directory_is_used_and_emptied(self, serve_cluster, tmp_path):
        """metrics.multiprocess_dir is where the workers write, and it is emptied of stale files."""
        directory = tmp_path / "metrics"
        directory.mkdir()
        (directory / "counter_999999.db").write_bytes(b"stale")
        served = serve_cluster(
            APP, "--workers", "2", env={"BASTION_METRICS__MULTIPROCESS_DIR": str(directory)}
        )
        served_pids(served.url)
        files = sorted(path.name for path in directory.glob("*.db"))
        served.signal()
        served.wait()
        assert "counter_999999.db" not in files
        assert any(name.startswith("histogram_") for name in files)
        assert [] == sorted(directory.glob("*.db"))

    def test_a_dead_workers_live_gauges_are_dropped(self, serve_cluster):
        """When a worker dies, its readiness gauge leaves the scrape; its counts stay."""
        served = serve_cluster(APP, "--workers", "2")
        counts = served_pids(served.url)
        victim = next(iter(counts))
        deadline = time.monotonic() + SPREAD_SECONDS
        # Readiness probes on fresh connections until the victim has set its gauge.
        while f'pid="{victim}"' not in httpx.get(served.url + "/metrics", timeout=5.0).text:
            if time.monotonic() > deadline:
                pytest.fail("the victim never answered a readiness probe")
            httpx.get(served.url + "/health/ready", timeout=5.0)
        os.kill(victim, 9)
        deadline = time.monotonic() + SPREAD_SECONDS
        # Real time: the supervisor notices the death on its own period and replaces it.
        while True:
            text = httpx.get(served.url + "/metrics", timeout=5.0).text
            if f'pid="{victim}"' not in text:
                break
            if time.monotonic() > deadline:
                pytest.fail("the dead worker's live gauges stayed in the scrape")
            time.sleep(0.1)
        assert float(sum(counts.values())) <= pid_requests_scraped(served.url)
