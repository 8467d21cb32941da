"""Account routes under ``/auth``: sign-up, e-mail verification, login, refresh, logout, passwords.

Every answer that could tell whether an address has an account is the same
either way: sign-up and reset requests answer 202 with one body, and a login
for an unknown address spends a password verification (``verify_dummy``) and
fails like a wrong password. The account work of a sign-up (without
invitation) and of a reset request runs after the response, with its mail (a
background task), so neither the database work nor a slow SMTP server shows
in the timing or fails the request; a failure is logged without the address.

Login and refresh answer the OAuth 2.0 token response (RFC 6749 5.1, with
``Cache-Control: no-store``) plus the tenant the access token acts for. A
browser client may ask for ``refresh_token_delivery: "cookie"``: the refresh
token then travels in an ``HttpOnly; Secure; SameSite=Strict`` cookie scoped
to ``<route_prefix>/auth`` and is left out of the body.

Errors::

    401 UNAUTHENTICATED   wrong e-mail or password (one answer), invalid refresh token,
                          invalid single-use link
    403 FORBIDDEN         e-mail not verified (only after the password matched),
                          not a member of the named tenant, sign-up closed or invite-only,
                          wrong current password, an external issuer's user on a route
                          that needs an account here
    409 CONFLICT          login without a tenant for a user of several (lists them);
                          a taken tenant slug at sign-up with an invitation
    422 INVALID_INPUT     malformed body, password policy
    429 RATE_LIMITED / ACCOUNT_LOCKED   the login throttle
    503 SERVICE_UNAVAILABLE             the password hashing pool is full
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final, Literal, NoReturn

import structlog
from fastapi import APIRouter, BackgroundTasks, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bastion.context import current_context
from bastion.data.types import utc_now
from bastion.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    Unauthenticated,
    problem_responses,
)
from bastion.identity._accounts import (
    InvalidRefreshToken,
    IssuedRefreshToken,
    NotATenantMember,
    RefreshTokens,
    RevocationReason,
    consume_one_time,
    discard_one_time,
    forget_one_time_data,
    issue_one_time,
    one_time_token_superseded,
    one_time_token_valid,
)
from bastion.identity._directory import (
    Membership,
    UserRecord,
    add_membership,
    create_tenant,
    create_user,
    find_tenant,
    find_user_by_email,
    get_user,
    normalise_email,
    user_memberships,
)
from bastion.identity._events import SecurityEventKind, emit_security_event
from bastion.identity._mail import PASSWORD_RESET_TEMPLATE, VERIFICATION_TEMPLATE, OutgoingMail
from bastion.identity._one_time import InvalidOneTimeToken, OneTimeTokenRecord, TokenPurpose
from bastion.identity._principal import BEARER_CHALLENGE, Authenticated, Principal
from bastion.identity._runtime import Identity
from bastion.identity._tables import EMAIL_MAX, NAME_MAX, SLUG_MAX, users
from bastion.identity._tenant_routes import accept_invitation
from bastion.identity._tokens import AccessClaims, InvalidToken
from bastion.ratelimit._login import identifier_hash

__all__ = [
    "AcceptedAnswer",
    "EmailVerifiedAnswer",
    "LoginRequest",
    "LogoutRequest",
    "MeAnswer",
    "PasswordChangeRequest",
    "PasswordResetRequest",
    "RefreshRequest",
    "ResetRequest",
    "SignupRequest",
    "TenantSummary",
    "TokenAnswer",
    "UserSummary",
    "VerifyEmailRequest",
    "auth_router",
]

logger = structlog.get_logger("bastion.identity")

# Generous bounds: the policy judges passwords (its own maximum is at least 64),
# these only stop a megabyte of body before any work.
_PASSWORD_MAX: Final = 1024
_TOKEN_MAX: Final = 128
# What the mail senders can deliver to: an ASCII dot-atom local part and a dotted
# domain. Checked up front, so an undeliverable address is a 422 whether or not it
# has an account (a refusal from the mail layer would come only for new ones).
_EMAIL_PATTERN: Final = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[^@\s]+\.[^@\s.]+$"
_SLUG_PATTERN: Final = r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$"
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_SIGNUP_ATTEMPTS: Final = 2

Delivery = Literal["body", "cookie"]


# -- bodies and answers -------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewTenant(_Body):
    """The tenant a sign-up creates, its creator becoming owner."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    slug: str = Field(min_length=1, max_length=SLUG_MAX, pattern=_SLUG_PATTERN)


class SignupRequest(_Body):
    """``POST /auth/signup``."""

    email: str = Field(min_length=3, max_length=EMAIL_MAX, pattern=_EMAIL_PATTERN)
    password: str = Field(min_length=1, max_length=_PASSWORD_MAX)
    display_name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX)
    tenant: NewTenant | None = None
    invitation: str | None = Field(default=None, min_length=1, max_length=_TOKEN_MAX)


class VerifyEmailRequest(_Body):
    """``POST /auth/verify-email``."""

    token: str = Field(min_length=1, max_length=_TOKEN_MAX)


