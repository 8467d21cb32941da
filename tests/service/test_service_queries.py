"""No N+1: every list endpoint runs the same number of statements whatever the page size."""

from __future__ import annotations

import pytest

from bastion.testing import count_queries

PAGE_SIZES = (1, 10, 50)
ROWS = max(PAGE_SIZES)


@pytest.fixture
async def full_workspace(app, new_workspace, create_document):
    """A tenant with enough documents to fill the largest page (their audit entries committed)."""
    workspace = await new_workspace()
    for number in range(ROWS):
        await create_document(workspace.owner, f"Document {number}", tags=[f"t{number % 3}"])
    # The audit writer's group commits would otherwise be counted with the list's statements.
    await app.state.bastion.audit.log.flush()
    return workspace


class TestListQueries:
    async def test_document_list_query_count_does_not_grow_with_the_page(
        self, app, client, full_workspace
    ):
        """GET /v1/documents runs as many statements for 50 items as for 1."""
        database = app.state.bastion.database
        counts, statements = {}, {}
        for size in PAGE_SIZES:
            with count_queries(database) as queries:
                response = await client.get(
                    "/v1/documents",
                    params={"page_size": size},
                    headers=full_workspace.owner.headers,
                )
            assert (200, size) == (response.status_code, len(response.json()["items"]))
            counts[size], statements[size] = queries.count, queries.statements
        assert [counts[1]] * len(PAGE_SIZES) == [counts[size] for size in PAGE_SIZES], statements
