"""The monitoring configuration (monitoring/): Prometheus config, recording and alert rules and
their unit tests, Alertmanager routing and inhibition, the Grafana dashboard and its
provisioning.

promtool (Debian package `prometheus`) and amtool (`prometheus-alertmanager`) are the checkers:
they are tools, not services, so these tests fail, never skip, when they are missing.
`metric_references()` and `declared_sample_names()` are shared with
tests/integration/test_metrics_exposition.py, which compares the references with a real
worker's /metrics/.

One module over 400 lines on purpose: the rules, the routing and the dashboard refer to each
other (alert names, labels, metric names), and these checks read them side by side.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

MONITORING = ROOT / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
ALERTMANAGER_CONFIG = MONITORING / "alertmanager" / "alertmanager.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stockstream.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "stockstream.yml"
RUNBOOKS = MONITORING / "README.md"

# Where docker-compose mounts monitoring/grafana/dashboards in the Grafana container
# (monitoring/README.md, "Running it").
GRAFANA_DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"

# Metric names other engineers add (agreed across the team), with their types: referenced by
# rules and the dashboard before every one of them is in stockstream/metrics.py.
AGREED_METRICS = {
    "stockstream_consumer_lag_records": "gauge",
    "stockstream_consumer_lag_seconds": "gauge",
    "stockstream_window_close_lag_seconds": "histogram",
    "stockstream_agent_batch_seconds": "histogram",
    "stockstream_anomalies_total": "counter",
    "stockstream_alert_deliveries_total": "counter",
    "stockstream_alert_pending": "gauge",
}
# Alertmanager's own metrics (it is scraped as job "alertmanager").
ALERTMANAGER_METRICS = {
    "alertmanager_notifications_total",
    "alertmanager_notifications_failed_total",
}

_METRIC = re.compile(r"(?<![\w:])((?:stockstream|alertmanager)_[a-zA-Z0-9_]+)(?![\w:])")
_RECORDED = re.compile(r"(?<![\w:])([a-zA-Z_]+:[a-zA-Z0-9_:]+)")
# Grafana's built-in interval variables, replaced by a duration before PromQL is parsed.
_GRAFANA_INTERVALS = re.compile(
    r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}"
)


# -- helpers shared with the integration test -------------------------------------------------


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install the Debian package `{package}`"
            f" (apt-get install -y {package}; .ci/run does it)",
            pytrace=False,
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            yield from group["rules"]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def promql_of_dashboard(expr: str) -> str:
    """A panel's query as plain PromQL: Grafana's interval variables become 5m."""
    return _GRAFANA_INTERVALS.sub("5m", expr)


def all_expressions() -> dict[str, str]:
    """Every PromQL expression of the rules and the dashboard, by where it is."""
    found = {f"rule {r.get('alert') or r.get('record')}": str(r["expr"]) for r in rules()}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            found[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    return found


def metric_references() -> dict[str, set[str]]:
    """Metric (sample) names referenced by the rules and the dashboard -> where."""
    refs: dict[str, set[str]] = {}
    for where, expr in all_expressions().items():
        for name in _METRIC.findall(expr):
            refs.setdefault(name, set()).add(where)
    return refs


def sample_names(family: str, kind: str) -> set[str]:
    """The sample names a metric family exposes (prometheus_client's text format)."""
    if kind == "counter":
        base = family.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind == "histogram":
        return {family, *(f"{family}_{s}" for s in ("bucket", "count", "sum", "created"))}
    if kind == "summary":
        return {family, *(f"{family}_{s}" for s in ("count", "sum", "created"))}
    return {family}


def declared_sample_names() -> set[str]:
    """Sample names of every metric in stockstream/metrics.py, labelled or not."""
    from stockstream.metrics import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= sample_names(family.name, family.type)
    return names


def agreed_sample_names() -> set[str]:
    names: set[str] = set()
    for family, kind in AGREED_METRICS.items():
        names |= sample_names(family, kind)
    return names


# -- Prometheus --------------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks the rule_files: the glob must find every one of them.
    assert f"{len(RULE_FILES)} rule files found" in result.stdout
    for path in RULE_FILES:
        assert f"rules/{path.name}" in result.stdout


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for name, job in jobs.items()
    }
    # Every replica of a scaled worker is its own instance: found by DNS, not one static name.
    assert jobs["worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 6066, "refresh_interval": "30s"}
    ]
    assert "static_configs" not in jobs["worker"]
    assert jobs["worker"]["metrics_path"] == "/metrics/"
    assert [t.split(":")[0] for t in targets["producer"]] == ["producer"]
    assert targets["alertmanager"] == ["alertmanager:9093"]
    alerting = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alerting == ["alertmanager:9093"]