class LoginRequest(_Body):
    """``POST /auth/login``."""

    email: str = Field(min_length=1, max_length=EMAIL_MAX)
    password: str = Field(min_length=1, max_length=_PASSWORD_MAX)
    tenant: str | None = Field(default=None, min_length=1, max_length=SLUG_MAX)
    refresh_token_delivery: Delivery = "body"  # noqa: S105 - a delivery mode, not a secret


class RefreshRequest(_Body):
    """``POST /auth/refresh``; without ``refresh_token``, the cookie's is used."""

    refresh_token: str | None = Field(default=None, min_length=1, max_length=_TOKEN_MAX)
    tenant: str | None = Field(default=None, min_length=1, max_length=SLUG_MAX)


class LogoutRequest(_Body):
    """``POST /auth/logout``; without ``refresh_token``, the cookie's is used."""

    refresh_token: str | None = Field(default=None, min_length=1, max_length=_TOKEN_MAX)


class PasswordChangeRequest(_Body):
    """``POST /auth/password/change``."""

    current_password: str = Field(min_length=1, max_length=_PASSWORD_MAX)
    new_password: str = Field(min_length=1, max_length=_PASSWORD_MAX)
    refresh_token_delivery: Delivery = "body"  # noqa: S105 - a delivery mode, not a secret


class PasswordResetRequest(_Body):
    """``POST /auth/password/reset-request``."""

    email: str = Field(min_length=1, max_length=EMAIL_MAX)


class ResetRequest(_Body):
    """``POST /auth/password/reset``."""

    token: str = Field(min_length=1, max_length=_TOKEN_MAX)
    new_password: str = Field(min_length=1, max_length=_PASSWORD_MAX)


class TenantSummary(BaseModel):
    """A tenant of the user's, with the user's role in it."""

    id: uuid.UUID
    slug: str
    name: str
    role: str


class UserSummary(BaseModel):
    """The signed-in user."""

    id: uuid.UUID
    email: str
    display_name: str
    email_verified: bool


class TokenAnswer(BaseModel):
    """The OAuth 2.0 token response, plus the tenant the access token acts for.

    ``refresh_token`` is absent when it was delivered in the cookie.
    """

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - RFC 6749's token type
    expires_in: int
    refresh_token: str | None = None
    tenant: TenantSummary | None


class AcceptedAnswer(BaseModel):
    """The one answer of sign-up and reset requests, whatever the address."""

    status: Literal["accepted"] = "accepted"
    detail: str


class EmailVerifiedAnswer(BaseModel):
    """``POST /auth/verify-email``.

    ``tenant`` is the tenant the sign-up named, created now with the user as
    owner; ``null`` when none was named, or when its slug was taken meanwhile
    (then ``reason`` is ``"slug_taken"``: the address is verified all the same).
    """

    email_verified: Literal[True] = True
    tenant: TenantSummary | None = None
    reason: Literal["slug_taken"] | None = None


class MeAnswer(BaseModel):
    """``GET /auth/me``."""

    user: UserSummary
    tenant: TenantSummary | None
    memberships: list[TenantSummary]


_SIGNUP_ACCEPTED: Final = AcceptedAnswer(
    detail="If this address can be used, a message has been sent to it."
)
_RESET_ACCEPTED: Final = AcceptedAnswer(
    detail="If an account has this address, a reset link has been sent to it."
)


# -- helpers --------------------------------------------------------------------------------


def _identity(request: Request) -> Identity:
    identity: Identity = request.app.state.bastion.identity
    return identity


IdentityDep = Annotated[Identity, Depends(_identity)]


class _WrongCredentials(Unauthenticated):
    """The one answer for an unknown address, a wrong password and a disabled account."""

    def __init__(self) -> None:
        super().__init__(
            "The e-mail address or the password is wrong.",
            headers={"WWW-Authenticate": BEARER_CHALLENGE},
        )


def _refresh_tokens(identity: Identity) -> RefreshTokens:
    # Stateless over the database: building one per request costs an object.
    return RefreshTokens(identity.database, ttl=identity.settings.identity.tokens.refresh_ttl)


def _client_ip() -> str | None:
    context = current_context()
    return None if context is None else context.client_ip


def _summary(membership: Membership) -> TenantSummary:
    tenant = membership.tenant
    return TenantSummary(id=tenant.id, slug=tenant.slug, name=tenant.name, role=membership.role)


def _user_id(principal: Principal) -> uuid.UUID:
    """The caller's account id; API keys, services and external issuers' users have none here."""
    if principal.kind != "user":
        raise Forbidden("Only a signed-in user can do this; an API key cannot.")
    if principal.issuer is not None:
        # Checked before the subject is parsed: an external issuer's subject may look
        # like one of our user ids (an application's own OidcProvider keeps subjects
        # unprefixed), and it must never act as that account.
        raise Forbidden(
            "A user signed in through an external identity provider has no account here;"
            " sign in with this service's own login to do this.",
            extra={"reason": "external_identity"},
        )
    try:
        return uuid.UUID(principal.subject)
    except ValueError:
        raise Forbidden("Only an account of this service can do this.") from None


