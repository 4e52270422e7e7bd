"""The base of every error stockstream raises on purpose.

`except StockstreamError` catches what the project itself reports (bad configuration, a broken
contract, an unavailable sink, ...) and nothing else; each subclass lives beside the code that
raises it. Messages a user can see name the setting or the action that fixes the problem.
"""

from __future__ import annotations


class StockstreamError(Exception):
    """Something stockstream detected and reports; the message says what to do."""
