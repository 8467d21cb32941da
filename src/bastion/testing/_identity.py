"""Members of tenants for an application's tests, with credentials, without the e-mail round trip.

Signing up, verifying the address and logging in over HTTP is what the
identity tests exercise; most of an application's tests just need "a member
of tenant X with role Y" and the headers that act as them. These helpers write
the rows straight into the app's database through bastion's directory and
sign an access token with the app's own keys, so the token is exactly what
``POST /v1/auth/login`` would have returned (minus the refresh token).

Example:
    >>> async with lifespan_client(app) as client:
    ...     ann = await create_member(app, tenant_slug="acme", email="ann@acme.test", role="owner")
    ...     response = await client.get("/v1/documents", headers=ann.headers)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from bastion.identity import (
    add_membership,
    create_tenant,
    create_user,
    find_tenant,
    find_user_by_email,
    membership_role,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from bastion.identity._runtime import Identity

__all__ = ["TestMember", "create_member", "member_token"]


@dataclass(frozen=True, slots=True)
class TestMember:
    """A user's membership of a tenant, and a valid access token acting as them there.

    Attributes:
        user_id: the user's id.
        tenant_id: the tenant's id.
        tenant_slug: the tenant's slug (what ``POST /v1/auth/login`` takes as ``tenant``).
        email: the address, as stored (normalised).
        role: the role in the tenant.
        token: an access token for the user in the tenant (the app's configured life).
        password: the password it was created with, for tests that log in; ``None``
            when it has none.
    """

    # pytest collects classes whose name starts with Test; this one is a value.
    __test__: ClassVar[bool] = False

    user_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_slug: str
    email: str
    role: str
    token: str
    password: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <token>``, to pass as a request's headers."""
        return {"Authorization": f"Bearer {self.token}"}

    def __repr__(self) -> str:
        # The token is a credential and the address personal data: neither goes into
        # a failing test's output, which CI logs keep.
        return (
            f"TestMember(user_id={self.user_id!s}, tenant={self.tenant_slug!r}, role={self.role!r})"
        )


def _identity(app: Starlette) -> Identity:
    runtime = getattr(app.state, "bastion", None)
    identity: Identity | None = getattr(runtime, "identity", None)
    if identity is None:
        raise RuntimeError(
            "the app has no identity component: install bastion with identity and a database"
        )
    return identity


def member_token(
    app: Starlette, user_id: uuid.UUID | str, tenant_id: uuid.UUID | str, role: str
) -> str:
    """Sign an access token with the app's keys, as login would for this membership.

    The token's ``roles`` claim is informative; what the caller may do comes
    from its membership (the permission cache), so a token for a membership that
    does not exist authenticates but is granted nothing.

    Args:
        app: an app with bastion installed (identity on).
        user_id: ``sub``.
        tenant_id: ``tid``.
        role: the ``roles`` claim.

    Returns:
        The compact JWT.

    Raises:
        RuntimeError: the app has no identity component.
    """
    return _identity(app).tokens.issue(str(user_id), str(tenant_id), [role]).token


async def create_member(
    app: Starlette,
    *,
    tenant_slug: str,
    email: str,
    role: str,
    password: str | None = None,
    tenant_name: str | None = None,
    display_name: str | None = None,
) -> TestMember:
    """Make ``email`` a member of tenant ``tenant_slug`` with ``role``, and sign them a token.

    The tenant is created when no tenant has this slug, the user when no user
    has this address (verified, so they can log in at once), and the membership
    is added; all in one transaction of the app's database. The app must be
    started (inside :func:`~bastion.testing.lifespan_client`), so its database
    is migrated and its keys loaded.

    Example:
        >>> owner = await create_member(app, tenant_slug="acme", email="o@a.test", role="owner")
        >>> viewer = await create_member(app, tenant_slug="acme", email="v@a.test", role="viewer")
        >>> await client.get("/v1/tenants/" + str(owner.tenant_id), headers=viewer.headers)

    Args:
        app: an app with bastion installed (identity and a database on).
        tenant_slug: the tenant's slug; tests sharing a database use unique ones.
        email: the user's address; an existing user of that address is reused.
        role: the role in the tenant, one of ``identity.roles``.
        password: set as the user's password (hashed with the app's hasher) when
            the user is created here; ``None`` leaves a new user without one.
        tenant_name: the name of a tenant created here (default: the slug).
        display_name: the display name of a user created here (default: the
            part of the address before the ``@``).

    Returns:
        The membership and a token acting as it.

    Raises:
        RuntimeError: the app has no identity component.
        ValueError: ``role`` is not a configured role, the slug or address is
            malformed, or the user is already a member of the tenant.
    """
    identity = _identity(app)
    if role not in identity.settings.identity.roles:
        raise ValueError(f"{role!r} is not one of the app's roles")
    password_hash = None if password is None else await identity.hasher.hash(password)
    async with identity.database.session() as session:
        tenant = await find_tenant(session, tenant_slug)
        if tenant is None:
            tenant = await create_tenant(session, tenant_name or tenant_slug, tenant_slug)
        user = await find_user_by_email(session, email)
        created = user is None
        if user is None:
            user = await create_user(
                session,
                email,
                password_hash=password_hash,
                display_name=display_name,
                verified=True,
            )
        elif await membership_role(session, user.id, tenant.id) is not None:
            raise ValueError("the user is already a member of this tenant")
        await add_membership(session, tenant.id, user.id, role)
    # Another test may have asked for this pair's permissions before it existed.
    await identity.permissions.invalidate_user(str(user.id), str(tenant.id))
    return TestMember(
        user_id=user.id,
        tenant_id=tenant.id,
        tenant_slug=tenant.slug,
        email=user.email,
        role=role,
        token=member_token(app, user.id, tenant.id, role),
        password=password if created else None,
    )
