"""Emulated documents compared with genuine AWS documents, field by field (tests/assets/nsm/README.md).

Compared: the COSE envelope bytes, the payload's key order, value types and CBOR header encodings, and for
every certificate position its version, algorithms, curve, subject attribute order and string types,
extension order/criticality/content, validity encoding, lifetime and serial layout. Values (keys, names,
PCRs) naturally differ and are not compared.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclavekit.nsm import NsmEmulator

ASSETS = Path(__file__).parents[2] / "assets" / "nsm"
REAL = sorted(ASSETS.glob("*.cbor"))


def load(path: Path) -> bytes:
    return path.read_bytes()


def cbor_tokens(data: bytes) -> list[str]:
    """The CBOR header structure of ``data``: one token per item; map keys spelled out."""
    tokens: list[str] = []
    pos = 0

    def head() -> tuple[int, int, int | None]:
        nonlocal pos
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info == 31:
            return major, info, None
        size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
        value = int.from_bytes(data[pos : pos + size], "big")
        pos += size
        return major, info, value

    def item(is_key: bool = False) -> bool:
        nonlocal pos
        major, info, arg = head()
        if major == 7 and info == 31:
            tokens.append("break")
            return False
        width = "short" if info < 24 else str(info)
        if major in (2, 3):
            assert arg is not None
            text = data[pos : pos + arg]
            pos += arg
            kind = "bstr" if major == 2 else "tstr"
            tokens.append(f"key:{text.decode()}" if is_key else f"{kind}[{width}]")
        elif major == 0:
            tokens.append(f"uint[{width}]" if not is_key else f"key:uint[{width}]")
        elif major in (4, 5):
            name = "array" if major == 4 else "map"
            tokens.append(f"{name}({'*' if arg is None else arg})")
            count = arg if arg is not None else -1
            n = 0
            while count < 0 or n < count:
                if major == 5:
                    if not item(is_key=True):
                        break
                    item()
                elif not item():
                    break
                n += 1
        elif major == 7:
            tokens.append({20: "false", 21: "true", 22: "null"}[info])
        else:
            tokens.append(f"major{major}")
        return True

    item()
    assert pos == len(data)
    return tokens


def payload_of(document: bytes) -> bytes:
    payload: bytes = cbor2.loads(document)[2]
    return payload


def decoded(document: bytes) -> dict[str, Any]:
    value: dict[str, Any] = cbor2.loads(payload_of(document))
    return value


def twin(real: bytes, emulator_factory: Any, *, definite: bool) -> bytes:
    """An emulated document with the same optional-field presence and lengths as ``real``."""
    fields = decoded(real)
    emulator: NsmEmulator = emulator_factory(definite)

    def same_shape(value: bytes | None) -> bytes | None:
        return None if value is None else b"\x5a" * len(value)

    return emulator.attest(
        user_data=same_shape(fields["user_data"]),
        nonce=same_shape(fields["nonce"]),
        public_key=same_shape(fields["public_key"]),
    )


@pytest.fixture
def emulator_factory(pki: Any, now: datetime) -> Any:
    def make(definite: bool) -> NsmEmulator:
        return NsmEmulator(
            pcrs={i: bytes([i]) * 48 for i in range(3)},
            pki=pki,
            clock=lambda: now,
            definite_payload=definite,
        )

    return make


@pytest.mark.parametrize("real_path", REAL, ids=lambda p: p.stem)
def test_cose_envelope_bytes_match(real_path: Path, emulator_factory: Any) -> None:
    real = load(real_path)
    emulated = twin(real, emulator_factory, definite=False)
    assert emulated[:8] == real[:8] == bytes.fromhex("8444a1013822a059")
    assert cbor2.loads(emulated)[1] == {}
    assert cbor_tokens(emulated) == cbor_tokens(real)  # array(4), bstr, map(0), bstr, bstr
    assert len(cbor2.loads(emulated)[3]) == len(cbor2.loads(real)[3]) == 96


@pytest.mark.parametrize("real_path", REAL, ids=lambda p: p.stem)
def test_definite_payload_has_the_same_cbor_structure_as_aws(
    real_path: Path, emulator_factory: Any
) -> None:
    """Key order, value types and every CBOR header (lengths classes, 8-byte timestamp) match."""
    real = load(real_path)
    emulated = twin(real, emulator_factory, definite=True)
    assert cbor_tokens(payload_of(emulated)) == cbor_tokens(payload_of(real))


@pytest.mark.parametrize("real_path", REAL, ids=lambda p: p.stem)
def test_default_payload_is_the_current_indefinite_form(
    real_path: Path, emulator_factory: Any
) -> None:
    """AWS since mid-2025: top-level map bf…ff, pcrs and cabundle still definite."""
    real = load(real_path)
    emulated_tokens = cbor_tokens(payload_of(twin(real, emulator_factory, definite=False)))
    real_tokens = cbor_tokens(payload_of(real))
    assert real_tokens[0] == "map(9)"
    assert emulated_tokens == ["map(*)", *real_tokens[1:], "break"]


def test_payload_key_order_and_types(emulator_factory: Any) -> None:
    real = decoded(load(REAL[0]))
    emulated = decoded(twin(load(REAL[0]), emulator_factory, definite=False))
    assert list(emulated) == list(real)
    for key in real:
        if real[key] is not None:
            assert type(emulated[key]) is type(real[key]), key
    assert all(len(v) == 48 for v in emulated["pcrs"].values())
    assert sorted(emulated["pcrs"]) == list(range(16))


# ------------------------------------------------------------------------------------- certificates

POSITIONS = ("root", "regional", "zonal", "instance", "leaf")


def chain_of(document: bytes) -> list[bytes]:
    fields = decoded(document)
    return [*fields["cabundle"], fields["certificate"]]


def certificate_shape(der: bytes) -> dict[str, Any]:
    """Everything about a certificate's structure that does not depend on its values."""
    cert = asn1_x509.Certificate.load(der)
    tbs = cert["tbs_certificate"]
    parsed = x509.load_der_x509_certificate(der)
    point = parsed.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    extensions = []
    for ext in tbs["extensions"]:
        name = ext["extn_id"].native
        value = ext["extn_value"].parsed
        if name == "basic_constraints":
            detail: Any = (value["ca"].native, value["path_len_constraint"].native)
        elif name == "key_usage":
            detail = sorted(value.native)
        elif name == "key_identifier":
            detail = value.native == hashlib.sha1(point).digest()
        elif name == "authority_key_identifier":
            detail = (
                value["key_identifier"].native is not None,
                value["authority_cert_issuer"].native,
                value["authority_cert_serial_number"].native,
            )
        elif name == "crl_distribution_points":
            detail = [[general.name for general in dp["distribution_point"].chosen] for dp in value]
        else:
            detail = "?"
        extensions.append((name, ext["critical"].native, detail))
    return {
        "version": tbs["version"].native,
        "signature": cert["signature_algorithm"]["algorithm"].native,
        "tbs_signature": tbs["signature"].dump(),
        "key": (tbs["subject_public_key_info"]["algorithm"]["parameters"].chosen.native),
        "subject": [
            (atv["type"].native, atv["value"].chosen.__class__.__name__)
            for rdn in tbs["subject"].chosen
            for atv in rdn
        ],
        "rdn_sizes": [len(rdn) for rdn in tbs["subject"].chosen],
        "validity": (tbs["validity"]["not_before"].name, tbs["validity"]["not_after"].name),
        "extensions": extensions,
        "issuer_unique_id": tbs["issuer_unique_id"].native,
    }


