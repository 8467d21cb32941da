"""Tenant quotas and overrides: validation, metering on the request path, usage, operator routes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from tenancy_support import running

from bastion.identity._tables import tenants
from bastion.settings import TenantQuotaSettings
from bastion.tenancy._quotas import TenantQuotas, quota_limit, validate_overrides


def _attach(service) -> TenantQuotas:
    """The app's tenant quotas, which install() hooks into its rate limiter."""
    made = service.identity.tenant_quotas
    assert isinstance(made, TenantQuotas)
    assert service.app.state.bastion.ratelimit.tenants is made
    return made


def _rejections(quota: str) -> float:
    value = REGISTRY.get_sample_value("bastion_tenant_quota_rejections_total", {"quota": quota})
    return value or 0.0


class TestOverrides:
    def test_valid_overrides_keep_only_what_was_given(self):
        """Left-out quotas stay out (inherited); null stays null (unlimited)."""
        raw = {
            "quotas": {"members": None, "requests_per_day": 10},
            "ratelimit": {"default": "5/second"},
        }
        assert raw == validate_overrides(raw)

    @pytest.mark.parametrize(
        "raw",
        [
            {"quotas": {"requests_per_day": -1}},
            {"quotas": {"storage": 3}},
            {"ratelimit": {"default": "lots"}},
            {"flags": {}},
            [],
        ],
    )
    def test_invalid_overrides_are_refused(self, raw):
        """Unknown keys, negative quotas and unparsable limits are refused."""
        with pytest.raises(ValueError, match=r"."):
            validate_overrides(raw)

    def test_a_named_quota_replaces_the_setting_and_null_lifts_it(self):
        """quota_limit: override value, explicit null = unlimited, absent = the setting."""
        defaults = TenantQuotaSettings(requests_per_day=100, members=5)
        assert 7 == quota_limit(defaults, {"quotas": {"requests_per_day": 7}}, "requests_per_day")
        assert (
            quota_limit(defaults, {"quotas": {"requests_per_day": None}}, "requests_per_day")
            is None
        )
        assert 5 == quota_limit(defaults, {"quotas": {"requests_per_day": 7}}, "members")


class TestRequestPath:
    async def test_requests_per_day_stops_a_tenants_callers_only(self, database_url):
        """With 3 a day, a tenant's 4th request is 429 naming the quota; another tenant goes on."""
        async with running(database_url, tenancy={"quotas": {"requests_per_day": 3}}) as service:
            _attach(service)
            owner, other = await service.user(), await service.user()
            tenant, elsewhere = await service.tenant(owner), await service.tenant(other)
            headers = service.headers(owner, tenant)
            before = _rejections("requests_per_day")
            codes = [
                (await service.client.get(f"/v1/tenants/{tenant.id}", headers=headers)).status_code
                for _ in range(3)
            ]
            refused = await service.client.get(f"/v1/tenants/{tenant.id}", headers=headers)
            assert [200, 200, 200] == codes
            assert 429 == refused.status_code
            assert "QUOTA_EXCEEDED" == refused.json()["code"]
            assert "requests_per_day" == refused.json()["quota"]
            assert int(refused.headers["retry-after"]) > 0
            assert before + 1 == _rejections("requests_per_day")
            fine = await service.client.get(
                f"/v1/tenants/{elsewhere.id}", headers=service.headers(other, elsewhere)
            )
            assert 200 == fine.status_code

    async def test_api_calls_per_month_counts_api_keys_only(self, database_url):
        """An API key's third call is refused with 2 a month; the tenant's users go on."""
        async with running(database_url, tenancy={"quotas": {"api_calls_per_month": 2}}) as service:
            _attach(service)
            owner = await service.user()
            tenant = await service.tenant(owner)
            user_headers = service.headers(owner, tenant)
            created = await service.client.post(
                "/v1/api-keys", json={"name": "k", "scopes": ["tenant:read"]}, headers=user_headers
            )
            key_headers = {"Authorization": f"Bearer {created.json()['key']}"}
            path = f"/v1/tenants/{tenant.id}"
            codes = [
                (await service.client.get(path, headers=key_headers)).status_code for _ in range(3)
            ]
            assert [200, 200, 429] == codes
            refused = await service.client.get(path, headers=key_headers)
            assert "api_calls_per_month" == refused.json()["quota"]
            assert 200 == (await service.client.get(path, headers=user_headers)).status_code

    async def test_a_tenant_override_applies_once_forgotten(self, database_url):
        """A tenant's new override applies at once on the instance that forgets its cache."""
        async with running(database_url, tenancy={"quotas": {"requests_per_day": 1}}) as service:
            tenant_quotas = _attach(service)
            owner = await service.user()
            tenant = await service.tenant(owner)
            headers = service.headers(owner, tenant)
            path = f"/v1/tenants/{tenant.id}"
            assert 200 == (await service.client.get(path, headers=headers)).status_code
            assert 429 == (await service.client.get(path, headers=headers)).status_code
            async with service.identity.database.session() as session:
                await session.execute(
                    update(tenants)
                    .where(tenants.c.id == tenant.id)
                    .values(settings={"quotas": {"requests_per_day": None}})
                )
            tenant_quotas.forget(tenant.id)
            assert 200 == (await service.client.get(path, headers=headers)).status_code

    async def test_a_tenant_rate_limit_override_replaces_the_default(self, database_url):
        """A tenant with its own default limit is limited by it; others keep the setting."""
        async with running(database_url, ratelimit={"default": "100/minute"}) as service:
            _attach(service)
            owner, other = await service.user(), await service.user()
            tight = await service.tenant(owner, settings={"ratelimit": {"default": "2/minute"}})
            loose = await service.tenant(other)
            tight_codes = [
                (
                    await service.client.get(
                        f"/v1/tenants/{tight.id}", headers=service.headers(owner, tight)
                    )
                ).status_code
                for _ in range(3)
            ]
            loose_codes = [
                (
                    await service.client.get(
                        f"/v1/tenants/{loose.id}", headers=service.headers(other, loose)
                    )
                ).status_code
                for _ in range(3)
            ]
            assert [200, 200, 429] == tight_codes
            assert [200, 200, 200] == loose_codes

    async def test_usage_counts_what_requests_consumed(self, database_url):
        """TenantQuotas.usage reports used and remaining of the current periods."""
        async with running(database_url, tenancy={"quotas": {"requests_per_day": 10}}) as service:
            tenant_quotas = _attach(service)
            owner = await service.user()
            tenant = await service.tenant(owner)
            headers = service.headers(owner, tenant)
            for _ in range(2):
                await service.client.get(f"/v1/tenants/{tenant.id}", headers=headers)
            found = await tenant_quotas.usage(str(tenant.id), {})
            assert (10, 2, 8) == tuple(
                found["requests_per_day"][field] for field in ("limit", "used", "remaining")
            )
            # Unlimited, yet counted: usage is known for every tenant.
            assert found["api_calls_per_month"]["limit"] is None
            assert 0 == found["api_calls_per_month"]["used"]


