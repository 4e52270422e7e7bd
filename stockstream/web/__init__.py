"""HTTP endpoints on the Faust web server (besides Faust's own /table/ and /stats/ views)."""

from stockstream.web import views

__all__ = ["views"]
