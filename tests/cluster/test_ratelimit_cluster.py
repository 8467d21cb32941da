"""Rate limits hold across three real instances behind nginx, and through a Redis outage.

Three `bastion serve` processes of ``ratelimit_app`` run behind one Debian nginx
(round robin, ``X-Forwarded-For: $proxy_add_x_forwarded_for``, ``proxy_bind
127.0.0.2``) on one Redis; ``127.0.0.2/32`` is the only trusted proxy, so the
services believe nginx about the client and believe nobody else (nginx_support.py
draws the topology).

The limit is a token bucket of ``RATE``/s with ``BURST`` at once: small enough
that a client sending as fast as it can is refused most of the time, so what it
gets is exactly ``BURST + RATE * elapsed`` whatever the machine's speed. Every
bound below is taken from the test's own clock around the requests, so a loaded
CI machine makes the run slower, never the assertions wrong.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import itertools
import json
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from nginx_support import (
    PROXY_ADDRESS,
    Exchange,
    NginxProxy,
    RedisServer,
    run_async,
    send,
    send_now,
    unavailable,
)
from prometheus_client.parser import text_string_to_metric_families
from shutdown_support import ServedProcess

from bastion.ratelimit._scripts import LuaScript, ScriptRunner

APP = "tests.cluster.ratelimit_app:app"
RATE = 20
BURST = 50
POLICY = f"{RATE}/second burst {BURST}"
FLOOD_SECONDS = 10.0
FLOOD_CONNECTIONS = 16
# Test and Redis clocks are read on the same machine; what separates them is the
# rate difference of CLOCK_MONOTONIC and Redis TIME (parts per million), far
# below this many refills.
CLOCK_SLACK = 0.01
# One decision's Redis round trip may take this long before the failure policy
# applies. The default (50 ms) is for a quiet production network; here three
# servers, nginx, Redis and the client share two CPUs at full load, and a decision
# failing open would be an admission the bucket never counted: the flood tests
# the arithmetic across instances, and the outage test the failure policy.
FLOOD_TIMEOUT = "1"

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def limiter_env(redis_url: str, prefix: str, **ratelimit: str) -> dict[str, str]:
    """Environment of every instance: one Redis, nginx the only trusted proxy."""
    env = {
        "BASTION_REDIS__URL": redis_url,
        "BASTION_REDIS__KEY_PREFIX": prefix,
        "BASTION_RATELIMIT__DEFAULT": POLICY,
        "BASTION_HTTP__TRUSTED_PROXIES": json.dumps([f"{PROXY_ADDRESS}/32"]),
        "BASTION_HTTP__CLIENT_IP_HEADER": "x-forwarded-for",
        "BASTION_LOGGING__LEVEL": "INFO",
        # One line per request would cost the servers more than the limiter does;
        # which instance served a request is in its body and in nginx's log.
        "BASTION_LOGGING__ACCESS_LOG": "false",
    }
    env.update({f"BASTION_RATELIMIT__{key.upper()}": value for key, value in ratelimit.items()})
    return env


@dataclass(frozen=True, slots=True)
class Cluster:
    services: list[ServedProcess]
    proxy: NginxProxy

    @property
    def url(self) -> str:
        return self.proxy.url

    def describe(self) -> str:
        logs = "\n".join(service.describe()[-4000:] for service in self.services)
        return f"{logs}\nnginx:\n{self.proxy.error_log.read_text()[-2000:]}"


def start_cluster(service_group, nginx_proxy, env: dict[str, str]) -> Cluster:
    """Three instances with ``env``, and nginx in front of them."""
    services = service_group(3, APP, env)
    return Cluster(services, nginx_proxy([service.port for service in services]))


@pytest.fixture(scope="module")
def shared_cluster(service_group, nginx_proxy, _redis_session) -> Cluster:
    """Three instances behind nginx on the shared Redis, under a key prefix of their own.

    Shared by the tests, each with client addresses of its own: starting three
    servers costs 8 to 15 s on this machine.
    """
    if _redis_session is None:
        unavailable("redis", "the shared Redis is unreachable")
    redis_url, prefix = _redis_session
    env = limiter_env(redis_url, f"{prefix}{secrets.token_hex(3)}:", timeout=FLOOD_TIMEOUT)
    return start_cluster(service_group, nginx_proxy, env)


@dataclass(frozen=True, slots=True)
class Flood:
    cluster: Cluster
    exchanges: list[Exchange]

    @property
    def admitted(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.status == 200]


@pytest.fixture(scope="module")
def flood(shared_cluster) -> Flood:
    """One client (127.0.0.1) sending as fast as it can for 10 s; read by several tests."""
    exchanges = send_now(shared_cluster.url, seconds=FLOOD_SECONDS, connections=FLOOD_CONNECTIONS)
    return Flood(shared_cluster, exchanges)


# -- what a single token bucket allows, seen from the client's clock -----------------


def allowance_bounds(exchanges: list[Exchange]) -> tuple[int, int]:
    """The fewest and most admissions one bucket can have given, from the client's timings.

    The bucket fills at its first decision, ``t_first``, and the admitted count after
    the last decision ``t_last`` is ``BURST + floor(RATE * (t_last - t_first))``: the
    client never lets a token wait, so none is lost (GCRA keeps the debt in its TAT).
    ``t_first`` lies between the first send and the first answer, ``t_last`` between
    the last send and the last answer; the -1 covers a last decision that admitted.
    """
    first_sent = min(e.sent for e in exchanges)
    first_received = min(e.received for e in exchanges)
    last_sent = max(e.sent for e in exchanges)
    last_received = max(e.received for e in exchanges)
    fewest = BURST + math.floor(RATE * (last_sent - first_received) - CLOCK_SLACK) - 1
    most = BURST + math.floor(RATE * (last_received - first_sent) + CLOCK_SLACK)
    return fewest, most


def rank_intervals(exchanges: list[Exchange]) -> list[tuple[int, int, Exchange]]:
    """For each admitted exchange, the positions in the server's order it can have had.

    A GCRA bucket that is never left full answers its k-th admission (from 1) with
    ``Remaining = BURST - k + refills``, where ``refills = floor(RATE * (t - t_first))``
    at its decision time ``t``. So each Remaining names its own position k, up to
    what the client's clock leaves open about ``t``; and an exchange answered before
    another was sent was decided first.
    """
    first_sent = min(e.sent for e in exchanges)
    first_received = min(e.received for e in exchanges)
    admitted = [e for e in exchanges if e.status == 200]
    answers = sorted(e.received for e in admitted)
    sends = sorted(e.sent for e in admitted)
    intervals = []
    for e in admitted:
        fewest_refills = max(0, math.floor(RATE * (e.sent - first_received) - CLOCK_SLACK))
        most_refills = math.floor(RATE * (e.received - first_sent) + CLOCK_SLACK)
        low = max(BURST + fewest_refills - e.remaining, bisect.bisect_left(answers, e.sent) + 1)
        high = min(BURST + most_refills - e.remaining, bisect.bisect_left(sends, e.received))
        intervals.append((low, high, e))
    return intervals


def assign_ranks(intervals: list[tuple[int, int, Exchange]]) -> list[str]:
    """Give each exchange a distinct rank 1..n inside its interval; what could not be placed.

    Earliest deadline first places every interval whenever any placement exists.
    """
    taken: set[int] = set()
    problems = []
    for low, high, e in sorted(intervals, key=lambda item: (item[1], item[0])):
        rank = next((k for k in range(max(low, 1), high + 1) if k not in taken), None)
        if rank is None:
            problems.append(
                f"Remaining={e.remaining} sent={e.sent:.4f} answered={e.received:.4f}: "
                f"ranks {low}..{high} all taken or empty"
            )
        else:
            taken.add(rank)
    return problems


def check_limited_headers(exchange: Exchange) -> None:
    """The rate-limit headers of one decided response agree with each other and the policy."""
    headers = exchange.headers
    window = math.ceil(BURST / RATE)
    assert str(BURST) == headers["x-ratelimit-limit"]
    assert f'"default";q={BURST};w={window}' == headers["ratelimit-policy"]
    reset = int(headers["x-ratelimit-reset"])
    assert 0 <= reset <= window
    assert f'"default";r={exchange.remaining};t={reset}' == headers["ratelimit"]


def check_rejection(exchange: Exchange) -> None:
    """A 429: problem+json ``RATE_LIMITED``; the bucket is empty and a token is < 1 s away."""
    assert "application/problem+json" == exchange.headers["content-type"]
    assert ("RATE_LIMITED", 429) == (exchange.json()["code"], exchange.json()["status"])
    # Refused means the next token is at most one emission interval (1/RATE s) away,
    # rounded up to whole seconds; and nothing is left.
    assert ("1", 0) == (exchange.headers["retry-after"], exchange.remaining)


def statuses(exchanges: list[Exchange]) -> Counter[int]:
    return Counter(e.status for e in exchanges)


class TestAllowanceAcrossInstances:
    """One client floods the three instances through nginx for 10 s (the ``flood`` fixture)."""

    def test_every_answer_is_decided(self, flood):
        """Nothing but 200 and 429, and no admission that skipped the store (failed open)."""
        counts = statuses(flood.exchanges)
        assert set(counts) <= {200, 429}, (counts, flood.cluster.describe())
        assert [] == [e for e in flood.admitted if not e.decided]

    def test_client_gets_exactly_the_allowance(self, flood):
        """Admitted: burst + rate x elapsed, across all three instances together."""
        # What the bounds assume: the client kept the bucket empty, refused again before
        # the bucket could fill (BURST / RATE seconds), so no token went unused.
        refusals = [e.received for e in flood.exchanges if e.status == 429]
        gaps = [later - earlier for earlier, later in itertools.pairwise(sorted(refusals))]
        assert max(gaps) < BURST / RATE, "the client did not keep the bucket empty"
        fewest, most = allowance_bounds(flood.exchanges)
        admitted = len(flood.admitted)
        assert fewest <= admitted <= most, (admitted, fewest, most, statuses(flood.exchanges))

    def test_every_instance_admitted_some(self, flood):
        """nginx spread the load: each instance served admitted requests."""
        served = Counter(e.json()["pid"] for e in flood.admitted)
        upstreams = flood.cluster.proxy.upstreams_used()
        assert 3 == len(served), served
        assert {f"127.0.0.1:{s.port}" for s in flood.cluster.services} == set(upstreams)

    def test_remaining_counts_down_as_one_bucket(self, flood):
        """Admitted Remaining values are one bucket's: one fewer per admission, one more per refill.

        The strongest statement the client can check: there is an order of the
        admissions, consistent with what the client saw happen before what, in
        which the k-th admission says ``BURST - k + refills so far``. It implies no
        value repeats between two refills, the burst counts 49, 48, ... 0 with no
        gap, and no instance answered from a stale or private count.
        """
        values = {e.remaining for e in flood.admitted}
        assert set(range(BURST)) == values
        intervals = rank_intervals(flood.exchanges)
        assert [] == [(low, high, e.remaining) for low, high, e in intervals if low > high][:5]
        assert [] == assign_ranks(intervals)[:5]

    def test_headers_describe_the_policy(self, flood):
        """Limit, Remaining, Reset and the IETF fields agree on every admitted and refused one."""
        for exchange in flood.exchanges:
            check_limited_headers(exchange)

    def test_refusals_are_rate_limited_problems(self, flood):
        """Every 429 is problem+json RATE_LIMITED with Retry-After 1 and nothing remaining."""
        refused = [e for e in flood.exchanges if e.status == 429]
        assert refused
        for exchange in refused:
            check_rejection(exchange)


class TestClientAddress:
    def test_spoofed_forwarded_for_does_not_escape_the_limit(self, shared_cluster):
        """A client inventing X-Forwarded-For on every request stays one client, alone."""
        spoofer, victim = "127.0.0.3", "127.0.0.4"

        def spoofed(number: int) -> dict[str, str]:
            # Half claim to be the victim (a trusting limiter would drain its bucket),
            # half a new address each (a trusting limiter would admit them all).
            claimed = victim if number % 2 else f"198.51.{number // 250 % 250}.{number % 250}"
            return {
                "X-Forwarded-For": f"{claimed}, 203.0.113.{number % 250}",
                "X-Real-IP": claimed,
                "Forwarded": f"for={claimed}",
            }

        spoofed_run = send_now(
            shared_cluster.url,
            seconds=5.0,
            connections=8,
            local_address=spoofer,
            count=4 * BURST,
            headers=spoofed,
        )
        assert set(statuses(spoofed_run)) <= {200, 429}, shared_cluster.describe()
        fewest, most = allowance_bounds(spoofed_run)
        admitted = statuses(spoofed_run)[200]
        assert fewest <= admitted <= most, (admitted, fewest, most)

        victim_run = send_now(
            shared_cluster.url, seconds=5.0, connections=8, local_address=victim, count=BURST
        )
        assert {200: BURST} == statuses(victim_run)


# Small, so that even a client slowed by a loaded machine spends it within a phase.
OUTAGE_RATE = 5
OUTAGE_LIMIT = f"{OUTAGE_RATE}/second burst {OUTAGE_RATE}"
OUTAGE_TIMEOUT = 0.1
# Requests overlapping a transition may have been decided on either side of it.
SETTLE = 0.3
# After a failure the store does not ask Redis again until a probe interval has
# passed, doubling while probes fail, up to this ceiling: a Redis that is down
# costs requests nothing, and limits resume at most this long after it is back.
PROBE_CEILING: float = inspect.signature(ScriptRunner).parameters["max_retry_interval"].default
# The probe's own round trip and script reload on a loaded machine; calls that
# arrive while it is in flight still fail fast.
PROBE_TIME = 1.0
# Seconds of the run before the kill, while Redis is down, and after the restart:
# the probe ceiling and time, then a second of decisions (the outage is logged as
# ended on a success a second after its last failure).
BEFORE, DOWN, AFTER = 1.5, 2.5, PROBE_CEILING + PROBE_TIME + 1.0
# Real time: a loaded 2-CPU machine may delay an answer by this much beyond the
# limiter's timeout; a hang on a dead Redis would show as the client's 15 s.
SCHEDULING_MARGIN = 1.0
OUTAGE_EVENT = "dependency unavailable: running degraded"
RECOVERY_EVENT = "dependency available again"


@dataclass(frozen=True, slots=True)
class Outage:
    """One steady run through a Redis outage: what each policy's client saw, and when."""

    cluster: Cluster
    redis: RedisServer
    open_run: list[Exchange]
    closed_run: list[Exchange]
    marks: dict[str, float]

    def before(self, run: list[Exchange]) -> list[Exchange]:
        return [e for e in run if e.received < self.marks["kill"]]

    def down(self, run: list[Exchange]) -> list[Exchange]:
        killed, restart = self.marks["killed"], self.marks["restart"]
        return [e for e in run if e.sent > killed + SETTLE and e.received < restart]

    def back(self, run: list[Exchange]) -> list[Exchange]:
        """Requests sent once the new Redis listened."""
        return [e for e in run if e.sent > self.marks["restarted"]]

    def resumed(self, run: list[Exchange]) -> list[Exchange]:
        """Requests sent once the store must have probed the new Redis."""
        return [e for e in run if e.sent > self.marks["restarted"] + PROBE_CEILING + PROBE_TIME]

    def resumed_after(self, run: list[Exchange]) -> float:
        """Seconds from the new Redis listening to the first answer decided by it."""
        decided = [e.received for e in self.back(run) if e.decided]
        return min(decided) - self.marks["restarted"] if decided else math.inf

    def describe(self) -> str:
        phases = {
            name: {
                "before": dict(statuses(self.before(run))),
                "down": dict(statuses(self.down(run))),
                "back": dict(statuses(self.back(run))),
                "resumed": dict(statuses(self.resumed(run))),
                "resumed_after": round(self.resumed_after(run), 3),
            }
            for name, run in (("open", self.open_run), ("closed", self.closed_run))
        }
        return f"{phases}\n{self.cluster.describe()}"


