"""Bastion Docs: a multi-tenant document workspace, the reference service of Bastion.

Written only against bastion's public API. The app factory is
``bastion_docs.app:create_app`` (``bastion serve``'s default); the Alembic tree
is ``bastion_docs:migrations``, applied by bastion at start-up or by
``bastion migrate upgrade``.

The API, under ``/v1``::

    POST   /tenants               create a tenant and its owner (open: bootstrap)
    GET    /tenants/current       the caller's tenant
    GET    /users/me              the caller
    POST   /users                 owners and admins add users to their tenant
    POST   /documents             create (201, Location)
    GET    /documents             list, newest first: ?page=1&page_size=20 (1-100)
    GET    /documents/{id}        read
    PATCH  /documents/{id}        change title, body or tags; version += 1
    DELETE /documents/{id}        delete (204)

Choices the code relies on:

- A user belongs to one tenant; emails are unique per tenant, so tenants cannot
  learn of each other's accounts through a conflict.
- Everything outside the caller's tenant is 404 ``NOT_FOUND``, as is a
  malformed id: existence never leaks across tenants.
- Owners grant any role, admins any but ``owner``; viewers only read.
- Lists return summaries (no body) and links as paths, not absolute URLs.
- Identity is a DEVELOPMENT STAND-IN (``X-Debug-User``, see
  :mod:`bastion_docs.identity`) until bastion's identity component lands.
"""
