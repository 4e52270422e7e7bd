"""stockstream: real-time stock analytics on Kafka and Faust.

`faust -A stockstream worker` finds the Faust app as `stockstream.app` (built in
application.py). It is imported lazily so
that the producer, the CLI and unit tests can use the package without building a Faust app.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from stockstream.application import app

        return app
    raise AttributeError(f"module 'stockstream' has no attribute {name!r}")
