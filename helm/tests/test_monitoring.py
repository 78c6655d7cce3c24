"""The chart's alerts and dashboard: the rules pass `promtool check rules`
and their unit tests (`promtool test rules alerts_test.yaml`: series that
fire each alert and series that do not), the chart ships them verbatim,
and the dashboard JSON is what scripts/dashboard.py writes. (Every panel's
query runs against a real Prometheus in tests/monitoring.)

promtool comes from Debian's `prometheus` package; CI installs it, and
there a missing promtool fails instead of skipping."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from test_chart import CHART, one, render

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def promtool():
    found = shutil.which("promtool")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: apt-get install prometheus")
        pytest.skip("promtool not found (apt-get install prometheus)")
    return found


def run(*args, cwd=HERE):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_their_unit_tests_pass():
    tool = promtool()
    checked = run(tool, "check", "rules", str(CHART / "files" / "alerts.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(tool, "test", "rules", "alerts_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert alerts == fired


def test_the_unit_tests_can_fail(tmp_path):
    """A rule with a changed threshold fails its test: the tests pin the rules."""
    tool = promtool()
    rules = (CHART / "files" / "alerts.yaml").read_text()
    changed = rules.replace("> 1000", "> 100000")
    assert changed != rules
    (tmp_path / "alerts.yaml").write_text(changed)
    cases = (HERE / "alerts_test.yaml").read_text().replace("../arbiter/files/alerts.yaml", "alerts.yaml")
    (tmp_path / "alerts_test.yaml").write_text(cases)
    tested = run(tool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert tested.returncode != 0 and "ArbiterFollowerLagging" in tested.stdout + tested.stderr


def test_the_chart_ships_the_rules_and_the_dashboard_when_asked():
    assert not [k for k in render() if k[0] == "PrometheusRule"]
    manifests = render("alerts.enabled=true", "alerts.labels.release=kube-prometheus",
                       "dashboards.enabled=true", "dashboards.annotations.grafana_folder=Platform")
    rule = one(manifests, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    [dashboard] = [m for (k, n), m in manifests.items() if k == "ConfigMap" and n.endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    shipped = json.loads(dashboard["data"]["arbiter.json"])
    assert shipped == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_the_dashboard_json_is_what_the_script_writes():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import dashboard
    finally:
        sys.path.pop(0)
    assert (CHART / "files" / "dashboard.json").read_text() == dashboard.render(), \
        "run python3 scripts/dashboard.py"
