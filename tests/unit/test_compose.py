"""docker-compose.yml and the pieces it runs, without a Docker engine (there is none here).

`docker-compose config` (Debian package `docker-compose`, which .ci/run installs) validates the
file as Compose does; the rest reads the file itself (PyYAML resolves its `<<` merge keys):
health checks and start order, ports published to loopback only, credentials only as secrets,
the network plan, bind mounts that exist, every stockstream command one the CLI really has
(through the image's entry point), the producer's choice of source, the MinIO policies (least
privilege for what stockstream/archive/object_store.py calls), minio-init's script, the secrets
generator and the Redis ACL it writes. The container health check script is tested against a
local HTTP server. docker-compose is a tool, not a service: missing, these tests fail.
"""

from __future__ import annotations

import configparser
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
MAKE_SECRETS = DEPLOY / "compose" / "make-secrets.sh"
MINIO_DIR = DEPLOY / "compose" / "minio"
VENV_BIN = Path(sys.executable).parent

ONE_SHOTS = {"topics", "minio-init", "airflow-init"}
# Who may reach whom (docker-compose.yml's header): the plan the file must keep.
NETWORK_PLAN = {
    "kafka": {"ingest"},
    "topics": {"ingest"},
    "redis": {"ingest"},
    "minio": {"storage"},
    "minio-init": {"storage"},
    "worker": {"ingest", "storage", "monitoring", "edge"},
    "producer": {"ingest", "monitoring", "edge"},
    "prometheus": {"monitoring", "edge"},
    "alertmanager": {"monitoring", "edge"},
    "grafana": {"monitoring", "edge"},
    "airflow-db": {"analytics"},
    "airflow-init": {"analytics"},
    "airflow-api-server": {"analytics", "edge"},
    "airflow-scheduler": {"analytics", "storage", "edge"},
    "airflow-dag-processor": {"analytics"},
}
PUBLISHED = {"worker", "prometheus", "alertmanager", "grafana", "airflow-api-server"}
CREDENTIAL_NAME = re.compile(
    r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|ROUTING_KEY|WEBHOOK|REDIS_URL"
)


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose not found on PATH: install the Debian package `docker-compose`"
            " (apt-get install -y docker-compose; .ci/run does it)",
            pytrace=False,
        )
    return path


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so variables are checked by name"
    return {str(k): str(v) for k, v in env.items()}


