"""Window state: the pure close rules (windows.py), their changelog-backed table mirror
(window_state.py) and recovery of what was already emitted (emitted.py)."""
