"""``/admin/features``, ``/admin/segments`` and ``GET /api/features``, as install mounts them."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import threading

import pytest

import bastion
from bastion.audit import Actor
from bastion.flags import _routes
from bastion.testing import create_member, lifespan_client

TOKEN = secrets.token_urlsafe(32)
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
FAST_PASSWORDS = {"time_cost": 1, "memory_cost": 8}


def make_app(database_url: str, **flags):
    return bastion.create_app(
        database={"url": database_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        http={"admin_token": TOKEN},
        identity={"passwords": FAST_PASSWORDS},
        audit={"mode": "sync", "checkpoint_interval": 0},
        flags={"store_url": "memory://", **flags},
    )


@pytest.fixture
async def client(sqlite_url):
    """An operator's client of an app on its own SQLite file."""
    app = make_app(sqlite_url)
    async with lifespan_client(app, headers=OPERATOR) as c:
        c.app = app
        yield c


def unique(prefix: str = "f") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def beta(key: str, **fields):
    """A flag on for tenant ``acme`` only."""
    return {
        "key": key,
        "enabled": True,
        "rules": [
            {
                "id": "acme",
                "constraints": [{"context": "tenantId", "operator": "IN", "values": ["acme"]}],
            }
        ],
        **fields,
    }


async def create(client, flag) -> str:
    response = await client.post("/admin/features", json=flag)
    assert 201 == response.status_code, response.text
    return response.headers["etag"]


