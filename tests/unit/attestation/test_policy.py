"""Policies: composition, explanations, and loading from files (enclavekit format and nitro-cli JSON)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import (
    AllOf,
    AnyOf,
    MaxAge,
    NotDebug,
    PcrAllowlist,
    PcrsEqual,
    PublicKeyEquals,
    UnsafeNoOp,
    UserDataEquals,
    load_policy,
    policy_from_mapping,
)
from enclavekit.errors import PolicyViolation, UsageError
from tests.unit.attestation.factory import NOW, TestPki, default_pcrs, make_document

PCRS = default_pcrs()
OTHER = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}


@pytest.fixture(scope="module")
def verified(pki: TestPki):  # type: ignore[no-untyped-def]
    raw = make_document(pki, public_key=b"pk", user_data=b"ud", nonce=b"n" * 8)
    return Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW + timedelta(seconds=30))


def test_pcrs_equal_checks_any_subset(verified) -> None:  # type: ignore[no-untyped-def]
    assert PcrsEqual({2: PCRS[2]}).failures(verified) == ()
    failures = PcrsEqual({1: OTHER[1], 2: PCRS[2], 5: OTHER[0]}).failures(verified)
    assert [f.check for f in failures] == ["PCR1", "PCR5"]
    assert failures[0].expected == OTHER[1].hex() and failures[0].found == PCRS[1].hex()


def test_pcr_absent_from_document_fails(verified) -> None:  # type: ignore[no-untyped-def]
    (failure,) = PcrsEqual({20: OTHER[0]}).failures(verified)
    assert failure.found == "absent"


def test_empty_pcr_set_is_refused_at_construction() -> None:
    """An empty expected set must not mean "accept anything" (privkeyio/keep#577)."""
    with pytest.raises(ValueError, match="empty"):
        PcrsEqual({})
    with pytest.raises(ValueError):
        AllOf([])
    with pytest.raises(ValueError):
        AnyOf([])
    with pytest.raises(ValueError):
        PcrAllowlist([])


def test_wrong_length_expected_pcr_is_refused() -> None:
    with pytest.raises(ValueError, match="32, 48 or 64"):
        PcrsEqual({0: b"short"})


def test_allowlist_accepts_any_matching_set_for_rolling_upgrades(verified) -> None:  # type: ignore[no-untyped-def]
    assert PcrAllowlist([OTHER, {i: PCRS[i] for i in (0, 1, 2)}]).failures(verified) == ()


def test_allowlist_failure_keeps_every_branch(verified) -> None:  # type: ignore[no-untyped-def]
    failures = PcrAllowlist([OTHER, {0: OTHER[1]}]).failures(verified)
    assert [f.check for f in failures] == [
        "allowlist entry 1/2: PCR0",
        "allowlist entry 1/2: PCR1",
        "allowlist entry 1/2: PCR2",
        "allowlist entry 2/2: PCR0",
    ]


def test_any_of_reports_every_branch(verified) -> None:  # type: ignore[no-untyped-def]
    failures = AnyOf([PcrsEqual({0: OTHER[0]}), UserDataEquals(b"nope")]).failures(verified)
    assert [f.check for f in failures] == ["branch 1/2: PCR0", "branch 2/2: user_data"]
    assert AnyOf([PcrsEqual({0: OTHER[0]}), UserDataEquals(b"ud")]).failures(verified) == ()


def test_all_of_lists_every_failure(verified) -> None:  # type: ignore[no-untyped-def]
    policy = AllOf(
        [PcrsEqual({0: OTHER[0]}), PublicKeyEquals(b"other"), MaxAge(timedelta(seconds=1))]
    )
    with pytest.raises(PolicyViolation) as caught:
        failures = policy.failures(verified)
        raise PolicyViolation(failures)
    assert [f.check for f in caught.value.failures] == ["PCR0", "public_key", "max age"]
    assert "3 failed check(s)" in caught.value.diagnostics()


def test_max_age_accepts_fresh_documents(verified) -> None:  # type: ignore[no-untyped-def]
    assert MaxAge(timedelta(seconds=60)).failures(verified) == ()
    assert MaxAge(timedelta(seconds=29)).failures(verified)[0].check == "max age"


def test_document_from_the_future_is_refused(pki: TestPki) -> None:
    raw = make_document(pki)
    early = Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW - timedelta(minutes=5))
    (failure,) = MaxAge(timedelta(hours=1)).failures(early)
    assert failure.check == "timestamp" and "future" in failure.found


