"""The strict CBOR decoder."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit import _cbor
from enclavekit.errors import MalformedInput

scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.binary(max_size=300),
    st.text(max_size=50),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.text(max_size=10), st.integers(-100, 100)), children, max_size=5
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip_matches_cbor2(value: object) -> None:
    assert _cbor.loads(cbor2.dumps(value)) == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_malformed_input(data: bytes) -> None:
    try:
        _cbor.loads(data)
    except MalformedInput:
        pass


@pytest.mark.parametrize(
    ("hexdata", "value"),
    [
        ("bf616101616202ff", {"a": 1, "b": 2}),
        ("9f0102ff", [1, 2]),
        ("5f42010243030405ff", b"\x01\x02\x03\x04\x05"),
        ("7f626869ff", "hi"),
        ("d2820102", _cbor.Tagged(18, [1, 2])),
        ("f90000", 0.0),
    ],
)
def test_indefinite_containers_and_tags(hexdata: str, value: object) -> None:
    assert _cbor.loads(bytes.fromhex(hexdata)) == value


@pytest.mark.parametrize(
    ("hexdata", "message"),
    [
        ("a2616101616102", "duplicate map key 'a'"),
        ("bf61610161610 2ff", "duplicate map key 'a'"),
        ("a201000100", "duplicate map key 1"),
        ("0000", "trailing"),
        ("1c", "reserved"),
        ("ff", "break"),
        ("9f01", "truncated"),
        ("5a00ffffff", "truncated"),
        ("9bffffffffffffffff", "claims"),
        ("bf6161ff", "break"),
        ("5f01ff", "chunk"),
        ("f818", "simple value 24 in the two-byte form"),
        ("f81f", "simple value 31 in the two-byte form"),
        ("7f5f", "chunk"),
        ("62c328", "UTF-8"),
        ("a1806161", "unhashable"),
        ("df00", "indefinite-length tag"),
        ("1f", "indefinite length"),
    ],
)
def test_malformed_inputs(hexdata: str, message: str) -> None:
    with pytest.raises(MalformedInput, match=message):
        _cbor.loads(bytes.fromhex(hexdata.replace(" ", "")))


def test_deep_nesting_is_bounded() -> None:
    with pytest.raises(MalformedInput, match="nest"):
        _cbor.loads(b"\x81" * 100_000 + b"\x00")


def test_item_budget_is_bounded() -> None:
    data = b"\x9f" + b"\x00" * (_cbor.MAX_ITEMS + 5) + b"\xff"
    with pytest.raises(MalformedInput, match="items"):
        _cbor.loads(data)


def test_rejects_non_bytes() -> None:
    with pytest.raises(TypeError):
        _cbor.loads("text")  # type: ignore[arg-type]
