"""The README's table of every setting: its default and what each environment profile
(config/<env>.yml) sets instead, generated from stockstream/settings.py and config/.

    python scripts/settings_table.py            # print the table
    python scripts/settings_table.py --write    # replace it in README.md, between the markers
    python scripts/settings_table.py --check    # exit 1 if README.md's table is not this one

tests/unit/test_settings_environments.py runs the check, so the table cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from stockstream.envconfig import secret_variables
from stockstream.settings import ENVIRONMENTS, Settings, documented_variables

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START = "<!-- settings-table:start (scripts/settings_table.py --write) -->"
END = "<!-- settings-table:end -->"


def _cell(value: str) -> str:
    escaped = value.replace("|", "\\|")  # a pipe would end the cell
    return f"`{escaped}`" if value else ""


def table(config_dir: Path = ROOT / "config") -> str:
    profiles = {
        env: {
            str(k): "" if v is None else str(v)
            for k, v in (
                yaml.safe_load((config_dir / f"{env}.yml").read_text(encoding="utf-8")) or {}
            ).items()
        }
        for env in ENVIRONMENTS
    }
    secrets = set(secret_variables(Settings))
    lines = [
        "| setting | default | " + " | ".join(ENVIRONMENTS) + " |",
        "|---|---|" + "---|" * len(ENVIRONMENTS),
    ]
    for name, default in documented_variables():
        shown = "secret: `_FILE` in prod" if name in secrets else _cell(default)
        overrides = [_cell(profiles[env].get(name, "")) for env in ENVIRONMENTS]
        lines.append(f"| `{name}` | {shown} | " + " | ".join(overrides) + " |")
    return "\n".join(lines) + "\n"


def readme_table(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="replace the table in README.md")
    action.add_argument("--check", action="store_true", help="fail if README.md's table differs")
    args = parser.parse_args(argv)
    generated = table()
    if not (args.write or args.check):
        sys.stdout.write(generated)
        return 0
    text = README.read_text(encoding="utf-8")
    if args.check:
        if readme_table(text) != generated:
            print("README.md: settings table out of date; run scripts/settings_table.py --write")
            return 1
        return 0
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + generated + text[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