@pytest.fixture(scope="module")
def outage(service_group, nginx_proxy, redis_server) -> Outage:
    """Redis killed 1.5 s into a steady run and started again 2.5 s later.

    The instances use a Redis of the test's own. Two policies with the same limit:
    ``ratelimit.fail_open`` is off, so ``default`` (``/hit``) fails closed, and the
    ``open`` policy (``/open``) overrides it and fails open. A client sends up to 50
    requests/s to each (two connections, one send per 40 ms each), steadily, throughout.
    """
    redis = redis_server()
    env = limiter_env(
        redis.url,
        "outage:",
        default=OUTAGE_LIMIT,
        timeout=str(OUTAGE_TIMEOUT),
        fail_open="false",
        policies=json.dumps({"open": {"limits": OUTAGE_LIMIT, "fail_open": True}}),
        routes=json.dumps({"/open": "open"}),
    )
    group = start_cluster(service_group, nginx_proxy, env)
    marks: dict[str, float] = {}

    async def operate() -> None:
        await asyncio.sleep(BEFORE)
        marks["kill"] = time.monotonic()
        await asyncio.to_thread(redis.kill)
        marks["killed"] = time.monotonic()
        await asyncio.sleep(DOWN)
        marks["restart"] = time.monotonic()
        await asyncio.to_thread(redis.start)
        marks["restarted"] = time.monotonic()

    async def run() -> tuple[list[Exchange], list[Exchange], None]:
        steady = {"seconds": BEFORE + DOWN + AFTER, "connections": 2, "interval": 0.04}
        return await asyncio.gather(
            send(group.url, path="/open", **steady),
            send(group.url, path="/hit", **steady),
            operate(),
        )

    open_run, closed_run, _ = run_async(run())
    return Outage(group, redis, open_run, closed_run, marks)


