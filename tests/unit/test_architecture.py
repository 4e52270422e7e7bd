"""The layout as checked rules: stages on shared plumbing without import cycles (the
import-linter contracts in pyproject.toml), imports without side effects, and small modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "stockstream"
MAX_LINES = 400
# A longer module says why at its top (in its docstring), with these words.
LONG_MODULE_REASON = "Longer than ~400 lines on purpose"


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_import_linter_contracts_are_kept() -> None:
    # Layers (stages above plumbing, stages independent of each other) and no cycles at any
    # depth, as configured in pyproject.toml.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_every_module_has_no_side_effect(tmp_path: Path) -> None:
    """In a fresh interpreter, with a configuration that cannot load and an empty working
    directory: every module imports, nothing is created on disk, no thread is started, no
    Faust app is built. The worker's app is built on first access, and then the invalid
    setting stops it with a message naming the variable."""
    script = textwrap.dedent(
        f"""
        import gc, json, os, sys, threading
        sys.path.insert(0, {str(ROOT)!r})
        names = {modules()!r}
        threads = threading.active_count()
        for name in names:
            __import__(name)
        import faust
        apps = [o for o in gc.get_objects() if isinstance(o, faust.App)]
        report = {{
            "files": sorted(os.listdir(".")),
            "threads": threading.active_count() - threads,
            "apps": len(apps),
        }}
        import stockstream
        try:
            stockstream.app
        except SystemExit as exc:
            report["exit"] = str(exc)
        print(json.dumps(report))
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KAFKA_PARTITIONS": "three",
        "FINNHUB_API_KEY": "never-printed",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["files"] == [], "importing created files in the working directory"
    assert report["threads"] == 0, "importing started threads"
    assert report["apps"] == 0, "importing built a Faust app"
    assert report["exit"].startswith("configuration error: KAFKA_PARTITIONS: expected an integer")
    assert "never-printed" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_modules_are_small_or_say_why(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert LONG_MODULE_REASON in docstring, (
        f"{path.relative_to(ROOT)} has {lines} lines: split it along a real seam, or say why"
        f" not at its top ({LONG_MODULE_REASON!r})"
    )


def test_every_package_says_its_job() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring) > 40, f"{init.relative_to(ROOT)} says nothing"


def test_the_workers_producer_is_idempotent(tmp_path: Path) -> None:
    """faust-streaming turns idempotence on only inside transactions; the worker's transport
    asks for it always (a lost ack must not make the client write a batch twice)."""
    from stockstream.application import create_app
    from stockstream.kafka.faust_transport import IdempotentProducer
    from stockstream.settings import load_settings

    settings = load_settings(environ={"STOCKSTREAM_DATA_DIR": str(tmp_path)}, dotenv_path=None)
    producer = create_app(settings).producer
    assert isinstance(producer, IdempotentProducer)
    extra = producer._settings_extra()
    assert extra["enable_idempotence"] is True and extra["acks"] == "all"
