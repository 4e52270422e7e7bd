"""Quote sources: each yields contract `Quote`s for the producer. `finnhub/` (REST polling and
the trades websocket), `simulator.py` (a seeded random walk), `replay.py` (recorded files);
`ratelimit.py` keeps an API's call budget."""
