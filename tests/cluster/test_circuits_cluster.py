"""Two real Bastion Docs processes share circuit state through Redis.

Both instances run `bastion serve` on the same PostgreSQL database and Redis
(under the test's key prefix), with one FakeLLMProvider as their LLM. Failures
seen by instance 1 open its ``llm`` circuit; instance 2 must show it open within
about the refresh interval without having called the provider itself, and must
follow instance 1 back to closed once a probe there succeeds.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import httpx
import pytest
from shutdown_support import REPO, bastion_command  # on the path: see conftest.py

from bastion.testing import FakeLLMProvider

APP = "bastion_docs.app:create_app"
ASK = "/v1/assistant/ask"
OPEN_DURATION = 3.0
# The promise is "within about a second" (published at once, re-read every 1 s);
# the margin is for two server processes on a loaded 2-CPU machine.
SHARED_WITHIN = 2.5
PASSWORD = "cluster-circuit-lantern-4"

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def llm_env(provider: FakeLLMProvider, postgres_url: str, redis_url: str, prefix: str) -> dict:
    llm = "BASTION_RESILIENCE__DEPENDENCIES__LLM__"
    return {
        "BASTION_DATABASE__URL": postgres_url,
        "BASTION_MIGRATIONS__MODE": "auto",
        "BASTION_REDIS__URL": redis_url,
        "BASTION_REDIS__KEY_PREFIX": prefix,
        "BASTION_LOGGING__LEVEL": "INFO",
        "BASTION_DOCS_LLM_URL": provider.url,
        f"{llm}CONSECUTIVE_FAILURES": "2",
        f"{llm}MINIMUM_CALLS": "100",
        f"{llm}RETRIES": "0",
        f"{llm}TIMEOUT": "1",
        f"{llm}TOTAL_TIMEOUT": "1",
        f"{llm}OPEN_DURATION": str(OPEN_DURATION),
    }


def llm_circuit(url: str) -> dict:
    body = httpx.get(url + "/health/circuits", timeout=5.0).json()
    return next(entry for entry in body["circuits"] if entry["name"] == "llm")


def wait_for_state(url: str, state: str, within: float) -> float:
    """Poll an instance's llm circuit until it is in ``state``; return the seconds it took."""
    started = time.monotonic()
    while llm_circuit(url)["state"] != state:
        if time.monotonic() - started > within:
            pytest.fail(f"llm circuit of {url} not {state} after {within} s: {llm_circuit(url)}")
        time.sleep(0.05)
    return time.monotonic() - started


def ask(url: str, owner: dict) -> dict:
    response = httpx.post(url + ASK, json={"question": "budget plans"}, headers=owner, timeout=10)
    assert 200 == response.status_code, response.text
    return response.json()


def new_owner(url: str, env: dict, slug: str) -> dict:
    """Bootstrap a tenant and its owner from the command line, log in; the owner's headers.

    The token works on every instance: they share the database and the signing keys.
    """
    environment = {**os.environ, **env}
    email = f"owner@{slug}.example"
    for command, stdin in (
        (["tenants", "create", "Cluster", "--slug", slug], None),
        (["users", "create", "--email", email, "--tenant", slug, "--password-stdin"], PASSWORD),
    ):
        subprocess.run(
            [*bastion_command(), *command],
            input=None if stdin is None else stdin + "\n",
            cwd=REPO,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    response = httpx.post(
        url + "/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10
    )
    assert 200 == response.status_code, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


class TestSharedCircuits:
    def test_circuit_opened_on_one_instance_opens_and_closes_on_the_other(
        self, serve_cluster, postgres_url, redis_url, redis_prefix
    ):
        """llm opens on instance 2 from instance 1's failures alone, and closes after its probe."""
        with FakeLLMProvider(reply="From the provider.") as provider:
            env = llm_env(provider, postgres_url, redis_url, redis_prefix)
            first = serve_cluster(APP, env=env)
            second = serve_cluster(APP, env=env)
            owner = new_owner(first.url, env, f"cluster-{secrets.token_hex(6)}")
            assert ["closed", "closed"] == [llm_circuit(s.url)["state"] for s in (first, second)]

            provider.behave("fail", status=500)
            for _ in range(2):
                assert ask(first.url, owner)["degraded"]
            wait_for_state(first.url, "open", within=1.0)
            calls = provider.request_count
            seen_after = wait_for_state(second.url, "open", within=SHARED_WITHIN)
            answer = ask(second.url, owner)
            assert (True, "circuit_open") == (answer["degraded"], answer["reason"])
            assert calls == provider.request_count
            assert seen_after < SHARED_WITHIN

            provider.behave("ok")
            # Real time: the circuit admits a probe only once open_duration has passed.
            time.sleep(OPEN_DURATION + 0.2)
            probe = ask(first.url, owner)
            assert (False, "closed") == (probe["degraded"], llm_circuit(first.url)["state"])
            wait_for_state(second.url, "closed", within=SHARED_WITHIN)
            assert not ask(second.url, owner)["degraded"]
