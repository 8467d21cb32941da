"""Security events into the audit trail: each identity event kind mapped to a catalogue action."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog

from bastion.audit._event import Actor, ActorType, AuditEvent, Outcome, Resource
from bastion.audit._subjects import subject_for_login, subject_for_user
from bastion.context import current_context
from bastion.data._transaction import current_session
from bastion.identity import SecurityEvent, SecurityEventKind, SecurityOutcome

if TYPE_CHECKING:
    from bastion.audit._pseudonym import LoginPseudonyms
    from bastion.audit._writer import AuditLog

__all__ = ["SECURITY_ACTIONS", "SecurityEventRecorder", "SecurityMapping", "audit_event_for"]

logger = structlog.get_logger("bastion.audit")


@dataclass(frozen=True, slots=True)
class SecurityMapping:
    """How one security event kind is recorded.

    Attributes:
        action: the catalogue action.
        resource: the type of what the event's ``subject`` names (``user``,
            ``api_key``, ``token_family``...).
        login: the subject is a login identifier's hash (a failed login, a
            lockout): the entry names it by its keyed pseudonym
            (:class:`~bastion.audit._pseudonym.LoginPseudonyms`), as resource id
            and as data subject ``login:<pseudonym>``, so erasing the person's
            e-mail address shreds its personal fields too.
    """

    action: str
    resource: str
    login: bool = False


K = SecurityEventKind

SECURITY_ACTIONS: Final[Mapping[SecurityEventKind, SecurityMapping]] = {
    K.LOGIN_SUCCEEDED: SecurityMapping("auth.login.success", "user"),
    K.LOGIN_FAILED: SecurityMapping("auth.login.failure", "login", login=True),
    K.LOGOUT: SecurityMapping("auth.logout", "token_family"),
    K.LOGOUT_ALL: SecurityMapping("auth.logout_all", "user"),
    K.LOCKOUT: SecurityMapping("auth.lockout", "login", login=True),
    K.TOKEN_REFRESHED: SecurityMapping("auth.token.refresh", "token_family"),
    K.TOKEN_FAMILY_REVOKED: SecurityMapping("auth.token.revoke", "token_family"),
    K.REFRESH_REUSE_DETECTED: SecurityMapping("auth.token.reuse_detected", "token_family"),
    K.SIGNUP: SecurityMapping("auth.signup", "user"),
    K.EMAIL_VERIFIED: SecurityMapping("auth.email.verify", "user"),
    K.PASSWORD_CHANGED: SecurityMapping("auth.password.change", "user"),
    K.PASSWORD_RESET_REQUESTED: SecurityMapping("auth.password.reset_request", "user"),
    K.PASSWORD_RESET: SecurityMapping("auth.password.reset", "user"),
    K.PASSWORD_REHASHED: SecurityMapping("auth.password.rehash", "user"),
    K.API_KEY_CREATED: SecurityMapping("api_key.create", "api_key"),
    K.API_KEY_REVOKED: SecurityMapping("api_key.revoke", "api_key"),
    K.API_KEY_REJECTED: SecurityMapping("api_key.reject", "api_key"),
    K.ROLE_CHANGED: SecurityMapping("member.role_change", "user"),
    K.PERMISSION_CHANGED: SecurityMapping("member.permission_change", "user"),
    K.MEMBER_INVITED: SecurityMapping("member.invite", "invitation"),
    K.MEMBER_JOINED: SecurityMapping("member.join", "user"),
    K.MEMBER_REMOVED: SecurityMapping("member.remove", "user"),
    K.TENANT_CREATED: SecurityMapping("tenant.create", "tenant"),
    K.TENANT_UPDATED: SecurityMapping("tenant.update", "tenant"),
    K.TENANT_SETTINGS_CHANGED: SecurityMapping("config.tenant_settings.change", "tenant"),
    K.INVITATION_REVOKED: SecurityMapping("member.invitation_revoke", "invitation"),
    K.ACCESS_DENIED: SecurityMapping("auth.access_denied", "route"),
}
"""Every :class:`~bastion.identity.SecurityEventKind`, as the audit trail records it."""


def audit_event_for(event: SecurityEvent, pseudonyms: LoginPseudonyms) -> AuditEvent:
    """The audit event that records a security event (same id, time and request).

    Args:
        event: the security event.
        pseudonyms: what names a login identifier: the event's unsalted hash of it
            never reaches an entry.

    Raises:
        KeyError: the kind has no mapping (a test pins that every kind has one).
    """
    mapping = SECURITY_ACTIONS[event.kind]
    outcome = Outcome.SUCCESS if event.outcome is SecurityOutcome.SUCCESS else Outcome.FAILURE
    if event.kind is SecurityEventKind.ACCESS_DENIED:
        outcome = Outcome.DENIED
    actor = _actor(event)
    resource_id = event.subject
    if mapping.login and event.subject is not None:
        resource_id = pseudonyms.of_hash(event.subject)
        subject: str | None = subject_for_login(resource_id)
    elif event.actor is not None:
        subject = subject_for_user(event.actor)
    elif mapping.resource == "user" and event.subject is not None:
        # Nobody signed in (a reset request): the person the event is about.
        subject = subject_for_user(event.subject)
    else:
        subject = None
    return AuditEvent(
        action=mapping.action,
        outcome=outcome,
        actor=actor,
        tenant_id=event.tenant,
        resource=Resource(mapping.resource, resource_id),
        ip=event.ip,
        request_id=event.request_id,
        occurred_at=event.occurred_at,
        details={"security_event": event.kind.value, **event.details},
        subject=subject,
        id=uuid.UUID(event.id),
    )


def _actor(event: SecurityEvent) -> Actor:
    if event.actor is not None:
        return Actor.user(event.actor)
    context = current_context()
    if context is not None and context.api_key_id is not None:
        return Actor(ActorType.API_KEY, context.api_key_id)
    return Actor(ActorType.ANONYMOUS)


class SecurityEventRecorder:
    """The security-event listener that records each event in an :class:`AuditLog`.

    Registered by :func:`~bastion.audit._build.start_audit` with
    :func:`bastion.identity.on_security_event`. A failure to record (a full
    buffer past ``enqueue_timeout``) propagates to the event's emitter, which
    logs the listener's failure by class and carries on: a login is never
    refused because the audit trail is slow.

    In ``sync`` mode an event emitted inside a unit of work
    (:func:`bastion.data.transaction`) is appended in that unit's transaction
    and commits or rolls back with it; outside one, in its own transaction
    committed before the emitter goes on. Identity emits its events after
    its transactions commit, so only an app's own emission inside a unit that
    then rolls back loses its entry. In ``async`` mode the event is buffered
    either way.
    """

    __slots__ = ("log", "pseudonyms")

    def __init__(self, log: AuditLog, pseudonyms: LoginPseudonyms) -> None:
        self.log = log
        self.pseudonyms = pseudonyms

    async def __call__(self, event: SecurityEvent) -> None:
        # The unit's session, passed explicitly: a second transaction from inside
        # a unit would wait on the locks the unit holds (SQLite's write lock).
        await self.log.record(audit_event_for(event, self.pseudonyms), session=current_session())