class TestCreateAndRead:
    async def test_create_answers_201_with_etag_and_location(self, client):
        """A new flag is 201 with its ETag and Location; GET gives the same ETag and body."""
        key = unique()
        response = await client.post("/admin/features", json=beta(key))
        assert 201 == response.status_code, response.text
        assert f"/admin/features/{key}" == response.headers["location"]
        read = await client.get(f"/admin/features/{key}")
        assert (200, response.headers["etag"]) == (read.status_code, read.headers["etag"])
        body = read.json()
        assert (key, True, 1) == (body["flag"]["key"], body["flag"]["enabled"], body["version"])
        assert body["updated_by"].endswith("operator")

    async def test_list_names_every_flag_with_version_and_etag(self, client):
        """The list carries each flag's version and ETag."""
        keys = sorted([unique(), unique()])
        etags = [await create(client, beta(key)) for key in keys]
        listed = {
            item["flag"]["key"]: item
            for item in (await client.get("/admin/features")).json()["flags"]
        }
        assert etags == [listed[key]["etag"] for key in keys]
        assert [1, 1] == [listed[key]["version"] for key in keys]

    async def test_taken_key_is_409(self, client):
        """Creating a key that exists is CONFLICT, the stored flag untouched."""
        key = unique()
        await create(client, beta(key))
        response = await client.post("/admin/features", json=beta(key, description="again"))
        assert (409, "CONFLICT") == (response.status_code, response.json()["code"])
        assert "" == (await client.get(f"/admin/features/{key}")).json()["flag"]["description"]

    async def test_invalid_flag_is_422_with_field_errors(self, client):
        """A string flag without variants and an unknown member are reported by field."""
        response = await client.post(
            "/admin/features", json={"key": unique(), "type": "string", "colour": "red"}
        )
        assert (422, "INVALID_INPUT") == (response.status_code, response.json()["code"])
        fields = {error["field"] for error in response.json()["errors"]}
        assert "body.colour" in fields

    async def test_body_that_is_not_json_is_a_problem(self, client):
        """Garbage is a 422 problem naming the body, never a 500 (the request guard's)."""
        response = await client.post(
            "/admin/features", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert 422 == response.status_code
        assert response.headers["content-type"].startswith("application/problem+json")
        assert [("body", "json_invalid")] == [
            (e["field"], e["code"]) for e in response.json()["errors"]
        ]

    async def test_oversized_body_is_413(self, client):
        """A flag document beyond 1 MiB is PAYLOAD_TOO_LARGE, read no further."""
        response = await client.post(
            "/admin/features", json={"key": unique(), "description": "x" * (1 << 20)}
        )
        assert (413, "PAYLOAD_TOO_LARGE") == (response.status_code, response.json()["code"])

    async def test_unknown_flag_is_404(self, client):
        """Reading, replacing and toggling a missing flag are 404 NOT_FOUND."""
        key = unique()
        headers = {"if-match": '"1.x"'}
        answers = [
            await client.get(f"/admin/features/{key}"),
            await client.put(f"/admin/features/{key}", json=beta(key), headers=headers),
            await client.post(
                f"/admin/features/{key}/toggle", json={"enabled": True}, headers=headers
            ),
        ]
        assert [404, 404, 404] == [answer.status_code for answer in answers]
        assert {"NOT_FOUND"} == {answer.json()["code"] for answer in answers}

    async def test_if_none_match_revalidates(self, client):
        """GET with the current ETag in If-None-Match is 304."""
        key = unique()
        etag = await create(client, beta(key))
        response = await client.get(f"/admin/features/{key}", headers={"if-none-match": etag})
        assert 304 == response.status_code

    async def test_operators_only(self, client):
        """Without the admin token the routes answer 401, whatever the method."""
        key = unique()
        await create(client, beta(key))
        anonymous = {"authorization": ""}
        answers = [
            await client.get("/admin/features", headers=anonymous),
            await client.post("/admin/features", json=beta(unique()), headers=anonymous),
            await client.get(f"/admin/features/{key}", headers={"authorization": "Bearer wrong"}),
        ]
        assert [401, 401, 401] == [answer.status_code for answer in answers]


class TestConditionalWrites:
    async def test_put_without_if_match_is_428(self, client):
        """PUT, DELETE and toggle without If-Match are PRECONDITION_REQUIRED and change nothing."""
        key = unique()
        await create(client, beta(key))
        answers = [
            await client.put(f"/admin/features/{key}", json=beta(key, description="x")),
            await client.delete(f"/admin/features/{key}"),
            await client.post(f"/admin/features/{key}/toggle", json={"enabled": False}),
        ]
        assert [428] * 3 == [answer.status_code for answer in answers]
        assert {"PRECONDITION_REQUIRED"} == {answer.json()["code"] for answer in answers}
        assert 1 == (await client.get(f"/admin/features/{key}")).json()["version"]

    async def test_put_with_current_etag_replaces(self, client):
        """PUT with the current ETag replaces the flag and answers its new ETag."""
        key = unique()
        etag = await create(client, beta(key))
        response = await client.put(
            f"/admin/features/{key}",
            json=beta(key, description="now with a description"),
            headers={"if-match": etag},
        )
        assert 200 == response.status_code, response.text
        assert etag != response.headers["etag"]
        body = (await client.get(f"/admin/features/{key}")).json()
        assert (2, "now with a description") == (body["version"], body["flag"]["description"])

    async def test_get_envelope_round_trips_through_put(self, client):
        """The body GET answers can be sent back to PUT as it is."""
        key = unique()
        await create(client, beta(key))
        read = await client.get(f"/admin/features/{key}")
        envelope = read.json()
        envelope["flag"]["owner"] = "team-a"
        response = await client.put(
            f"/admin/features/{key}", json=envelope, headers={"if-match": read.headers["etag"]}
        )
        assert 200 == response.status_code, response.text
        assert "team-a" == response.json()["flag"]["owner"]

    async def test_two_admins_racing_one_gets_412(self, client):
        """Of two admins who read the same version, the second write is 412 with the new ETag."""
        key = unique()
        etag = await create(client, beta(key))
        first = await client.put(
            f"/admin/features/{key}",
            json=beta(key, description="first"),
            headers={"if-match": etag},
        )
        second = await client.put(
            f"/admin/features/{key}",
            json=beta(key, description="second"),
            headers={"if-match": etag},
        )
        assert 200 == first.status_code, first.text
        assert (412, "PRECONDITION_FAILED") == (second.status_code, second.json()["code"])
        assert first.headers["etag"] == second.headers["etag"]
        assert 2 == second.json()["current_version"]
        assert "first" == (await client.get(f"/admin/features/{key}")).json()["flag"]["description"]

    async def test_concurrent_writes_with_one_etag_commit_once(self, client):
        """Writes sent together with the same ETag: exactly one commits, the others are 412."""
        key = unique()
        etag = await create(client, beta(key))
        answers = await asyncio.gather(
            *(
                client.put(
                    f"/admin/features/{key}",
                    json=beta(key, description=f"writer {n}"),
                    headers={"if-match": etag},
                )
                for n in range(4)
            )
        )
        assert [200, 412, 412, 412] == sorted(answer.status_code for answer in answers)
        assert 2 == (await client.get(f"/admin/features/{key}")).json()["version"]

    async def test_toggle_and_delete_with_etag(self, client):
        """Toggle with the current ETag switches the flag; DELETE with the next ETag removes it."""
        key = unique()
        etag = await create(client, beta(key))
        toggled = await client.post(
            f"/admin/features/{key}/toggle", json={"enabled": False}, headers={"if-match": etag}
        )
        assert (200, False) == (toggled.status_code, toggled.json()["flag"]["enabled"])
        stale = await client.delete(f"/admin/features/{key}", headers={"if-match": etag})
        assert 412 == stale.status_code
        deleted = await client.delete(
            f"/admin/features/{key}", headers={"if-match": toggled.headers["etag"]}
        )
        assert 204 == deleted.status_code
        assert 404 == (await client.get(f"/admin/features/{key}")).status_code

    async def test_toggle_needs_a_boolean(self, client):
        """``{"enabled": "yes"}`` is 422 on body.enabled."""
        key = unique()
        etag = await create(client, beta(key))
        response = await client.post(
            f"/admin/features/{key}/toggle", json={"enabled": "yes"}, headers={"if-match": etag}
        )
        assert (422, ["body.enabled"]) == (
            response.status_code,
            [error["field"] for error in response.json()["errors"]],
        )

    async def test_put_key_must_match_the_path(self, client):
        """A body naming another key is 422, not a rename."""
        key = unique()
        etag = await create(client, beta(key))
        response = await client.put(
            f"/admin/features/{key}", json=beta(unique()), headers={"if-match": etag}
        )
        assert (422, ["body.key"]) == (
            response.status_code,
            [error["field"] for error in response.json()["errors"]],
        )


class TestEvaluateAndHistory:
    async def test_evaluate_explains_the_matching_rule(self, client):
        """Evaluate with a context in snake_case names reports the value, reason and rule."""
        key = unique()
        await create(client, beta(key))
        response = await client.post(
            f"/admin/features/{key}/evaluate", json={"context": {"tenant_id": "acme"}}
        )
        assert 200 == response.status_code, response.text
        evaluation = response.json()["evaluation"]
        assert (True, "TARGETING_MATCH", "acme") == (
            evaluation["value"],
            evaluation["reason"],
            evaluation["rule"],
        )
        assert response.json()["steps"]

    async def test_evaluate_takes_unleash_context(self, client):
        """Unleash's context shape (``properties``) is read as well."""
        key = unique()
        await create(client, beta(key))
        matched = await client.post(
            f"/admin/features/{key}/evaluate",
            json={"context": {"properties": {"tenantId": "acme"}}},
        )
        missed = await client.post(
            f"/admin/features/{key}/evaluate",
            json={"context": {"userId": "u-1", "tenantId": "zeta"}},
        )
        assert True is matched.json()["evaluation"]["value"]
        assert (False, "DEFAULT") == (
            missed.json()["evaluation"]["value"],
            missed.json()["evaluation"]["reason"],
        )

    async def test_evaluate_bad_context_is_422_and_unknown_flag_404(self, client):
        """A malformed context is 422 naming the field; an unknown flag is 404."""
        key = unique()
        await create(client, beta(key))
        bad = await client.post(f"/admin/features/{key}/evaluate", json={"context": {"roles": 3}})
        missing = await client.post(f"/admin/features/{unique()}/evaluate", json={})
        assert (422, ["body.context.roles"]) == (
            bad.status_code,
            [error["field"] for error in bad.json()["errors"]],
        )
        assert 404 == missing.status_code

    async def test_history_lists_changes_newest_first(self, client):
        """Create then toggle: two changes, newest first, by the operator, before and after."""
        key = unique()
        etag = await create(client, beta(key))
        await client.post(
            f"/admin/features/{key}/toggle", json={"enabled": False}, headers={"if-match": etag}
        )
        response = await client.get(f"/admin/features/{key}/history")
        items = response.json()["items"]
        assert ["toggle", "create"] == [item["action"] for item in items]
        assert [2, 1] == [item["version"] for item in items]
        assert (True, False) == (items[0]["before"]["enabled"], items[0]["after"]["enabled"])
        assert None is items[1]["before"]
        assert all(item["actor"].endswith("operator") for item in items)

    async def test_history_limit_is_checked(self, client):
        """``limit`` out of range is 422 on query.limit; a never-written key is 404."""
        key = unique()
        await create(client, beta(key))
        bad = await client.get(f"/admin/features/{key}/history", params={"limit": "0"})
        never = await client.get(f"/admin/features/{unique()}/history")
        assert (422, 404) == (bad.status_code, never.status_code)


class TestImportExport:
    async def test_bastion_round_trip(self, client, tmp_path):
        """An export imported into another app (replace) gives the same flags and segments."""
        await client.put(
            "/admin/segments/staff",
            json={"constraints": [{"context": "roles", "operator": "IN", "values": ["admin"]}]},
        )
        keys = sorted([unique(), unique()])
        await create(client, beta(keys[0], client_visible=True))
        await create(client, {"key": keys[1], "enabled": True, "rules": [{"segments": ["staff"]}]})
        exported = await client.get("/admin/features/export")
        assert 200 == exported.status_code, exported.text
        document = exported.json()

        other = make_app(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
        async with lifespan_client(other, headers=OPERATOR) as second:
            imported = await second.post("/admin/features/import?mode=replace", json=document)
            assert 200 == imported.status_code, imported.text
            again = (await second.get("/admin/features/export")).json()
        assert document["flags"] == again["flags"]
        assert document["segments"] == again["segments"]

    async def test_unleash_round_trip_evaluates_alike(self, client, tmp_path):
        """Exported as an Unleash state and imported elsewhere, the flag answers the same."""
        key = unique()
        await create(client, beta(key))
        state = (await client.get("/admin/features/export", params={"format": "unleash"})).json()
        assert [key] == [feature["name"] for feature in state["features"]]

        other = make_app(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
        async with lifespan_client(other, headers=OPERATOR) as second:
            imported = await second.post("/admin/features/import", json=state)
            assert 200 == imported.status_code, imported.text
            answers = [
                (
                    await second.post(
                        f"/admin/features/{key}/evaluate", json={"context": {"tenantId": tenant}}
                    )
                ).json()["evaluation"]["value"]
                for tenant in ("acme", "zeta")
            ]
        assert [True, False] == answers

    async def test_invalid_import_is_422_and_writes_nothing(self, client):
        """A document with one bad flag is refused whole, its position named."""
        good, bad = unique(), unique()
        response = await client.post(
            "/admin/features/import",
            json={"flags": [{"key": good}, {"key": bad, "type": "number"}]},
        )
        assert 422 == response.status_code
        assert any(error["field"].startswith("body.flags.1") for error in response.json()["errors"])
        assert 404 == (await client.get(f"/admin/features/{good}")).status_code

    async def test_export_format_and_import_mode_are_checked(self, client):
        """Unknown ``format`` and ``mode`` are 422 on the query parameter."""
        export = await client.get("/admin/features/export", params={"format": "xml"})
        imported = await client.post("/admin/features/import?mode=wipe", json={"flags": []})
        assert ["query.format"] == [error["field"] for error in export.json()["errors"]]
        assert ["query.mode"] == [error["field"] for error in imported.json()["errors"]]

    async def test_a_flag_keyed_export_is_reachable_for_writes(self, client):
        """``export`` is reserved for GET only: the flag of that key is still changed by PUT."""
        etag = await create(client, {"key": "export", "enabled": False})
        response = await client.put(
            "/admin/features/export",
            json={"key": "export", "enabled": True},
            headers={"if-match": etag},
        )
        assert (200, True) == (response.status_code, response.json()["flag"]["enabled"])


def segment(description: str = "") -> dict:
    return {
        "description": description,
        "constraints": [{"context": "tenantId", "operator": "IN", "values": ["acme"]}],
    }


class TestSegments:
    async def test_segment_lifecycle(self, client):
        """PUT creates (201); changing needs If-Match; deleting one in use is 409."""
        name = unique("seg")
        body = {"constraints": [{"context": "tenantId", "operator": "IN", "values": ["acme"]}]}
        created = await client.put(f"/admin/segments/{name}", json=body)
        assert 201 == created.status_code, created.text
        unconditional = await client.put(f"/admin/segments/{name}", json=body)
        assert 428 == unconditional.status_code
        updated = await client.put(
            f"/admin/segments/{name}",
            json={**body, "description": "acme only"},
            headers={"if-match": created.headers["etag"]},
        )
        assert (200, 2) == (updated.status_code, updated.json()["version"])

        key = unique()
        await create(client, {"key": key, "enabled": True, "rules": [{"segments": [name]}]})
        in_use = await client.delete(
            f"/admin/segments/{name}", headers={"if-match": updated.headers["etag"]}
        )
        assert (409, "CONFLICT") == (in_use.status_code, in_use.json()["code"])
        listed = (await client.get("/admin/segments")).json()["segments"]
        assert [name] == [
            item["segment"]["name"] for item in listed if item["segment"]["name"] == name
        ]

    async def test_flag_citing_an_unknown_segment_is_422(self, client):
        """A rule naming a segment that does not exist is refused."""
        response = await client.post(
            "/admin/features", json={"key": unique(), "rules": [{"segments": ["ghost"]}]}
        )
        assert (422, "INVALID_INPUT") == (response.status_code, response.json()["code"])


class TestClientRoute:
    async def test_only_client_visible_flags_evaluated_for_the_caller(self, sqlite_url):
        """Front ends get client-visible flags only, evaluated with the caller's roles."""
        app = make_app(sqlite_url)
        async with lifespan_client(app) as client:
            admin = await create_member(
                app, tenant_slug=unique("t"), email=f"{unique()}@example.org", role="admin"
            )
            viewer = await create_member(
                app, tenant_slug=unique("t"), email=f"{unique()}@example.org", role="viewer"
            )
            roles = [{"context": "roles", "operator": "IN", "values": ["admin"]}]
            for flag in (
                {
                    "key": "for-admins",
                    "enabled": True,
                    "client_visible": True,
                    "rules": [{"constraints": roles}],
                },
                {"key": "server-only", "enabled": True},
            ):
                assert (
                    201
                    == (
                        await client.post("/admin/features", json=flag, headers=OPERATOR)
                    ).status_code
                )
            as_admin = await client.get("/api/features", headers=admin.headers)
            as_viewer = await client.get("/api/features", headers=viewer.headers)
            anonymous = await client.get("/api/features")
        assert 200 == as_admin.status_code, as_admin.text
        assert {"for-admins": {"enabled": True, "variant": None, "value": True}} == as_admin.json()[
            "flags"
        ]
        assert {"enabled": False, "variant": None, "value": False} == as_viewer.json()["flags"][
            "for-admins"
        ]
        assert ["for-admins"] == list(anonymous.json()["flags"])

    async def test_etag_and_304(self, client):
        """The body's ETag revalidates with 304 until a flag the caller sees changes."""
        key = unique()
        etag = await create(client, {"key": key, "enabled": True, "client_visible": True})
        first = await client.get("/api/features")
        assert first.headers["cache-control"] == "private, no-cache"
        assert "Authorization" in first.headers["vary"]
        unchanged = await client.get(
            "/api/features", headers={"if-none-match": first.headers["etag"]}
        )
        assert 304 == unchanged.status_code
        await client.post(
            f"/admin/features/{key}/toggle", json={"enabled": False}, headers={"if-match": etag}
        )
        changed = await client.get(
            "/api/features", headers={"if-none-match": first.headers["etag"]}
        )
        assert 200 == changed.status_code
        assert first.headers["etag"] != changed.headers["etag"]

    async def test_route_can_be_moved_or_removed(self, tmp_path):
        """``flags.client_route`` moves the route; ``None`` removes it; admin routes can go too."""
        moved = make_app(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", client_route="/v1/features")
        removed = make_app(
            f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", client_route=None, admin_routes=False
        )
        async with lifespan_client(moved) as client:
            assert 200 == (await client.get("/v1/features")).status_code
            assert 404 == (await client.get("/api/features")).status_code
        async with lifespan_client(removed, headers=OPERATOR) as client:
            assert 404 == (await client.get("/api/features")).status_code
            assert 404 == (await client.get("/admin/features")).status_code

    async def test_client_route_is_documented(self, client):
        """The OpenAPI document describes the client route; the admin routes stay out of it."""
        schema = (await client.get("/openapi.json")).json()
        assert "get" in schema["paths"]["/api/features"]
        assert not any(path.startswith("/admin/features") for path in schema["paths"])


@pytest.fixture
def private_postgres(postgres_url, scratch_postgres):
    """A PostgreSQL database of this test's own.

    Not the session's: audit subject keys other tests stored there are wrapped
    under their apps' development keys, which this app cannot unwrap.
    """
    with scratch_postgres(f"flags_routes_{secrets.token_hex(4)}") as url:
        yield url


class TestPostgres:
    async def test_racing_admins_on_postgres(self, private_postgres):
        """On PostgreSQL too, of two writes with one ETag exactly one commits."""
        app = make_app(private_postgres)
        key = unique()
        async with lifespan_client(app, headers=OPERATOR) as client:
            etag = await create(client, beta(key))
            answers = await asyncio.gather(
                *(
                    client.put(
                        f"/admin/features/{key}",
                        json=beta(key, description=f"writer {n}"),
                        headers={"if-match": etag},
                    )
                    for n in range(3)
                )
            )
            history = (await client.get(f"/admin/features/{key}/history")).json()["items"]
        assert [200, 412, 412] == sorted(answer.status_code for answer in answers)
        assert ["update", "create"] == [item["action"] for item in history]

    async def test_racing_segment_creates_on_postgres(self, private_postgres):
        """Concurrent PUTs creating one segment: one 201, the others refused, none overwrites."""
        app = make_app(private_postgres)
        name = unique("seg")
        async with lifespan_client(app, headers=OPERATOR) as client:
            answers = await asyncio.gather(
                *(
                    client.put(f"/admin/segments/{name}", json=segment(f"writer {n}"))
                    for n in range(3)
                )
            )
        codes = sorted(answer.status_code for answer in answers)
        assert 201 == codes[0]
        assert set(codes[1:]) <= {412, 428}, codes


class TestRaces:
    async def test_delete_and_recreate_after_the_read_is_412(self, client, monkeypatch):
        """A flag deleted and created again between the route's read and its write is 412."""
        key = unique()
        etag = await create(client, beta(key))
        store = client.app.state.bastion.flags.store
        read = store.get
        racer = Actor.system("racer")

        async def read_then_recreate(name):
            stored = await read(name)
            monkeypatch.setattr(store, "get", read)
            # Version 1 again: only the ETag tells the new flag from the one read.
            await store.delete(name, expected_version=None, actor=racer)
            await store.create(stored.flag, actor=racer)
            return stored

        monkeypatch.setattr(store, "get", read_then_recreate)
        response = await client.put(
            f"/admin/features/{key}", json=beta(key, description="lost"), headers={"if-match": etag}
        )
        assert (412, "PRECONDITION_FAILED") == (response.status_code, response.json()["code"])
        assert "" == (await client.get(f"/admin/features/{key}")).json()["flag"]["description"]

    async def test_racing_segment_creates_never_overwrite(self, client):
        """Concurrent PUTs creating one segment: exactly one 201, the rest refused."""
        name = unique("seg")
        answers = await asyncio.gather(
            *(client.put(f"/admin/segments/{name}", json=segment(f"writer {n}")) for n in range(3))
        )
        codes = sorted(answer.status_code for answer in answers)
        assert 201 == codes[0]
        assert set(codes[1:]) <= {412, 428}, codes
        stored = (await client.get(f"/admin/segments/{name}")).json()
        assert 1 == stored["version"]

    async def test_create_of_a_segment_created_meanwhile_is_412(self, client, monkeypatch):
        """A segment created between the route's read (absent) and its write is not replaced."""
        name = unique("seg")
        store = client.app.state.bastion.flags.store
        read = store.get_segment

        async def absent_then_created(segment_name):
            monkeypatch.setattr(store, "get_segment", read)
            from bastion.flags import Segment

            await store.put_segment(
                Segment.model_validate({"name": segment_name, **segment("first")}),
                expected_version=None,
                actor=Actor.system("racer"),
            )
            return await read(f"{segment_name}-absent")

        monkeypatch.setattr(store, "get_segment", absent_then_created)
        response = await client.put(f"/admin/segments/{name}", json=segment("second"))
        assert 412 == response.status_code, response.text
        assert (
            "first"
            == (await client.get(f"/admin/segments/{name}")).json()["segment"]["description"]
        )


class TestConditionalImport:
    async def test_export_etag_makes_the_import_conditional(self, client):
        """Export's ETag ``"r<revision>"`` in If-Match imports; after a change it is 412."""
        await create(client, beta(unique()))
        exported = await client.get("/admin/features/export")
        etag = exported.headers["etag"]
        assert etag == f'"r{etag[2:-1]}"'
        assert etag[2:-1].isdigit()
        document = exported.json()
        same = await client.post(
            "/admin/features/import", json=document, headers={"if-match": etag}
        )
        assert 200 == same.status_code, same.text
        await create(client, beta(unique()))
        stale = await client.post(
            "/admin/features/import", json=document, headers={"if-match": etag}
        )
        assert (412, "PRECONDITION_FAILED") == (stale.status_code, stale.json()["code"])
        assert stale.headers["etag"] == (await client.get("/admin/features/export")).headers["etag"]

    async def test_if_match_of_another_form_is_412(self, client):
        """An If-Match that is not an export's ETag can never match: 412, nothing imported."""
        key = unique()
        response = await client.post(
            "/admin/features/import", json={"flags": [{"key": key}]}, headers={"if-match": '"1.x"'}
        )
        assert 412 == response.status_code
        assert 404 == (await client.get(f"/admin/features/{key}")).status_code

    async def test_unleash_merge_keeps_bastion_fields(self, client):
        """Merging an Unleash state changes what Unleash says; tags and visibility stay."""
        key = unique()
        await create(client, beta(key, tags=["checkout"], client_visible=True))
        state = (await client.get("/admin/features/export", params={"format": "unleash"})).json()
        for feature in state["features"]:
            feature["enabled"] = False
        response = await client.post("/admin/features/import", json=state)
        assert 200 == response.status_code, response.text
        stored = (await client.get(f"/admin/features/{key}")).json()["flag"]
        assert (False, ["checkout"], True) == (
            stored["enabled"],
            stored["tags"],
            stored["client_visible"],
        )

    async def test_untranslatable_unleash_state_is_422(self, client):
        """A state of the wrong shape is refused, located, not imported as "never matches"."""
        key = unique()
        strategy = {"name": "flexibleRollout", "constraints": "userId=alice"}
        state = {
            "version": 2,
            "features": [{"name": key, "enabled": True, "strategies": [strategy]}],
        }
        response = await client.post("/admin/features/import", json=state)
        assert (422, "INVALID_INPUT") == (response.status_code, response.json()["code"])
        assert ["body.features[0].strategies[0].constraints"] == [
            error["field"] for error in response.json()["errors"]
        ]
        assert 404 == (await client.get(f"/admin/features/{key}")).status_code


class TestImportLimits:
    async def test_too_many_flags_is_422(self, client):
        """More than 10,000 flags in one document is refused before any is validated."""
        flags = [{"key": f"k{n}"} for n in range(10_001)]
        response = await client.post("/admin/features/import", json={"flags": flags})
        assert 422 == response.status_code
        assert [("body.flags", "too_long")] == [
            (error["field"], error["code"]) for error in response.json()["errors"]
        ]

    async def test_an_import_past_the_guards_default_element_count_is_taken(self, client):
        """Thousands of flags hold more JSON values than the request guard's default 10,000:
        the import route's own bounds apply instead."""
        flags = [
            {"key": f"bulk-{unique()}-{n}", "description": "d", "tags": ["a", "b"]}
            for n in range(3_000)
        ]
        response = await client.post("/admin/features/import", json={"flags": flags})
        assert 200 == response.status_code, response.text

    async def test_errors_stop_after_100(self, client):
        """A document of many bad flags reports 100 errors and says it stopped."""
        flags = [{"key": f"k{n}", "type": "number"} for n in range(500)]
        response = await client.post("/admin/features/import", json={"flags": flags})
        errors = response.json()["errors"]
        assert 422 == response.status_code
        assert 101 == len(errors)
        assert "too_many_errors" == errors[-1]["code"]

    async def test_import_beyond_8_mib_is_413(self, client):
        """An import body beyond 8 MiB is PAYLOAD_TOO_LARGE."""
        body = {"flags": [{"key": "big", "description": "x" * (8 << 20)}]}
        response = await client.post("/admin/features/import", json=body)
        assert (413, "PAYLOAD_TOO_LARGE") == (response.status_code, response.json()["code"])

    async def test_import_is_parsed_off_the_event_loop(self, client, monkeypatch):
        """The document is parsed and validated in a worker thread, not on the event loop."""
        threads = []
        parse = _routes.parse_document

        def recording(document, **options):
            threads.append(threading.current_thread())
            return parse(document, **options)

        monkeypatch.setattr(_routes, "parse_document", recording)
        response = await client.post("/admin/features/import", json={"flags": [{"key": unique()}]})
        assert 200 == response.status_code, response.text
        assert [False] == [thread is threading.main_thread() for thread in threads]


class TestProxiedAccess:
    async def test_forwarded_internet_caller_is_forbidden(self, sqlite_url):
        """Behind a trusted loopback proxy, a forwarded internet client is not an operator."""
        app = bastion.create_app(
            database={"url": sqlite_url},
            migrations={"mode": "auto"},
            logging={"level": "WARNING", "format": "json"},
            http={"trusted_proxies": ["127.0.0.0/8", "::1/128"]},
            audit={"mode": "sync", "checkpoint_interval": 0},
            flags={"store_url": "memory://"},
        )
        forwarded = {"x-forwarded-for": "203.0.113.9"}
        async with lifespan_client(app) as client:
            answers = [
                await client.get(path, headers=forwarded)
                for path in ("/admin/features", "/admin/segments", "/admin/migrations")
            ]
            local = await client.get("/admin/features", headers={"x-forwarded-for": "127.0.0.1"})
        assert [403, 403, 403] == [answer.status_code for answer in answers]
        assert {"FORBIDDEN"} == {answer.json()["code"] for answer in answers}
        assert 200 == local.status_code


class TestClientSession:
    async def test_session_id_keeps_an_anonymous_visitor_in_its_bucket(self, client):
        """``?sessionId=`` gives an anonymous caller a stable answer in a partial rollout."""
        key = unique()
        await create(
            client,
            {
                "key": key,
                "enabled": True,
                "client_visible": True,
                "rules": [{"rollout": {"percentage": 50}}],
            },
        )
        answers = {}
        for n in range(40):
            seen = set()
            for _ in range(3):
                response = await client.get("/api/features", params={"sessionId": f"s-{n}"})
                seen.add(response.json()["flags"][key]["enabled"])
            assert 1 == len(seen), f"session s-{n} moved between buckets"
            answers[n] = seen.pop()
        assert {True, False} == set(answers.values())

    async def test_identity_never_comes_from_the_query(self, client):
        """``userId``, ``roles`` and ``tenantId`` in the query unlock nothing."""
        key = unique()
        await create(
            client,
            {
                "key": key,
                "enabled": True,
                "client_visible": True,
                "rules": [
                    {"constraints": [{"context": "userId", "operator": "IN", "values": ["alice"]}]},
                    {"constraints": [{"context": "roles", "operator": "IN", "values": ["admin"]}]},
                    {
                        "constraints": [
                            {"context": "tenantId", "operator": "IN", "values": ["acme"]}
                        ]
                    },
                ],
            },
        )
        response = await client.get(
            "/api/features",
            params={"userId": "alice", "roles": "admin", "tenantId": "acme", "sessionId": "s"},
        )
        assert response.json()["flags"][key]["enabled"] is False

    async def test_session_id_is_documented(self, client):
        """The OpenAPI document names the ``sessionId`` query parameter of the client route."""
        operation = (await client.get("/openapi.json")).json()["paths"]["/api/features"]["get"]
        assert ["sessionId", "appVersion"] == [
            parameter["name"] for parameter in operation["parameters"]
        ]


def audit_entries(database_url: str, key: str) -> list[tuple[str, str, dict]]:
    """``(action, actor, details)`` of the audit entries about flag ``key``, oldest first."""
    path = database_url.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT action, actor_type, actor_id, details FROM bastion_audit_entries"
            " WHERE resource_type = 'flag' AND resource_id = ? ORDER BY seq",
            (key,),
        ).fetchall()
    return [
        (action, f"{kind}:{ident}", json.loads(details)) for action, kind, ident, details in rows
    ]


class TestWho:
    async def test_claimed_operator_is_recorded_with_the_shared_token(self, client, sqlite_url):
        """``X-Operator`` is kept as the claimed name; the actor stays ``system:operator``."""
        key = unique()
        created = await client.post(
            "/admin/features", json=beta(key), headers={"x-operator": "alice"}
        )
        assert 201 == created.status_code, created.text
        toggled = await client.post(
            f"/admin/features/{key}/toggle",
            json={"enabled": False},
            headers={
                "if-match": created.headers["etag"],
                "x-operator": "Zoë".encode(),
            },
        )
        assert 200 == toggled.status_code, toggled.text

        assert "system:operator (claimed: Zoë)" == toggled.json()["updated_by"]
        history = (await client.get(f"/admin/features/{key}/history")).json()["items"]
        assert ["system:operator (claimed: Zoë)", "system:operator (claimed: alice)"] == [
            item["actor"] for item in history
        ]
        assert [
            ("flag.create", "system:operator", "alice"),
            ("flag.toggle", "system:operator", "Zoë"),
        ] == [
            (action, actor, details["operator"])
            for action, actor, details in audit_entries(sqlite_url, key)
        ]

    async def test_without_a_claim_the_operator_is_unnamed(self, client, sqlite_url):
        """No ``X-Operator``: ``system:operator``, and no name in the audit details."""
        key = unique()
        await create(client, beta(key))
        assert [("flag.create", "system:operator", {"version": 1})] == audit_entries(
            sqlite_url, key
        )

    @pytest.mark.parametrize("bad", ["", "  ", "x" * 129, "ali\tce", "\u202eevil"])
    async def test_bad_claim_is_422_and_nothing_is_written(self, client, bad):
        """An empty, over-long or unprintable ``X-Operator`` is 422 on the header, no write."""
        key = unique()
        response = await client.post(
            "/admin/features",
            json=beta(key),
            headers={"x-operator": bad.encode()},
        )
        assert (422, "INVALID_INPUT") == (response.status_code, response.json()["code"])
        assert response.headers["content-type"].startswith("application/problem+json")
        assert ["header.X-Operator"] == [error["field"] for error in response.json()["errors"]]
        assert 404 == (await client.get(f"/admin/features/{key}")).status_code

    async def test_api_key_beside_the_token_is_the_actor(self, sqlite_url):
        """An API key sent beside the admin token is recorded as the actor, not the claim."""
        app = make_app(sqlite_url)
        async with lifespan_client(app, headers=OPERATOR) as client:
            admin = await create_member(
                app, tenant_slug=unique("t"), email=f"{unique()}@example.org", role="admin"
            )
            issued = await client.post(
                "/v1/api-keys",
                json={"name": "ops", "scopes": ["tenant:read"]},
                headers=admin.headers,
            )
            assert 201 == issued.status_code, issued.text
            api_key = issued.json()
            key = unique()
            created = await client.post(
                "/admin/features",
                json=beta(key),
                headers={"x-api-key": api_key["key"], "x-operator": "mallory"},
            )
            wrong = await client.post(
                "/admin/features",
                json=beta(unique()),
                headers={"x-api-key": api_key["key"][:-1] + "?"},
            )
            without_token = await client.post(
                "/admin/features",
                json=beta(unique()),
                headers={"authorization": "", "x-api-key": api_key["key"]},
            )

        assert 201 == created.status_code, created.text
        assert f"api_key:{api_key['id']}" == created.json()["updated_by"]
        assert [("flag.create", f"api_key:{api_key['id']}", {"version": 1})] == audit_entries(
            sqlite_url, key
        )
        # A key that does not authenticate is refused, not taken for the operator's write.
        assert (401, 401) == (wrong.status_code, without_token.status_code)


class TestClientAppVersion:
    async def test_app_version_targets_front_end_builds(self, client):
        """``?appVersion=`` is matched by a semver rule: 2.1.0 and later get the flag."""
        key = unique()
        newer = {"context": "appVersion", "operator": "SEMVER_GTE", "value": "2.1.0"}
        await create(
            client,
            {
                "key": key,
                "enabled": True,
                "client_visible": True,
                "rules": [{"constraints": [newer]}],
            },
        )
        answers = {}
        for version in ("2.0.9", "2.1.0", "2.10.0-beta.1", "v3"):
            response = await client.get("/api/features", params={"appVersion": version})
            assert 200 == response.status_code, response.text
            answers[version] = response.json()["flags"][key]["enabled"]
        without = (await client.get("/api/features")).json()["flags"][key]["enabled"]

        assert {"2.0.9": False, "2.1.0": True, "2.10.0-beta.1": True, "v3": False} == answers
        assert without is False

    @pytest.mark.parametrize("bad", ["", "latest", "1..2", "1.2.3-", "1" * 65, "1.0 OR 1=1"])
    async def test_bad_app_version_is_422(self, client, bad):
        """An ``appVersion`` that is no version is 422 INVALID_INPUT on the query parameter."""
        response = await client.get("/api/features", params={"appVersion": bad})
        assert (422, "INVALID_INPUT") == (response.status_code, response.json()["code"])
        assert response.headers["content-type"].startswith("application/problem+json")
        assert ["query.appVersion"] == [error["field"] for error in response.json()["errors"]]

    @pytest.mark.parametrize("version", ["2024.01", "2024.01.05", "1.02.3", "v07"])
    async def test_calendar_and_zero_padded_versions_are_accepted(self, client, version):
        """Plain versions with leading zeros (calendar versions) are versions too."""
        response = await client.get("/api/features", params={"appVersion": version})
        assert 200 == response.status_code, response.text