def test_policy_file_in_enclavekit_format(tmp_path: Path, verified) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    path.write_text(
        "pcrs:\n"
        f"  0: {PCRS[0].hex()}\n"
        f"  PCR1: {PCRS[1].hex()}\n"
        f"user_data: {b'ud'.hex()}\n"
        "max_age: 300\n"
    )
    assert load_policy(path).failures(verified) == ()


def test_policy_file_allowlist(tmp_path: Path, verified) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"allowlist": [{"0": OTHER[0].hex()}, {"0": PCRS[0].hex()}]}))
    assert load_policy(path).failures(verified) == ()


def test_nitro_cli_build_enclave_json_is_a_policy(tmp_path: Path, verified) -> None:  # type: ignore[no-untyped-def]
    build = {
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": PCRS[0].hex(),
            "PCR1": PCRS[1].hex(),
            "PCR2": PCRS[2].hex(),
        }
    }
    path = tmp_path / "build.json"
    path.write_text(json.dumps(build))
    assert load_policy(path).failures(verified) == ()
    build["Measurements"]["PCR2"] = OTHER[2].hex()
    assert [f.check for f in policy_from_mapping(build).failures(verified)] == ["PCR2"]


def test_nitro_cli_15_hash_algorithm_label_is_accepted(verified) -> None:  # type: ignore[no-untyped-def]
    build = {"Measurements": {"HashAlgorithm": "Sha512_384 { .. }", "PCR0": PCRS[0].hex()}}
    assert policy_from_mapping(build).failures(verified) == ()


def test_nitro_cli_describe_eif_json_is_a_policy(verified) -> None:  # type: ignore[no-untyped-def]
    describe = {
        "EifVersion": 4,
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCRS[0].hex()},
        "IsSigned": False,
        "CheckCRC": True,
        "ArmKernel": False,
        "MetadataInfo": {"ImageName": "x"},
    }
    assert policy_from_mapping(describe).failures(verified) == ()


def test_list_of_nitro_cli_outputs_is_an_allowlist(verified) -> None:  # type: ignore[no-untyped-def]
    old = {"Measurements": {"PCR0": OTHER[0].hex()}}
    new = {"Measurements": {"PCR0": PCRS[0].hex()}}
    assert policy_from_mapping([old, new]).failures(verified) == ()


def test_policy_file_refuses_debug_unless_allowed(pki: TestPki) -> None:
    debug = Verifier([pki.root]).verify(
        make_document(pki, pcrs=default_pcrs(debug=True)), UnsafeNoOp(), at=NOW
    )
    checks = {"pcrs": {"3": bytes(48).hex()}}
    assert policy_from_mapping(checks).failures(debug)[0].check == "debug mode"
    assert policy_from_mapping({**checks, "allow_debug": True}).failures(debug) == ()
    assert NotDebug().failures(debug)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({}, "sets no check"),
        ({"allow_debug": True}, "sets no check"),
        ({"pcr": {"0": "00"}}, "unknown key"),
        ({"pcrs": {"0": "zz"}}, "not hex"),
        ({"pcrs": {"0": "00" * 47}}, "47 bytes"),
        ({"pcrs": {"32": "00" * 48}}, "not a PCR index"),
        ({"pcrs": {}}, "non-empty"),
        ({"allowlist": []}, "non-empty"),
        ({"max_age": -1}, "positive"),
        ({"allow_debug": "yes", "nonce": "00"}, "true or false"),
        ({"Measurements": {"HashAlgorithm": "Sha256"}}, "Sha384"),
        ({"Measurements": {"HashAlgorithm": "Sha384 { ... }"}}, "no PCR"),
        ("text", "expected a map"),
    ],
)
def test_bad_policy_is_a_usage_error(obj: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        policy_from_mapping(obj)


def test_unreadable_policy_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_policy(tmp_path / "missing.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    with pytest.raises(UsageError, match="neither JSON nor YAML"):
        load_policy(bad)