def own_image(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("stockstream:")


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run(["sh", str(MAKE_SECRETS), str(directory)], check=True, capture_output=True)
    return directory


def run_compose(secrets_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STOCKSTREAM_SECRETS_DIR": str(secrets_dir)}
    return subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize("profile", [[], ["--profile", "analytics"]], ids=["core", "analytics"])
def test_docker_compose_accepts_the_file(secrets_dir: Path, profile: list[str]) -> None:
    result = run_compose(secrets_dir, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr
    listed = run_compose(secrets_dir, *profile, "config", "--services")
    assert set(listed.stdout.split()) == set(services())


def test_secret_files_are_all_made_by_make_secrets(secrets_dir: Path) -> None:
    declared = compose()["secrets"]
    for name, spec in declared.items():
        assert spec["file"].endswith(f"/{name}"), name
        assert (secrets_dir / name).is_file(), f"make-secrets.sh does not create {name}"
    assert {p.name for p in secrets_dir.iterdir()} == set(declared)


def test_every_service_is_checked_and_starts_after_what_it_needs() -> None:
    svcs = services()
    for name, svc in svcs.items():
        check = svc.get("healthcheck") or {}
        if name in ONE_SHOTS:
            # Their check is the exit status their dependants wait for.
            assert svc.get("restart") == "no" and check.get("disable") is True, name
        else:
            assert check.get("test") and not check.get("disable"), f"{name}: no health check"
            assert svc.get("restart") == "unless-stopped", name
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for dependency, spec in depends.items():
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            )
            assert spec == {"condition": expected}, f"{name} -> {dependency}"
    assert set(svcs["worker"]["depends_on"]) == {"kafka", "topics", "minio-init"}
    assert set(svcs["producer"]["depends_on"]) == {"kafka", "topics", "redis"}


def test_only_needed_ports_are_published_and_only_on_loopback() -> None:
    published = set()
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
            published.add(name)
    assert published == PUBLISHED
    # Replicas cannot share a fixed host port: Docker picks one per worker.
    assert services()["worker"]["ports"] == ["127.0.0.1::6066"]
    assert "container_name" not in services()["worker"]


def test_networks_are_segmented() -> None:
    svcs, networks = services(), compose()["networks"]
    assert {name: set(svc["networks"]) for name, svc in svcs.items()} == NETWORK_PLAN
    # Only `edge` leads out of the machine (and carries the published ports).
    assert {name for name, spec in networks.items() if not (spec or {}).get("internal")} == {"edge"}
    for name in PUBLISHED:
        assert "edge" in svcs[name]["networks"], name
    assert "storage" not in svcs["producer"]["networks"]
    assert "ingest" not in svcs["minio"]["networks"]
    for name in ("prometheus", "alertmanager", "grafana"):
        assert not {"ingest", "storage"} & set(svcs[name]["networks"]), name


def test_credentials_are_only_secrets(secrets_dir: Path) -> None:
    svcs = services()
    for name, svc in svcs.items():
        mounted = set(svc.get("secrets", []))
        for variable, value in environment(svc).items():
            if variable.endswith("_FILE"):
                assert value.startswith("/run/secrets/"), f"{name}: {variable}"
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {variable}"
            elif variable.endswith("_CMD"):  # Airflow's way: a command that prints the secret
                secret = value.removeprefix("cat /run/secrets/")
                assert value.startswith("cat /run/secrets/") and secret in mounted, variable
            else:
                assert not CREDENTIAL_NAME.search(variable), f"{name}: {variable} in clear"
        for reference in re.findall(r"/run/secrets/([\w.-]+)", json.dumps(svc)):
            assert reference in mounted, f"{name} reads {reference} without mounting it"
    # The strongest form: no generated credential appears in the resolved configuration.
    rendered = run_compose(secrets_dir, "--profile", "analytics", "config").stdout
    assert "services:" in rendered
    for path in secrets_dir.iterdir():
        value = path.read_text().strip()
        if value:
            for part in re.split(r"[\s:@/>]+", value):
                if len(part) >= 16:
                    assert part not in rendered, f"{path.name} leaks into the configuration"


def test_bind_mounts_exist_in_the_repository() -> None:
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose()["volumes"], f"{name}: unknown volume {source}"


def test_monitoring_configs_are_mounted_where_they_expect() -> None:
    svcs = services()
    assert "./monitoring/prometheus:/etc/prometheus:ro" in svcs["prometheus"]["volumes"]
    assert "./monitoring/alertmanager:/etc/alertmanager:ro" in svcs["alertmanager"]["volumes"]
    grafana = svcs["grafana"]["volumes"]
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    alertmanager_config = (ROOT / "monitoring/alertmanager/alertmanager.yml").read_text()
    for secret in re.findall(r"/run/secrets/([\w.-]+)", alertmanager_config):
        assert secret in svcs["alertmanager"]["secrets"], secret
    # The scrape targets of monitoring/prometheus/prometheus.yml.
    scrape = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = {
        name: job["static_configs"][0]["targets"][0]
        for name, job in jobs.items()
        if "static_configs" in job
    }
    worker, producer = environment(svcs["worker"]), environment(svcs["producer"])
    # Scaled workers are found by DNS under the service name, each replica on its web port.
    (worker_sd,) = jobs["worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"] and worker_sd["port"] == 6066
    assert worker["STOCKSTREAM_WEB_HOST"] == "0.0.0.0"
    assert targets["producer"] == f"producer:{producer['PRODUCER_METRICS_PORT']}"
    assert producer["PRODUCER_METRICS_HOST"] == "0.0.0.0"
    for name in ("worker", "producer", "alertmanager"):
        assert "monitoring" in svcs[name]["networks"], name


def test_airflow_runs_the_deployment_configuration() -> None:
    svcs = services()
    airflow = {
        name: svc
        for name, svc in svcs.items()
        if str(svc.get("image", "")).startswith("stockstream-analytics:")
    }
    assert {name: svc["command"] for name, svc in airflow.items()} == {
        "airflow-init": ["bash", "/opt/stockstream/deploy/compose/airflow/init.sh"],
        "airflow-api-server": ["api-server"],
        "airflow-scheduler": ["scheduler"],
        "airflow-dag-processor": ["dag-processor"],
    }
    config = configparser.ConfigParser()
    assert config.read(ROOT / "deploy/airflow/airflow.cfg")
    project = environment(svcs["airflow-scheduler"])["STOCKSTREAM_PROJECT_DIR"]
    for name, svc in {**airflow, "airflow-db": svcs["airflow-db"]}.items():
        assert svc["profiles"] == ["analytics"], name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
        if name == "airflow-db":
            continue
        # Every path the container is told about is a mount of the repository's file.
        config_path = Path(environment(svc)["AIRFLOW_CONFIG"])
        assert (ROOT / mounts[str(config_path.parent)] / config_path.name).is_file(), name
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svcs[name]["volumes"]}
        assert mounts[config["core"]["dags_folder"]] == "./dags", name
    scheduler = {v.split(":")[1]: v.split(":")[0] for v in svcs["airflow-scheduler"]["volumes"]}
    assert scheduler[f"{project}/scripts"] == "./scripts" and scheduler[f"{project}/dbt"] == "./dbt"
    worker_db = environment(svcs["worker"])["DUCKDB_PATH"]
    assert environment(svcs["airflow-scheduler"])["DUCKDB_PATH"] == worker_db
    assert f"warehouse:{Path(worker_db).parent}" in svcs["airflow-scheduler"]["volumes"]
    init = (ROOT / "deploy/compose/airflow/init.sh").read_text()
    for path in re.findall(r"/opt/stockstream/(deploy/airflow/\S+)", init):
        assert (ROOT / path).is_file(), path
    for secret in re.findall(r"/run/secrets/(\w+)", init):
        assert secret in svcs["airflow-init"]["secrets"], secret


def test_images_are_pinned() -> None:
    for name, svc in services().items():
        image = str(svc["image"])
        if own_image(svc) or image.startswith("stockstream-analytics:"):
            assert svc["build"]["context"] == ".", name
            continue
        tag = image.split("@")[0].rpartition(":")[2]
        assert re.search(r"\d", tag) and "latest" not in tag, f"{name}: {image}"


def entrypoint(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": os.environ["PATH"], "STOCKSTREAM_ENTRYPOINT_DRY_RUN": "1", **(env or {})},
    )
    return result.stdout.splitlines()


def test_every_stockstream_command_is_one_the_project_has() -> None:
    seen = set()
    for name, svc in services().items():
        if not own_image(svc):
            continue
        argv = entrypoint(*svc["command"])
        executable = VENV_BIN / argv[0]
        assert executable.is_file(), f"{name}: {argv[0]} is not a command of the project"
        # --help parses the whole command line (sub-command, options) and exits 0.
        result = subprocess.run(
            [str(executable), *argv[1:], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 0, f"{name}: {argv}: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower(), name
        seen.add(argv[0] if argv[0] == "faust" else " ".join(argv[:2]))
    assert seen == {"faust", "stockstream topics", "stockstream produce"}


@pytest.mark.parametrize(
    ("key", "extra_env", "args", "expected"),
    [
        (None, {}, [], ["--source", "simulate"]),
        ("", {}, [], ["--source", "simulate"]),
        (" \n\t\n", {}, [], ["--source", "simulate"]),
        ("d0fake-key\n", {}, [], ["--source", "finnhub"]),
        ("d0fake-key", {"STOCKSTREAM_LIVE_SOURCE": "finnhub-ws"}, [], ["--source", "finnhub-ws"]),
        ("d0fake-key", {}, ["--source", "replay", "--files", "a.ndjson"], ["--source", "replay"]),
        (None, {}, ["--rate", "5"], ["--source", "simulate", "--rate", "5"]),
    ],
    ids=["no-file", "empty", "blank", "key", "websocket", "explicit-source", "passes-args"],
)
def test_producer_uses_finnhub_only_with_a_key(
    tmp_path: Path, key: str | None, extra_env: dict[str, str], args: list[str], expected: list[str]
) -> None:
    key_file = tmp_path / "finnhub_api_key"
    if key is not None:
        key_file.write_text(key)
    argv = entrypoint("producer", *args, env={"FINNHUB_API_KEY_FILE": str(key_file), **extra_env})
    assert argv[:2] == ["stockstream", "produce"]
    assert argv[2 : 2 + len(expected)] == expected
    assert [a for a in argv[2:] if a not in expected] == [a for a in args if a not in expected]
    help_text = subprocess.run(
        [str(VENV_BIN / "stockstream"), "produce", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    choices = re.search(r"--source \{([^}]*)\}", help_text)
    assert choices is not None
    assert argv[argv.index("--source") + 1] in choices[1].split(",")


def test_entrypoint_defaults_to_the_worker_and_runs_other_commands_as_given() -> None:
    assert entrypoint() == ["faust", "-A", "stockstream", "worker", "-l", "info"]
    assert entrypoint("worker", env={"FAUST_LOG_LEVEL": "warning"})[-1] == "warning"
    assert entrypoint("stockstream", "tail", "aggregated") == ["stockstream", "tail", "aggregated"]


# The bucket operations stockstream/archive/object_store.py performs, and the S3 action each
# needs (MinIO checks HEAD bucket as ListBucket; multipart uploads as PutObject).
CLIENT_CALLS = {
    "bucket_exists": "s3:ListBucket",
    "make_bucket": "s3:CreateBucket",
    "put_object": "s3:PutObject",
    "get_object": "s3:GetObject",
    "list_objects": "s3:ListBucket",
}


def policy(name: str) -> dict[str, str | set[str]]:
    document = json.loads((MINIO_DIR / f"{name}.json").read_text())
    actions: dict[str, set[str]] = {}
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        for resource in statement["Resource"]:
            actions.setdefault(resource, set()).update(statement["Action"])
    return {"version": document["Version"], **actions}


def test_minio_policies_are_least_privilege() -> None:
    bucket = environment(services()["worker"])["S3_BUCKET"]
    assert environment(services()["minio-init"])["S3_BUCKET"] == bucket
    assert environment(services()["airflow-scheduler"])["S3_BUCKET"] == bucket
    source = (ROOT / "stockstream/archive/object_store.py").read_text()
    calls = set(re.findall(r"self\.client\.(\w+)\(", source))
    assert calls <= set(CLIENT_CALLS), f"object_store.py calls {calls - set(CLIENT_CALLS)}"
    # The bucket exists before the worker starts (minio-init), so make_bucket is never reached.
    needed = {CLIENT_CALLS[c] for c in calls} - {"s3:CreateBucket"}
    bucket_arn, objects_arn = f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"
    writer, reader = policy("archive-writer"), policy("analytics-reader")
    assert writer == {
        "version": "2012-10-17",
        bucket_arn: {"s3:ListBucket"},
        objects_arn: {"s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"},
    }
    assert needed <= writer[bucket_arn] | writer[objects_arn]  # type: ignore[operator]
    assert reader == {
        "version": "2012-10-17",
        bucket_arn: {"s3:ListBucket"},
        objects_arn: {"s3:GetObject"},
    }


def test_minio_init_uses_files_and_secrets_that_exist() -> None:
    script = (MINIO_DIR / "minio-init.sh").read_text()
    svc = services()["minio-init"]
    assert svc["entrypoint"] == ["/bin/sh", "/minio-init/minio-init.sh"]
    assert "./deploy/compose/minio:/minio-init:ro" in svc["volumes"]
    for name in re.findall(r"for policy in ([\w -]+); do", script)[0].split():
        assert (MINIO_DIR / f"{name}.json").is_file(), name
    used = set(re.findall(r"secret ([a-z_]+)\)", script))
    used |= {s for pair in re.findall(r"^user (\w+) (\w+) ", script, re.M) for s in pair}
    assert used == set(svc["secrets"]), used ^ set(svc["secrets"])
    assert "minio_root" not in json.dumps(services()["worker"])


@pytest.mark.parametrize(
    "script",
    [
        "deploy/docker/entrypoint.sh",
        "deploy/compose/make-secrets.sh",
        "deploy/compose/minio/minio-init.sh",
        "deploy/compose/airflow/init.sh",
        "deploy/docker/lock.sh",
    ],
)
def test_shell_scripts_parse(script: str) -> None:
    shell = "bash" if "#!/usr/bin/env bash" in (ROOT / script).read_text() else "sh"
    result = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_make_secrets_keeps_what_exists(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    subprocess.run(["sh", str(MAKE_SECRETS), str(directory)], check=True, capture_output=True)
    before = {p.name: p.read_text() for p in directory.iterdir()}
    again = subprocess.run(
        ["sh", str(MAKE_SECRETS), str(directory)], check=True, capture_output=True, text=True
    )
    assert again.stdout == "" and {p.name: p.read_text() for p in directory.iterdir()} == before
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert before["finnhub_api_key"] == before["slack_webhook_url"] == ""
    assert before["minio_root_password"] != before["archive_secret_key"]
    # A fresh run makes other values.
    other = tmp_path / "other"
    subprocess.run(["sh", str(MAKE_SECRETS), str(other)], check=True, capture_output=True)
    assert (other / "web_token").read_text() != before["web_token"]


def test_redis_acl_and_url_agree_and_fence_the_producer_keys(secrets_dir: Path) -> None:
    from stockstream.sources.finnhub import socket_lease
    from stockstream.sources.finnhub.cache import QuoteCache

    acl = (secrets_dir / "redis_acl").read_text().splitlines()
    users = {line.split()[1]: line.split()[2:] for line in acl}
    assert users["default"] == ["on", "nopass", "-@all", "+ping"]
    rules = users["stockstream"]
    password = next(r[1:] for r in rules if r.startswith(">"))
    url = (secrets_dir / "redis_url").read_text()
    assert url == f"redis://stockstream:{password}@redis:6379/0"
    [pattern] = [r[1:] for r in rules if r.startswith("~")]
    cache_prefix = inspect.signature(QuoteCache).parameters["prefix"].default
    for key_prefix in (cache_prefix, socket_lease.PREFIX):
        assert key_prefix.startswith(pattern.rstrip("*")), key_prefix
    assert "-@dangerous" in rules and "+@all" not in rules


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health/" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def healthcheck(*args: str, port: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STOCKSTREAM_WEB_PORT": port, "HEALTHCHECK_TIMEOUT_SECONDS": "2"}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, env=env
    )


def test_healthcheck_passes_only_on_a_2xx_answer(http_server: str) -> None:
    port = http_server.rpartition(":")[2]
    assert healthcheck(port=port).returncode == 0  # the worker's default: /health/ on the port
    assert healthcheck(f"{http_server}/health/").returncode == 0
    failing = healthcheck(f"{http_server}/ready/")
    assert failing.returncode == 1 and "HTTP 503" in failing.stderr
    assert healthcheck(port="1").returncode == 1  # nothing listens on port 1
