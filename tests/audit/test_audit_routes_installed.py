"""``/admin/audit`` as ``bastion.install`` mounts it: behind the admin token and identity."""

from __future__ import annotations

import secrets

import bastion
from bastion.audit import AuditEvent, Resource
from bastion.testing import create_member, lifespan_client

TOKEN = "operator-token-" + "x" * 24
FAST_PASSWORDS = {"time_cost": 1, "memory_cost": 8}


def make_app(database_url: str, **http):
    return bastion.create_app(
        database={"url": database_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        http={"admin_token": TOKEN} | http,
        identity={"passwords": FAST_PASSWORDS},
        audit={"mode": "sync", "checkpoint_interval": 0},
    )


class TestInstalledRoutes:
    """The operator's token and a tenant admin's access token both reach the routes."""

    async def test_operator_and_tenant_admins_each_see_their_scope(self, database_url):
        """The operator reads every tenant; each tenant's admin only its own; a viewer nothing."""
        app = make_app(database_url)
        slug = secrets.token_hex(4)
        async with lifespan_client(app) as client:
            a = await create_member(
                app, tenant_slug=f"a-{slug}", email=f"a-{slug}@example.org", role="admin"
            )
            b = await create_member(
                app, tenant_slug=f"b-{slug}", email=f"b-{slug}@example.org", role="admin"
            )
            viewer = await create_member(
                app, tenant_slug=f"a-{slug}", email=f"v-{slug}@example.org", role="viewer"
            )
            log = app.state.bastion.audit.log
            log.register_actions({"document.update": "A document was changed."})
            ids = {
                tenant: await log.record(
                    AuditEvent(
                        action="document.update",
                        tenant_id=tenant,
                        resource=Resource("document", slug),
                    )
                )
                for tenant in (a.tenant_id, b.tenant_id)
            }
            params = {"resource_id": slug}

            operator = await client.get(
                "/admin/audit", params=params, headers={"authorization": f"Bearer {TOKEN}"}
            )
            as_a = await client.get("/admin/audit", params=params, headers=a.headers)
            as_b = await client.get(f"/admin/audit/entries/{ids[a.tenant_id]}", headers=b.headers)
            as_viewer = await client.get("/admin/audit", params=params, headers=viewer.headers)
            nobody = await client.get("/admin/audit", params=params)

        assert 200 == operator.status_code, operator.text
        assert {str(i) for i in ids.values()} == {item["id"] for item in operator.json()["items"]}
        assert 200 == as_a.status_code, as_a.text
        assert [str(ids[a.tenant_id])] == [item["id"] for item in as_a.json()["items"]]
        assert 404 == as_b.status_code
        assert 403 == as_viewer.status_code
        assert 401 == nobody.status_code

    async def test_loopback_does_not_lift_a_tenant_admin_without_token(self, database_url):
        """With no admin token, a tenant admin on an allowed network still sees only its tenant."""
        # The default http settings: loopback networks, no token; the client is 127.0.0.1.
        app = make_app(database_url, admin_token=None)
        slug = secrets.token_hex(4)
        async with lifespan_client(app) as client:
            a = await create_member(
                app, tenant_slug=f"a-{slug}", email=f"a-{slug}@example.org", role="admin"
            )
            b = await create_member(
                app, tenant_slug=f"b-{slug}", email=f"b-{slug}@example.org", role="admin"
            )
            log = app.state.bastion.audit.log
            log.register_actions({"document.update": "A document was changed."})
            ids = {
                tenant: await log.record(
                    AuditEvent(
                        action="document.update",
                        tenant_id=tenant,
                        resource=Resource("document", slug),
                    )
                )
                for tenant in (a.tenant_id, b.tenant_id)
            }
            params = {"resource_id": slug}

            as_a = await client.get("/admin/audit", params=params, headers=a.headers)
            into_b = await client.get(
                "/admin/audit", params=params | {"tenant": str(b.tenant_id)}, headers=a.headers
            )
            b_entry = await client.get(
                f"/admin/audit/entries/{ids[b.tenant_id]}", headers=a.headers
            )
            operator = await client.get("/admin/audit", params=params)

        assert 200 == as_a.status_code, as_a.text
        assert [str(ids[a.tenant_id])] == [item["id"] for item in as_a.json()["items"]]
        assert (403, 404) == (into_b.status_code, b_entry.status_code)
        assert 200 == operator.status_code, operator.text
        assert {str(i) for i in ids.values()} == {item["id"] for item in operator.json()["items"]}
