"""Finnhub sources: REST quote polling (`rest.py`) and the trades websocket (`websocket.py`),
the API's payloads and errors (`api.py`), and the Redis cache that lets replicas share one
API key (`cache.py`)."""
