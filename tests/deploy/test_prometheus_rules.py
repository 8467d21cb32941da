"""Deploy artefacts: Prometheus rules, their promtool unit tests, runbooks, Grafana dashboards."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from bastion.observability import _metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
GRAFANA = DEPLOY / "grafana"
RUNBOOKS = DEPLOY / "runbooks"

# Labels every scraped series carries, added by Prometheus from the target.
TARGET_LABELS = {"job", "instance"}
# Grafana's interval variables, replaced by durations for promtool.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def _declared() -> dict[str, set[str]]:
    """Every series name bastion exports, with the label names it carries."""
    series: dict[str, set[str]] = {}
    for value in vars(_metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for family in value.describe():
            for suffix in _SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                series[family.name + suffix] = labels | extra
    return series


DECLARED = _declared()


def _strip(expr: str) -> str:
    """The expression without strings, so no label value reads as a name."""
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each metric an expression selects, with the label names its matchers use."""
    text = _strip(expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = []
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", text):
        name, matchers, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    """Label names an expression aggregates or matches on (``by (...)``, ``on (...)``)."""
    labels: set[str] = set()
    pattern = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for group in re.findall(pattern, _strip(expr)):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def run_promtool(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run promtool; the caller asserts on its exit status and shows its output."""
    return subprocess.run(
        [promtool, *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=60
    )


def check_expressions(
    promtool: str, exprs: list[str], tmp_path: Path
) -> subprocess.CompletedProcess:
    """Run ``promtool check rules`` on the expressions, each as a recording rule."""
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return run_promtool(promtool, "check", "rules", str(path))


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while building the class.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    exprs = []
    for dashboard in _dashboards().values():
        for panel in _panels(dashboard):
            exprs += [target["expr"] for target in panel["targets"]]
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(<selector>, <label>) is Grafana's, not PromQL: check the selector.
                match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
                assert match is not None, variable["definition"]
                exprs.append(match.group(1))
    for variable, duration in GRAFANA_INTERVALS.items():
        exprs = [expr.replace(variable, duration) for expr in exprs]
    return exprs


class TestExpressionChecker:
    """The helpers below find what they must, so the checks built on them can fail."""

    def test_selectors_finds_metrics_and_matcher_labels(self):
        """Metric names and matcher labels are found; functions, keywords, values are not."""
        expr = (
            'sum by (route) (rate(a_total{x="b_total", y=~"5.."}[5m])) '
            "/ on (job) group_left c > 0.5 and histogram_quantile(0.99, d_bucket) offset 1h"
        )
        assert [
            ("a_total", {"x", "y"}),
            ("c", set()),
            ("d_bucket", set()),
        ] == selectors(expr)

    def test_grouping_labels(self):
        """Labels of by, on and group_left clauses are collected."""
        expr = "sum by (a, b) (x) / on (c) group_left (d) y"
        assert {"a", "b", "c", "d"} == grouping_labels(expr)

    def test_promtool_rejects_an_invalid_expression(self, promtool, tmp_path):
        """The parse check fails on broken PromQL, so a broken panel cannot pass it."""
        result = check_expressions(promtool, ["sum by (a (rate(x[5m]))"], tmp_path)
        assert 0 != result.returncode


class TestRules:
    """deploy/prometheus/rules.yml and its unit tests."""

    def test_promtool_check_rules(self, promtool):
        """The rule file is valid for Prometheus."""
        result = run_promtool(promtool, "check", "rules", str(RULES))
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_promtool_unit_tests(self, promtool):
        """Every unit test in rules.test.yml passes: alerts fire, and stay silent when healthy."""
        # Run beside the file: rule_files in it are relative to the working directory.
        result = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_every_alert_is_tested_firing_and_silent(self):
        """Each alert has a unit test where it fires and one where it does not."""
        fired, silent = set(), set()
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else silent).add(case["alertname"])
        alerts = {rule["alert"] for rule in _alerts()}
        assert (alerts, alerts) == (fired, silent)

    def test_every_alert_is_documented(self):
        """Each alert has a severity and a summary, a description and a runbook_url."""
        incomplete = [
            rule["alert"]
            for rule in _alerts()
            if rule["labels"].get("severity") not in {"critical", "warning"}
            or not {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        ]
        assert [] == incomplete

    def test_every_runbook_url_names_an_existing_runbook(self):
        """runbook_url is deploy/runbooks/<alert>.md, and that file exists."""
        wrong = [
            rule["alert"]
            for rule in _alerts()
            if rule["annotations"]["runbook_url"] != f"deploy/runbooks/{rule['alert']}.md"
            or not (ROOT / rule["annotations"]["runbook_url"]).is_file()
        ]
        assert [] == wrong

    def test_every_runbook_belongs_to_an_alert(self):
        """No runbook is left behind by a renamed or removed alert."""
        alerts = {rule["alert"] for rule in _alerts()}
        assert alerts == {path.stem for path in RUNBOOKS.glob("*.md")}

    def test_runbooks_say_what_to_check_and_do(self):
        """Every runbook has the sections an on-call engineer looks for."""
        sections = ["## What it means", "## Check first", "## What to do", "## Escalate"]
        missing = {
            path.name: [s for s in sections if s not in path.read_text()]
            for path in RUNBOOKS.glob("*.md")
        }
        assert {name: [] for name in missing} == missing

    def test_rules_use_declared_metrics_and_labels(self):
        """Rules select only bastion's declared series (or recorded ones, or up) by their labels."""
        recorded = {rule["record"] for rule in _rules() if "record" in rule}
        known = set(DECLARED) | recorded | {"up"}
        problems = []
        for rule in _rules():
            names = set()
            for name, labels in selectors(rule["expr"]):
                names.add(name)
                if name not in known:
                    problems.append(f"{name}: not declared")
                elif name in DECLARED and not labels <= DECLARED[name] | TARGET_LABELS:
                    problems.append(f"{name}: unknown labels {labels - DECLARED[name]}")
            available = set().union(*(DECLARED.get(name, set()) for name in names))
            unknown = grouping_labels(rule["expr"]) - available - TARGET_LABELS
            if unknown and not names & recorded:
                problems.append(f"{rule.get('alert') or rule['record']}: groups by {unknown}")
        assert [] == problems


class TestDashboards:
    """deploy/grafana/*.json."""

    def test_committed_json_is_what_the_builder_writes(self):
        """The JSON files are current: regenerate with `python deploy/grafana/build.py`."""
        expected = _builder().render()
        actual = {path.name: path.read_text() for path in GRAFANA.glob("*.json")}
        assert expected == actual

    def test_the_four_dashboards_exist(self):
        """Service overview, database, authentication and dependencies dashboards."""
        titles = {dashboard["title"] for dashboard in _dashboards().values()}
        assert {
            "Bastion / Service overview",
            "Bastion / Database",
            "Bastion / Authentication",
            "Bastion / Dependencies",
        } == titles

    def test_dashboards_have_datasource_job_and_instance_variables(self):
        """Each dashboard imports anywhere: a datasource variable, then job and instance."""
        for dashboard in _dashboards().values():
            variables = {v["name"]: v["type"] for v in dashboard["templating"]["list"]}
            assert {"datasource": "datasource", "job": "query", "instance": "query"} == variables
            assert 39 == dashboard["schemaVersion"]

    def test_every_panel_and_target_uses_the_datasource_variable(self):
        """No panel is bound to one Grafana's datasource uid."""
        expected = {"type": "prometheus", "uid": "${datasource}"}
        wrong = [
            (name, panel["title"])
            for name, dashboard in _dashboards().items()
            for panel in _panels(dashboard)
            if panel["datasource"] != expected
            or any(target["datasource"] != expected for target in panel["targets"])
            or not panel["targets"]
        ]
        assert [] == wrong

    def test_every_query_is_scoped_to_job_and_instance(self):
        """Each selector of each panel carries the dashboard's job and instance filters."""
        unscoped = []
        for dashboard in _dashboards().values():
            for panel in _panels(dashboard):
                for target in panel["targets"]:
                    braces = re.findall(r"\{[^}]*\}", target["expr"])
                    if not braces or not all(
                        'job=~"$job"' in b and 'instance=~"$instance"' in b for b in braces
                    ):
                        unscoped.append(target["expr"])
        assert [] == unscoped

    def test_every_expression_parses(self, promtool, tmp_path):
        """promtool parses every panel query and variable query (as recording rules)."""
        result = check_expressions(promtool, _dashboard_exprs(), tmp_path)
        assert 0 == result.returncode, result.stdout + result.stderr

    def test_every_metric_and_label_is_declared(self):
        """Dashboards select only series declared in _metrics.py, by labels they carry."""
        problems = []
        for expr in _dashboard_exprs():
            names = set()
            for name, labels in selectors(expr):
                names.add(name)
                if name not in DECLARED and name != "up":
                    problems.append(f"{name}: not declared")
                elif name in DECLARED and not labels <= DECLARED[name] | TARGET_LABELS:
                    problems.append(f"{name}: unknown labels {labels - DECLARED[name]}")
            available = set().union(*(DECLARED.get(name, set()) for name in names))
            unknown = grouping_labels(expr) - available - TARGET_LABELS
            if unknown:
                problems.append(f"{expr}: groups by {unknown}")
        assert [] == problems

    def test_every_declared_metric_is_on_a_dashboard(self):
        """Each metric bastion exports is shown somewhere."""
        shown = {name for expr in _dashboard_exprs() for name, _ in selectors(expr)}
        families = {
            family.name
            for value in vars(_metrics).values()
            if isinstance(value, MetricWrapperBase)
            for family in value.describe()
        }
        unshown = {
            family
            for family in families
            if not any(name.startswith(family) and name in DECLARED for name in shown)
        }
        assert set() == unshown

    @pytest.mark.parametrize(
        "name", ["service-overview", "database", "authentication", "dependencies"]
    )
    def test_panels_do_not_overlap(self, name):
        """Panels tile the grid: no two share a cell, none is wider than 24 columns."""
        taken: set[tuple[int, int]] = set()
        for panel in json.loads((GRAFANA / f"{name}.json").read_text())["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            cells = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert set() == taken & cells, panel["title"]
            taken |= cells