def _presented_access(request: Request, identity: Identity) -> AccessClaims | None:
    """The verified claims of the request's bearer access token, else ``None``.

    Read from the header itself rather than the principal: logout is open to a
    caller whose token the middleware refused (revoked, say), and needs the
    token's ``jti``, ``exp`` and ``sid``.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return identity.tokens.verify(token.strip())
    except InvalidToken:
        return None


def _presented_refresh(
    request: Request, identity: Identity, from_body: str | None
) -> tuple[str | None, Delivery]:
    if from_body is not None:
        return from_body, "body"
    return request.cookies.get(identity.settings.identity.refresh_cookie), "cookie"


def _cookie_path(identity: Identity) -> str:
    return identity.settings.identity.route_prefix.rstrip("/") + "/auth"


def _set_refresh_cookie(response: Response, identity: Identity, token: str) -> None:
    response.set_cookie(
        identity.settings.identity.refresh_cookie,
        token,
        max_age=int(identity.settings.identity.tokens.refresh_ttl),
        path=_cookie_path(identity),
        secure=True,
        httponly=True,
        samesite="strict",
    )


def _clear_refresh_cookie(response: Response, identity: Identity) -> None:
    response.delete_cookie(
        identity.settings.identity.refresh_cookie,
        path=_cookie_path(identity),
        secure=True,
        httponly=True,
        samesite="strict",
    )


def _token_response(
    identity: Identity,
    user_id: uuid.UUID,
    membership: Membership | None,
    refresh: IssuedRefreshToken,
    delivery: Delivery,
) -> JSONResponse:
    access = identity.tokens.issue(
        str(user_id),
        "" if membership is None else str(membership.tenant.id),
        [] if membership is None else [membership.role],
        extra={"sid": str(refresh.family_id)},
    )
    answer = TokenAnswer(
        access_token=access.token,
        expires_in=access.expires_in,
        refresh_token=refresh.token if delivery == "body" else None,
        tenant=None if membership is None else _summary(membership),
    )
    content = answer.model_dump(
        mode="json", exclude={"refresh_token"} if delivery == "cookie" else None
    )
    response = JSONResponse(content, headers=_NO_STORE)
    if delivery == "cookie":
        _set_refresh_cookie(response, identity, refresh.token)
    return response


def _mail_link(identity: Identity, path: str, token: str) -> str:
    # The token is URL-safe base64: it needs no quoting.
    return f"{identity.settings.identity.mail.link_base.rstrip('/')}{path}?token={token}"


def _service_name(identity: Identity) -> str:
    return identity.settings.identity.mail.from_name or identity.settings.tracing.service_name


async def _deliver(identity: Identity, message: OutgoingMail) -> None:
    """Send after the response: a delivery failure must not tell the client anything."""
    try:
        await identity.mail.send(message)
    except Exception as exc:  # noqa: BLE001 -- logged by class; the client already has its answer
        logger.warning(
            "identity mail not sent",
            purpose=message.purpose,
            recipient_domain=message.recipient_domain,
            error=type(exc).__name__,
        )


def _verification_mail(identity: Identity, to: str, token: str) -> OutgoingMail:
    return VERIFICATION_TEMPLATE.render(
        to,
        link=_mail_link(identity, "/verify-email", token),
        expires_in=identity.one_time.ttl(TokenPurpose.EMAIL_VERIFICATION),
        service=_service_name(identity),
    )


async def _login_failed(identity: Identity, email: str, ip: str | None, reason: str) -> NoReturn:
    if identity.login is not None:
        await identity.login.record_failure(email, ip)
    await emit_security_event(
        SecurityEventKind.LOGIN_FAILED, subject=identifier_hash(email), details={"reason": reason}
    )
    raise _WrongCredentials


def _choose_tenant(memberships: list[Membership], wanted: str | None) -> Membership | None:
    """The tenant named (slug or id), the only one, none; or 409 listing them."""
    if wanted is not None:
        for membership in memberships:
            if wanted in {membership.tenant.slug, str(membership.tenant.id)}:
                return membership
        raise NotATenantMember
    if len(memberships) <= 1:
        return memberships[0] if memberships else None
    raise Conflict(
        "You are a member of several tenants: name one in 'tenant'.",
        extra={
            "reason": "tenant_required",
            "tenants": [_summary(each).model_dump(mode="json") for each in memberships],
        },
    )


async def _store_new_hash(identity: Identity, user: UserRecord, new_hash: str) -> None:
    async with identity.database.session() as session:
        await session.execute(
            update(users).where(users.c.id == user.id).values(password_hash=new_hash)
        )
    await emit_security_event(
        SecurityEventKind.PASSWORD_REHASHED, actor=str(user.id), subject=str(user.id)
    )


async def _revoke_access(
    identity: Identity, user_id: uuid.UUID, claims: AccessClaims | None
) -> None:
    """Refuse every access token of the user issued until now, and the presented one.

    The subject mark is in whole seconds (a token issued in the same second
    survives it), so the presented token is also revoked by its ``jti``.
    """
    if identity.deny_list is None:
        return
    await identity.deny_list.revoke_subject(str(user_id))
    if claims is not None and claims.subject == str(user_id):
        await identity.deny_list.revoke(claims.token_id, claims.expires_at)


async def _membership_for(
    session: AsyncSession, user_id: uuid.UUID, tenant_id: str | None
) -> Membership | None:
    if tenant_id is None:
        return None
    for membership in await user_memberships(session, user_id):
        if str(membership.tenant.id) == tenant_id:
            return membership
    return None


# -- sign-up ---------------------------------------------------------------------------

_Events = list[tuple[SecurityEventKind, str, str | None]]


def _pending_data(
    payload: SignupRequest, email: str, password_hash: str | None
) -> dict[str, object]:
    """What a verification token carries, applied when its link is followed.

    ``password_hash`` and ``display_name`` are set only for an existing
    unverified account (a new one has them in its row already): the password
    that counts is the one of the sign-up whose link reached the mailbox, so an
    earlier sign-up by someone else cannot keep its password on the account.
    """
    data: dict[str, object] = {}
    if password_hash is not None:
        data["password_hash"] = password_hash
        data["display_name"] = (payload.display_name or email.partition("@")[0])[:NAME_MAX]
    if payload.tenant is not None:
        data["tenant"] = {"name": payload.tenant.name, "slug": payload.tenant.slug}
    return data


async def _signup_unit(
    session: AsyncSession,
    identity: Identity,
    payload: SignupRequest,
    email: str,
    password_hash: str,
) -> tuple[OutgoingMail | None, _Events]:
    """Create the account (or re-send an unverified account's link); return the mail and events.

    Without an invitation no tenant is made here: it waits in the verification
    token until the address is proven (a tenant made now for new addresses only
    would tell, through its slug, which addresses have accounts).
    """
    events: _Events = []
    invitation: OneTimeTokenRecord | None = None
    # Only an invitation's holder gets a 409; checked before the address all the same.
    if (
        payload.invitation is not None
        and payload.tenant is not None
        and await find_tenant(session, payload.tenant.slug) is not None
    ):
        raise Conflict("That tenant slug is taken.", extra={"reason": "slug_taken"})
    existing = await find_user_by_email(session, email)
    if payload.invitation is not None:
        if existing is None:
            invitation = await consume_one_time(
                identity.one_time, session, TokenPurpose.INVITATION, payload.invitation
            )
            valid = invitation.subject == email
        else:
            # An existing account joins through the accept route: the invitation stays unspent.
            valid = await one_time_token_valid(
                identity.one_time, session, TokenPurpose.INVITATION, payload.invitation, email
            )
        if not valid:
            raise InvalidOneTimeToken
    if existing is not None:
        if existing.email_verified_at is not None or existing.disabled_at is not None:
            return None, events
        issued = await issue_one_time(
            identity.one_time,
            session,
            TokenPurpose.EMAIL_VERIFICATION,
            str(existing.id),
            data=_pending_data(payload, email, password_hash),
        )
        return _verification_mail(identity, existing.email, issued.token), events
    user = await create_user(
        session,
        email,
        password_hash=password_hash,
        display_name=payload.display_name,
        # An invitation came to this address: the mailbox is proven.
        verified=invitation is not None,
    )
    events.append((SecurityEventKind.SIGNUP, str(user.id), None))
    if invitation is not None:
        if payload.tenant is not None:
            tenant = await create_tenant(session, payload.tenant.name, payload.tenant.slug)
            await add_membership(session, tenant.id, user.id, identity.settings.identity.owner_role)
            events.append((SecurityEventKind.TENANT_CREATED, str(tenant.id), str(tenant.id)))
        accepted = await accept_invitation(session, identity, invitation, user.id)
        events.append((SecurityEventKind.MEMBER_JOINED, str(user.id), str(accepted.tenant_id)))
        return None, events
    issued = await issue_one_time(
        identity.one_time,
        session,
        TokenPurpose.EMAIL_VERIFICATION,
        str(user.id),
        data=_pending_data(payload, email, None),
    )
    return _verification_mail(identity, user.email, issued.token), events


async def _signup_with_retry(
    identity: Identity, payload: SignupRequest, email: str, password_hash: str
) -> tuple[OutgoingMail | None, _Events]:
    for _ in range(_SIGNUP_ATTEMPTS - 1):
        try:
            async with identity.database.session() as session:
                return await _signup_unit(session, identity, payload, email, password_hash)
        except IntegrityError:
            # A concurrent sign-up took the address (or, with an invitation, the slug)
            # between our check and our insert; the next pass sees it and answers as
            # for a taken one.
            continue
    async with identity.database.session() as session:
        return await _signup_unit(session, identity, payload, email, password_hash)


async def _signup_finish(identity: Identity, events: _Events) -> None:
    for kind, subject, tenant in events:
        if kind is SecurityEventKind.MEMBER_JOINED and tenant is not None:
            await identity.permissions.invalidate_user(subject, tenant)
        await emit_security_event(
            kind,
            actor=subject if kind is SecurityEventKind.SIGNUP else None,
            subject=subject,
            tenant=tenant,
        )


async def _signup_in_background(
    identity: Identity, payload: SignupRequest, email: str, password_hash: str
) -> None:
    """The database work and the mail of a sign-up without invitation, after the response.

    The client already has its 202, the same for every address, at the same
    cost: whether the address had an account shows neither in the answer nor
    in its timing. A failure (the database is down) loses this attempt; it is
    logged without the address, and the user signs up again.
    """
    try:
        mail, events = await _signup_with_retry(identity, payload, email, password_hash)
        await _signup_finish(identity, events)
    except Exception as exc:  # noqa: BLE001 -- logged by class; the client already has its answer
        logger.warning("identity sign-up not completed", error=type(exc).__name__)
        return
    if mail is not None:
        await _deliver(identity, mail)


async def signup(
    payload: SignupRequest, identity: IdentityDep, background: BackgroundTasks
) -> AcceptedAnswer:
    """Create an account and mail a verification link; 202 whether or not the address is taken.

    - ``identity.signup``: ``closed`` answers 403; ``invite_only`` needs
      ``invitation``, a single-use invitation token sent to this address.
    - The policy is checked and the password hashed for every request; then,
      without an invitation, the answer is 202 at once and the account work
      runs after the response (its outcome must not show in the timing).
    - A new address gets an account and a verification link; the tenant named
      in ``tenant`` is created when the link is followed.
    - An existing unverified account gets a fresh link (the old one stops
      working) carrying this sign-up's password, name and tenant, applied when
      it is followed; an existing verified account gets nothing.
    - With an invitation (checked in the request: an invalid one is 401) a new
      address counts as verified, joins the invitation's tenant and gets the
      tenant named in ``tenant`` at once (409 when its slug is taken).
    """
    mode = identity.settings.identity.signup
    if mode == "closed":
        raise Forbidden("Sign-up is closed.", extra={"reason": "signup_closed"})
    if mode == "invite_only" and payload.invitation is None:
        raise Forbidden("Sign-up needs an invitation.", extra={"reason": "invitation_required"})
    email = normalise_email(payload.email)
    identity.policy.check(payload.password, context=[email, payload.display_name or ""])
    password_hash = await identity.hasher.hash(payload.password)
    if payload.invitation is None:
        background.add_task(_signup_in_background, identity, payload, email, password_hash)
        return _SIGNUP_ACCEPTED
    mail, events = await _signup_with_retry(identity, payload, email, password_hash)
    await _signup_finish(identity, events)
    if mail is not None:
        background.add_task(_deliver, identity, mail)
    return _SIGNUP_ACCEPTED


async def _verify_unit(
    session: AsyncSession, identity: Identity, presented: str
) -> tuple[UserRecord, EmailVerifiedAnswer, Membership | None, list[uuid.UUID]]:
    record = await consume_one_time(
        identity.one_time, session, TokenPurpose.EMAIL_VERIFICATION, presented
    )
    user = await get_user(session, uuid.UUID(record.subject))
    if user is None or await one_time_token_superseded(identity.one_time, session, record):
        # Raised, so the transaction rolls back: an older link of two that survived
        # racing sign-ups must not apply its password over the newer one's.
        raise InvalidOneTimeToken
    await forget_one_time_data(identity.one_time, session, record)
    if user.email_verified_at is not None:
        # Verified meanwhile (a reset link, say): what this link carried no longer applies.
        return user, EmailVerifiedAnswer(), None, []
    now = utc_now()
    values: dict[str, object] = {"email_verified_at": now}
    password_hash = record.data.get("password_hash")
    if isinstance(password_hash, str):
        values.update(password_hash=password_hash, password_changed_at=now)
    display_name = record.data.get("display_name")
    if isinstance(display_name, str) and display_name:
        values["display_name"] = display_name
    await session.execute(update(users).where(users.c.id == user.id).values(**values))
    # No other session may outlive the proof of who holds the mailbox.
    revoked = await _refresh_tokens(identity).revoke_user(
        user.id, RevocationReason.EMAIL_VERIFIED, session=session
    )
    await discard_one_time(
        identity.one_time, session, TokenPurpose.EMAIL_VERIFICATION, str(user.id)
    )
    wanted = record.data.get("tenant")
    if not isinstance(wanted, dict):
        return user, EmailVerifiedAnswer(), None, revoked
    slug, name = str(wanted.get("slug", "")), str(wanted.get("name", ""))
    if await find_tenant(session, slug) is not None:
        return user, EmailVerifiedAnswer(reason="slug_taken"), None, revoked
    tenant = await create_tenant(session, name, slug)
    role = identity.settings.identity.owner_role
    await add_membership(session, tenant.id, user.id, role)
    membership = Membership(tenant, role)
    return user, EmailVerifiedAnswer(tenant=_summary(membership)), membership, revoked


async def verify_email(payload: VerifyEmailRequest, identity: IdentityDep) -> EmailVerifiedAnswer:
    """Spend a verification link's token, mark the address verified and apply what it carries.

    The token's password hash and display name (a sign-up that met an
    unverified account) replace the account's; every refresh family of the
    user is revoked; the tenant the sign-up named is created with the user as
    owner, unless its slug was taken meanwhile: the address is verified all
    the same and the answer says ``"tenant": null, "reason": "slug_taken"``.
    """
    try:
        async with identity.database.session() as session:
            outcome = await _verify_unit(session, identity, payload.token)
    except IntegrityError:
        # The slug was taken by a concurrent transaction after our look-up: the
        # rollback left the token unspent, and this pass finds the slug taken.
        async with identity.database.session() as session:
            outcome = await _verify_unit(session, identity, payload.token)
    user, answer, membership, revoked = outcome
    if revoked:
        await _revoke_access(identity, user.id, None)
    await emit_security_event(
        SecurityEventKind.EMAIL_VERIFIED, actor=str(user.id), subject=str(user.id)
    )
    if membership is not None:
        tenant_id = str(membership.tenant.id)
        await emit_security_event(
            SecurityEventKind.TENANT_CREATED,
            actor=str(user.id),
            subject=tenant_id,
            tenant=tenant_id,
        )
    return answer


# -- sessions ----------------------------------------------------------------------------


async def login(payload: LoginRequest, identity: IdentityDep) -> JSONResponse:
    """Check an e-mail and password and answer a token pair for one of the user's tenants.

    The login throttle is asked first (429 ``RATE_LIMITED`` for the IP,
    ``ACCOUNT_LOCKED`` for the address). An unknown address, a wrong password
    and a disabled account are one 401, at one cost. Only after the password
    matched: 403 when the address is unverified, 403 for a tenant the user is
    not in, 409 listing the tenants when there are several and none is named.
    """
    email = normalise_email(payload.email)
    ip = _client_ip()
    if identity.login is not None:
        await identity.login.check(email, ip)
    async with identity.database.sessions() as session:
        user = await find_user_by_email(session, email)
    if user is None or user.password_hash is None:
        await identity.hasher.verify_dummy(payload.password)
        await _login_failed(
            identity, email, ip, "unknown_account" if user is None else "no_password"
        )
    verification = await identity.hasher.verify(user.password_hash, payload.password)
    if not verification.valid:
        await _login_failed(identity, email, ip, "bad_password")
    if user.disabled_at is not None:
        await _login_failed(identity, email, ip, "disabled")
    if identity.login is not None:
        await identity.login.record_success(email, ip)
    if verification.new_hash is not None:
        await _store_new_hash(identity, user, verification.new_hash)
    if user.email_verified_at is None:
        raise Forbidden(
            "Confirm your e-mail address first: follow the link that was sent to it.",
            extra={"reason": "email_not_verified"},
        )
    async with identity.database.session() as session:
        membership = _choose_tenant(await user_memberships(session, user.id), payload.tenant)
        refresh = await _refresh_tokens(identity).start(
            session, user.id, None if membership is None else membership.tenant.id
        )
    tenant_id = None if membership is None else str(membership.tenant.id)
    await emit_security_event(
        SecurityEventKind.LOGIN_SUCCEEDED,
        actor=str(user.id),
        subject=str(user.id),
        tenant=tenant_id,
        details={"token_family_id": str(refresh.family_id)},
    )
    return _token_response(identity, user.id, membership, refresh, payload.refresh_token_delivery)


async def refresh(
    request: Request, identity: IdentityDep, payload: RefreshRequest | None = None
) -> JSONResponse:
    """Exchange a refresh token for a new pair; optionally switch to another of the user's tenants.

    The token comes from the body or, when the body has none, from the
    cookie; the new one goes back the same way. A token used before revokes
    its whole family (likely theft) and answers 401.
    """
    body_token = None if payload is None else payload.refresh_token
    presented, delivery = _presented_refresh(request, identity, body_token)
    if presented is None:
        raise InvalidRefreshToken
    tenant = None if payload is None else payload.tenant
    rotation = await _refresh_tokens(identity).rotate(presented, tenant=tenant)
    membership = (
        None
        if rotation.tenant is None or rotation.role is None
        else Membership(rotation.tenant, rotation.role)
    )
    await emit_security_event(
        SecurityEventKind.TOKEN_REFRESHED,
        actor=str(rotation.user_id),
        subject=str(rotation.issued.family_id),
        tenant=None if rotation.tenant is None else str(rotation.tenant.id),
        details={"tenant_switch": tenant is not None},
    )
    return _token_response(identity, rotation.user_id, membership, rotation.issued, delivery)


async def logout(
    request: Request, identity: IdentityDep, payload: LogoutRequest | None = None
) -> Response:
    """End one session: revoke its refresh family and its access token; 204, idempotent.

    The family is the presented refresh token's (body or cookie) and the
    access token's (its ``sid``); the access token's ``jti`` goes on the deny
    list until it expires (without Redis it lives out its ``access_ttl``).
    """
    tokens = _refresh_tokens(identity)
    body_token = None if payload is None else payload.refresh_token
    presented, _ = _presented_refresh(request, identity, body_token)
    claims = _presented_access(request, identity)
    revoked: list[tuple[uuid.UUID, uuid.UUID]] = []
    if presented is not None:
        found = await tokens.family_of(presented)
        if found is not None and await tokens.revoke_family(found[0], RevocationReason.LOGOUT):
            revoked.append(found)
    if claims is not None:
        family = _uuid_or_none(claims.extra.get("sid"))
        user = _uuid_or_none(claims.subject)
        if (
            family is not None
            and user is not None
            and await tokens.revoke_family(family, RevocationReason.LOGOUT, user_id=user)
        ):
            revoked.append((family, user))
        if identity.deny_list is not None:
            await identity.deny_list.revoke(claims.token_id, claims.expires_at)
    for family, user in revoked:
        await emit_security_event(
            SecurityEventKind.LOGOUT,
            actor=str(user),
            subject=str(family),
            details={"token_family_id": str(family)},
        )
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    _clear_refresh_cookie(response, identity)
    return response


def _uuid_or_none(value: object) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def logout_all(request: Request, principal: Authenticated, identity: IdentityDep) -> Response:
    """Log out everywhere: revoke every refresh family and every access token issued until now."""
    user_id = _user_id(principal)
    revoked = await _refresh_tokens(identity).revoke_user(user_id, RevocationReason.LOGOUT_ALL)
    await _revoke_access(identity, user_id, _presented_access(request, identity))
    await emit_security_event(
        SecurityEventKind.LOGOUT_ALL,
        actor=str(user_id),
        subject=str(user_id),
        details={"families": len(revoked)},
    )
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    _clear_refresh_cookie(response, identity)
    return response


# -- passwords ---------------------------------------------------------------------------


async def change_password(
    request: Request,
    payload: PasswordChangeRequest,
    principal: Authenticated,
    identity: IdentityDep,
) -> JSONResponse:
    """Change the password; every other session ends, and a new pair answers for this one.

    The current password is checked through the login throttle (a stolen
    access token cannot guess it freely). Every refresh family of the user is
    revoked and every access token issued until now refused (with Redis); the
    answer is a fresh token pair for the tenant the caller's token acts for.
    """
    user_id = _user_id(principal)
    async with identity.database.sessions() as session:
        user = await get_user(session, user_id)
    if user is None:
        raise Unauthenticated(headers={"WWW-Authenticate": BEARER_CHALLENGE})
    ip = _client_ip()
    if identity.login is not None:
        await identity.login.check(user.email, ip)
    if user.password_hash is None:
        verification = await identity.hasher.verify_dummy(payload.current_password)
    else:
        verification = await identity.hasher.verify(user.password_hash, payload.current_password)
    if not verification.valid:
        if identity.login is not None:
            await identity.login.record_failure(user.email, ip)
        raise Forbidden("The current password is wrong.", extra={"reason": "wrong_password"})
    if identity.login is not None:
        await identity.login.record_success(user.email, ip)
    identity.policy.check(payload.new_password, context=[user.email, user.display_name])
    new_hash = await identity.hasher.hash(payload.new_password)
    tokens = _refresh_tokens(identity)
    async with identity.database.session() as session:
        await session.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(password_hash=new_hash, password_changed_at=utc_now())
        )
        revoked = await tokens.revoke_user(
            user_id, RevocationReason.PASSWORD_CHANGE, session=session
        )
        await discard_one_time(
            identity.one_time, session, TokenPurpose.PASSWORD_RESET, str(user_id)
        )
        membership = await _membership_for(session, user_id, principal.tenant_id)
        issued = await tokens.start(
            session, user_id, None if membership is None else membership.tenant.id
        )
    await _revoke_access(identity, user_id, _presented_access(request, identity))
    await emit_security_event(
        SecurityEventKind.PASSWORD_CHANGED,
        actor=str(user_id),
        subject=str(user_id),
        details={"families_revoked": len(revoked)},
    )
    return _token_response(identity, user_id, membership, issued, payload.refresh_token_delivery)


async def request_password_reset(
    payload: PasswordResetRequest, identity: IdentityDep, background: BackgroundTasks
) -> AcceptedAnswer:
    """Answer 202 at once; mail a reset link, after the response, when an account has the address.

    The look-up, the token and the mail all run after the response, so neither
    the answer nor its timing depends on the address.
    """
    background.add_task(_reset_in_background, identity, normalise_email(payload.email))
    return _RESET_ACCEPTED


async def _reset_in_background(identity: Identity, email: str) -> None:
    """Issue and mail a reset link for an active account; failures are logged, never raised."""
    try:
        async with identity.database.session() as session:
            user = await find_user_by_email(session, email)
            if user is None or user.disabled_at is not None:
                return
            issued = await issue_one_time(
                identity.one_time, session, TokenPurpose.PASSWORD_RESET, str(user.id)
            )
        await emit_security_event(
            SecurityEventKind.PASSWORD_RESET_REQUESTED, actor=None, subject=str(user.id)
        )
    except Exception as exc:  # noqa: BLE001 -- logged by class; the client already has its answer
        logger.warning("identity reset request not completed", error=type(exc).__name__)
        return
    mail = PASSWORD_RESET_TEMPLATE.render(
        user.email,
        link=_mail_link(identity, "/reset-password", issued.token),
        expires_in=identity.one_time.ttl(TokenPurpose.PASSWORD_RESET),
        service=_service_name(identity),
    )
    await _deliver(identity, mail)


async def reset_password(payload: ResetRequest, identity: IdentityDep) -> Response:
    """Set a new password with a reset link's token; every session of the account ends; 204.

    The address counts as verified (the link reached it). A new password that
    breaks the policy answers 422 and leaves the link usable.
    """
    identity.one_time.lookup_hash(TokenPurpose.PASSWORD_RESET, payload.token)
    identity.policy.check(payload.new_password)
    new_hash = await identity.hasher.hash(payload.new_password)
    tokens = _refresh_tokens(identity)
    async with identity.database.session() as session:
        record = await consume_one_time(
            identity.one_time, session, TokenPurpose.PASSWORD_RESET, payload.token
        )
        user = await get_user(session, uuid.UUID(record.subject))
        if user is None or user.disabled_at is not None:
            raise InvalidOneTimeToken
        # Raised inside the transaction: the token is not spent by a refused password.
        identity.policy.check(payload.new_password, context=[user.email, user.display_name])
        now = utc_now()
        await session.execute(
            update(users)
            .where(users.c.id == user.id)
            .values(
                password_hash=new_hash,
                password_changed_at=now,
                email_verified_at=user.email_verified_at or now,
            )
        )
        revoked = await tokens.revoke_user(
            user.id, RevocationReason.PASSWORD_RESET, session=session
        )
        # The address is proven now: a pending verification link (and the password,
        # name or tenant it carries from a sign-up) must not apply later.
        await discard_one_time(
            identity.one_time, session, TokenPurpose.EMAIL_VERIFICATION, str(user.id)
        )
    await _revoke_access(identity, user.id, None)
    await emit_security_event(
        SecurityEventKind.PASSWORD_RESET,
        actor=str(user.id),
        subject=str(user.id),
        details={"families_revoked": len(revoked)},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def me(principal: Authenticated, identity: IdentityDep) -> MeAnswer:
    """The signed-in user, the tenant its token acts for, and all its memberships."""
    user_id = _user_id(principal)
    async with identity.database.sessions() as session:
        user = await get_user(session, user_id)
        memberships = [] if user is None else await user_memberships(session, user_id)
    if user is None:
        raise Unauthenticated(headers={"WWW-Authenticate": BEARER_CHALLENGE})
    current = next(
        (each for each in memberships if str(each.tenant.id) == principal.tenant_id), None
    )
    return MeAnswer(
        user=UserSummary(
            id=user.id,
            email=user.email,
            display_name=user.display_name,
            email_verified=user.email_verified_at is not None,
        ),
        tenant=None if current is None else _summary(current),
        memberships=[_summary(each) for each in memberships],
    )


# -- the router ----------------------------------------------------------------------------


def auth_router() -> APIRouter:
    """Build the ``/auth`` routes; the app mounts them under ``identity.route_prefix``.

    Returns:
        A new router (one per app), prefix ``/auth``, tag ``auth``.
    """
    router = APIRouter(prefix="/auth", tags=["auth"])
    unauthenticated = ErrorCode.UNAUTHENTICATED
    invalid = ErrorCode.INVALID_INPUT
    busy = ErrorCode.SERVICE_UNAVAILABLE
    router.add_api_route(
        "/signup",
        signup,
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        summary="Sign up",
        responses=problem_responses(
            unauthenticated, ErrorCode.FORBIDDEN, ErrorCode.CONFLICT, invalid, busy
        ),
    )
    router.add_api_route(
        "/verify-email",
        verify_email,
        methods=["POST"],
        summary="Confirm an e-mail address",
        responses=problem_responses(unauthenticated, invalid),
    )
    router.add_api_route(
        "/login",
        login,
        methods=["POST"],
        response_model=TokenAnswer,
        summary="Log in",
        responses=problem_responses(
            unauthenticated,
            ErrorCode.FORBIDDEN,
            ErrorCode.CONFLICT,
            invalid,
            ErrorCode.RATE_LIMITED,
            ErrorCode.ACCOUNT_LOCKED,
            busy,
        ),
    )
    router.add_api_route(
        "/refresh",
        refresh,
        methods=["POST"],
        response_model=TokenAnswer,
        summary="Refresh the access token",
        responses=problem_responses(unauthenticated, ErrorCode.FORBIDDEN, invalid),
    )
    router.add_api_route(
        "/logout",
        logout,
        methods=["POST"],
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Log out this session",
        responses=problem_responses(invalid, ErrorCode.DEPENDENCY_FAILURE),
    )
    router.add_api_route(
        "/logout-all",
        logout_all,
        methods=["POST"],
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Log out everywhere",
        responses=problem_responses(
            unauthenticated, ErrorCode.FORBIDDEN, ErrorCode.DEPENDENCY_FAILURE
        ),
    )
    router.add_api_route(
        "/password/change",
        change_password,
        methods=["POST"],
        response_model=TokenAnswer,
        summary="Change the password",
        responses=problem_responses(
            unauthenticated,
            ErrorCode.FORBIDDEN,
            invalid,
            ErrorCode.RATE_LIMITED,
            ErrorCode.ACCOUNT_LOCKED,
            busy,
            ErrorCode.DEPENDENCY_FAILURE,
        ),
    )
    router.add_api_route(
        "/password/reset-request",
        request_password_reset,
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        summary="Ask for a password reset link",
        responses=problem_responses(invalid),
    )
    router.add_api_route(
        "/password/reset",
        reset_password,
        methods=["POST"],
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        summary="Set a new password with a reset link",
        responses=problem_responses(unauthenticated, invalid, busy, ErrorCode.DEPENDENCY_FAILURE),
    )
    router.add_api_route(
        "/me",
        me,
        methods=["GET"],
        summary="The signed-in user",
        responses=problem_responses(unauthenticated, ErrorCode.FORBIDDEN),
    )
    return router
