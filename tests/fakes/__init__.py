"""In-process fakes of external services for tests (see each module's docstring)."""

from tests.fakes.finnhub import (
    TOKEN,
    FakeFinnhub,
    Fault,
    QuoteRequest,
    WsClient,
    max_in_window,
    trade,
)

__all__ = ["TOKEN", "FakeFinnhub", "Fault", "QuoteRequest", "WsClient", "max_in_window", "trade"]
