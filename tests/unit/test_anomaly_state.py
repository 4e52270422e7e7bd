"""The anomaly table's record format (versioned, named fields) and its mirror's restore."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faust.serializers import codecs
from hypothesis import given
from hypothesis import strategies as st

from stockstream.metrics import STATE_UNREADABLE
from stockstream.tables.anomaly_state import (
    VERSION,
    AnomalyState,
    DetectorProgress,
    SymbolHistory,
    decode_history,
    decode_progress,
    encode_history,
    encode_progress,
    history_key,
    progress_key,
)
from stockstream.tables.state_codec import StateFormatError

T0 = 1_767_623_400_000
finite = st.floats(allow_nan=False, allow_infinity=False)


def through_changelog(value: Any) -> Any:
    """What the table's json value serializer writes and reads back."""
    codec = codecs.get_codec("json")
    return codec.loads(codec.dumps(value))


@given(
    st.builds(
        SymbolHistory,
        symbol=st.text(min_size=1, max_size=64),
        last_start_ms=st.integers(0, 2**53),
        last_close=finite,
        returns=st.lists(finite, max_size=70),
        volumes=st.lists(finite, max_size=70),
        last_reported_ms=st.dictionaries(
            st.sampled_from(["return", "volume"]), st.integers(0, 2**53)
        ),
    ),
    st.builds(DetectorProgress, st.integers(-1, 2**62), st.integers(-1, 2**62)),
)
def test_round_trip(history: SymbolHistory, progress: DetectorProgress) -> None:
    assert decode_history(through_changelog(encode_history(history))) == history
    assert decode_progress(through_changelog(encode_progress(progress))) == progress


def test_encoding_copies_the_live_series() -> None:
    history = SymbolHistory("AAPL", T0, 10.0, [0.01], [5.0], {"return": T0})
    stored = encode_history(history)
    history.returns.append(0.02)
    history.last_reported_ms["volume"] = T0
    assert stored["returns"] == [0.01] and stored["last_reported_ms"] == {"return": T0}


GOOD = encode_history(SymbolHistory("AAPL", T0, 10.0, [0.01, -0.02], [5.0, 7.0], {}))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({**GOOD, "v": VERSION + 1}, "version 2"),
        ({k: v for k, v in GOOD.items() if k != "v"}, "version None"),
        ([GOOD["symbol"], T0], "unexpected state list"),
        ("AAPL", "unexpected state str"),
        ({k: v for k, v in GOOD.items() if k != "volumes"}, "missing \\['volumes'\\]"),
        ({**GOOD, "extra": 1}, "unknown \\['extra'\\]"),
        ({**GOOD, "returns": [0.1, "0.2"]}, "returns"),
        ({**GOOD, "returns": [0.1, None]}, "returns"),
        ({**GOOD, "volumes": 5.0}, "volumes"),
        ({**GOOD, "last_start_ms": True}, "last_start_ms"),
        ({**GOOD, "last_start_ms": 1.5}, "last_start_ms"),
        ({**GOOD, "last_close": None}, "last_close"),
        ({**GOOD, "symbol": ""}, "symbol"),
        ({**GOOD, "last_reported_ms": {"price": T0}}, "last_reported_ms"),
        ({**GOOD, "last_reported_ms": {"return": "soon"}}, "last_reported_ms"),
        ({**GOOD, "returns": [0.0] * 100_001}, "returns"),
    ],
)
def test_a_bad_stored_history_is_refused(value: Any, error: str) -> None:
    with pytest.raises(StateFormatError, match=error):
        decode_history(value)


@pytest.mark.parametrize(
    "value",
    [
        {"v": VERSION, "last_offset": 1},
        {"v": VERSION, "last_offset": 1, "emitted_offset": "2"},
        {"v": 0, "last_offset": 1, "emitted_offset": 2},
        [1, 2],
    ],
)
def test_a_bad_stored_progress_is_refused(value: Any) -> None:
    with pytest.raises(StateFormatError):
        decode_progress(value)


def test_restore_skips_unreadable_values_and_counts_them() -> None:
    table: dict[str, Any] = {
        progress_key(0): {"v": 99},
        history_key(0, "AAPL"): GOOD,
        history_key(0, "MSFT"): {**GOOD, "symbol": "MSFT", "returns": "x"},
        history_key(1, "TSLA"): {**GOOD, "symbol": "TSLA"},
        history_key(0, "GONE"): None,
    }
    before = STATE_UNREADABLE._value.get()
    restored = AnomalyState(table).restore(0)
    assert STATE_UNREADABLE._value.get() == before + 2
    assert restored.progress == DetectorProgress()  # fresh: the output is read back whole
    assert set(restored.symbols) == {"AAPL"}
    assert restored.folded_until("AAPL") == T0 and restored.folded_until("TSLA") is None


def test_write_puts_histories_before_the_progress() -> None:
    writes: list[str] = []

    class Table(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    table = Table()
    state = AnomalyState(table)
    restored = state.restore(2)
    state.register(2, restored)
    for symbol in ("B", "A"):
        restored.symbols[symbol] = SymbolHistory(symbol, T0, 1.0)
        state.mark_dirty(2, symbol)
    restored.progress.last_offset = 7
    state.write(2)
    assert writes == [history_key(2, "A"), history_key(2, "B"), progress_key(2)]
    assert json.loads(json.dumps(table[progress_key(2)]))["last_offset"] == 7
    state.write(2)  # nothing changed: only the progress again
    assert writes[3:] == [progress_key(2)]
