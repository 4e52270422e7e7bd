"""The Helm chart (deploy/helm/stockstream): `helm lint`, `helm template`, the rendered manifests
against Kubernetes' own JSON schemas (kubernetes-validate, offline), the values schema refusing
bad values, and the rendered configuration accepted by the settings with STOCKSTREAM_ENV=prod.

helm is a tool, not a service: these tests fail, never skip, when it is missing
(scripts/go_tools.sh installs it into .local/bin; .ci/run does that first).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from stockstream.envconfig import secret_variables
from stockstream.settings import Settings, documented_variables, load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "stockstream"
VALUES = {name: CHART / "ci" / f"{name}-values.yaml" for name in ("minimal", "prod")}
# The oldest Kubernetes the chart is checked against and the newest schemas installed.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SECRETS_DIR = "/run/secrets/stockstream"


def helm() -> str:
    local = ROOT / ".local" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if found is None:
        pytest.fail("helm not found: run scripts/go_tools.sh (it installs into .local/bin)")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, check=False)


def template_args(values: str | None, sets: dict[str, str] | None, kube: str) -> list[str]:
    args = [str(CHART), "--kube-version", kube]
    if values is not None:
        args += ["-f", str(VALUES[values])]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render(
    values: str | None = "minimal",
    sets: dict[str, str] | None = None,
    kube: str = KUBE_VERSIONS[-1],
) -> list[dict[str, Any]]:
    result = run_helm("template", "t", *template_args(values, sets, kube))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(values: str | None = "minimal", sets: dict[str, str] | None = None) -> str:
    result = run_helm("template", "t", *template_args(values, sets, KUBE_VERSIONS[-1]))
    assert result.returncode != 0, "rendered although it should not have"
    return result.stderr


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} rendered"
    return found[0]


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_is_clean(values: str) -> None:
    result = run_helm("lint", "--strict", *template_args(values, None, KUBE_VERSIONS[0]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_manifests_match_the_kubernetes_schemas(values: str, kube: str) -> None:
    docs = render(values, kube=kube)
    kinds = sorted(d["kind"] for d in docs)
    expected = [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    if values == "prod":
        expected += ["ServiceMonitor", "ServiceMonitor"]
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: not in Kubernetes' schemas, checked by the next test
        # strict: a misspelt or misplaced field is an error, not silently dropped.
        kubernetes_validate.validate(doc, kube, strict=True)


# The part of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) the chart
# uses, with its types; the CRD's own schema is not installable offline.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "labels"],
            "properties": {"labels": {"additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def test_service_monitors_scrape_what_the_pods_serve() -> None:
    docs = render("prod")
    services = [d for d in docs if d["kind"] == "Service"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        jsonschema.validate(monitor, SERVICE_MONITOR)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
        # The same path the pod's scrape annotation announces.
        (pod,) = [
            d["spec"]["template"]
            for d in deployments
            if d["spec"]["selector"]["matchLabels"] == matched[0]["spec"]["selector"]
        ]
        assert pod["metadata"]["annotations"]["prometheus.io/path"] == endpoint["path"]


def test_monitoring_can_be_left_to_annotations_or_nothing() -> None:
    docs = render("minimal", {"monitoring.scrapeAnnotations": "false"})
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert not any(key.startswith("prometheus.io/") for key in annotations)


def test_worker_replicas_stop_at_the_partition_count() -> None:
    docs = render("prod", {"worker.replicas": "12"})
    assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 12
    assert one(docs, "ConfigMap")["data"]["KAFKA_PARTITIONS"] == "12"
    error = render_error("prod", {"worker.replicas": "13"})
    assert "worker.replicas (13) must not exceed kafka.partitions (12)" in error


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("worker.replicas", "0", "at '/worker/replicas'"),
        ("environment", "dev", "at '/environment'"),
        ("producer.source", "websocket", "at '/producer/source'"),
        ("kafka.bootstrapServers", "kafka-without-port", "at '/kafka/bootstrapServers'"),
        ("kafka.partitions", "-1", "at '/kafka/partitions'"),
        ("warehouse.backend", "duckdb", "at '/warehouse/backend'"),
        # helm 3.22 reports a propertyNames failure under a wrong path: match the name.
        ("config.FINNHUB_API_KEY", "plain-key", "invalid propertyName 'FINNHUB_API_KEY'"),
        ("config.log_level", "INFO", "invalid propertyName 'log_level'"),
        ("secrets.files.KAFKA_PARTITIONS", "k", "invalid propertyName 'KAFKA_PARTITIONS'"),
        ("worker.resources.requests.memory", "lots", "at '/worker/resources/requests/memory'"),
        ("podSecurityContext.runAsNonRoot", "false", "at '/podSecurityContext/runAsNonRoot'"),
        ("replicas", "3", "additional properties 'replicas' not allowed"),
    ],
)
def test_helm_lint_refuses_a_bad_value(setting: str, value: str, named: str) -> None:
    args = template_args("minimal", {setting: value}, KUBE_VERSIONS[-1])
    result = run_helm("lint", "--strict", *args)
    assert result.returncode != 0, f"{setting}={value} accepted"
    assert "values don't meet the specifications of the schema" in result.stdout
    assert named in result.stdout


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"kafka.bootstrapServers": ""}, "kafka.bootstrapServers is required"),
        ({"image.repository": ""}, "image.repository is required"),
        ({"secrets.existingSecret": ""}, "secrets.existingSecret (or secrets.secretProviderClass)"),
        ({"objectStore.endpoint": ""}, "objectStore.endpoint is required while archive.enabled"),
        ({"secrets.files.STOCKSTREAM_WEB_TOKEN": "null"}, "STOCKSTREAM_WEB_TOKEN is required"),
        ({"producer.source": "finnhub"}, "FINNHUB_API_KEY is required"),
        ({"warehouse.backend": "bigquery"}, "warehouse.bqProject is required"),
        ({"config.KAFKA_PARTITIONS": "24"}, "config.KAFKA_PARTITIONS: set by the chart"),
    ],
)
def test_rendering_refuses_values_that_cannot_work(sets: dict[str, str], message: str) -> None:
    assert message in render_error("minimal", sets)


def test_staging_runs_without_a_token_but_not_without_the_cluster() -> None:
    docs = render(
        "minimal", {"environment": "staging", "secrets.files.STOCKSTREAM_WEB_TOKEN": "null"}
    )
    assert one(docs, "ConfigMap")["data"]["STOCKSTREAM_ENV"] == "staging"
    assert not any(v["name"] == "secrets" for v in pod_spec(docs, "-worker")["volumes"])


def pod_spec(docs: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment", suffix)["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("suffix", ["-worker", "-producer"])
def test_pods_run_unprivileged_on_a_read_only_root(suffix: str) -> None:
    docs = render("prod")
    spec = pod_spec(docs, suffix)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    # Every place the process writes is a volume; secrets are read-only files.
    assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/var/lib/stockstream"]
    assert mounts[SECRETS_DIR]["secret"]["secretName"] == "stockstream"
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["mountPath"] == SECRETS_DIR)
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]
    assert container["image"] == "ghcr.io/example/stockstream:1.2.3"


def test_worker_probes_and_disruption_budget() -> None:
    docs = render("prod")
    spec = pod_spec(docs, "-worker")
    (container,) = spec["containers"]
    assert container["args"][0] == "worker"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 6066}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready/", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 300
    worker = one(docs, "Deployment", "-worker")
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(docs, "Service", "-worker")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_producer_runs_the_chosen_source_with_its_spool_claim() -> None:
    docs = render("prod", {"producer.spoolClaim": "stockstream-spool"})
    spec = pod_spec(docs, "-producer")
    (container,) = spec["containers"]
    assert container["args"] == ["producer", "--source", "finnhub-ws"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == "stockstream-spool"
    assert one(docs, "Deployment", "-producer")["spec"]["strategy"]["type"] == "Recreate"
    assert not [
        d
        for d in render("minimal", {"producer.enabled": "false"})
        if "producer" in str(d["metadata"]["name"])
    ]


def test_secrets_can_come_from_a_secret_provider_class() -> None:
    docs = render(
        "minimal",
        {"secrets.existingSecret": "", "secrets.secretProviderClass": "stockstream-gcp"},
    )
    volumes = {v["name"]: v for v in pod_spec(docs, "-worker")["volumes"]}
    assert volumes["secrets"]["csi"] == {
        "driver": "secrets-store.csi.k8s.io",
        "readOnly": True,
        "volumeAttributes": {"secretProviderClass": "stockstream-gcp"},
    }


@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_configuration_is_accepted_by_prod(values: str, tmp_path: Path) -> None:
    """The pods' environment (ConfigMap + the worker's own variables), with the Secret's keys as
    files, loads with STOCKSTREAM_ENV=prod: the chart satisfies what prod refuses."""
    docs = render(values)
    data: dict[str, str] = dict(one(docs, "ConfigMap")["data"])
    for name, path in data.items():
        if path.startswith(SECRETS_DIR + "/"):
            local = tmp_path / path.removeprefix(SECRETS_DIR + "/")
            local.write_text(f"value-of-{local.name}\n")
            data[name] = str(local)
    (container,) = pod_spec(docs, "-worker")["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    data["STOCKSTREAM_WEB_URL"] = env["STOCKSTREAM_WEB_URL"].replace("$(POD_IP)", "10.0.0.7")
    settings = load_settings(environ=data, dotenv_path=None, config_dir=ROOT / "config")
    assert settings.env == "prod"
    assert settings.kafka.replication_factor >= 2
    assert settings.worker.web_host == "0.0.0.0" and settings.worker.web_token
    assert settings.worker.web_url == "http://10.0.0.7:6066"
    assert settings.worker.store == "rocksdb://"
    assert (
        settings.kafka.bootstrap_servers
        == yaml.safe_load(VALUES[values].read_text())["kafka"]["bootstrapServers"]
    )
    if values == "prod":
        assert settings.kafka.sasl_password.reveal() == "value-of-kafka-password"
        assert settings.warehouse.backend == "bigquery"
        assert settings.archive.endpoint == "https://storage.googleapis.com"


def test_chart_knows_every_secret_setting() -> None:
    """values.schema.json lists the settings that are secrets (only through secrets.files, never
    in config) and those naming a file: they must follow settings.py."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    secrets = schema["properties"]["secrets"]["properties"]
    assert secrets["files"]["propertyNames"]["enum"] == secret_variables(Settings)
    refused = schema["properties"]["config"]["propertyNames"]["allOf"][1]["not"]["enum"]
    assert refused == secret_variables(Settings)
    known = {name for name, _ in documented_variables()}
    assert set(secrets["paths"]["propertyNames"]["enum"]) <= known


def test_packaged_chart_leaves_the_test_values_out(tmp_path: Path) -> None:
    result = run_helm("package", str(CHART), "--version", "9.8.7", "-d", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "stockstream-9.8.7.tgz") as archive:
        names = set(archive.getnames())
    assert "stockstream/values.schema.json" in names
    assert "stockstream/templates/worker.yaml" in names
    assert not [n for n in names if n.startswith("stockstream/ci/")]


def test_helm_defaults_to_a_supported_kubernetes() -> None:
    """scripts/go_tools.sh links helm like its release build; a plain `go install` would default
    to Kubernetes 1.20, which the chart's kubeVersion (>= 1.30) refuses."""
    result = run_helm("template", "t", str(CHART), "-f", str(VALUES["minimal"]))
    assert result.returncode == 0, result.stderr
    too_old = run_helm("template", "t", *template_args("minimal", None, "1.29.0"))
    assert too_old.returncode != 0 and "kubeVersion" in too_old.stderr
