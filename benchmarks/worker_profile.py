"""Where a profiled worker spends its time: stack samples from py-spy or pyinstrument, summed
by thread, by processing stage, by hot line and by function.

Both profilers are reduced to the same thing, a list of samples (thread, stack root first,
seconds), so one analysis serves both:
- py-spy (`record --format raw --full-filenames --idle --threads`): sampled from outside, no
  overhead in the worker; C code (orjson, rocksdict, socket.send) counts on the Python line
  calling it. With --nonblocking a few stacks come out truncated; they still count.
- pyinstrument (benchmarks/profiled_worker.py): in-process, main thread only; its per-call hook
  slows a call-heavy asyncio program down several times and inflates call-heavy code.

Stages are decided on the part of a stack below the event loop's dispatch (`Handle._run`), i.e.
on the task or callback that was running, so the worker's own root frames (runpy, click,
mode's Worker, the loop) never decide a stage.
"""

from __future__ import annotations

import linecache
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Frame:
    function: str  # qualified where the profiler knows it (py-spy: "Class.method")
    path: str  # full path when known, "<built-in>" for C functions (pyinstrument)
    line: int


@dataclass(frozen=True, slots=True)
class Sample:
    thread: str
    stack: tuple[Frame, ...]  # root first
    seconds: float


# ----------------------------------------------------------------------------- loaders

_PYSPY_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
_PYSPY_THREAD = re.compile(r"^thread \((?P<id>[^)]*)\)(?::\s*(?P<name>.*))?$")


def load_pyspy_raw(path: Path, rate_hz: float) -> list[Sample]:
    """py-spy's raw (collapsed) format: `thread (id): name;frame;frame;... count`, frames
    `function (file:line)`."""
    samples: list[Sample] = []
    for text in path.read_text(errors="replace").splitlines():
        stack_text, _, count = text.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        parts = stack_text.split(";")
        thread = "?"
        m_thread = _PYSPY_THREAD.match(parts[0])
        if m_thread is not None:
            thread = m_thread["name"] or m_thread["id"]
            parts = parts[1:]
        frames = []
        for part in parts:
            m = _PYSPY_FRAME.match(part)
            if m is None:
                frames.append(Frame(part, "", 0))
            else:
                frames.append(Frame(m["function"], m["path"], int(m["line"] or 0)))
        samples.append(Sample(thread, tuple(frames), int(count) / rate_hz))
    return samples


def load_pyinstrument(path: Path) -> list[Sample]:
    from pyinstrument.session import Session

    session = Session.load(path)
    samples: list[Sample] = []
    for stack, seconds in session.frame_records:
        frames = []
        thread = "MainThread"
        for info in stack:
            identifier, *attributes = info.split("\x01")
            function, file_path, first_line = [*identifier.split("\x00"), "", "", "0"][:3]
            if file_path == "<thread>":
                thread = function
                continue
            cls = next((a[1:] for a in attributes if a[:1] == "c"), "")
            line = next((int(a[1:]) for a in attributes if a[:1] == "l" and a[1:].isdigit()), 0)
            qualified = f"{cls}.{function}" if cls else function
            frames.append(Frame(qualified, file_path, line or int(first_line or 0)))
        samples.append(Sample(thread, tuple(frames), seconds))
    return samples


# ----------------------------------------------------------------------------- stages

Match = Callable[[Frame], bool]


def _in(*needles: str) -> Match:
    return lambda f: any(n in f.path for n in needles)


def _fn(path_part: str, *functions: str) -> Match:
    def match(f: Frame) -> bool:
        name = f.function.rsplit(".", 1)[-1]
        return path_part in f.path and name in functions

    return match


# The first stage with a matching frame in the task part of a sample names its stage, so the
# more specific stages come first.
STAGES: list[tuple[str, Match]] = [
    ("metrics: prometheus_client (agent updates + /metrics scrapes)", _in("/prometheus_client/")),
    (
        "table: RocksDB put of the changelog offset per ack (Store.set_persisted_offset)",
        _fn("/faust/stores/", "set_persisted_offset"),
    ),
    ("table: RocksDB other (faust/stores, rocksdict)", _in("/faust/stores/", "rocksdict")),
    (
        "table: changelog send (Table.send_changelog: serialise, queue record)",
        _fn("/faust/tables/", "send_changelog"),
    ),
    (
        "table: rest of Table set/del (WindowState.write_dirty, checkpoint)",
        _fn("/stockstream/tables/window_state.py", "write_dirty", "checkpoint"),
    ),
    (
        "agent: close_windows (emit aggregates, wait for acks)",
        _in("/stockstream/agents/aggregate/emitter.py"),
    ),
    (
        "agent: QuoteValidator.parse (orjson.loads + validation)",
        _in("/stockstream/contracts/quotes.py"),
    ),
    ("agent: window fold + closable() (tables/windows.py)", _in("/stockstream/tables/windows.py")),
    ("agent: rest of the quote path (_handle_quote, _fold) and ticks", _in("/stockstream/")),
    ("logging", _in("/logging/")),
    (
        "producer: aiokafka Sender (produce requests, socket writes, responses)",
        _in("/aiokafka/producer/sender.py"),
    ),
    (
        "producer: Faust ProducerBuffer + AIOKafkaProducer.send (queue into batches)",
        _in("/faust/transport/producer.py", "/aiokafka/producer/"),
    ),
    (
        "consumer: fetch + message conversion (aiokafka consumer, faust Consumer/Fetcher)",
        _in("/aiokafka/consumer/", "/faust/transport/consumer.py", "/faust/transport/drivers/"),
    ),
    ("aiokafka connection / protocol", _in("/aiokafka/")),
    (
        "faust stream machinery (conductor, Stream iteration, events, acks)",
        _in(
            "/faust/streams.py",
            "/faust/channels.py",
            "/faust/transport/",
            "/faust/events.py",
            "/faust/agents/",
            "/faust/topics.py",
        ),
    ),
    ("faust other", _in("/faust/")),
    ("mode (services, queues, timers)", _in("/mode/")),
    ("web server (aiohttp)", _in("/aiohttp/", "/yarl/", "/multidict/")),
]
IDLE = "idle: event loop waiting in epoll"
LOOP = "asyncio event loop itself (_run_once, handles, futures)"
OTHER = "other"
_ROOTS = (
    "/asyncio/",
    "<frozen runpy>",
    "/click/",
    "/faust/cli/",
    "/faust/__main__.py",
    "/mode/worker.py",
    "/mode/threads.py",
    "/threading.py",
    "/benchmarks/",
    "/selectors.py",
)


