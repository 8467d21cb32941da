"""The OpenFeature provider: bastion's flags through openfeature-sdk's client, hooks included."""

from __future__ import annotations

import secrets

import pytest
import structlog
from openfeature import api
from openfeature.evaluation_context import EvaluationContext as OpenFeatureContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.hook import Hook

from bastion.flags import _engine as engine
from bastion.flags._engine import FlagSet
from bastion.flags._flags import UNKNOWN_FLAG, Flags
from bastion.flags._model import Constraint, Flag, FlagType, Operator, Rule, Variant
from bastion.flags._provider import BastionProvider, to_evaluation_context

FLAGS = [
    Flag(
        key="beta",
        enabled=True,
        rules=(
            Rule(
                id="acme",
                constraints=(
                    Constraint(context="tenantId", operator=Operator.IN, values=("acme",)),
                ),
            ),
        ),
    ),
    Flag(key="dark", enabled=False),
    Flag(
        key="theme",
        type=FlagType.STRING,
        enabled=True,
        default="light",
        variants=(Variant(name="dark", value="dark"),),
        rules=(Rule(id="everyone", variant="dark"),),
    ),
    Flag(
        key="page-size",
        type=FlagType.NUMBER,
        enabled=True,
        variants=(Variant(name="forty", value=40),),
        rules=(Rule(variant="forty"),),
    ),
    Flag(
        key="ratio",
        type=FlagType.NUMBER,
        enabled=True,
        variants=(Variant(name="half", value=0.5),),
        rules=(Rule(variant="half"),),
    ),
    Flag(
        key="limits",
        type=FlagType.JSON,
        enabled=True,
        variants=(Variant(name="v1", value={"uploads": 10}),),
        rules=(Rule(variant="v1"),),
    ),
    Flag(
        key="admins",
        enabled=True,
        rules=(
            Rule(
                constraints=(Constraint(context="roles", operator=Operator.IN, values=("admin",)),)
            ),
        ),
    ),
    Flag(
        key="alice",
        enabled=True,
        rules=(
            Rule(
                constraints=(Constraint(context="userId", operator=Operator.IN, values=("alice",)),)
            ),
        ),
    ),
]


class Recorder(Hook):
    """Records which stages of OpenFeature's hook lifecycle ran, per flag."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, str]] = []

    def before(self, hook_context, hints):
        self.stages.append(("before", hook_context.flag_key))

    def after(self, hook_context, details, hints):
        self.stages.append(("after", hook_context.flag_key))

    def error(self, hook_context, exception, hints):
        self.stages.append(("error", hook_context.flag_key))


@pytest.fixture
def flags() -> Flags:
    """The flags above, compiled."""
    return Flags(FlagSet.from_flags(FLAGS))


@pytest.fixture
def client(flags):
    """An OpenFeature client of a domain of its own, served by bastion's provider."""
    domain = f"bastion-{secrets.token_hex(4)}"
    api.set_provider(BastionProvider(flags), domain)
    yield api.get_client(domain)
    api.clear_providers()
    api.clear_hooks()


class TestResolution:
    def test_metadata_names_bastion(self, client):
        """The provider reports itself as ``bastion``."""
        assert "bastion" == api.get_provider_metadata(client.domain).name

    def test_targeting_match_reports_reason_and_rule(self, client):
        """A matched rule resolves on, with TARGETING_MATCH and the rule in the metadata."""
        details = client.get_boolean_details(
            "beta", False, OpenFeatureContext(attributes={"tenantId": "acme"})
        )
        assert (True, Reason.TARGETING_MATCH, None) == (
            details.value,
            details.reason,
            details.error_code,
        )
        assert "acme" == details.flag_metadata["rule"]

    def test_no_match_serves_the_flags_default(self, client):
        """A context no rule admits gets the flag's default (off) with DEFAULT, not an error."""
        details = client.get_boolean_details(
            "beta", True, OpenFeatureContext(attributes={"tenantId": "other"})
        )
        assert (False, Reason.DEFAULT, None) == (details.value, details.reason, details.error_code)

    def test_kill_switch_is_disabled(self, client):
        """A flag switched off resolves to its default with reason DISABLED."""
        details = client.get_boolean_details("dark", True)
        assert (False, Reason.DISABLED) == (details.value, details.reason)

    def test_string_flag_serves_its_variant(self, client):
        """A string flag's value and variant come from the variant the rule names."""
        details = client.get_string_details("theme", "light")
        assert ("dark", "dark", Reason.TARGETING_MATCH) == (
            details.value,
            details.variant,
            details.reason,
        )

    def test_number_flag_as_integer_and_float(self, client):
        """A whole number resolves as an integer and as a float."""
        assert 40 == client.get_integer_value("page-size", 10)
        assert 40.0 == client.get_float_value("page-size", 1.5)
        assert isinstance(client.get_integer_value("page-size", 10), int)

    def test_fractional_number_is_not_an_integer(self, client):
        """0.5 asked as an integer is TYPE_MISMATCH and the caller's default."""
        details = client.get_integer_details("ratio", 7)
        assert (7, ErrorCode.TYPE_MISMATCH) == (details.value, details.error_code)
        assert 0.5 == client.get_float_value("ratio", 1.0)

    def test_json_flag_as_object(self, client):
        """A JSON flag resolves as an object."""
        assert {"uploads": 10} == client.get_object_value("limits", {})

    def test_missing_flag_is_flag_not_found_and_default(self, client):
        """An unknown key never raises: the default, reason ERROR, FLAG_NOT_FOUND."""
        details = client.get_boolean_details("nope", True)
        assert (True, Reason.ERROR, ErrorCode.FLAG_NOT_FOUND) == (
            details.value,
            details.reason,
            details.error_code,
        )

    def test_wrong_type_is_type_mismatch_and_default(self, client):
        """A string flag asked as a boolean is TYPE_MISMATCH with the caller's default."""
        details = client.get_boolean_details("theme", True)
        assert (True, Reason.ERROR, ErrorCode.TYPE_MISMATCH) == (
            details.value,
            details.reason,
            details.error_code,
        )