def scraped(service: ServedProcess, name: str, **labels: str) -> float:
    """The value of one sample on one instance's /metrics (0 when absent)."""
    text = httpx.get(service.url + "/metrics", timeout=5.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class TestRedisOutage:
    """The services' own Redis is killed mid-run, then started again on the same port."""

    def test_every_request_is_answered(self, outage):
        """No connection error and no 5xx but the closed policy's 503s."""
        open_codes = statuses(outage.open_run)
        closed_codes = statuses(outage.closed_run)
        assert set(open_codes) <= {200, 429}, outage.describe()
        assert set(closed_codes) <= {200, 429, 503}, outage.describe()

    def test_limits_apply_before_the_outage(self, outage):
        """Both policies refuse once their allowance is spent while Redis is up."""
        for run in (outage.open_run, outage.closed_run):
            assert {200, 429} == set(statuses(outage.before(run))), outage.describe()

    def test_fail_open_policy_admits_while_redis_is_down(self, outage):
        """Redis down: the fail-open policy answers 200, without rate-limit headers."""
        down = outage.down(outage.open_run)
        assert {200: len(down)} == statuses(down), outage.describe()
        assert [] == [e.headers for e in down if e.decided][:3]

    def test_fail_closed_policy_answers_503_while_redis_is_down(self, outage):
        """Redis down: the fail-closed policy answers 503 SERVICE_UNAVAILABLE, Retry-After 1."""
        down = outage.down(outage.closed_run)
        assert {503: len(down)} == statuses(down), outage.describe()
        for exchange in down:
            assert "application/problem+json" == exchange.headers["content-type"]
            assert ("SERVICE_UNAVAILABLE", "1") == (
                exchange.json()["code"],
                exchange.headers["retry-after"],
            )

    def test_no_answer_waits_beyond_the_timeout(self, outage):
        """While Redis is down, every answer comes within the limiter's timeout (and scheduling)."""
        down = outage.down(outage.open_run) + outage.down(outage.closed_run)
        slowest = max(e.received - e.sent for e in down)
        assert slowest < OUTAGE_TIMEOUT + SCHEDULING_MARGIN, slowest

    def test_limits_resume_when_redis_returns(self, outage):
        """Back: within the probe ceiling every answer is decided again, and refusals return."""
        for run in (outage.open_run, outage.closed_run):
            resumed = outage.resumed(run)
            assert [] == [e.status for e in resumed if not e.decided], outage.describe()
            assert 429 in statuses(resumed), outage.describe()

    def test_new_bucket_holds_no_more_than_its_allowance(self, outage):
        """The new Redis is empty: a fresh bucket, begun at the restart at the earliest."""
        for run in (outage.open_run, outage.closed_run):
            back = outage.back(run)
            admitted = [e for e in back if e.status == 200 and e.decided]
            most = OUTAGE_RATE + math.floor(
                OUTAGE_RATE * (max(e.received for e in back) - outage.marks["restart"])
                + CLOCK_SLACK
            )
            assert len(admitted) <= most, outage.describe()

    def test_scripts_are_loaded_again_transparently(self, outage):
        """The new Redis started with no script; the limiter's was loaded on NOSCRIPT, unseen."""
        assert [True] == outage.redis.scripts_exist(LuaScript("decide.lua").sha)
        # The first call on the new Redis met NOSCRIPT. Surfaced, it would be a 500 here
        # (a script error), or undecided answers once the store has probed (test above).
        back = outage.back(outage.open_run) + outage.back(outage.closed_run)
        assert set(statuses(back)) <= {200, 429, 503}, outage.describe()

    def test_each_instance_logs_the_outage_once(self, outage):
        """One warning when it began and one line when it ended, per instance, not per request."""
        for service in outage.cluster.services:
            events = [
                event["event"]
                for event in service.events()
                if event.get("feature") == "rate limits"
            ]
            assert [OUTAGE_EVENT, RECOVERY_EVENT] == events, service.describe()[-3000:]

    def test_fallbacks_are_counted(self, outage):
        """The instances count each request let through or refused without Redis, as seen."""
        services = outage.cluster.services
        failed_open = sum(
            scraped(s, "bastion_ratelimit_decisions_total", policy="open", decision="failed_open")
            for s in services
        )
        failed_closed = sum(
            scraped(
                s, "bastion_ratelimit_decisions_total", policy="default", decision="failed_closed"
            )
            for s in services
        )
        admitted_blind = [e for e in outage.open_run if e.status == 200 and not e.decided]
        refused = [e for e in outage.closed_run if e.status == 503]
        assert (len(admitted_blind), len(refused)) == (failed_open, failed_closed)

    def test_each_instance_counts_the_outage(self, outage):
        """Each instance counts a Redis outage (once per outage of any feature using Redis).

        Not ``== 1``: the counter is per dependency, and the circuit-state feature may
        see a Redis timeout of its own on a loaded machine; the rate-limit feature's
        single outage is pinned by its log lines above.
        """
        outages = [
            scraped(s, "bastion_dependency_outages_total", dependency="redis")
            for s in outage.cluster.services
        ]
        assert all(count >= 1 for count in outages), outages
