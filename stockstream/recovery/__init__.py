"""Backfill and recovery: windows recomputed from the raw archive with the worker's own window
code, written to the warehouse; gap reports between the archive and the warehouse."""
