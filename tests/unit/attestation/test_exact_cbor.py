"""Exact CBOR semantics (issue 14 item 4): types compared as well as values, text parsed exactly, unknown
keys ignored whatever they carry, field sizes as the real NSM allows them."""

from __future__ import annotations

import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit import _cbor
from enclavekit.attestation import Verifier
from enclavekit.attestation.document import (
    MAX_NSM_REQUEST,
    AttestationDocument,
    smallest_attestation_request,
)
from enclavekit.attestation.policy import (
    PcrsEqual,
    UnsafeNoOp,
    parse_pcr_index,
    policy_from_mapping,
)
from enclavekit.errors import MalformedInput, NsmError, UsageError
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.nsm.messages import (
    MAX_REQUEST_SIZE,
    Attestation,
    ErrorCode,
    ErrorResponse,
    encode_request,
)
from tests.unit.attestation.factory import NOW, TestPki, default_pcrs, make_document

# -- the protected header: exactly {1: -35} ---------------------------------------------------------


@pytest.mark.parametrize(
    "protected",
    [
        "a1f53822",  # {true: -35}
        "a1f93c003822",  # {1.0 (half): -35}
        "a1fb3ff00000000000003822",  # {1.0 (double): -35}
        "a101f9d060",  # {1: -35.0}
        "a101fbc041800000000000",  # {1: -35.0 (double)}
        "a1c1013822",  # {1(1): -35}: a tagged key
    ],
)
def test_attack_protected_header_alg_key_of_another_type(pki: TestPki, protected: str) -> None:
    """Python's True == 1 == 1.0 must not make these ES384 headers."""
    raw = make_document(pki, protected=bytes.fromhex(protected))
    with pytest.raises(MalformedInput, match="exactly"):
        Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)


def test_non_minimal_but_exact_protected_header_is_accepted(pki: TestPki) -> None:
    """{1: -35} with a non-minimal integer head is still the integer 1 (RFC 8949 allows the form)."""
    raw = make_document(pki, protected=bytes.fromhex("a1180138 22".replace(" ", "")))
    Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)


# -- map keys: type and value ------------------------------------------------------------------------


def test_attack_true_and_one_are_one_key() -> None:
    """{1: "a", true: "b"} has two distinct keys; a decoder that merges them reports a false duplicate
    (or, last-write-wins, loses one)."""
    value = _cbor.loads(bytes.fromhex("a2016161f56162"))
    assert value == {1: "a", _cbor.TypedKey(True): "b"}
    assert value[1] == "a"
    assert len(value) == 2  # a Python dict literal {1: "a", True: "b"} would hold one entry


def test_attack_float_key_equals_integer_key() -> None:
    value = _cbor.loads(bytes.fromhex("a2016161f93c006162"))  # {1: "a", 1.0: "b"}
    assert len(value) == 2
    assert _cbor.loads(bytes.fromhex("a1f93c0001")) != {1: 1}


def test_attack_pcr_index_true_is_pcr1(pki: TestPki) -> None:
    pcrs: dict[object, bytes] = dict(default_pcrs())
    del pcrs[1]
    pcrs[True] = b"\xa1" * 48
    with pytest.raises(MalformedInput, match="pcrs index"):
        AttestationDocument.from_cbor(make_document(pki, pcrs=pcrs))


def test_attack_pcr_index_float_is_pcr1(pki: TestPki) -> None:
    pcrs: dict[object, bytes] = dict(default_pcrs())
    del pcrs[1]
    pcrs[1.0] = b"\xa1" * 48
    with pytest.raises(MalformedInput, match="pcrs index"):
        AttestationDocument.from_cbor(make_document(pki, pcrs=pcrs))


def test_tagged_values_compare_by_type() -> None:
    assert _cbor.Tagged(1, True) != _cbor.Tagged(1, 1)
    assert _cbor.Tagged(1, [1, 2]) == _cbor.Tagged(1, [1, 2])
    assert len(_cbor.loads(bytes.fromhex("a2c10100c1f500"))) == 2  # {1(1): 0, 1(true): 0}


