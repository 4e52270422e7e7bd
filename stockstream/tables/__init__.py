"""The aggregation's state: the pure window and close rules (windows.py), the changelog-backed
table and its in-memory mirror (window_state.py) with its versioned record format
(state_codec.py), and what each partition has already emitted (emitted.py)."""
