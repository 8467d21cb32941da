"""Bastion Docs: a multi-tenant document workspace, the reference service of Bastion.

Written only against bastion's public API. The app factory is
``bastion_docs.app:create_app`` (``bastion serve``'s default); the Alembic tree
is ``bastion_docs:migrations``, applied by bastion at start-up or by
``bastion migrate upgrade``.

The service's API, under ``/v1``::

    POST   /documents             create (201, Location, ETag); Idempotency-Key honoured
    GET    /documents             list: ?sort=-created_at&filter[tag]=ops&page=1&page_size=50
    GET    /documents/{id}        read (ETag "v<version>"; 304 to If-None-Match)
    PATCH  /documents/{id}        change title, body, tags or sensitive; If-Match required
    DELETE /documents/{id}        delete (204); If-Match required
    POST   /assistant/ask         a question about the tenant's documents (screened)

Accounts (``/v1/auth/*``), tenants and their members (``/v1/tenants``) and API
keys (``/v1/api-keys``) are bastion's identity routes, mounted by
``bastion.install`` beside these.

Choices the code relies on:

- Users are bastion's: global accounts (one per e-mail address) that belong to
  tenants through memberships with a role. A request acts for the tenant its
  access token or API key names, never one the request chooses.
- Everything outside the caller's tenant is 404 ``NOT_FOUND``, as is a
  malformed id: existence never leaks across tenants.
- ``documents:read`` (viewer and up) reads and asks the assistant;
  ``documents:write`` (member and up) writes. An API key holds what its scopes
  name; a document it creates records the key as its author.
- Lists return summaries (no body) and links as paths, not absolute URLs.
- Writes are conditional: ``If-Match`` with the version's ETag (or ``*``),
  checked inside the ``UPDATE``/``DELETE``, so no update is ever lost.
"""