class TestContext:
    def test_targeting_key_is_the_user_id(self, client):
        """OpenFeature's targeting key is bastion's ``userId``."""
        assert client.get_boolean_value("alice", False, OpenFeatureContext("alice"))
        assert not client.get_boolean_value("alice", False, OpenFeatureContext("bob"))

    def test_snake_case_and_list_attributes(self, client):
        """``tenant_id`` is read as ``tenantId``, and a ``roles`` list matches IN."""
        assert client.get_boolean_value(
            "beta", False, OpenFeatureContext(attributes={"tenant_id": "acme"})
        )
        context = OpenFeatureContext(attributes={"roles": ["viewer", "admin"]})
        assert client.get_boolean_value("admins", False, context)

    def test_unusable_context_is_invalid_context(self, client):
        """A ``roles`` attribute that is not a list of strings resolves to the default."""
        details = client.get_boolean_details(
            "admins", True, OpenFeatureContext(attributes={"roles": 5})
        )
        assert (True, ErrorCode.INVALID_CONTEXT) == (details.value, details.error_code)

    def test_unusable_context_is_logged_and_counted(self, client, flags, monkeypatch):
        """INVALID_CONTEXT is counted as ERROR and logged with the flag and code, no values."""
        monkeypatch.setattr(engine, "_last_logged", {})
        context = OpenFeatureContext("secret-user", {"roles": 5, "email": "ann@example.com"})
        with structlog.testing.capture_logs() as logs:
            client.get_boolean_details("admins", True, context)
            client.get_boolean_details("nope", True, context)
        logged = [
            (e["flag"], e["error_code"]) for e in logs if e["event"] == "flags.evaluation_error"
        ]
        assert [("admins", "INVALID_CONTEXT"), ("nope", "INVALID_CONTEXT")] == logged
        assert "secret-user" not in repr(logs)
        assert "example.com" not in repr(logs)
        # An unknown key is counted under "<unknown>": callers cannot grow the label set.
        assert {("admins", "ERROR"): 1, (UNKNOWN_FLAG, "ERROR"): 1} == flags.evaluation_counts()

    def test_fraction_asked_as_integer_is_counted_as_error(self, client, flags):
        """A TYPE_MISMATCH found by the provider's conversion is counted once, as ERROR."""
        client.get_integer_details("ratio", 7)
        assert {("ratio", "ERROR"): 1} == flags.evaluation_counts()

    def test_translation_keeps_custom_attributes(self):
        """Attributes bastion has no field for become custom properties."""
        context = to_evaluation_context(
            OpenFeatureContext(
                "u-1", {"plan": "pro", "remoteAddress": "10.0.0.1", "ip": "10.0.0.2"}
            )
        )
        assert ("u-1", {"plan": "pro"}) == (context.user_id, dict(context.properties))
        assert context.ip in ("10.0.0.1", "10.0.0.2")

    def test_global_context_merges_with_the_invocation(self, client):
        """The API-level context (OpenFeature merges it) reaches the provider."""
        api.set_evaluation_context(OpenFeatureContext(attributes={"tenantId": "acme"}))
        try:
            assert client.get_boolean_value("beta", False)
        finally:
            api.set_evaluation_context(OpenFeatureContext())


class TestLifecycle:
    def test_hooks_run_around_resolution(self, client):
        """Before and after hooks run for a resolved flag, the error hook for a missing one."""
        recorder = Recorder()
        client.add_hooks([recorder])
        client.get_boolean_value("beta", False)
        client.get_boolean_value("nope", False)
        assert [
            ("before", "beta"),
            ("after", "beta"),
            ("before", "nope"),
            ("error", "nope"),
        ] == recorder.stages

    def test_a_replaced_flag_set_is_served_at_once(self, client, flags):
        """The provider reads the facade, so a refresh (replace) is visible to the next call."""
        assert not client.get_boolean_value("dark", False)
        flags.replace(FlagSet.from_flags([Flag(key="dark", enabled=True)], revision=2))
        assert client.get_boolean_value("dark", False)

    async def test_async_resolution(self, client):
        """The async API resolves through the same provider."""
        details = await client.get_string_details_async("theme", "light")
        assert ("dark", Reason.TARGETING_MATCH) == (details.value, details.reason)
