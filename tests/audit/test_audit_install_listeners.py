"""Security events as audit events: every identity event kind has its catalogue action."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from bastion.audit import BASTION_ACTIONS, Actor, ActorType, Outcome, Resource
from bastion.audit._listeners import SECURITY_ACTIONS, SecurityEventRecorder, audit_event_for
from bastion.audit._pseudonym import LoginPseudonyms
from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import entries
from bastion.audit._writer import AuditLog
from bastion.context import RequestContext, bind, unbind
from bastion.data import transaction
from bastion.identity import SecurityEvent, SecurityEventKind, SecurityOutcome
from bastion.ratelimit._login import identifier_hash
from bastion.settings import AuditSettings

USER = "0190f1c2-7d4e-7a3b-8c5d-1e2f3a4b5c6d"
HASH = "9f" * 32
SECRET = b"k" * 32
PSEUDONYMS = LoginPseudonyms(SECRET)


def _event(kind: SecurityEventKind, **fields) -> SecurityEvent:
    outcome = fields.pop("outcome", SecurityOutcome.SUCCESS)
    return SecurityEvent(kind=kind, outcome=outcome, **fields)


class TestSecurityActions:
    """The table from security event kinds to catalogue actions."""

    @pytest.mark.parametrize("kind", list(SecurityEventKind))
    def test_every_kind_has_a_catalogued_action(self, kind: SecurityEventKind) -> None:
        """Each kind maps to an action of bastion's catalogue (fails when identity adds a kind)."""
        assert kind in SECURITY_ACTIONS
        assert SECURITY_ACTIONS[kind].action in BASTION_ACTIONS

    def test_no_mapping_for_unknown_kinds(self) -> None:
        """The table names only kinds identity defines."""
        assert set(SecurityEventKind) == set(SECURITY_ACTIONS)


class TestAuditEventFor:
    """One security event becomes one audit event."""

    def test_login_failure_is_encrypted_under_the_login_subject(self) -> None:
        """A failed login names the identifier's pseudonym as subject and resource, not a user."""
        event = _event(
            SecurityEventKind.LOGIN_FAILED,
            outcome=SecurityOutcome.FAILURE,
            subject=HASH,
            ip="203.0.113.9",
            request_id="req-1",
            details={"reason": "bad_password"},
        )

        audited = audit_event_for(event, PSEUDONYMS)

        assert "auth.login.failure" == audited.action
        assert Outcome.FAILURE == audited.outcome
        assert f"login:{PSEUDONYMS.of_hash(HASH)}" == audited.subject
        assert Resource("login", PSEUDONYMS.of_hash(HASH)) == audited.resource
        assert HASH not in repr(audited)
        assert Actor(ActorType.ANONYMOUS) == audited.actor
        assert "203.0.113.9" == audited.ip
        assert "req-1" == audited.request_id

    def test_keeps_id_time_tenant_and_details(self) -> None:
        """The audit entry reuses the security event's id and time, so the two correlate."""
        tenant = str(uuid.uuid4())
        event = _event(
            SecurityEventKind.ROLE_CHANGED,
            actor=USER,
            subject="0190f1c2-0000-7000-8000-000000000001",
            tenant=tenant,
            details={"role": "admin"},
        )

        audited = audit_event_for(event, PSEUDONYMS)

        assert uuid.UUID(event.id) == audited.id
        assert event.occurred_at == audited.occurred_at
        assert tenant == audited.tenant_id
        assert {"security_event": "role_changed", "role": "admin"} == dict(audited.details)
        assert Actor.user(USER) == audited.actor
        assert f"user:{USER}" == audited.subject

    def test_access_denied_is_recorded_as_denied(self) -> None:
        """A refusal for lack of permission has the outcome ``denied``, not ``failure``."""
        event = _event(SecurityEventKind.ACCESS_DENIED, outcome=SecurityOutcome.FAILURE)

        assert Outcome.DENIED == audit_event_for(event, PSEUDONYMS).outcome

    def test_reuse_detection_keeps_its_failure(self) -> None:
        """A refresh-token reuse is a failure about the token family."""
        family = str(uuid.uuid4())
        event = _event(
            SecurityEventKind.REFRESH_REUSE_DETECTED,
            outcome=SecurityOutcome.FAILURE,
            actor=USER,
            subject=family,
        )

        audited = audit_event_for(event, PSEUDONYMS)

        assert ("auth.token.reuse_detected", Outcome.FAILURE) == (audited.action, audited.outcome)
        assert Resource("token_family", family) == audited.resource

    def test_password_reset_request_names_the_account_as_subject(self) -> None:
        """Without an actor, an event about a user is encrypted under that user's key."""
        event = _event(SecurityEventKind.PASSWORD_RESET_REQUESTED, subject=USER)

        assert f"user:{USER}" == audit_event_for(event, PSEUDONYMS).subject

    def test_api_key_caller_is_the_actor(self) -> None:
        """With no user, the request's API key is the actor."""
        context = RequestContext("req-2", api_key_id="key-1")
        token = bind(context)
        try:
            audited = audit_event_for(
                _event(SecurityEventKind.API_KEY_REVOKED, subject="key-2"), PSEUDONYMS
            )
        finally:
            unbind(token)

        assert Actor(ActorType.API_KEY, "key-1") == audited.actor
        assert audited.subject is None


