"""Tenant isolation: no tenant reads, lists, changes or deletes another's documents."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


class TestTenantIsolation:
    async def test_other_tenant_sees_only_not_found(
        self, client, new_workspace, add_member, create_document
    ):
        """Tenant B's owner and admin get 404 for every operation on tenant A's document."""
        a, b = await new_workspace("A"), await new_workspace("B")
        doc = await create_document(a.owner, "Secret plan", body="confidential")
        url = f"/v1/documents/{doc['id']}"
        for intruder in (b.owner, await add_member(b, "admin")):
            attempts = [
                await client.get(url, headers=intruder.headers),
                # The right ETag changes nothing: another tenant's document does not exist here.
                await client.patch(
                    url, json={"title": "pwned"}, headers=intruder.headers | {"If-Match": '"v1"'}
                ),
                await client.delete(url, headers=intruder.headers | {"If-Match": "*"}),
            ]
            assert [(404, "NOT_FOUND")] * 3 == [(r.status_code, r.json()["code"]) for r in attempts]
        assert doc == (await client.get(url, headers=a.owner.headers)).json()

    async def test_not_found_is_indistinguishable_from_absent(
        self, client, new_workspace, create_document
    ):
        """Another tenant's document and a nonexistent one get the same answer body."""
        a, b = await new_workspace(), await new_workspace()
        doc = await create_document(a.owner)
        theirs = await client.get(f"/v1/documents/{doc['id']}", headers=b.owner.headers)
        nothing = await client.get(
            "/v1/documents/00000000-0000-7000-8000-000000000000", headers=b.owner.headers
        )

        def shape(response):
            return {k: v for k, v in response.json().items() if k != "correlation_id"}

        assert shape(nothing) == shape(theirs)

    async def test_lists_and_totals_are_per_tenant(self, client, new_workspace, create_document):
        """Each tenant's list and total count only its own documents."""
        a, b = await new_workspace(), await new_workspace()
        a_ids = {(await create_document(a.owner, f"A{n}"))["id"] for n in range(3)}
        b_ids = {(await create_document(b.owner, f"B{n}"))["id"] for n in range(2)}
        for ws, ids in ((a, a_ids), (b, b_ids)):
            page = (await client.get("/v1/documents", headers=ws.owner.headers)).json()
            assert (ids, len(ids)) == ({item["id"] for item in page["items"]}, page["total"])

    @settings(
        max_examples=15,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(data=st.data())
    async def test_isolation_holds_for_any_sequence(self, client, new_workspace, data):
        """Whatever mix of creates, patches and deletes two tenants run, each sees only its own.

        A model tracks which tenant owns which live document and at which
        version; every operation is checked against it, then both lists.
        """
        tenants = [await new_workspace("A"), await new_workspace("B")]
        owner_of: dict[str, int] = {}
        version: dict[str, int] = {}
        gone: set[str] = set()
        steps = data.draw(
            st.lists(
                st.tuples(
                    st.integers(0, 1), st.sampled_from(["create", "read", "patch", "delete"])
                ),
                min_size=1,
                max_size=10,
            )
        )
        for actor, action in steps:
            headers = tenants[actor].owner.headers
            known = sorted(owner_of) + sorted(gone)
            if action == "create" or not known:
                response = await client.post("/v1/documents", json={"title": "t"}, headers=headers)
                assert 201 == response.status_code
                owner_of[response.json()["id"]] = actor
                version[response.json()["id"]] = 1
                continue
            target = data.draw(st.sampled_from(known))
            mine = owner_of.get(target) == actor
            url = f"/v1/documents/{target}"
            # The version the model expects (a guess of 1 for another tenant's document).
            headers = headers | {"If-Match": f'"v{version.get(target, 1)}"'}
            if action == "read":
                response = await client.get(url, headers=headers)
            elif action == "patch":
                response = await client.patch(url, json={"body": "x"}, headers=headers)
            else:
                response = await client.delete(url, headers=headers)
            if not mine:
                assert 404 == response.status_code
                continue
            assert response.status_code in {200, 204}
            if action == "patch":
                version[target] += 1
                assert version[target] == response.json()["version"]
            elif action == "delete":
                del owner_of[target]
                gone.add(target)
        for index, ws in enumerate(tenants):
            page = (
                await client.get("/v1/documents?page_size=100", headers=ws.owner.headers)
            ).json()
            expected = {doc: version[doc] for doc, owner in owner_of.items() if owner == index}
            assert expected == {item["id"]: item["version"] for item in page["items"]}
            assert len(expected) == page["total"]
