"""The anomaly agent: closed windows of `stock-quotes-aggregated` judged against each symbol's
recent history, anomalies written once to `stock-anomalies`. `statistics.py` holds the rules
(pure), `emitter.py` writes each anomaly exactly once, `agent.py` is the Faust agent; the
durable histories are in tables/anomaly_state.py."""
