"""Anomalies delivered to people: each record of `stock-anomalies` to a Slack-compatible
incoming webhook and to PagerDuty (Events API v2). `payloads.py` renders the messages (pure),
`receivers.py` posts them over HTTP and sorts the answers, `sender.py` adds the retry policy and
the rate limit of one receiver, `delivery.py` is the consumer service (one consumer group per
receiver) that commits an anomaly only once it is delivered or dead-lettered."""
