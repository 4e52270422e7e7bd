"""The one path into `stock-quotes`: `QuoteProducer` (quote_producer.py) sends what the sources
yield, tracks every delivery and, while the broker is away, keeps records in a local spool
(spool.py) that it drains in order, without duplicates, once the broker is back.

The rest serves it: session.py (one aiokafka producer and its records), reconcile.py (finding
spooled records that were delivered after all), spooling.py (what goes into the spool),
spool_format.py (a spooled record as a line), instruments.py (its metrics)."""
