"""Hypothesis: random and mutated documents never raise anything but enclavekit's own errors."""

from __future__ import annotations

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.attestation import AttestationDocument, Verifier
from enclavekit.attestation.policy import NotDebug
from enclavekit.errors import Error
from tests.unit.attestation.conftest import real
from tests.unit.attestation.factory import NOW, TestPki, make_document

GENUINE = real("marlin-2024-08-prod.cbor")
AT = AttestationDocument.from_cbor(GENUINE).timestamp
VERIFIER = Verifier.aws()
PKI = TestPki()
SYNTHETIC = make_document(PKI)
SYNTHETIC_VERIFIER = Verifier([PKI.root])


def _must_not_crash(raw: bytes, verifier: Verifier = VERIFIER) -> None:
    try:
        verifier.verify(raw, NotDebug(), at=AT)
    except Error:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _must_not_crash(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_genuine_document(data: st.DataObject) -> None:
    raw = bytearray(GENUINE)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    _must_not_crash(bytes(raw))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(GENUINE) - 1))
def test_truncated_genuine_document(cut: int) -> None:
    _must_not_crash(GENUINE[:cut])


payload_values = st.one_of(
    st.none(),
    st.integers(-5, 2**65),
    st.binary(max_size=64),
    st.text(max_size=8),
    st.lists(st.binary(max_size=8), max_size=3),
    st.dictionaries(st.integers(-2, 40), st.binary(max_size=70), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "module_id",
                "digest",
                "timestamp",
                "pcrs",
                "certificate",
                "cabundle",
                "public_key",
                "user_data",
                "nonce",
                "nitrotpm_pcrs",
                "extra",
            ]
        ),
        payload_values,
    )
)
def test_signed_payloads_with_random_fields(overrides: dict[str, object]) -> None:
    """Even a correctly signed payload with hostile field values only raises enclavekit errors."""
    base = cbor2.loads(cbor2.loads(SYNTHETIC)[2])
    base.update(overrides)
    raw = make_document(PKI, raw_payload=cbor2.dumps(base))
    try:
        SYNTHETIC_VERIFIER.verify(raw, NotDebug(), at=NOW)
    except Error:
        pass
