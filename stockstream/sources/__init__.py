"""Quote sources. Each yields `contracts.Quote` objects; producer.py sends them."""