def _is_idle(leaf: Frame) -> bool:
    name = leaf.function.rsplit(".", 1)[-1]
    return (name == "select" and leaf.path.endswith("selectors.py")) or (
        leaf.path == "<built-in>" and name == "poll"
    )


def task_frames(stack: Sequence[Frame]) -> list[Frame]:
    """The frames of the task/callback that was running, without the loop and worker roots."""
    start = 0
    for i, frame in enumerate(stack):
        if frame.function.rsplit(".", 1)[-1] == "_run" and frame.path.endswith("events.py"):
            start = i + 1
    return [f for f in stack[start:] if not any(r in f.path for r in _ROOTS)]


def stage_of(stack: Sequence[Frame]) -> str:
    if stack and _is_idle(stack[-1]):
        return IDLE
    frames = task_frames(stack)
    for name, matches in STAGES:
        if any(matches(f) for f in frames):
            return name
    if any("/asyncio/" in f.path for f in stack):
        return LOOP
    return OTHER


# ----------------------------------------------------------------------------- report


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "/stockstream/" in path:
        return "stockstream/" + path.split("/stockstream/", 1)[1]
    return path


def _source(frame: Frame) -> str:
    if not frame.path.startswith("/") or frame.line <= 0:
        return ""
    return linecache.getline(frame.path, frame.line).strip()[:60]


def print_summary(samples: list[Sample], top: int = 20) -> None:
    total = sum(s.seconds for s in samples)
    if total <= 0:
        print("  (no samples)")
        return
    per_thread: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # sampled, idle
    by_stage: dict[str, float] = defaultdict(float)
    by_line: dict[tuple[str, str, int], float] = defaultdict(float)
    inclusive: dict[tuple[str, str], float] = defaultdict(float)
    busy = 0.0
    for sample in samples:
        stack, t = sample.stack, sample.seconds
        per_thread[sample.thread][0] += t
        stage = stage_of(stack)
        if stage == IDLE:
            per_thread[sample.thread][1] += t
            continue
        busy += t
        by_stage[stage] += t
        # C functions (pyinstrument only) count on the Python line that called them.
        leaf_i = len(stack) - 1
        while leaf_i > 0 and stack[leaf_i].path in ("", "<built-in>"):
            leaf_i -= 1
        if stack:
            leaf = stack[leaf_i]
            by_line[(leaf.function, leaf.path, leaf.line)] += t
        for key in {(f.function, f.path) for f in task_frames(stack)}:
            inclusive[key] += t
    if busy <= 0:
        print("  (no busy samples)")
        return

    def pct(t: float) -> str:
        return f"{100 * t / busy:5.1f}%"

    print("  threads (sampled wall time, share of it waiting in epoll):")
    for thread, (sampled, idle) in sorted(per_thread.items(), key=lambda kv: -kv[1][0]):
        print(f"    {thread:<24} {sampled:8.1f} s sampled, {100 * idle / sampled:5.1f}% idle")
    print(f"  busy samples: {busy:.1f} s; every % below is a share of them")
    print("  busy time by stage (a sample counts once, for the first stage listed that matches):")
    order = [name for name, _ in STAGES] + [LOOP, OTHER]
    for name in sorted(order, key=lambda n: -by_stage.get(n, 0.0)):
        t = by_stage.get(name, 0.0)
        if t >= 0.002 * busy:
            print(f"    {pct(t)} {t:8.2f} s  {name}")
    print(f"  top {top} lines by self time (C calls count on their Python caller's line):")
    for (function, path, line), t in sorted(by_line.items(), key=lambda kv: -kv[1])[:top]:
        src = _source(Frame(function, path, line))
        print(f"    {pct(t)}  {_short(path)}:{line} {function}" + (f"  | {src}" if src else ""))
    print("  inclusive busy time of stockstream functions:")
    ours = [(k, t) for k, t in inclusive.items() if "/stockstream/" in k[1]]
    for (function, path), t in sorted(ours, key=lambda kv: -kv[1])[:top]:
        if t >= 0.002 * busy:
            print(f"    {pct(t)}  {function} ({_short(path)})")
    print(f"  inclusive busy time of library functions (top {top}):")
    libs = [(k, t) for k, t in inclusive.items() if "/stockstream/" not in k[1]]
    for (function, path), t in sorted(libs, key=lambda kv: -kv[1])[:top]:
        print(f"    {pct(t)}  {function} ({_short(path)})")