def test_rules_are_valid() -> None:
    promtool = tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    promtool = tool("promtool", "prometheus")
    assert RULE_TESTS, "no promtool tests in monitoring/prometheus/tests"
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The promtool tests can fail: the same tests against rules with one threshold moved."""
    promtool = tool("promtool", "prometheus")
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in RULE_FILES:
        text = path.read_text()
        if path.name == "alerts.yml":
            assert "max by (job, topic) (stockstream_consumer_lag_seconds) > 300" in text
            text = text.replace(
                "max by (job, topic) (stockstream_consumer_lag_seconds) > 300",
                "max by (job, topic) (stockstream_consumer_lag_seconds) > 3000",
            )
        (tmp_path / "rules" / path.name).write_text(text)
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    result = run(promtool, "test", "rules", *map(str, sorted((tmp_path / "tests").glob("*.yml"))))
    assert result.returncode != 0
    assert "StockstreamConsumerLagHigh" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts without a test that fires them"
    assert names - quiet == set(), "alerts without a test where they stay quiet"


def test_every_alert_says_what_to_do() -> None:
    readme = RUNBOOKS.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", readme, re.MULTILINE)}
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["labels"]["service"] in {"worker", "producer", "alertmanager"}, name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key}"
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "monitoring/README.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no runbook entry"


def test_every_runbook_entry_belongs_to_an_alert() -> None:
    section = RUNBOOKS.read_text().split("## Runbooks", 1)[1].split("\n## ", 1)[0]
    entries = set(re.findall(r"^### (\S+)\s*$", section, re.MULTILINE))
    assert entries == {rule["alert"] for rule in alerts()}


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- names referenced by rules and dashboard --------------------------------------------------


def test_referenced_metrics_exist() -> None:
    """A typo in a rule or a panel fails here; the integration test compares with a real
    worker's /metrics/ as well."""
    known = declared_sample_names() | agreed_sample_names() | ALERTMANAGER_METRICS
    unknown = {
        name: sorted(where) for name, where in metric_references().items() if name not in known
    }
    assert unknown == {}


def test_referenced_recording_rules_exist() -> None:
    recorded = recorded_names()
    for where, expr in all_expressions().items():
        for name in _RECORDED.findall(expr):
            assert name in recorded, f"{where}: {name} is not a recording rule"


def test_reference_check_sees_a_typo() -> None:
    assert "stockstream_quote_total" in {
        name for name in _METRIC.findall('sum(rate(stockstream_quote_total{outcome="x"}[5m]))')
    }
    assert "stockstream_quote_total" not in declared_sample_names() | agreed_sample_names()


# -- Alertmanager ------------------------------------------------------------------------------