def test_positive_and_negative_zero_keys_are_distinct() -> None:
    assert len(_cbor.loads(bytes.fromhex("a2f9000001f9800002"))) == 2


#: Keys of every scalar CBOR type, with values Python considers equal across types.
typed_keys = st.one_of(
    st.integers(-3, 3),
    st.booleans(),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5]),
    st.none(),
    st.sampled_from(["", "1", "a"]),
    st.sampled_from([b"", b"1", b"a"]),
    st.integers(0, 19).map(cbor2.CBORSimpleValue),
    st.builds(cbor2.CBORTag, st.sampled_from([1, 2]), st.one_of(st.integers(0, 2), st.booleans())),
)


def _reference_identity(key: object) -> object:
    """Independent of the decoder: what makes two CBOR keys the same (type, then value)."""
    if isinstance(key, float):
        return ("float", struct.pack(">d", key))
    if isinstance(key, cbor2.CBORTag):
        return ("tag", key.tag, _reference_identity(key.value))
    if isinstance(key, cbor2.CBORSimpleValue):
        return ("simple", key.value)
    return (type(key).__name__, key)


def _encode_map(keys: list[object]) -> bytes:
    head = bytes([0xA0 + len(keys)]) if len(keys) < 24 else b"\xb8" + bytes([len(keys)])
    return head + b"".join(cbor2.dumps(k) + cbor2.dumps(i) for i, k in enumerate(keys))


@settings(max_examples=300, deadline=None)
@given(st.lists(typed_keys, max_size=12, unique_by=_reference_identity))
def test_distinct_typed_keys_all_survive(keys: list[object]) -> None:
    """Keys that differ in CBOR type or value are kept apart, each with its own value."""
    decoded = _cbor.loads(_encode_map(keys))
    assert isinstance(decoded, dict)
    assert len(decoded) == len(keys)
    assert sorted(decoded.values()) == list(range(len(keys)))


@settings(max_examples=300, deadline=None)
@given(st.lists(typed_keys, min_size=1, max_size=8, unique_by=_reference_identity), st.data())
def test_same_typed_key_twice_is_a_duplicate(keys: list[object], data: st.DataObject) -> None:
    repeated = data.draw(st.sampled_from(keys))
    position = data.draw(st.integers(0, len(keys)))
    with pytest.raises(MalformedInput, match="duplicate"):
        _cbor.loads(_encode_map([*keys[:position], repeated, *keys[position:]]))


# -- text fields parsed exactly ---------------------------------------------------------------------


@pytest.mark.parametrize("digest", ["SHA384\n", "sha384", "SHA384 ", "SHA384\x00", b"SHA384"])
def test_attack_digest_with_trailing_newline(pki: TestPki, digest: object) -> None:
    with pytest.raises(MalformedInput, match="digest must be"):
        AttestationDocument.from_cbor(make_document(pki, digest=digest))


@pytest.mark.parametrize("index", ["²", "١", "𝟙", " 1", "1 ", "+1", "PCR²", "0x1", "32", "", True])
def test_attack_unicode_digit_pcr_index_crashes_policy_loader(index: object) -> None:
    """str.isdigit() accepts "²" and int() then raised a ValueError traceback; now a usage error."""
    with pytest.raises(UsageError, match="not a PCR index"):
        policy_from_mapping({"pcrs": {index: "00" * 48}})
    with pytest.raises(UsageError, match="not a PCR index"):
        parse_pcr_index(index, "--pcr")


@pytest.mark.parametrize(
    ("index", "expected"), [("0", 0), ("31", 31), ("PCR8", 8), ("pcr16", 16), (7, 7)]
)
def test_ascii_pcr_indexes_are_parsed(index: object, expected: int) -> None:
    assert parse_pcr_index(index, "test") == expected


def test_attack_unicode_digit_pcr_index_in_ca_policy() -> None:
    from enclavekit.atls.ca import ca_policy_from_mapping

    with pytest.raises(UsageError, match="PCR index"):
        ca_policy_from_mapping(
            {"services": {"web": {"dns_names": ["web"], "pcrs": [{"²": "00" * 48}]}}}
        )


