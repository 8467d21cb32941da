"""The permission cache: hits and misses, TTLs, invalidation across instances, Redis down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.context import RequestContext, bind, unbind
from bastion.identity._permission_cache import PermissionCache
from bastion.resilience import Degradation
from bastion.settings import AuthorizationSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """A loader backed by a dict, standing in for the memberships tables, counting calls."""

    def __init__(self, grants: dict[tuple[str, str], set[str]] | None = None) -> None:
        self.grants = grants if grants is not None else {("u1", "t1"): {"documents:read"}}
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, user_id: str, tenant_id: str) -> set[str]:
        self.calls += 1
        self.started.set()
        read = set(self.grants.get((user_id, tenant_id), set()))  # the database read
        if self.gate is not None:
            await self.gate.wait()
        return read


def samples(cache: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "bastion_cache_requests_total", {"cache": cache, "result": result}
    )
    return value or 0.0


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[Any]]:
    """Two Redis clients with their own pools, as two processes would have."""
    made = [redis_asyncio.from_url(redis_url, socket_timeout=1) for _ in range(2)]
    yield made
    for client in made:
        await client.aclose()


def make(loader: Any, client: Any, prefix: str, **kwargs: Any) -> PermissionCache:
    return PermissionCache(loader, redis=client, key_prefix=prefix, **kwargs)


class TestMemory:
    async def test_second_lookup_is_a_hit(self):
        """Without Redis, the loader runs once and the next lookup is served locally."""
        loader = Loader()
        cache = PermissionCache(loader)
        before = samples("permissions", "hit")
        assert frozenset({"documents:read"}) == await cache.permissions("u1", "t1")
        assert frozenset({"documents:read"}) == await cache.permissions("u1", "t1")
        assert 1 == loader.calls
        assert 1 == samples("permissions", "hit") - before

    async def test_expires_after_the_ttl(self):
        """A value older than permission_ttl is loaded again."""
        loader, clock = Loader(), FakeClock()
        cache = PermissionCache(loader, permission_ttl=300, clock=clock)
        await cache.permissions("u1", "t1")
        clock.now += 299
        await cache.permissions("u1", "t1")
        assert 1 == loader.calls
        clock.now += 2
        await cache.permissions("u1", "t1")
        assert 2 == loader.calls

    async def test_invalidation_drops_the_user(self):
        """invalidate_user drops that user's permissions only."""
        loader = Loader({("u1", "t1"): {"a:b"}, ("u2", "t1"): {"c:d"}})
        cache = PermissionCache(loader)
        await cache.permissions("u1", "t1")
        await cache.permissions("u2", "t1")
        loader.grants[("u1", "t1")] = {"x:y"}
        assert await cache.invalidate_user("u1", "t1")
        assert frozenset({"x:y"}) == await cache.permissions("u1", "t1")
        await cache.permissions("u2", "t1")
        assert 3 == loader.calls

    async def test_tenant_invalidation_drops_members_and_roles(self):
        """invalidate_tenant drops the tenant's roles and every member's permissions."""
        roles_calls = []

        async def roles(tenant_id: str | None) -> dict[str, set[str]]:
            roles_calls.append(tenant_id)
            return {"viewer": {"documents:read"}}

        loader = Loader({("u1", "t1"): {"a:b"}, ("u1", "t2"): {"a:b"}})
        cache = PermissionCache(loader, roles)
        assert {"viewer": frozenset({"documents:read"})} == await cache.roles("t1")
        await cache.permissions("u1", "t1")
        await cache.permissions("u1", "t2")
        await cache.invalidate_tenant("t1")
        await cache.roles("t1")
        await cache.permissions("u1", "t1")
        await cache.permissions("u1", "t2")
        assert ["t1", "t1"] == roles_calls
        assert 3 == loader.calls

    async def test_roles_expire_after_role_ttl(self):
        """Role definitions are kept for role_ttl, independently of permission_ttl."""
        calls = []

        async def roles(tenant_id: str | None) -> dict[str, set[str]]:
            calls.append(tenant_id)
            return {}

        clock = FakeClock()
        cache = PermissionCache(Loader(), roles, permission_ttl=10, role_ttl=600, clock=clock)
        await cache.roles()
        clock.now += 599
        await cache.roles()
        clock.now += 2
        await cache.roles()
        assert [None, None] == calls

    async def test_concurrent_misses_share_one_load(self):
        """The stampede guard: 50 concurrent misses of one key run the loader once."""
        loader = Loader()
        loader.gate = asyncio.Event()
        cache = PermissionCache(loader)
        lookups = [asyncio.create_task(cache.permissions("u1", "t1")) for _ in range(50)]
        await asyncio.sleep(0)
        loader.gate.set()
        results = await asyncio.gather(*lookups)
        assert 1 == loader.calls
        assert {frozenset({"documents:read"})} == set(results)

    async def test_load_overtaken_by_a_change_is_not_kept(self):
        """A load that began before an invalidation answers its caller but is not cached."""
        loader = Loader()
        loader.gate = asyncio.Event()
        cache = PermissionCache(loader)
        lookup = asyncio.create_task(cache.permissions("u1", "t1"))
        await loader.started.wait()  # the load has begun reading
        await cache.invalidate_user("u1", "t1")
        loader.gate.set()
        await lookup
        loader.gate = None
        await cache.permissions("u1", "t1")
        assert 2 == loader.calls

    async def test_lookup_after_a_change_does_not_join_an_older_load(self):
        """A lookup that starts after an invalidation runs its own load, not one begun before."""
        loader = Loader()
        loader.gate = asyncio.Event()
        cache = PermissionCache(loader)
        first = asyncio.create_task(cache.permissions("u1", "t1"))
        await loader.started.wait()
        loader.grants[("u1", "t1")] = {"x:y"}
        await cache.invalidate_user("u1", "t1")
        second = asyncio.create_task(cache.permissions("u1", "t1"))
        loader.gate.set()
        assert frozenset({"documents:read"}) == await first
        assert frozenset({"x:y"}) == await second
        assert 2 == loader.calls

    async def test_loader_failure_propagates_and_is_not_cached(self):
        """A failing loader fails the lookup; the next lookup tries again."""
        calls = []

        async def failing(user_id: str, tenant_id: str) -> set[str]:
            calls.append(user_id)
            raise RuntimeError("database down")

        cache = PermissionCache(failing)
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await cache.permissions("u1", "t1")
        assert 2 == len(calls)

    async def test_built_from_settings(self):
        """from_settings takes TTLs and the hit-rate threshold from identity.authorization."""
        section = AuthorizationSettings(permission_ttl=10, hit_rate_window=60)
        loader, clock = Loader(), FakeClock()
        cache = PermissionCache.from_settings(section, loader)
        cache._clock = clock
        await cache.permissions("u1", "t1")
        clock.now += 11
        await cache.permissions("u1", "t1")
        assert 2 == loader.calls

    def test_rejects_a_non_positive_ttl(self):
        """A TTL of zero is refused at construction."""
        with pytest.raises(ValueError, match="positive"):
            PermissionCache(Loader(), permission_ttl=0)


