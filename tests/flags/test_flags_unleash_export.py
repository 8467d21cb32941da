"""Unleash exports (``featureStrategies``, ``featureEnvironments``...) read as the client state.

The fixture ``vectors/unleash_export.json`` is an export in the shape of Unleash's
``POST /api/admin/features-batch/export`` (two features, two environments merged into
one file, a segment with its constraints added, a dependency, feature and strategy
variants, a disabled strategy, strategies out of ``sortOrder``); ``CLIENT_STATE`` is
what Unleash's ``/api/client/features`` serves for the same flags in production.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from test_flags_cli import cli, migrated  # noqa: F401 -- the CLI's fixtures
from test_flags_cli import flags as run_flags
from test_flags_routes import OPERATOR, make_app

import bastion
from bastion.errors import InvalidInput
from bastion.flags import FlagSet, flags_from_unleash
from bastion.flags._build import flags_runtime
from bastion.flags._document import parse_document
from bastion.flags._unleash import is_unleash_export
from bastion.testing import lifespan_client

EXPORT: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "unleash_export.json").read_text("utf-8")
)

CLIENT_STATE: dict[str, Any] = {
    "version": 2,
    "features": [
        {
            "name": "checkout-v2",
            "enabled": True,
            "impressionData": True,
            # Unleash serves neither the disabled strategy nor the order it was stored in.
            "strategies": [
                {"name": "default", "parameters": {}, "constraints": [], "segments": [7]},
                {
                    "name": "flexibleRollout",
                    "parameters": {"groupId": "checkout", "rollout": "30", "stickiness": "userId"},
                    "constraints": [
                        {"contextName": "country", "operator": "IN", "values": ["NO", "SE"]}
                    ],
                    "variants": EXPORT["featureStrategies"][0]["variants"],
                },
            ],
            "variants": [],
        },
        {
            "name": "new-header",
            "enabled": True,
            "strategies": [
                {
                    "name": "flexibleRollout",
                    "parameters": {"groupId": "new-header", "rollout": "100"},
                    "constraints": [],
                }
            ],
            "variants": EXPORT["featureEnvironments"][2]["variants"],
            "dependencies": [{"feature": "checkout-v2", "enabled": True}],
        },
    ],
    "segments": EXPORT["segments"],
}


def contexts() -> list[dict[str, Any]]:
    """Users across the rollout, the countries, the segment and the variant override."""
    found = []
    for user in range(400):
        country = ("NO", "SE", "DK")[user % 3]
        email = f"u{user}@example.com" if user % 7 == 0 else f"u{user}@other.org"
        found.append({"userId": str(user), "properties": {"country": country, "email": email}})
    return found


def answers(flag_set: FlagSet) -> list[tuple[bool, dict[str, Any]]]:
    return [
        (flag_set.is_enabled(name, context), flag_set.variant(name, context))
        for name in ("checkout-v2", "new-header")
        for context in contexts()
    ]


def single_environment(environment: str = "production") -> dict[str, Any]:
    """The fixture as Unleash exports it: one environment, strategies without their
    environment, segments named only, their constraints added by hand."""
    export = copy.deepcopy(EXPORT)
    export["featureStrategies"] = [
        {k: v for k, v in row.items() if k != "environment"}
        for row in export["featureStrategies"]
        if row["environment"] == environment
    ]
    export["featureEnvironments"] = [
        row for row in export["featureEnvironments"] if row["environment"] == environment
    ]
    return export


class TestExportReading:
    def test_export_evaluates_as_the_client_state(self):
        """Every user gets from the export what Unleash's client state gives them."""
        flags, segments = flags_from_unleash(EXPORT, strict=True, environment="production")
        from_export = FlagSet.from_flags(flags, segments)
        expected = answers(FlagSet.from_unleash(CLIENT_STATE))
        assert expected == answers(from_export)
        # Not vacuous: the rollout, the segment, the dependency and the override all show.
        enabled = [on for on, _ in expected]
        assert 0 < sum(enabled[:400]) < 400
        assert {"tall", "short"} <= {v["name"] for _, v in expected[400:]}
        tester = {"userId": "42", "properties": {"email": "eve@example.com"}}
        assert "tall" == from_export.variant("new-header", tester)["name"]

    def test_strategies_follow_sort_order_and_the_disabled_one_never_admits(self):
        """Rules are in Unleash's sortOrder; the disabled pilot admits none of its users."""
        flags, _ = flags_from_unleash(EXPORT, strict=True, environment="production")
        checkout = next(flag for flag in flags if flag.key == "checkout-v2")
        assert (["a02", "a03", "a01"], [True, False, False]) == (
            [rule.id[-3:] for rule in checkout.rules if rule.id],
            [rule.disabled for rule in checkout.rules],
        )
        flag_set = FlagSet.from_flags(flags, _)
        assert not flag_set.is_enabled("checkout-v2", {"userId": "1"})

    def test_the_other_environment_is_its_own_configuration(self):
        """In development checkout-v2 is on for everyone and new-header is off."""
        flags, segments = flags_from_unleash(EXPORT, strict=True, environment="development")
        flag_set = FlagSet.from_flags(flags, segments)
        assert (True, False) == (
            flag_set.is_enabled("checkout-v2", {"userId": "99"}),
            flag_set.is_enabled("new-header", {"userId": "99"}),
        )

    def test_an_export_of_one_environment_is_read_whatever_the_setting(self):
        """An export holds one environment; its rows are read under any setting."""
        export = single_environment()
        assert is_unleash_export(export)
        flags, segments = flags_from_unleash(export, strict=True, environment="staging")
        assert answers(FlagSet.from_unleash(CLIENT_STATE)) == answers(
            FlagSet.from_flags(flags, segments)
        )

    def test_several_environments_none_chosen_is_422_naming_them(self):
        """Several environments and none the setting's: INVALID_INPUT naming those present."""
        for environment in (None, "staging"):
            with pytest.raises(InvalidInput) as raised:
                parse_document(EXPORT, environment=environment)
            [error] = raised.value.errors
            assert "body.featureEnvironments" == error.field
            assert "'production'" in error.message
            assert "'development'" in error.message
        with pytest.raises(ValueError, match="'development'"):
            FlagSet.from_unleash(EXPORT)

    def test_segment_named_without_constraints_is_refused_not_widened(self):
        """Unleash's export names segments only: the import refuses, leniently it admits none."""
        export = single_environment()
        export["segments"] = [{"id": 7, "name": "beta-testers"}]
        with pytest.raises(InvalidInput) as raised:
            parse_document(export)
        assert ["body.segments[0].constraints"] == [e.field for e in raised.value.errors]
        lenient = FlagSet.from_unleash(export)
        beta = {"userId": "1", "properties": {"email": "a@example.com", "country": "DK"}}
        assert not lenient.is_enabled("checkout-v2", beta)

    def test_archived_features_and_strays_are_handled(self):
        """Archived features are gone, as in Unleash; a row about no feature is refused."""
        export = single_environment()
        export["features"].append({"name": "retired", "archived": True})
        export["featureEnvironments"].append({"featureName": "retired", "enabled": True})
        flags, _ = flags_from_unleash(export, strict=True)
        assert ["checkout-v2", "new-header"] == [flag.key for flag in flags]
        export["featureEnvironments"].append({"featureName": "ghost", "enabled": True})
        with pytest.raises(InvalidInput) as raised:
            parse_document(export)
        assert ["body.featureEnvironments[3].featureName"] == [e.field for e in raised.value.errors]