# -- unknown payload keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        cbor2.undefined,
        cbor2.CBORSimpleValue(0),
        cbor2.CBORSimpleValue(19),
        cbor2.CBORSimpleValue(255),
        1.5,
    ],
)
def test_attack_unknown_key_with_simple_value_refuses_genuine_document(
    pki: TestPki, value: object
) -> None:
    """A future AWS field carrying undefined or a simple value must not make documents unverifiable."""
    raw = make_document(pki, future_field=value)
    verified = Verifier([pki.root]).verify(raw, PcrsEqual({1: b"\xa1" * 48}), at=NOW)
    assert verified.user_data is None


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_undefined_in_a_known_field_is_refused(pki: TestPki, field: str) -> None:
    with pytest.raises(MalformedInput, match=f"{field} must be a byte string"):
        AttestationDocument.from_cbor(make_document(pki, **{field: cbor2.undefined}))


# -- field sizes: what the NSM signs -----------------------------------------------------------------


def test_request_limit_matches_the_nsm() -> None:
    assert MAX_NSM_REQUEST == MAX_REQUEST_SIZE


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=300)),
)
def test_smallest_request_is_the_minimal_encoding(
    user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> None:
    """The bound is the size of the shortest request serde accepts: absent fields omitted."""
    fields = {
        k: v
        for k, v in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key))
        if v is not None
    }
    minimal = cbor2.dumps({"Attestation": fields})
    assert smallest_attestation_request(public_key, user_data, nonce) == len(minimal)
    assert len(encode_request(Attestation(user_data, nonce, public_key))) >= len(minimal)


@pytest.fixture(scope="module")
def emulator() -> NsmEmulator:
    return NsmEmulator(pki=EmulatedAwsPki.ephemeral())


def _verify(emulator: NsmEmulator, raw: bytes) -> None:
    Verifier([emulator.pki.root_certificate()]).verify(raw, UnsafeNoOp())


@pytest.mark.parametrize(
    "fields",
    [
        {"user_data": bytes(2000)},  # the emulator issued these and verify called them malformed
        {"nonce": bytes(1025)},  # accepted by the real NSM (hf/nitrite#3)
        {"public_key": bytes(1500), "user_data": bytes(1500)},
    ],
)
def test_attack_emulator_issues_documents_verify_rejects(
    emulator: NsmEmulator, fields: dict[str, bytes]
) -> None:
    _verify(emulator, emulator.attest(**fields))


def test_largest_request_the_emulator_answers_verifies(emulator: NsmEmulator) -> None:
    # serde sends null for the absent fields: 46 bytes besides user_data's own (3-byte head from 256).
    overhead = len(encode_request(Attestation(user_data=bytes(300)))) - 300
    largest = MAX_REQUEST_SIZE - overhead
    assert len(encode_request(Attestation(user_data=bytes(largest)))) == MAX_REQUEST_SIZE
    _verify(emulator, emulator.attest(user_data=bytes(largest)))
    with pytest.raises(NsmError, match="InputTooLarge"):
        emulator.attest(user_data=bytes(largest + 1))
    answer = emulator.handle(Attestation(user_data=bytes(largest + 1)))
    assert answer == ErrorResponse(ErrorCode.INPUT_TOO_LARGE)


@pytest.mark.parametrize(
    ("field", "largest"), [("user_data", 4069), ("nonce", 4073), ("public_key", 4068)]
)
def test_verifier_bound_is_exactly_one_request(pki: TestPki, field: str, largest: int) -> None:
    """One field alone: 4096 bytes minus the request around it; one byte more is refused."""
    AttestationDocument.from_cbor(make_document(pki, **{field: bytes(largest)}))
    with pytest.raises(MalformedInput, match="InputTooLarge"):
        AttestationDocument.from_cbor(make_document(pki, **{field: bytes(largest + 1)}))


def test_fields_that_fit_alone_but_not_together_are_refused(pki: TestPki) -> None:
    raw = make_document(pki, user_data=bytes(2100), nonce=bytes(2100))
    with pytest.raises(MalformedInput, match="InputTooLarge"):
        AttestationDocument.from_cbor(raw)
