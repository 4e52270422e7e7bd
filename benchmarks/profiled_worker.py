"""Run `python -m faust ...` under pyinstrument, sampling only between two signals.

Used by aggregate_throughput.py --profile, so the profile covers the processing phase and not
the imports, the rebalance or the idle wait at the end:

    python benchmarks/profiled_worker.py SESSION_FILE -- -A stockstream worker -l warn

    kill -RTMIN   <pid>   start sampling
    kill -RTMIN+1 <pid>   stop sampling (cheap: the session stays in memory)
    kill -RTMIN+2 <pid>   write SESSION_FILE (a pyinstrument session, JSON) atomically; this
                          blocks the worker's event loop for a while, so send it when the
                          measurement is over

Real-time signals are used because mode's worker already handles SIGINT/SIGTERM/SIGUSR1/SIGUSR2.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType

from pyinstrument import Profiler
from pyinstrument.session import Session

START_SIGNAL = int(signal.SIGRTMIN)
STOP_SIGNAL = START_SIGNAL + 1
SAVE_SIGNAL = START_SIGNAL + 2
INTERVAL_S = 0.001


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(f"usage: {sys.argv[0]} SESSION_FILE -- FAUST_ARGS...")
    session_path = Path(sys.argv[1])
    faust_args = sys.argv[3:]
    profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")

    def on_start(signum: int, frame: FrameType | None) -> None:
        if not profiler.is_running:
            profiler.start(caller_frame=frame)

    sessions: list[Session] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if profiler.is_running:
            sessions.append(profiler.stop())

    def on_save(signum: int, frame: FrameType | None) -> None:
        on_stop(signum, frame)
        if not sessions:
            return
        tmp = session_path.with_name(session_path.name + ".tmp")
        sessions[-1].save(tmp)
        os.replace(tmp, session_path)

    signal.signal(START_SIGNAL, on_start)
    signal.signal(STOP_SIGNAL, on_stop)
    signal.signal(SAVE_SIGNAL, on_save)
    sys.argv = ["faust", *faust_args]
    runpy.run_module("faust", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
