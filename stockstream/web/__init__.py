"""HTTP endpoints on the Faust web server (besides Faust's own /table/ and /stats/ views):
health, readiness, Prometheus metrics and the open windows (views.py)."""
