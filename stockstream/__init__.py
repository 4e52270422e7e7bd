"""stockstream: real-time stock analytics on Kafka and Faust.

`faust -A stockstream worker` finds the Faust app as `stockstream.app`. It is built on first
access (application.py `worker_app`), not at import: the producer, the CLI and the tests import
the package without loading settings or building a Faust app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from stockstream.application import worker_app

        return worker_app()
    raise AttributeError(f"module 'stockstream' has no attribute {name!r}")