def test_alertmanager_config_is_valid() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    result = run(amtool, "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (
            ["severity=critical", "alertname=StockstreamWorkerDown", "service=worker"],
            "pagerduty-and-slack",
        ),
        (
            ["severity=warning", "alertname=StockstreamProducerSpooling", "service=producer"],
            "slack",
        ),
        (["alertname=Unlabelled"], "slack"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    result = run(
        amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={receiver}", *labels,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_receivers_read_secrets_from_files() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    receivers = {r["name"]: r for r in config["receivers"]}
    paging = receivers["pagerduty-and-slack"]
    assert [c["routing_key_file"] for c in paging["pagerduty_configs"]]
    for receiver in receivers.values():
        for slack in receiver.get("slack_configs", []):
            assert slack["api_url_file"] and "api_url" not in slack
        for pagerduty in receiver.get("pagerduty_configs", []):
            assert "routing_key" not in pagerduty and "service_key" not in pagerduty
    assert "slack_api_url" not in config.get("global", {})


def test_inhibit_rules_name_existing_alerts_and_labels() -> None:
    """Every alert an inhibit rule names exists, and carries the labels it must share (as the
    promtool tests show them firing)."""
    names = {rule["alert"] for rule in alerts()}
    fired = fired_labels()
    config = load_yaml(ALERTMANAGER_CONFIG)
    worker_down = config["inhibit_rules"][0]
    assert worker_down["source_matchers"] == ['alertname="StockstreamWorkerDown"']
    assert "StockstreamConsumerLagHigh" in worker_down["target_matchers"][0]
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            parsed = re.fullmatch(r'alertname(=~|=)"(.*)"', matcher)
            assert parsed, f"{matcher}: only alertname matchers are expected"
            op, value = parsed.groups()
            listed = value.split("|") if op == "=~" else [value]
            assert set(listed) <= names, f"{matcher} names an alert that does not exist"
            for name in listed:
                for labels in fired[name]:
                    missing = set(inhibit["equal"]) - set(labels)
                    assert not missing, f"{name} fires without {missing}"


def fired_labels() -> dict[str, list[dict[str, str]]]:
    """alertname -> the label sets the promtool tests expect it to fire with."""
    out: dict[str, list[dict[str, str]]] = {}
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                for alert in check.get("exp_alerts") or []:
                    out.setdefault(check["alertname"], []).append(alert["exp_labels"])
    return out


def test_alertmanager_templates_render() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    result = run(
        amtool, "template", "render",
        f"--template.glob={MONITORING / 'alertmanager' / 'templates' / '*.tmpl'}",
        '--template.text={{ template "stockstream.title" . }}\n{{ template "stockstream.text" . }}',
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Runbook:" in result.stdout


# -- Grafana -----------------------------------------------------------------------------------


def test_dashboard_provider_points_at_the_dashboard() -> None:
    provider = load_yaml(DASHBOARD_PROVIDER)
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["folder"]
    assert entry["options"]["path"] == GRAFANA_DASHBOARDS_MOUNT
    assert DASHBOARD.parent == GRAFANA / "dashboards" and DASHBOARD.is_file()
    # The mount is documented where docker-compose users look for it.
    assert f"monitoring/grafana/dashboards:{GRAFANA_DASHBOARDS_MOUNT}" in RUNBOOKS.read_text()


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    sources = load_yaml(DATASOURCES)
    assert sources["apiVersion"] == 1
    uids = {s["uid"]: s for s in sources["datasources"]}
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        refs = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        for ref in refs:
            assert ref["uid"] in uids, f"panel {panel['title']!r}: unknown datasource {ref}"
            assert ref["type"] == uids[ref["uid"]]["type"] == "prometheus"


def _check_as_rules(tmp_path: Path, expressions: list[str]) -> subprocess.CompletedProcess[str]:
    """promtool parses PromQL when it checks rules: every expression as a recording rule."""
    promtool = tool("promtool", "prometheus")
    group = {
        "name": "dashboard",
        "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(expressions)],
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    return run(promtool, "check", "rules", str(path))


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    expressions = [promql_of_dashboard(e) for e in dashboard_expressions()]
    assert len(expressions) >= 20
    assert not any("$" in e for e in expressions), "a Grafana variable is not substituted"
    result = _check_as_rules(tmp_path, expressions)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(expressions)} rules found" in result.stdout


def test_promql_check_rejects_a_broken_expression(tmp_path: Path) -> None:
    result = _check_as_rules(
        tmp_path, ["sum by (reason) (rate(stockstream_dead_letters_total[5m])"]
    )
    assert result.returncode != 0


def test_dashboard_covers_the_operator_view() -> None:
    titles = {p["title"] for p in dashboard_panels() if p["type"] == "row"}
    assert titles >= {
        "Throughput", "Lag", "Windows", "Dead letters", "Archive and warehouse", "Producer",
        "Prices and event time", "Anomalies and alerts",
    }  # fmt: skip
    referenced = set(metric_references())
    for family in (
        "stockstream_quotes_total", "stockstream_windows_emitted_total",
        "stockstream_consumer_lag_records", "stockstream_consumer_lag_seconds",
        "stockstream_dead_letters_total", "stockstream_archive_blocked",
        "stockstream_warehouse_up", "stockstream_producer_spool_pending",
        "stockstream_watermark_seconds", "stockstream_anomalies_total",
        "stockstream_alert_deliveries_total", "stockstream_window_close_lag_seconds_bucket",
    ):  # fmt: skip
        assert family in referenced, family


def test_every_dead_letter_reason_is_watched() -> None:
    """A new reason must be placed: input (share of the input), pipeline (any is alerted) or
    alert delivery (StockstreamAnomalyAlertsFailing already covers alert-failed)."""
    from stockstream.contracts.dead_letters import Reason

    by_name = {rule["alert"]: str(rule["expr"]) for rule in alerts()}

    def reasons(alert: str) -> set[str]:
        found = re.search(r'stockstream_dead_letters_total\{reason=~"([^"]+)"\}', by_name[alert])
        assert found, alert
        return set(found.group(1).split("|"))

    watched = (
        reasons("StockstreamDeadLetterRateHigh")
        | reasons("StockstreamDeadLettersPipelineFault")
        | {Reason.ALERT_FAILED.value}
    )
    assert watched == {reason.value for reason in Reason}