class TestHitRate:
    async def test_low_hit_rate_warns_once_per_window(self):
        """A window under hit_rate_warning logs one warning when it closes."""
        clock = FakeClock()
        cache = PermissionCache(Loader(), clock=clock, hit_rate_window=60, hit_rate_warning=0.7)
        with capture_logs() as logs:
            for n in range(120):
                await cache.permissions(f"u{n}", "t1")  # every lookup a miss
            clock.now += 61
            await cache.permissions("u0", "t1")
            await cache.permissions("u0", "t1")
        warnings = [e for e in logs if e["event"] == "cache hit rate low"]
        assert 1 == len(warnings)
        assert "permissions" == warnings[0]["cache"]
        assert 0.0 == warnings[0]["hit_rate"]

    async def test_high_hit_rate_and_small_windows_stay_quiet(self):
        """A good hit rate, or too few lookups to judge, logs nothing."""
        clock = FakeClock()
        cache = PermissionCache(Loader(), clock=clock, hit_rate_window=60)
        with capture_logs() as logs:
            for _ in range(200):
                await cache.permissions("u1", "t1")
            clock.now += 61
            for n in range(50):
                await cache.permissions(f"x{n}", "t1")
            clock.now += 61
            await cache.permissions("u1", "t1")
        assert [] == [e for e in logs if e["event"] == "cache hit rate low"]