# A beta tester (the segment admits them) and an outsider, both outside the Nordics.
SERVED_CONTEXTS = [
    {"userId": "100", "properties": {"email": "ana@example.com", "country": "DK"}},
    {"userId": "100", "properties": {"email": "x@other.org", "country": "DK"}},
]


class TestEntryPoints:
    async def test_seed_file_accepts_an_export(self, sqlite_url, tmp_path):
        """An export as the seed file fills the store with its flags, evaluated alike."""
        seed = tmp_path / "unleash-export.json"
        seed.write_text(json.dumps(single_environment()))
        app = FastAPI()
        bastion.install(
            app,
            secrets={"development_directory": str(tmp_path / "secrets")},
            logging={"level": "WARNING"},
            migrations={"mode": "auto"},
            database={"url": sqlite_url},
            flags={"seed_file": str(seed), "store_url": "memory://"},
        )
        async with lifespan_client(app):
            runtime = flags_runtime(app)
            stored = await runtime.store.get("new-header")
            served = [runtime.flags.flag_set.is_enabled("checkout-v2", c) for c in SERVED_CONTEXTS]
        assert [True, False] == served
        assert ("checkout-v2", 2) == (
            stored.flag.prerequisites[0].flag,
            len(stored.flag.variants),
        )

    async def test_admin_import_accepts_an_export(self, sqlite_url):
        """POST /admin/features/import takes an export; the flags answer as in Unleash."""
        app = make_app(sqlite_url)
        async with lifespan_client(app, headers=OPERATOR) as client:
            response = await client.post("/admin/features/import", json=single_environment())
            assert 200 == response.status_code, response.text

            async def is_enabled(context):
                answer = await client.post(
                    "/admin/features/checkout-v2/evaluate", json={"context": context}
                )
                return answer.json()["evaluation"]["value"]

            seen = [await is_enabled(c) for c in SERVED_CONTEXTS]
        assert [True, False] == seen

    def test_cli_import_accepts_an_export(self, cli, migrated, tmp_path):  # noqa: F811
        """`bastion flags import export.json` stores the export's flags with their rules."""
        path = tmp_path / "export.json"
        path.write_text(json.dumps(single_environment()))
        result = run_flags(cli, "import", str(path))
        assert 0 == result.exit_code, result.stderr
        assert "created 2" in result.stdout
        shown = json.loads(run_flags(cli, "get", "checkout-v2").stdout)["flag"]
        assert (True, 3, [True, False, False]) == (
            shown["enabled"],
            len(shown["rules"]),
            [rule.get("disabled", False) for rule in shown["rules"]],
        )
