"""Bootstrapping without e-mail: an operator creates a tenant and its first users.

What ``bastion tenants create`` and ``bastion users create`` run; scripts and
tests call the same functions with an app's :class:`~bastion.identity.Identity`.
Users made here are verified at once (the operator vouches for the address)
and their password goes through the app's password policy and hasher.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bastion.errors import Conflict, FieldError, InvalidInput, NotFound

if TYPE_CHECKING:
    from bastion.identity._directory import TenantRecord, UserRecord
    from bastion.identity._runtime import Identity

__all__ = ["bootstrap_tenant", "bootstrap_user", "slug_from_name"]

_NOT_SLUG: Final = re.compile(r"[^a-z0-9]+")


def slug_from_name(name: str) -> str:
    """Return a slug made of ``name``: lowercase ASCII letters and digits joined by hyphens.

    Raises:
        InvalidInput: nothing of the name survives (give a slug yourself).
    """
    slug = _NOT_SLUG.sub("-", name.casefold()).strip("-")[:63].strip("-")
    if not slug:
        raise InvalidInput(
            errors=[FieldError("slug", "invalid", "the name gives no slug; pass --slug")]
        )
    return slug


async def bootstrap_tenant(identity: Identity, name: str, slug: str | None = None) -> TenantRecord:
    """Create a tenant (with no members yet).

    Args:
        identity: the app's identity component.
        name: the tenant's display name.
        slug: its unique short name; made from ``name`` when omitted.

    Raises:
        InvalidInput: an empty or too long name, or a malformed slug.
        Conflict: the slug is taken.
    """
    from bastion.identity._directory import create_tenant  # noqa: PLC0415 -- identity imports tenancy

    chosen = slug if slug is not None else slug_from_name(name)
    try:
        async with identity.database.session() as session:
            return await create_tenant(session, name, chosen)
    except ValueError as exc:
        raise InvalidInput(errors=[FieldError("tenant", "invalid", str(exc))]) from None
    except IntegrityError:
        raise Conflict(f"the slug {chosen!r} is taken") from None


async def bootstrap_user(
    identity: Identity,
    email: str,
    password: str,
    *,
    tenant: str,
    role: str,
    display_name: str | None = None,
) -> tuple[UserRecord, TenantRecord]:
    """Create a verified user with a password and make it a member of ``tenant``.

    Args:
        identity: the app's identity component.
        email: the user's address (stored normalised).
        password: checked against the password policy, then hashed.
        tenant: the tenant's id, slug or (unique) name.
        role: a role of ``identity.roles``.
        display_name: shown to other members; the address's local part by default.

    Raises:
        InvalidInput: an unknown role, a malformed address, or a password the policy refuses.
        NotFound: no tenant by that id, slug or name.
        Conflict: the name matches several tenants, or a user has this address already.
    """
    from bastion.identity._directory import (  # noqa: PLC0415 -- identity imports tenancy
        add_membership,
        create_user,
        find_tenant,
        normalise_email,
    )
    from bastion.identity._tables import tenants  # noqa: PLC0415 -- as above

    if role not in identity.roles.names:
        known = ", ".join(sorted(identity.roles.names))
        raise InvalidInput(errors=[FieldError("role", "invalid", f"role must be one of {known}")])
    folded = normalise_email(email)
    identity.policy.check(password, context=(folded, folded.partition("@")[0]))
    async with identity.database.sessions() as session:
        record = await find_tenant(session, tenant)
        if record is None:
            ids = (
                await session.scalars(select(tenants.c.id).where(tenants.c.name == tenant))
            ).all()
            if len(ids) > 1:
                raise Conflict(f"{len(ids)} tenants are named {tenant!r}; give its slug")
            record = await find_tenant(session, ids[0]) if ids else None
    if record is None:
        raise NotFound(f"no tenant with the id, slug or name {tenant!r}")
    password_hash = await identity.hasher.hash(password)
    try:
        async with identity.database.session() as session:
            user = await create_user(
                session,
                folded,
                password_hash=password_hash,
                display_name=display_name,
                verified=True,
            )
            await add_membership(session, record.id, user.id, role)
    except ValueError as exc:
        raise InvalidInput(errors=[FieldError("email", "invalid", str(exc))]) from None
    except IntegrityError:
        raise Conflict("a user with this address exists") from None
    await identity.permissions.invalidate_user(str(user.id), str(record.id))
    return user, record
