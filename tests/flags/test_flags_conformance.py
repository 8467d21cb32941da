"""Conformance of the flag engine with the Unleash client specification."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bastion.flags._engine import FlagSet

# The copy kept in the repository, and the workspace's own directory (where reviewers
# add cases) when there is one: ../shared next to the checkout, or BASTION_UNLEASH_VECTORS.
VENDORED = Path(__file__).parent / "vectors" / "unleash"
WORKSPACE = Path(
    os.environ.get(
        "BASTION_UNLEASH_VECTORS",
        Path(__file__).resolve().parents[3] / "shared" / "conformance" / "unleash",
    )
)
# applicationHostname compares the machine's name; the specification's cases assume none
# of their host names is this machine's, so the tests pin one.
HOSTNAME = "bastion-conformance-host"


def _files() -> list[Path]:
    sources = [VENDORED]
    if WORKSPACE.is_dir() and WORKSPACE.resolve() != VENDORED.resolve():
        sources.append(WORKSPACE)
    return sorted(path for source in sources for path in source.glob("*.json"))


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _not_client_state(path: Path) -> str | None:
    """Why ``path`` is not a case file of the evaluator; ``None`` when it is one."""
    try:
        spec = _load(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not readable JSON ({type(exc).__name__}: {exc})"
    if not isinstance(spec, dict):
        # Upstream's specifications/index.json lists the files: not a case file.
        return f"a JSON {type(spec).__name__}, not a case file (an index?)"
    state = spec.get("state")
    if not isinstance(state, dict):
        return "no 'state' object"
    if "events" in state:
        # The delta-API files (an event stream under state.events) test a transport,
        # not the evaluator.
        return "a delta-API file (state.events): a transport, not the evaluator"
    shapes = {
        "its state has no 'features' list": isinstance(state.get("features"), list),
        "its 'tests' is not a list": isinstance(spec.get("tests", []), list),
        "its 'variantTests' is not a list": isinstance(spec.get("variantTests", []), list),
    }
    return next((why for why, fits in shapes.items() if not fits), None)


def _is_client_state(path: Path) -> bool:
    return _not_client_state(path) is None


def _source(path: Path) -> str:
    return "repo" if path.is_relative_to(VENDORED) else "workspace"


def _cases(kind: str) -> list:
    cases = []
    for path in _files():
        if not _is_client_state(path):
            continue
        spec = _load(path)
        for index in range(len(spec.get(kind, []))):
            cases.append(pytest.param(path, index, id=f"{_source(path)}/{path.stem}/{index}"))
    return cases


_compiled: dict[Path, FlagSet] = {}


def _flag_set(path: Path) -> FlagSet:
    flag_set = _compiled.get(path)
    if flag_set is None:
        flag_set = FlagSet.from_unleash(_load(path)["state"], hostname=HOSTNAME)
        _compiled[path] = flag_set
    return flag_set


class TestVectorsPresent:
    def test_vendored_vectors_are_there(self):
        """The repository's copy holds the 14 specification files and their 215 cases."""
        specs = [_load(path) for path in VENDORED.glob("*.json")]
        cases = sum(len(s.get("tests", [])) + len(s.get("variantTests", [])) for s in specs)
        assert (14, 215) == (len(specs), cases)

    def test_every_file_is_client_state(self):
        """Every vendored file is a client-state case file, so none is silently skipped."""
        assert {} == {
            path.name: why for path in VENDORED.glob("*.json") if (why := _not_client_state(path))
        }

    def test_workspace_vectors_are_there(self):
        """The workspace's directory is run too when there is one; its absence is a visible
        skip, not a failure: a checkout elsewhere (CI's among them) has no ../shared, and
        the vendored copy holds the specification's cases."""
        if not WORKSPACE.is_dir():
            pytest.skip(
                f"{WORKSPACE} is missing: the workspace's Unleash cases "
                "(../shared/conformance/unleash, or BASTION_UNLEASH_VECTORS) are not run; "
                "the vendored copy is"
            )
        assert any(WORKSPACE.glob("*.json")), f"{WORKSPACE} holds no .json file"


class TestFiles:
    @pytest.mark.parametrize("path", _files(), ids=lambda path: f"{_source(path)}/{path.name}")
    def test_file_is_a_case_file(self, path):
        """Every file is read; one that is not a client-state case file is a visible skip."""
        why = _not_client_state(path)
        if why is not None:
            pytest.skip(f"{path}: {why}")
        spec = _load(path)
        assert spec.get("tests") or spec.get("variantTests"), f"{path} holds no case"


class TestIsEnabled:
    @pytest.mark.parametrize(("path", "index"), _cases("tests"))
    def test_case(self, path, index):
        """is_enabled answers every `tests` case as the specification expects."""
        case = _load(path)["tests"][index]
        flag_set = _flag_set(path)
        assert case["expectedResult"] == flag_set.is_enabled(case["toggleName"], case["context"])


class TestVariant:
    @pytest.mark.parametrize(("path", "index"), _cases("variantTests"))
    def test_case(self, path, index):
        """variant answers every `variantTests` case with Unleash's name, payload and flags."""
        case = _load(path)["variantTests"][index]
        expected = case["expectedResult"]
        actual = _flag_set(path).variant(case["toggleName"], case["context"])
        if "feature_enabled" not in expected:
            # Older cases predate feature_enabled; they pin the other members.
            actual.pop("feature_enabled")
        assert expected == actual
