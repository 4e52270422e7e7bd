"""Faust agents: `aggregate.py`, the aggregation of `stock-quotes` into one-minute windows
(with its idle clock). They are registered on the app by application.py."""
