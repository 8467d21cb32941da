"""Users of the caller's tenant: who am I, and adding colleagues."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bastion.errors import Conflict, ErrorCode, Forbidden, NotFound, problem_responses
from bastion_docs.dependencies import DbSession
from bastion_docs.identity import CurrentCaller
from bastion_docs.ids import uuid7
from bastion_docs.models import NAME_MAX, Role, User, utc_now
from bastion_docs.schemas import UserCreate, UserOut

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])


@router.get(
    "/me",
    summary="The caller",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.NOT_FOUND),
)
async def read_me(caller: CurrentCaller, session: DbSession) -> UserOut:
    """Return the calling user.

    Raises:
        NotFound: the user was deleted while the request was in flight.
    """
    user = await session.scalar(select(User).where(User.id == caller.user_id))
    if user is None:
        raise NotFound("The user no longer exists.")
    return UserOut.model_validate(user)


@router.post(
    "",
    status_code=201,
    summary="Add a user to the caller's tenant",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.CONFLICT),
)
async def create_user(payload: UserCreate, caller: CurrentCaller, session: DbSession) -> UserOut:
    """Add a user with a role to the caller's tenant.

    Owners may grant any role; admins any role but ``owner``, so no one can
    grant more than they hold.

    Raises:
        Forbidden: the caller is not an owner or admin, or an admin tried to add an owner.
        Conflict: the tenant already has a user with this email address.
    """
    role = Role(payload.role)
    if not caller.role.can_manage_users:
        raise Forbidden("Only owners and admins can add users.")
    if role is Role.OWNER and caller.role is not Role.OWNER:
        raise Forbidden("Only owners can add owners.")
    user = User(
        id=uuid7(),
        tenant_id=caller.tenant_id,
        email=payload.email,
        display_name=payload.display_name or payload.email.split("@", 1)[0][:NAME_MAX],
        role=role.value,
        created_at=utc_now(),
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:
        raise Conflict("This tenant already has a user with this email address.") from exc
    return UserOut.model_validate(user)
