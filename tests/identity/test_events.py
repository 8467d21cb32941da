"""Security events: building, context, listeners, the log line, and the lockout bridge."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.context import RequestContext, bind, unbind
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    SecurityOutcome,
    emit_lockout,
    emit_security_event,
    log_security_event,
    on_security_event,
    remove_security_listener,
)
from bastion.ratelimit._login import LockoutEvent, LoginThrottle, identifier_hash
from bastion.settings import LoginThrottleSettings


@pytest.fixture
def received():
    """Events delivered to a listener registered for the test."""
    events: list[SecurityEvent] = []
    on_security_event(events.append)
    yield events
    remove_security_listener(events.append)


@pytest.fixture
def request_context():
    """A bound request context with a user, a tenant and a client."""
    token = bind(
        RequestContext(request_id="req-1", client_ip="203.0.113.9", tenant_id="t1", user_id="u1")
    )
    yield
    unbind(token)


def emitted(kind: str, outcome: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bastion_identity_security_events_total", {"kind": kind, "outcome": outcome}
        )
        or 0.0
    )


class TestEmit:
    async def test_delivers(self, received):
        """An emitted event reaches the listener with what was given."""
        event = await emit_security_event(
            SecurityEventKind.ROLE_CHANGED,
            actor="u1",
            subject="u2",
            tenant="t1",
            details={"role": "admin", "previous": "member"},
        )
        assert [event] == received
        assert SecurityOutcome.SUCCESS == event.outcome
        assert {"role": "admin", "previous": "member"} == dict(event.details)
        assert 7 == uuid.UUID(event.id).version
        assert dt.UTC == event.occurred_at.tzinfo

    async def test_context(self, received, request_context):
        """Actor, tenant, ip and request id come from the request context when not given."""
        event = await emit_security_event("logout")
        assert ("u1", "t1", "203.0.113.9", "req-1") == (
            event.actor,
            event.tenant,
            event.ip,
            event.request_id,
        )
        explicit = await emit_security_event("logout", actor="u9", tenant="t9")
        assert ("u9", "t9") == (explicit.actor, explicit.tenant)

    @pytest.mark.parametrize(
        ("kind", "outcome"),
        [
            ("login_failed", "failure"),
            ("lockout", "failure"),
            ("refresh_reuse_detected", "failure"),
            ("login_succeeded", "success"),
            ("password_changed", "success"),
        ],
    )
    async def test_default_outcome(self, received, kind, outcome):
        """Refusals default to failure, everything else to success; each is counted."""
        before = emitted(kind, outcome)
        event = await emit_security_event(kind)
        assert outcome == event.outcome
        assert before + 1 == emitted(kind, outcome)

    async def test_unknown_kind(self):
        """A kind outside the enum is refused."""
        with pytest.raises(ValueError, match="not a valid SecurityEventKind"):
            await emit_security_event("made_up")

    async def test_ids_sort_by_time(self, received):
        """Event ids are UUIDv7s whose millisecond prefix never goes backwards."""
        prefixes = [(await emit_security_event("logout")).id[:13] for _ in range(50)]
        assert sorted(prefixes) == prefixes


class TestNoSecrets:
    @pytest.mark.parametrize(
        "key",
        [
            "password",
            "new_password",
            "token",
            "refresh_token",
            "access_token",
            "email",
            "e-mail",
            "pepper",
            "api_key",
            "client_secret",
            "authorization",
        ],
    )
    def test_forbidden_keys(self, key):
        """Details named like a secret or an e-mail are a programming error."""
        with pytest.raises(ValueError, match="secret or personal data"):
            SecurityEvent(
                SecurityEventKind.LOGIN_FAILED, SecurityOutcome.FAILURE, details={key: "x"}
            )

    @pytest.mark.parametrize(
        "value", ["someone@example.org", "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1MSJ9.sig"]
    )
    def test_forbidden_values(self, value):
        """A detail value shaped like an e-mail address or a JWT is refused."""
        with pytest.raises(ValueError, match="e-mail or a token"):
            SecurityEvent(
                SecurityEventKind.LOGIN_FAILED, SecurityOutcome.FAILURE, details={"note": value}
            )

    def test_email_subject(self):
        """An e-mail address as actor or subject is refused: ids or identifier hashes only."""
        with pytest.raises(ValueError, match="identifier_hash"):
            SecurityEvent(
                SecurityEventKind.LOGIN_FAILED, SecurityOutcome.FAILURE, subject="a@example.org"
            )

    def test_allowed_keys(self):
        """Ids, hashes and prefixes of secrets are fine."""
        event = SecurityEvent(
            SecurityEventKind.TOKEN_FAMILY_REVOKED,
            SecurityOutcome.SUCCESS,
            details={"token_family_id": "f1", "identifier_hash": "ab", "key_prefix": "bk_12"},
        )
        assert 3 == len(event.details)

    def test_scalars_only(self):
        """Details are short scalars."""
        with pytest.raises(ValueError, match="must be a str"):
            SecurityEvent(SecurityEventKind.LOGOUT, SecurityOutcome.SUCCESS, details={"x": [1]})
        with pytest.raises(ValueError, match="over 512"):
            SecurityEvent(
                SecurityEventKind.LOGOUT, SecurityOutcome.SUCCESS, details={"x": "y" * 513}
            )

    def test_frozen_details(self):
        """A listener cannot change the details the next listener sees."""
        event = SecurityEvent(SecurityEventKind.LOGOUT, SecurityOutcome.SUCCESS, details={"a": 1})
        with pytest.raises(TypeError):
            event.details["a"] = 2  # type: ignore[index]


class TestListeners:
    async def test_failing_listener_isolated(self, received):
        """A listener that raises is logged by class name only; the others still run."""

        def broken(event):
            raise RuntimeError("alice@example.org could not be notified")

        on_security_event(broken)
        # Registered after the broken one: it must still be called.
        later: list[SecurityEvent] = []
        on_security_event(later.append)
        try:
            with capture_logs() as logs:
                event = await emit_security_event("password_reset", subject="u1")
        finally:
            remove_security_listener(broken)
            remove_security_listener(later.append)
        assert [event] == received
        assert [event] == later
        failures = [line for line in logs if line["event"] == "security event listener failed"]
        assert 1 == len(failures)
        assert "RuntimeError" == failures[0]["error"]
        assert "alice" not in repr(logs)

    async def test_async_listener(self):
        """Coroutine listeners are awaited before emit returns."""
        seen: list[str] = []

        async def record(event):
            seen.append(event.kind)

        on_security_event(record)
        try:
            await emit_security_event("api_key_created", subject="k1")
        finally:
            remove_security_listener(record)
        assert ["api_key_created"] == seen

    async def test_register_once(self, received):
        """Registering a listener twice delivers once; removing an unknown one is harmless."""
        on_security_event(received.append)
        await emit_security_event("logout")
        assert 1 == len(received)
        remove_security_listener(print)


class TestLogLine:
    async def test_one_line(self):
        """The default listener writes one security_event line with the event's fields."""
        with capture_logs() as logs:
            event = await emit_security_event(
                "login_failed",
                subject=identifier_hash("Alice@Example.org"),
                ip="198.51.100.7",
                request_id="req-2",
                details={"reason": "bad_password"},
            )
        lines = [line for line in logs if line["event"] == "security_event"]
        assert 1 == len(lines)
        line = lines[0]
        assert "login_failed" == line["kind"]
        assert "failure" == line["outcome"]
        assert event.id == line["security_event_id"]
        assert "req-2" == line["request_id"]
        assert {"reason": "bad_password"} == line["details"]
        assert "alice" not in repr(line).lower()

    async def test_can_be_removed(self):
        """Removing the default listener silences the log line."""
        remove_security_listener(log_security_event)
        try:
            with capture_logs() as logs:
                await emit_security_event("logout")
        finally:
            on_security_event(log_security_event)
        assert [] == [line for line in logs if line["event"] == "security_event"]

    def test_as_dict(self):
        """as_dict is JSON-ready: strings for kind, outcome and time."""
        event = SecurityEvent(SecurityEventKind.LOGOUT, SecurityOutcome.SUCCESS, actor="u1")
        data = event.as_dict()
        assert ("logout", "success", "u1") == (data["kind"], data["outcome"], data["actor"])
        assert event.occurred_at.isoformat() == data["occurred_at"]


