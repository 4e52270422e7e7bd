"""Faust agents: `aggregate/`, the aggregation of `stock-quotes` into one-minute windows (the
agent, its exactly-once emitter and its idle clock). Registered on the app by application.py."""