class TestRedis:
    async def test_value_is_shared_between_instances(self, clients, redis_prefix):
        """Instance B is served what instance A loaded, without running its loader."""
        loader_a, loader_b = Loader(), Loader()
        a = make(loader_a, clients[0], redis_prefix)
        b = make(loader_b, clients[1], redis_prefix)
        assert frozenset({"documents:read"}) == await a.permissions("u1", "t1")
        assert frozenset({"documents:read"}) == await b.permissions("u1", "t1")
        assert (1, 0) == (loader_a.calls, loader_b.calls)

    async def test_shared_value_carries_the_ttl(self, clients, redis_prefix):
        """The shared value expires in Redis after permission_ttl."""
        cache = make(Loader(), clients[0], redis_prefix, permission_ttl=300)
        await cache.permissions("u1", "t1")
        keys = [k async for k in clients[0].scan_iter(match=redis_prefix + "authz:p:*")]
        assert 1 == len(keys)
        assert 290 <= await clients[0].ttl(keys[0]) <= 300

    async def test_invalidation_is_seen_by_the_other_instance_on_its_next_lookup(
        self, clients, redis_prefix
    ):
        """A change on A is seen by B's very next lookup, with no wait (verify_every_request)."""
        grants = {("u1", "t1"): {"documents:read"}}
        a = make(Loader(grants), clients[0], redis_prefix)
        b = make(Loader(grants), clients[1], redis_prefix)
        async with a, b:
            assert frozenset({"documents:read"}) == await b.permissions("u1", "t1")
            assert frozenset({"documents:read"}) == await b.permissions("u1", "t1")
            grants[("u1", "t1")] = {"documents:write"}
            assert await a.invalidate_user("u1", "t1")
            assert frozenset({"documents:write"}) == await b.permissions("u1", "t1")

    @pytest.mark.parametrize("scope", ["tenant", "all"])
    async def test_wider_invalidations_reach_the_other_instance(self, clients, redis_prefix, scope):
        """Tenant-wide and global invalidations are seen by the other instance too."""
        grants = {("u1", "t1"): {"a:b"}}
        a = make(Loader(grants), clients[0], redis_prefix)
        b = make(Loader(grants), clients[1], redis_prefix)
        await b.permissions("u1", "t1")
        grants[("u1", "t1")] = {"c:d"}
        if scope == "tenant":
            await a.invalidate_tenant("t1")
        else:
            await a.invalidate_all()
        assert frozenset({"c:d"}) == await b.permissions("u1", "t1")

    async def test_pubsub_reaches_the_other_instance_without_verification(
        self, clients, redis_prefix
    ):
        """With verify_every_request off, B drops its local value when A's message arrives."""
        grants = {("u1", "t1"): {"a:b"}}
        a = make(Loader(grants), clients[0], redis_prefix, verify_every_request=False)
        b = make(Loader(grants), clients[1], redis_prefix, verify_every_request=False, local_ttl=60)
        async with a, b:
            await b.permissions("u1", "t1")
            grants[("u1", "t1")] = {"c:d"}
            await a.invalidate_user("u1", "t1")
            # Real time, bounded: pub/sub delivery is what this test measures.
            async with asyncio.timeout(2):
                # Polling is the point (ASYNC110): the lookup itself is what must change.
                while (await b.permissions("u1", "t1")) != frozenset({"c:d"}):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)

    async def test_listener_resubscribes_after_its_connection_dies(
        self, clients, redis_url, redis_prefix
    ):
        """A killed subscriber connection is replaced; later changes arrive again."""
        name = "bastion-test-" + redis_prefix.replace(":", "-")
        b_client = redis_asyncio.from_url(redis_url, client_name=name)
        grants = {("u1", "t1"): {"a:b"}}
        a = make(Loader(grants), clients[0], redis_prefix)
        b = make(
            Loader(grants),
            b_client,
            redis_prefix,
            verify_every_request=False,
            local_ttl=60,
            retry_after=0.05,
        )
        try:
            async with a, b:
                listed = await clients[0].client_list(_type="pubsub")
                ids = [c["id"] for c in listed if c.get("name") == name]
                assert 1 == len(ids)
                await clients[0].client_kill_filter(_id=ids[0])

                # Real time, bounded: the listener notices the dead socket and resubscribes.
                async def resubscribed() -> bool:
                    listed = await clients[0].client_list(_type="pubsub")
                    return any(c.get("name") == name and c["id"] != ids[0] for c in listed)

                async with asyncio.timeout(3):
                    while not await resubscribed():  # noqa: ASYNC110 -- polling Redis is the point
                        await asyncio.sleep(0.01)
                await b.permissions("u1", "t1")
                grants[("u1", "t1")] = {"c:d"}
                await a.invalidate_user("u1", "t1")
                async with asyncio.timeout(2):
                    while (await b.permissions("u1", "t1")) != frozenset({"c:d"}):  # noqa: ASYNC110 -- as above
                        await asyncio.sleep(0.005)
        finally:
            await b_client.aclose()

    async def test_local_ttl_bounds_a_lost_message(self, clients, redis_prefix):
        """Without verification and without a listener, a value is re-checked after local_ttl."""
        grants = {("u1", "t1"): {"a:b"}}
        clock = FakeClock()
        a = make(Loader(grants), clients[0], redis_prefix)
        b = make(
            Loader(grants),
            clients[1],
            redis_prefix,
            verify_every_request=False,
            local_ttl=1.0,
            clock=clock,
        )
        await b.permissions("u1", "t1")  # b never started: it gets no messages
        grants[("u1", "t1")] = {"c:d"}
        await a.invalidate_user("u1", "t1")
        assert frozenset({"a:b"}) == await b.permissions("u1", "t1")
        clock.now += 1.5
        assert frozenset({"c:d"}) == await b.permissions("u1", "t1")

    async def test_roles_are_shared_and_invalidated(self, clients, redis_prefix):
        """Role definitions are shared between instances and a tenant change reloads them."""
        definitions = {"viewer": {"documents:read"}}

        async def roles(tenant_id: str | None) -> dict[str, set[str]]:
            return definitions

        a = PermissionCache(Loader(), roles, redis=clients[0], key_prefix=redis_prefix)
        b = PermissionCache(Loader(), roles, redis=clients[1], key_prefix=redis_prefix)
        assert {"viewer": frozenset({"documents:read"})} == await b.roles("t1")
        definitions = {"viewer": {"documents:read", "comments:read"}}
        await a.invalidate_tenant("t1")
        assert {"viewer": frozenset({"documents:read", "comments:read"})} == await b.roles("t1")

    async def test_concurrent_misses_share_one_load(self, clients, redis_prefix):
        """The stampede guard holds with Redis too: one load per key per process."""
        loader = Loader()
        loader.gate = asyncio.Event()
        cache = make(loader, clients[0], redis_prefix)
        lookups = [asyncio.create_task(cache.permissions("u1", "t1")) for _ in range(20)]
        for _ in range(20):  # let every lookup pass its MGET
            await asyncio.sleep(0.001)
        loader.gate.set()
        await asyncio.gather(*lookups)
        assert 1 == loader.calls

    async def test_concurrent_lookups_are_batched_and_each_gets_its_own(
        self, clients, redis_prefix, monkeypatch
    ):
        """Concurrent lookups share round trips (one in flight), each gets its own value."""
        grants = {(f"u{n}", "t1"): {f"doc{n}:read"} for n in range(40)}
        cache = make(Loader(grants), clients[0], redis_prefix)
        for n in range(40):  # warm: every value shared
            await cache.permissions(f"u{n}", "t1")
        cache.clear_local()
        calls = []
        original = clients[0].mget

        async def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return await original(*args, **kwargs)

        monkeypatch.setattr(clients[0], "mget", counting)
        results = await asyncio.gather(*(cache.permissions(f"u{n}", "t1") for n in range(40)))
        assert [frozenset({f"doc{n}:read"}) for n in range(40)] == results
        assert 1 == len(calls)  # the first alone; the other 39 went in pipelines

    async def test_batched_lookups_fall_back_together(self, redis_prefix):
        """When a batched round trip fails, every waiting lookup falls back to the loader."""
        client = redis_asyncio.from_url(
            "redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2
        )
        loader = Loader({(f"u{n}", "t1"): {"a:b"} for n in range(10)})
        cache = make(loader, client, redis_prefix, timeout=1.0)
        results = await asyncio.gather(*(cache.permissions(f"u{n}", "t1") for n in range(10)))
        assert [frozenset({"a:b"})] * 10 == results
        assert 10 == loader.calls
        await cache.aclose()
        await client.aclose()

    async def test_one_round_trip_per_request(self, clients, redis_prefix, monkeypatch):
        """Checks within one request share one answer; the next request reads Redis again."""
        cache = make(Loader(), clients[0], redis_prefix)
        calls = []
        original = clients[0].mget

        async def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return await original(*args, **kwargs)

        monkeypatch.setattr(clients[0], "mget", counting)
        for request_id in ("r1", "r2"):
            token = bind(RequestContext(request_id=request_id))
            try:
                for _ in range(3):
                    await cache.permissions("u1", "t1")
            finally:
                unbind(token)
        assert 2 == len(calls)

    async def test_a_request_sees_its_own_invalidation(self, clients, redis_prefix):
        """A request that changes roles and checks again sees the change."""
        grants = {("u1", "t1"): {"a:b"}}
        cache = make(Loader(grants), clients[0], redis_prefix)
        token = bind(RequestContext(request_id="r1"))
        try:
            await cache.permissions("u1", "t1")
            grants[("u1", "t1")] = {"c:d"}
            await cache.invalidate_user("u1", "t1")
            assert frozenset({"c:d"}) == await cache.permissions("u1", "t1")
        finally:
            unbind(token)

    async def test_unreadable_shared_value_is_reloaded(self, clients, redis_prefix):
        """A shared value this release cannot read is replaced, not an error."""
        loader = Loader()
        cache = make(loader, clients[0], redis_prefix)
        await cache.permissions("u1", "t1")
        keys = [k async for k in clients[0].scan_iter(match=redis_prefix + "authz:p:*")]
        await clients[0].set(keys[0], b"not json")
        cache.clear_local()
        assert frozenset({"documents:read"}) == await cache.permissions("u1", "t1")
        assert 2 == loader.calls

    async def test_ping(self, clients, redis_prefix):
        """ping answers True with Redis up."""
        assert await make(Loader(), clients[0], redis_prefix).ping()