class TestLoginPseudonyms:
    """A login identifier is named by a keyed hash, never by its plain SHA-256."""

    def test_same_identifier_same_pseudonym(self) -> None:
        """The pseudonym of an e-mail equals that of its hash, whatever its case or spaces."""
        assert PSEUDONYMS.of_hash(identifier_hash("ann@example.test")) == (
            PSEUDONYMS.of_identifier(" Ann@Example.test ")
        )

    def test_keyed(self) -> None:
        """Another encryption key gives another pseudonym; neither is the plain hash."""
        other = LoginPseudonyms(b"o" * 32)

        assert len({PSEUDONYMS.of_hash(HASH), other.of_hash(HASH), HASH}) == 3

    def test_short_key_refused(self) -> None:
        """A key under 256 bits is refused, as for the subject keys."""
        with pytest.raises(ValueError, match="32 bytes"):
            LoginPseudonyms(b"short")


def _recorder(database, mode: str) -> SecurityEventRecorder:
    keys = SubjectKeys(database=database, master_key=SECRET, cache_ttl=60)
    log = AuditLog(AuditSettings(mode=mode), database=database, subject_keys=keys)
    return SecurityEventRecorder(log, PSEUDONYMS)


async def _rows(database):
    async with database.session() as session:
        return (await session.execute(select(entries).order_by(entries.c.seq))).all()


class TestRecorder:
    """The listener records each event where the mode and the emitter's unit say."""

    async def test_login_failure_stores_neither_address_nor_hash(self, database) -> None:
        """No column of a failed login's entry holds the e-mail or its plain hash."""
        email = "ann@example.test"
        recorder = _recorder(database, "sync")
        event = _event(
            SecurityEventKind.LOGIN_FAILED,
            outcome=SecurityOutcome.FAILURE,
            subject=identifier_hash(email),
            ip="203.0.113.9",
        )

        await recorder(event)
        [row] = await _rows(database)

        stored = repr(tuple(row))
        assert f"login:{PSEUDONYMS.of_identifier(email)}" == row.subject
        assert identifier_hash(email) not in stored
        assert email not in stored

    @pytest.mark.parametrize("mode", ["sync", "async"])
    async def test_outside_a_unit(self, database, mode: str) -> None:
        """A login failure and a role change emitted outside a transaction are both recorded."""
        recorder = _recorder(database, mode)
        failure = _event(
            SecurityEventKind.LOGIN_FAILED, outcome=SecurityOutcome.FAILURE, subject=HASH
        )
        change = _event(SecurityEventKind.ROLE_CHANGED, actor=USER, subject=USER)
        await recorder.log.start()
        try:
            await recorder(failure)
            await recorder(change)
            await recorder.log.flush()
        finally:
            await recorder.log.stop()

        assert ["auth.login.failure", "member.role_change"] == [
            row.action for row in await _rows(database)
        ]

    async def test_sync_inside_a_unit_commits_with_it(self, database) -> None:
        """Sync mode: an event emitted inside a unit is appended in its transaction."""
        recorder = _recorder(database, "sync")
        change = _event(SecurityEventKind.ROLE_CHANGED, actor=USER, subject=USER)

        async with transaction(database=database):
            await recorder(change)

        assert [uuid.UUID(change.id)] == [row.id for row in await _rows(database)]

    async def test_sync_inside_a_unit_rolls_back_with_it(self, database) -> None:
        """Sync mode: a unit that rolls back takes the entry of its change with it."""
        recorder = _recorder(database, "sync")
        change = _event(SecurityEventKind.ROLE_CHANGED, actor=USER, subject=USER)

        async def change_then_fail() -> None:
            async with transaction(database=database):
                await recorder(change)
                raise LookupError

        with pytest.raises(LookupError):
            await change_then_fail()

        assert [] == await _rows(database)
