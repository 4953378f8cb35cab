"""Exact CBOR encodings of NSM requests, responses and errors (nsm.md §3), and hostile-input decoding."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import MalformedInput
from enclavekit.nsm import NsmEmulator
from enclavekit.nsm.messages import (
    Attestation,
    AttestationDocument,
    DescribeNsm,
    DescribePcr,
    ErrorCode,
    ErrorResponse,
    ExtendPcr,
    GetRandom,
    LockPcr,
    LockPcrs,
    NsmDescription,
    PcrDescription,
    PcrExtended,
    PcrLocked,
    PcrsLocked,
    RandomBytes,
    UnknownRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

REQUESTS = [
    (DescribePcr(0), "a16b4465736372696265504352a165696e64657800"),
    (ExtendPcr(16, b"abc"), "a169457874656e64504352a265696e6465781064646174614361626" + "3"),
    (LockPcr(16), "a1674c6f636b504352a165696e64657810"),
    (LockPcrs(32), "a1684c6f636b50435273a16572616e67651820"),
    (DescribeNsm(), "6b44657363726962654e534d"),
    (
        Attestation(nonce=b"\x01\x02"),
        "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e6365420102"
        "6a7075626c69635f6b6579f6",
    ),
    (
        Attestation(),
        "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e6365f66a7075626c69635f6b6579f6",
    ),
    (GetRandom(), "6947657452616e646f6d"),
]

ERRORS = {
    ErrorCode.SUCCESS: "a1654572726f726753756363657373",
    ErrorCode.INVALID_ARGUMENT: "a1654572726f726f496e76616c6964417267756d656e74",
    ErrorCode.INVALID_INDEX: "a1654572726f726c496e76616c6964496e646578",
    ErrorCode.INVALID_RESPONSE: "a1654572726f726f496e76616c6964526573706f6e7365",
    ErrorCode.READ_ONLY_INDEX: "a1654572726f726d526561644f6e6c79496e646578",
    ErrorCode.INVALID_OPERATION: "a1654572726f7270496e76616c69644f7065726174696f6e",
    ErrorCode.BUFFER_TOO_SMALL: "a1654572726f726e427566666572546f6f536d616c6c",
    ErrorCode.INPUT_TOO_LARGE: "a1654572726f726d496e707574546f6f4c61726765",
    ErrorCode.INTERNAL_ERROR: "a1654572726f726d496e7465726e616c4572726f72",
}

QEMU_DESCRIBE_NSM = (
    "a16b44657363726962654e534da76d76657273696f6e5f6d616a6f72016d76657273696f6e5f6d696e6f7200"
    "6d76657273696f6e5f706174636800696d6f64756c655f69646d692d3233342d656e6335363738686d61785f"
    "7063727318206b6c6f636b65645f7063727390000102030405060708090a0b0c0d0e0f666469676573746653"
    "4841333834"
)


@pytest.mark.parametrize(("request_", "hex_"), REQUESTS)
def test_requests_encode_exactly_like_serde(request_: object, hex_: str) -> None:
    assert encode_request(request_).hex() == hex_  # type: ignore[arg-type]
    assert decode_request(bytes.fromhex(hex_)) == request_


@pytest.mark.parametrize(("code", "hex_"), ERRORS.items())
def test_error_responses_encode_exactly(code: ErrorCode, hex_: str) -> None:
    assert encode_response(ErrorResponse(code)).hex() == hex_
    assert decode_response(bytes.fromhex(hex_)) == ErrorResponse(code)


def test_error_code_c_abi_numbers() -> None:
    assert [c.c_value for c in ErrorCode] == list(range(9))
    assert ErrorCode.INPUT_TOO_LARGE.c_value == 7


def test_response_encodings() -> None:
    zero = bytes(48)
    assert (
        encode_response(PcrDescription(True, zero)).hex()
        == "a16b4465736372696265504352a2646c6f636bf564646174615830" + "00" * 48
    )
    assert encode_response(PcrExtended(zero)).hex() == "a169457874656e64504352a16464617461583" + (
        "0" + "00" * 48
    )
    assert encode_response(PcrLocked()).hex() == "674c6f636b504352"
    assert encode_response(PcrsLocked()).hex() == "684c6f636b50435273"
    doc = encode_response(AttestationDocument(bytes(300)))
    assert doc.hex().startswith("a16b4174746573746174696f6ea168646f63756d656e74590" + "12c")
    rnd = encode_response(RandomBytes(bytes(256)))
    assert rnd.hex().startswith("a16947657452616e646f6da16672616e646f6d590100")


def test_describe_nsm_matches_the_spec_example() -> None:
    description = NsmDescription(1, 0, 0, "i-234-enc5678", 32, tuple(range(16)), "SHA384")
    assert encode_response(description).hex() == QEMU_DESCRIBE_NSM
    assert decode_response(bytes.fromhex(QEMU_DESCRIBE_NSM)) == description


def test_describe_nsm_decoding_is_order_agnostic_like_qemu_output() -> None:
    qemu_order = cbor2.dumps(
        {
            "DescribeNSM": {
                "digest": "SHA384",
                "max_pcrs": 32,
                "module_id": "i-234-enc5678",
                "locked_pcrs": list(range(16)),
                "version_major": 1,
                "version_minor": 0,
                "version_patch": 0,
            }
        }
    )
    assert decode_response(qemu_order).module_id == "i-234-enc5678"  # type: ignore[union-attr]


def test_serde_tolerance_missing_attestation_fields_are_none() -> None:
    assert decode_request(cbor2.dumps({"Attestation": {}})) == Attestation()


@pytest.mark.parametrize(
    "obj",
    [
        "Nonsense",
        {"DescribePCR": {"index": -1}},
        {"DescribePCR": {"index": 70000}},
        {"DescribePCR": {"index": True}},
        {"DescribePCR": {}},
        {"ExtendPCR": {"index": 16, "data": 5}},
        {"LockPCRs": {"range": "32"}},
        {"DescribeNSM": {}},
        {"Attestation": {"nonce": 1}},
        {"Attestation": []},
        {"A": 1, "B": 2},
        [1, 2],
        42,
    ],
)
def test_malformed_requests_are_unknown(obj: object) -> None:
    assert isinstance(decode_request(cbor2.dumps(obj)), UnknownRequest)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xa1",  # truncated
        bytes.fromhex("6b44657363726962654e534d00"),  # trailing byte
        bytes.fromhex("a2614101614102"),  # duplicate key
        b"\x81" * 100 + b"\x00",  # deeply nested
    ],
)
def test_undecodable_requests_raise_malformed_input(raw: bytes) -> None:
    with pytest.raises(MalformedInput):
        decode_request(raw)


def test_duplicate_key_response_is_refused() -> None:
    """An answer with two "Error"/"GetRandom" entries cannot be read two ways."""
    raw = b"\xa2" + cbor2.dumps("Error") + cbor2.dumps("InvalidIndex")
    raw += cbor2.dumps("Error") + cbor2.dumps("InternalError")
    with pytest.raises(MalformedInput, match="duplicate"):
        decode_response(raw)


def test_duplicate_key_request_is_invalid_operation_at_the_emulator(
    emulator: NsmEmulator,
) -> None:
    """A request with two bodies for one name cannot smuggle a second meaning: it is refused."""
    raw = bytes.fromhex("a2") + cbor2.dumps("LockPCR")[0:] + cbor2.dumps({"index": 16})
    raw += cbor2.dumps("LockPCR") + cbor2.dumps({"index": 17})
    assert decode_response(emulator.handle_bytes(raw)) == ErrorResponse(ErrorCode.INVALID_OPERATION)
    assert emulator.pcr(16)[0] is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (cbor2.dumps({"Error": "Bogus"}), "unknown error code"),
        (cbor2.dumps({"GetRandom": {"random": "text"}}), "random"),
        (cbor2.dumps({"DescribePCR": {"lock": 1, "data": b""}}), "lock"),
        (cbor2.dumps({"Mystery": {}}), "unknown response"),
        (cbor2.dumps([1]), "expected a map"),
        (cbor2.dumps({"DescribeNSM": {"locked_pcrs": ["a"]}}), "locked_pcrs"),
        (bytes.fromhex("674c6f636b504352") + b"\x00", "trailing"),
        (bytes.fromhex("674c6f636b5043"), "truncated"),
        (bytes.fromhex("a2654572726f72616165457272"), "truncated"),
        (cbor2.dumps({"Error": "InvalidIndex"})[:-1], "truncated"),
        (b"\xa1\x61x" + b"\x81" * 40 + b"\x00", "nested|deeper"),
    ],
)
def test_bad_responses_raise_malformed_input(raw: bytes, message: str) -> None:
    """A hostile or broken NSM answer is a decoding error, never a crash or a partial result."""
    with pytest.raises(MalformedInput, match=message):
        decode_response(raw)


def test_index_beyond_u16_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        encode_request(DescribePcr(65536))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoders(raw: bytes) -> None:
    for decode in (decode_request, decode_response):
        with contextlib.suppress(MalformedInput):
            decode(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_requests_always_get_a_cbor_answer(raw: bytes) -> None:
    emulator = _shared_emulator()
    answer = decode_response(emulator.handle_bytes(raw))
    assert answer is not None


_EMULATOR: list[NsmEmulator] = []


def _shared_emulator() -> NsmEmulator:
    if not _EMULATOR:
        _EMULATOR.append(NsmEmulator())
    return _EMULATOR[0]


requests_strategy = st.one_of(
    st.builds(DescribePcr, st.integers(0, 65535)),
    st.builds(ExtendPcr, st.integers(0, 65535), st.binary(max_size=64)),
    st.builds(LockPcr, st.integers(0, 65535)),
    st.builds(LockPcrs, st.integers(0, 65535)),
    st.just(DescribeNsm()),
    st.just(GetRandom()),
    st.builds(
        Attestation,
        st.none() | st.binary(max_size=32),
        st.none() | st.binary(max_size=32),
        st.none() | st.binary(max_size=32),
    ),
)


@settings(max_examples=200, deadline=None)
@given(requests_strategy)
def test_request_roundtrip(request_: object) -> None:
    assert decode_request(encode_request(request_)) == request_  # type: ignore[arg-type]


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64) + 1, 2**64 - 1)
    | st.binary(max_size=16)
    | st.text(max_size=8)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 40), children, max_size=4)
    ),
    max_leaves=6,
)
names = st.sampled_from(
    [
        "DescribePCR",
        "ExtendPCR",
        "LockPCR",
        "LockPCRs",
        "DescribeNSM",
        "Attestation",
        "GetRandom",
        "x",
    ]
)
fields = st.sampled_from(["index", "data", "range", "user_data", "nonce", "public_key", "lock"])


@settings(max_examples=100, deadline=None)
@given(names, st.dictionaries(fields, cbor_values, max_size=4))
def test_request_shaped_garbage_is_answered_not_crashed(name: str, body: dict[str, object]) -> None:
    """Well-formed CBOR with wrong field types must yield an NSM error answer, never an exception."""
    raw = cbor2.dumps({name: body})
    answer = decode_response(_shared_emulator().handle_bytes(raw))
    assert answer is not None
