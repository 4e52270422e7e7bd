"""The aggregation agent: `stock-quotes` -> one-minute windows -> `stock-quotes-aggregated`.
`agent.py` is the agent itself, `emitter.py` writes closed windows exactly once, `idle.py`
is its clock for partitions that receive nothing."""
