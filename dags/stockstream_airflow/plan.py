"""The DAGs' decisions, pure: which day a reconciliation checks, the gap report of
`stockstream gaps --json` cut into one backfill per UTC hour (the mapped tasks), and which
sources dbt found stale.

Per hour rather than per gap range: a mapped task then has a bounded, predictable cost (the
backfill reads that hour's archive plus one hour on each side), a failure retries one hour,
and at most 24 tasks exist per day whatever the gaps look like. Each hour's backfill names only
the symbols with gaps in it; windows already stored and equal are left alone by the backfill.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

HOUR = timedelta(hours=1)
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def reconciled_day(logical_date: datetime, override: str | None) -> str:
    """The UTC day a run checks: `override` (the `day` param) when given, else the day before
    the run's logical date (the run at 00:30 checks the day that just ended)."""
    if override:
        if not _DAY.match(override):
            raise ValueError(f"day: expected YYYY-MM-DD, got {override!r}")
        return date.fromisoformat(override).isoformat()
    return (logical_date.astimezone(UTC) - timedelta(days=1)).date().isoformat()


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def hourly_backfills(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """[{"from", "to", "symbols"}] one per UTC hour holding gaps, in time order, for
    `stockstream backfill --from --to --symbols`."""
    gaps = report.get("gaps")
    if not isinstance(gaps, list):
        raise ValueError("gap report without a 'gaps' list")
    hours: dict[datetime, set[str]] = {}
    for gap in gaps:
        start = _instant(str(gap["window_start"]))
        hour = start.replace(minute=0, second=0, microsecond=0)
        hours.setdefault(hour, set()).add(str(gap["symbol"]))
    return [
        {"from": _iso(hour), "to": _iso(hour + HOUR), "symbols": ",".join(sorted(symbols))}
        for hour, symbols in sorted(hours.items())
    ]


def total(summaries: Sequence[Mapping[str, Any]], field: str) -> int:
    """A field of the backfill summaries added up (`written`, `new`, `changed`...)."""
    return sum(int(s.get(field, 0)) for s in summaries)


def stale_sources(sources_json: Path) -> list[str]:
    """The sources `dbt source freshness` found older than their `error_after` (status
    `error` in its sources.json; `runtime error` is a failed query, not staleness). Empty
    when the report is missing (dbt failed before checking anything)."""
    try:
        report = json.loads(sources_json.read_text())
    except (OSError, ValueError):
        return []
    return sorted(
        str(result.get("unique_id"))
        for result in report.get("results", [])
        if result.get("status") == "error"
    )