class TestLockoutBridge:
    async def test_lockout_forwarded(self, received):
        """The login throttle's LockoutEvent becomes a lockout security event."""
        until = dt.datetime(2026, 12, 7, 12, 15, tzinfo=dt.UTC)
        await emit_lockout(
            LockoutEvent(
                identifier_hash=identifier_hash("bob@example.org"),
                ip="192.0.2.1",
                until=until,
                duration=900.0,
                repetition=0,
            )
        )
        (event,) = received
        assert SecurityEventKind.LOCKOUT == event.kind
        assert SecurityOutcome.FAILURE == event.outcome
        assert identifier_hash("bob@example.org") == event.subject
        assert "192.0.2.1" == event.ip
        assert {"until": until.isoformat(), "duration": 900.0, "repetition": 0} == dict(
            event.details
        )

    async def test_wired_to_throttle(self, received):
        """One listener on the throttle turns its lockout into exactly one security event."""
        throttle = LoginThrottle(LoginThrottleSettings(lockout_threshold=3, ip_limit="100/minute"))
        throttle.on_lockout(emit_lockout)
        for _ in range(3):
            await throttle.record_failure("carol@example.org", "192.0.2.2")
        assert [SecurityEventKind.LOCKOUT] == [event.kind for event in received]
        assert identifier_hash("carol@example.org") == received[0].subject