class TestRedis:
    async def test_quota_and_limit_go_out_together_and_a_refused_limit_refunds(
        self, database_url, redis_url, redis_prefix
    ):
        """On Redis both calls are in flight at once; a request the limit refuses costs no quota."""
        async with running(
            database_url,
            redis={"url": redis_url, "key_prefix": redis_prefix},
            ratelimit={"store_url": redis_url, "default": "2/minute"},
            tenancy={"quotas": {"requests_per_day": 100}},
        ) as service:
            tenant_quotas = _attach(service)
            runner = service.app.state.bastion.ratelimit.store.runner
            in_flight = peak = 0
            run = runner.run

            async def counted(script, keys, args):
                nonlocal in_flight, peak
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await run(script, keys, args)
                finally:
                    in_flight -= 1

            runner.run = counted
            owner = await service.user()
            tenant = await service.tenant(owner)
            headers = service.headers(owner, tenant)
            codes = [
                (await service.client.get(f"/v1/tenants/{tenant.id}", headers=headers)).status_code
                for _ in range(3)
            ]
            assert [200, 200, 429] == codes
            assert 2 == peak
            found = await tenant_quotas.usage(str(tenant.id), {})
            assert 2 == found["requests_per_day"]["used"]


class TestOperatorRoutes:
    async def test_operators_list_usage_and_set_overrides(self, database_url):
        """GET /admin/tenants/usage pages through tenants; PATCH settings validates and applies."""
        async with running(database_url, tenancy={"quotas": {"requests_per_day": 1}}) as service:
            _attach(service)
            owner = await service.user()
            tenant = await service.tenant(owner)
            headers = service.headers(owner, tenant)
            path = f"/v1/tenants/{tenant.id}"
            await service.client.get(path, headers=headers)
            assert 429 == (await service.client.get(path, headers=headers)).status_code
            bad = await service.client.patch(
                f"/admin/tenants/{tenant.id}/settings", json={"quotas": {"requests_per_day": -5}}
            )
            assert 422 == bad.status_code
            good = await service.client.patch(
                f"/admin/tenants/{tenant.id}/settings", json={"quotas": {"requests_per_day": 5}}
            )
            assert 200 == good.status_code
            assert 200 == (await service.client.get(path, headers=headers)).status_code
            # The shared PostgreSQL database holds other tests' tenants: page until ours.
            entry, offset = None, 0
            while entry is None:
                page = await service.client.get(
                    "/admin/tenants/usage", params={"limit": 100, "offset": offset}
                )
                assert 200 == page.status_code, page.text
                listed = page.json()["tenants"]
                assert listed, "the tenant was not listed on any page"
                entry = next((each for each in listed if each["id"] == str(tenant.id)), None)
                offset += len(listed)
            assert 5 == entry["quotas"]["requests_per_day"]["limit"]
            assert 1 == entry["quotas"]["members"]["used"]
            too_big = await service.client.get("/admin/tenants/usage", params={"limit": 1000})
            assert 422 == too_big.status_code


async def test_plans_are_loaded_once_for_concurrent_requests(sqlite_url):
    """Concurrent first requests of one tenant share one read of its overrides."""
    async with running(sqlite_url) as service:
        tenant_quotas = _attach(service)
        owner = await service.user()
        tenant = await service.tenant(owner, settings={"quotas": {"requests_per_day": 9}})
        reads = 0
        read = tenant_quotas._overrides

        async def counted(tenant_id):
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.01)
            return await read(tenant_id)

        tenant_quotas._overrides = counted
        plans = await asyncio.gather(*(tenant_quotas.plan(str(tenant.id)) for _ in range(5)))
        assert 1 == reads
        assert {9} == {plan.user_counters[0].limit for plan in plans}


class TestRedisDown:
    @pytest.mark.parametrize(("fail_open", "expected"), [(True, 200), (False, 503)])
    async def test_quotas_follow_the_rate_limit_failure_rule(self, sqlite_url, fail_open, expected):
        """With Redis unreachable, a tenant's request is admitted uncounted, or refused 503."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        async with running(
            sqlite_url,
            ratelimit={"store_url": f"redis://127.0.0.1:{port}/0", "fail_open": fail_open},
            tenancy={"quotas": {"requests_per_day": 5}},
        ) as service:
            _attach(service)
            owner = await service.user()
            tenant = await service.tenant(owner)
            response = await service.client.get(
                f"/v1/tenants/{tenant.id}", headers=service.headers(owner, tenant)
            )
            assert expected == response.status_code
