"""Event preparation: validation, what the request context fills in, and details' canonical form."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid

import pytest

from bastion.audit._catalogue import ActionCatalogue
from bastion.audit._event import Actor, ActorType, AuditEvent, Resource
from bastion.audit._prepare import EntryPreparer, log_id_for
from bastion.context import RequestContext, bind, unbind

NOW = dt.datetime(2026, 3, 14, 15, 9, 26, 535897, tzinfo=dt.UTC)
TENANT = uuid.UUID("0192a0e4-6a53-7c1e-9f5e-0a1b2c3d4e5f")


def preparer(*, partition: str = "global", details_max_bytes: int = 4096) -> EntryPreparer:
    return EntryPreparer(
        catalogue=ActionCatalogue(),
        partition=partition,  # type: ignore[arg-type]
        details_max_bytes=details_max_bytes,
        mask_keys=("iban",),
        clock=lambda: NOW,
    )


class Colour(enum.Enum):
    RED = "red"


class TestValidation:
    def test_unknown_action_is_refused(self):
        """An action outside the catalogue raises ValueError naming it."""
        with pytest.raises(ValueError, match=r"document\.frobnicate"):
            preparer().prepare(AuditEvent(action="document.frobnicate"))

    def test_unknown_outcome_is_refused(self):
        """An outcome outside success/failure/denied raises ValueError."""
        with pytest.raises(ValueError, match="outcome"):
            preparer().prepare(AuditEvent(action="tenant.update", outcome="maybe"))

    def test_naive_time_is_refused(self):
        """occurred_at without a timezone raises ValueError."""
        with pytest.raises(ValueError, match="timezone-aware"):
            preparer().prepare(
                AuditEvent(action="tenant.update", occurred_at=dt.datetime(2026, 1, 1))
            )

    def test_tenant_must_be_a_uuid(self):
        """A tenant id that is not a UUID raises ValueError."""
        with pytest.raises(ValueError, match="tenant_id"):
            preparer().prepare(AuditEvent(action="tenant.update", tenant_id="acme"))

    def test_too_long_text_names_the_field(self):
        """A value longer than its column raises ValueError naming the field; nothing is cut."""
        with pytest.raises(ValueError, match=r"resource\.id"):
            preparer().prepare(
                AuditEvent(action="tenant.update", resource=Resource("tenant", "x" * 256))
            )

    def test_nul_in_text_is_refused(self):
        """A NUL character (PostgreSQL text cannot hold it) raises ValueError."""
        with pytest.raises(ValueError, match="request_id"):
            preparer().prepare(AuditEvent(action="tenant.update", request_id="a\x00b"))

    def test_details_above_the_bound_are_refused(self):
        """Details whose canonical JSON exceeds details_max_bytes raise ValueError."""
        with pytest.raises(ValueError, match="details_max_bytes"):
            preparer(details_max_bytes=64).prepare(
                AuditEvent(action="tenant.update", details={"note": "é" * 40})
            )

    def test_details_must_be_json(self):
        """A details value JSON has no form for raises ValueError naming where it is."""
        with pytest.raises(ValueError, match=r"details\.blob"):
            preparer().prepare(AuditEvent(action="tenant.update", details={"blob": object()}))

    def test_nested_bad_value_names_its_path(self):
        """A bad value deep in details is named by its path."""
        with pytest.raises(ValueError, match=r"details\.items\[\]\.when is a set"):
            preparer().prepare(
                AuditEvent(action="tenant.update", details={"items": [{"when": {1}}]})
            )

    def test_details_reject_nan(self):
        """NaN in details raises ValueError."""
        with pytest.raises(ValueError, match="NaN"):
            preparer().prepare(AuditEvent(action="tenant.update", details={"x": float("nan")}))


class TestDetails:
    def test_canonical_json(self):
        """Details are written with sorted keys, no spaces and UTF-8 as is."""
        entry = preparer().prepare(
            AuditEvent(action="tenant.update", details={"b": [1, 2.5], "a": "ünï", "c": None})
        )
        assert '{"a":"ünï","b":[1,2.5],"c":null}' == entry.details

    def test_values_without_a_json_type_become_text(self):
        """Datetimes, UUIDs, decimals and enums are written as their text forms."""
        details = {
            "at": NOW,
            "id": TENANT,
            "amount": decimal.Decimal("10.50"),
            "colour": Colour.RED,
            "kind": ActorType.USER,
        }
        entry = preparer().prepare(AuditEvent(action="tenant.update", details=details))
        assert (
            '{"amount":"10.50","at":"2026-03-14T15:09:26.535897+00:00","colour":"red",'
            f'"id":"{TENANT}","kind":"user"}}'
        ) == entry.details

    def test_secrets_are_masked_and_the_callers_dict_is_untouched(self):
        """Secret keys (the logs' and audit.mask_keys) are masked in a copy of the details."""
        details = {"password": "hunter2", "nested": {"iban": "DE00 1234"}, "name": "q3"}
        entry = preparer().prepare(AuditEvent(action="tenant.update", details=details))
        assert '{"name":"q3","nested":{"iban":"***"},"password":"***"}' == entry.details
        assert "hunter2" == details["password"]

    def test_empty_details(self):
        """No details are written as an empty object."""
        assert "{}" == preparer().prepare(AuditEvent(action="tenant.update")).details


class TestContext:
    def test_request_context_fills_the_gaps(self):
        """Actor, tenant, request id, trace id and client IP come from the request."""
        context = RequestContext(
            request_id="req-1", client_ip="203.0.113.7", trace_id="ab" * 16, tenant_id=str(TENANT)
        )
        context.user_id = "42"
        token = bind(context)
        try:
            entry = preparer().prepare(AuditEvent(action="tenant.update"))
        finally:
            unbind(token)
        assert ("user", "42") == (entry.actor_type, entry.actor_id)
        assert TENANT == entry.tenant_id
        assert ("req-1", "ab" * 16, "203.0.113.7") == (entry.request_id, entry.trace_id, entry.ip)
        assert "user:42" == entry.subject

    def test_api_key_actor(self):
        """A request authenticated by an API key names the key as the actor."""
        context = RequestContext(request_id="req-2", api_key_id="key-7")
        token = bind(context)
        try:
            entry = preparer().prepare(AuditEvent(action="api_key.reject"))
        finally:
            unbind(token)
        assert ("api_key", "key-7") == (entry.actor_type, entry.actor_id)

    def test_the_event_wins_over_the_context(self):
        """Fields the event sets are kept even inside a request."""
        token = bind(RequestContext(request_id="req-3", client_ip="198.51.100.1"))
        try:
            entry = preparer().prepare(
                AuditEvent(action="tenant.update", request_id="mine", ip="192.0.2.9")
            )
        finally:
            unbind(token)
        assert ("mine", "192.0.2.9") == (entry.request_id, entry.ip)

    def test_outside_a_request(self):
        """Without a request the actor is anonymous and the time is the clock's."""
        entry = preparer().prepare(AuditEvent(action="auth.signup"))
        assert ("anonymous", None) == (entry.actor_type, entry.actor_id)
        assert NOW == entry.occurred_at
        assert "anonymous:2026-03" == entry.subject

    def test_time_is_converted_to_utc(self):
        """An aware occurred_at in another zone is stored as the same instant in UTC."""
        paris = dt.timezone(dt.timedelta(hours=1))
        at = dt.datetime(2026, 1, 1, 0, 30, tzinfo=paris)
        entry = preparer().prepare(AuditEvent(action="tenant.update", occurred_at=at))
        assert dt.datetime(2025, 12, 31, 23, 30, tzinfo=dt.UTC) == entry.occurred_at
        assert "anonymous:2025-12" == entry.subject

    def test_explicit_subject_and_email(self):
        """An event's subject is kept, and the actor's e-mail is carried to be sealed."""
        entry = preparer().prepare(
            AuditEvent(
                action="auth.login.failure",
                actor=Actor(ActorType.ANONYMOUS, email="a@example.com"),
                subject="login:abc",
            )
        )
        assert ("login:abc", "a@example.com") == (entry.subject, entry.email)


class TestLogIds:
    def test_global_partition(self):
        """One log, global, whatever the tenant."""
        assert "global" == log_id_for("global", TENANT)

    def test_tenant_partition(self):
        """A log per tenant, and system for events without one."""
        assert (f"tenant/{TENANT}", "system") == (
            log_id_for("tenant", TENANT),
            log_id_for("tenant", None),
        )

    def test_prepared_entry_names_its_log(self):
        """A prepared entry carries the log id of its tenant under the tenant partition."""
        entry = preparer(partition="tenant").prepare(
            AuditEvent(action="tenant.update", tenant_id=str(TENANT))
        )
        assert f"tenant/{TENANT}" == entry.log_id
