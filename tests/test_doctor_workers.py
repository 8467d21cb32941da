"""bastion doctor names idempotency keys held in process memory under several workers."""

from __future__ import annotations

from bastion._doctor import check_workers
from bastion.settings import load_settings


def _names_idempotency(**overrides: object) -> bool:
    findings = check_workers(load_settings(server={"workers": 4}, **overrides))
    return any("http.idempotency" in finding.detail for finding in findings)


def test_memory_idempotency_store_under_workers_is_a_finding() -> None:
    """No Redis and no database: each worker would hold its own keys, so it is a warning."""
    assert _names_idempotency(database={"enabled": False})


def test_shared_idempotency_stores_are_not_findings() -> None:
    """Redis, the database (the fallback) or switching the feature off: nothing to say."""
    assert not _names_idempotency(redis={"url": "redis://r:6379/0"})
    assert not _names_idempotency()
    assert not _names_idempotency(
        database={"enabled": False}, http={"idempotency": {"enabled": False}}
    )