@pytest.mark.parametrize("real_path", REAL, ids=lambda p: p.stem)
def test_every_certificate_position_has_the_aws_structure(
    real_path: Path, emulator_factory: Any
) -> None:
    real_chain = chain_of(load(real_path))
    emulated_chain = chain_of(emulator_factory(False).attest())
    assert len(emulated_chain) == len(real_chain) == 5
    for position, real_der, emulated_der in zip(POSITIONS, real_chain, emulated_chain, strict=True):
        assert certificate_shape(emulated_der) == certificate_shape(real_der), position


@pytest.mark.parametrize("real_path", REAL, ids=lambda p: p.stem)
def test_lifetimes_match_aws(real_path: Path, emulator_factory: Any) -> None:
    def lifetimes(chain: list[bytes]) -> list[timedelta]:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
        return [c.not_valid_after_utc - c.not_valid_before_utc for c in certs]

    real = lifetimes(chain_of(load(real_path)))
    emulated = lifetimes(chain_of(emulator_factory(False).attest()))
    exact = {0: "root", 1: "regional", 3: "instance", 4: "leaf"}
    for index, name in exact.items():
        assert emulated[index] == real[index], name
    # Zonal CAs vary: 5 d 12 h 59 min 59 s ... 5 d 23 h in the real documents.
    assert timedelta(days=5, hours=12) <= real[2] <= timedelta(days=5, hours=23)
    assert timedelta(days=5, hours=12) <= emulated[2] <= timedelta(days=5, hours=23)


def test_names_chain_byte_for_byte(emulator_factory: Any) -> None:
    chain = [x509.load_der_x509_certificate(d) for d in chain_of(emulator_factory(False).attest())]
    for parent, child in itertools.pairwise(chain):
        assert child.issuer.public_bytes() == parent.subject.public_bytes()
    assert chain[0].issuer.public_bytes() == chain[0].subject.public_bytes()


def test_leaf_names_serial_and_window_follow_the_aws_layout(
    emulator_factory: Any, now: datetime
) -> None:
    emulator = emulator_factory(False)
    leaf = x509.load_der_x509_certificate(chain_of(emulator.attest())[-1])
    common_name = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert common_name == f"{emulator.module_id}.us-east-1.aws"
    serial = leaf.serial_number.to_bytes(16, "big")
    issued = leaf.not_valid_before_utc + timedelta(seconds=3)
    assert serial[:8] == bytes.fromhex(emulator.module_id.split("-enc")[1])
    assert serial[8:12] == bytes(4)
    assert struct.unpack(">I", serial[12:])[0] == int(issued.timestamp())
    assert leaf.not_valid_after_utc - issued == timedelta(hours=3)
    assert issued == now


def test_module_id_looks_like_aws(emulator_factory: Any) -> None:
    import re

    module_id = decoded(emulator_factory(False).attest())["module_id"]
    assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", module_id)
    for path in REAL:
        assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", decoded(load(path))["module_id"])
