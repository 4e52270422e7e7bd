"""Faust agents: `aggregate/`, the aggregation of `stock-quotes` into one-minute windows (the
agent, its exactly-once emitter, its idle clock and lag meter), and `anomaly/`, the real-time
anomalies of those windows (`stock-quotes-aggregated` -> `stock-anomalies`). Registered on the
app by application.py."""