class TestRedisDown:
    @pytest.fixture
    async def down(self) -> AsyncIterator[Any]:
        client = redis_asyncio.from_url(
            "redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2
        )
        yield client
        await client.aclose()

    async def test_loader_answers_and_the_outage_is_logged_once(self, down):
        """With Redis unreachable every lookup goes to the loader; one warning per outage."""
        loader, clock = Loader(), FakeClock()
        cache = PermissionCache(loader, redis=down, clock=clock)
        with capture_logs() as logs:
            for _ in range(3):
                assert frozenset({"documents:read"}) == await cache.permissions("u1", "t1")
                clock.now += 2  # past retry_after: Redis is tried again each time
        assert 3 == loader.calls
        outages = [e for e in logs if e["event"] == "dependency unavailable: running degraded"]
        assert 1 == len(outages)
        assert "permission cache" == outages[0]["feature"]
        await cache.aclose()

    async def test_redis_is_left_alone_for_retry_after(self, down, monkeypatch):
        """After a failure, lookups skip Redis for retry_after seconds instead of timing out."""
        loader, clock = Loader(), FakeClock()
        cache = PermissionCache(loader, redis=down, clock=clock, retry_after=1.0)
        calls = []
        original = down.mget

        async def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            return await original(*args, **kwargs)

        monkeypatch.setattr(down, "mget", counting)
        for _ in range(5):
            await cache.permissions("u1", "t1")
        assert 1 == len(calls)
        await cache.aclose()

    async def test_invalidation_reports_it_was_not_shared(self, down):
        """An invalidation that cannot reach Redis returns False and logs a warning."""
        cache = PermissionCache(Loader(), redis=down)
        with capture_logs() as logs:
            assert not await cache.invalidate_user("u1", "t1")
        assert any(e["event"].startswith("permission change not shared") for e in logs)
        assert not await cache.ping()

    async def test_slow_redis_times_out_to_the_loader(self, clients, redis_prefix, monkeypatch):
        """A round trip slower than timeout falls back to the loader."""
        loader = Loader()
        cache = make(loader, clients[0], redis_prefix, timeout=0.01)

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(1)

        monkeypatch.setattr(clients[0], "mget", slow)
        assert frozenset({"documents:read"}) == await cache.permissions("u1", "t1")
        assert 1 == loader.calls
        await cache.aclose()


def test_degradation_is_the_shared_type():
    """The cache reports outages through bastion.resilience.Degradation."""
    cache = PermissionCache(Loader())
    assert isinstance(cache._degradation, Degradation)
