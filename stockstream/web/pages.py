"""Server-rendered HTML for the inspection pages: no JavaScript, one small stylesheet.

Every value that comes from the data (symbols, error texts, URLs of workers) goes through
`html.escape`, and links to a symbol quote it for the URL first: a symbol is whatever
QUOTE_SYMBOL_PATTERN lets through, and the pages must stay inert whatever that is. The answers
also carry a Content-Security-Policy that allows no script at all (views.py).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1c1c1c;background:#fafafa}
nav a{margin-right:1rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0;background:#fff}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.muted{color:#777}.err{color:#a00}.ok{color:#070}
code{background:#eee;padding:0 .2rem}
"""

#: Columns of a window row: (record field, heading).
WINDOW_COLUMNS = (
    ("window_start", "start (UTC)"),
    ("window_end", "end"),
    ("count", "count"),
    ("open", "open"),
    ("max", "high"),
    ("min", "low"),
    ("close", "close"),
    ("vwap", "vwap"),
    ("volume", "volume"),
)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def symbol_href(symbol: str, last: int | None = None) -> str:
    href = f"/symbol/?symbol={quote(symbol, safe='')}"
    return href + (f"&last={last}" if last is not None else "")


def layout(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)} · stockstream</title>"
        '<link rel=stylesheet href="/style.css"></head><body>'
        '<nav><a href="/">index</a><a href="/symbols/">symbols</a>'
        '<a href="/partitions/">partitions</a><a href="/chart/">chart</a>'
        '<a href="/health/">health</a><a href="/ready/">ready</a></nav>'
        f"<h1>{esc(title)}</h1>{body}</body></html>"
    )


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """`rows` hold HTML already escaped; the first `left` columns are left-aligned."""

    def cell(tag: str, i: int, content: str) -> str:
        return f"<{tag} class=l>{content}</{tag}>" if i < left else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, esc(h)) for i, h in enumerate(headings))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    return esc(value)


def windows_table(windows: Sequence[dict[str, Any]]) -> str:
    if not windows:
        return "<p class=muted>none</p>"
    rows = [[_number(w.get(field)) for field, _ in WINDOW_COLUMNS] for w in windows]
    return _table([heading for _, heading in WINDOW_COLUMNS], rows, left=2)


def _errors(errors: Sequence[str]) -> str:
    return "".join(f"<p class=err>{esc(e)}</p>" for e in errors)


def index_page(app_id: str, served_by: str) -> str:
    links = [
        ("/symbols/", "Symbols", "every symbol with its open window and partition"),
        ("/partitions/", "Partitions", "watermark, idle state, open windows, last emitted offset"),
        ("/chart/", "Live chart", "closed windows as they are emitted"),
        ("/health/", "Health", "liveness and the state of each dependency (JSON)"),
        ("/ready/", "Readiness", "503 while a dependency the worker needs is down (JSON)"),
        ("/metrics/", "Metrics", "Prometheus text format"),
        ("/api/symbols/", "JSON: symbols", ""),
        ("/api/partitions/", "JSON: partitions", ""),
    ]
    items = "".join(
        f'<li><a href="{esc(href)}">{esc(name)}</a> <span class=muted>{esc(what)}</span></li>'
        for href, name, what in links
    )
    lookup = (
        '<form action="/symbol/" method=get>Symbol <input name=symbol maxlength=64 required> '
        "last <input name=last type=number min=1 max=500 value=20> <button>show</button></form>"
    )
    return layout(
        f"stockstream {app_id}",
        f"<ul>{items}</ul>{lookup}<p class=muted>served by {esc(served_by)}</p>",
    )


def symbols_page(rows: Sequence[dict[str, Any]], errors: Sequence[str]) -> str:
    table_rows = []
    for row in rows:
        opened = row.get("open") or []
        current = opened[-1] if opened else {}
        table_rows.append(
            [
                f'<a href="{esc(symbol_href(row["symbol"]))}">{esc(row["symbol"])}</a>',
                esc(row.get("partition")),
                esc(row.get("owner")),
                esc(current.get("window_start", "—")),
                esc(current.get("count", "")),
                _number(current.get("close", "")),
            ]
        )
    headings = ["symbol", "partition", "owner", "open window", "count", "last price"]
    return layout(
        "Symbols",
        _errors(errors) + f"<p>{len(rows)} symbols</p>" + _table(headings, table_rows, left=1),
    )


def symbol_page(view: dict[str, Any]) -> str:
    symbol = view["symbol"]
    facts = (
        f"<p>partition {esc(view['partition'])}, served by {esc(view.get('served_by'))},"
        f" watermark {esc(view.get('watermark') or '—')}</p>"
    )
    since = view.get("history_since")
    history = (
        f"<p class=muted>closed windows kept since {esc(since)} (this worker's emits)</p>"
        if since
        else "<p class=muted>no window emitted by this worker yet</p>"
    )
    return layout(
        f"Symbol {symbol}",
        facts
        + "<h2>Open</h2>"
        + windows_table(view.get("open", []))
        + f"<h2>Last {esc(view.get('last'))} closed (newest first)</h2>"
        + history
        + windows_table(view.get("closed", [])),
    )


def _partition_row(snap: dict[str, Any]) -> list[str]:
    idle = snap.get("idle") or {}
    state = "not loaded" if not snap.get("loaded") else ("idle" if idle.get("idle") else "active")
    return [
        f'<a href="/partitions/{esc(snap.get("partition"))}/">{esc(snap.get("partition"))}</a>',
        esc(snap.get("owner")),
        esc(snap.get("watermark") or "—"),
        esc(state),
        esc(idle.get("quiet_seconds")),
        esc(snap.get("open_windows")),
        esc(snap.get("last_offset")),
        esc(snap.get("last_emitted_offset")),
        esc(snap.get("error", "")),
    ]


PARTITION_HEADINGS = [
    "partition",
    "owner",
    "watermark",
    "state",
    "quiet (s)",
    "open windows",
    "last source offset",
    "last emitted offset",
    "error",
]


def partitions_page(snapshots: Sequence[dict[str, Any]], errors: Sequence[str]) -> str:
    rows = [_partition_row(s) for s in snapshots]
    return layout("Partitions", _errors(errors) + _table(PARTITION_HEADINGS, rows, left=2))


def partition_page(snap: dict[str, Any]) -> str:
    symbols = "".join(
        f'<h2><a href="{esc(symbol_href(entry["symbol"]))}">{esc(entry["symbol"])}</a></h2>'
        + windows_table(entry.get("open", []))
        for entry in snap.get("symbols", [])
    )
    return layout(
        f"Partition {snap.get('partition')}",
        _table(PARTITION_HEADINGS, [_partition_row(snap)], left=2)
        + f"<p class=muted>checkpointed output offset {esc(snap.get('emitted_offset'))}</p>"
        + (symbols or "<p class=muted>no symbol</p>"),
    )


def error_page(status: int, message: str) -> str:
    return layout(f"{status}", f"<p class=err>{esc(message)}</p>")
