"""The emulated AWS-shaped PKI: persistence of the root, leaf reuse and rotation of every level."""

from __future__ import annotations

import itertools
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from enclavekit.attestation.verifier import Verifier
from enclavekit.errors import UsageError
from enclavekit.nsm import NsmEmulator
from enclavekit.pki.emulated import EmulatedAwsPki, default_state_dir

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def chain(emulator: NsmEmulator, at: datetime) -> tuple[list[x509.Certificate], bytes]:
    import cbor2

    document = emulator.attest(now=at)
    payload = cbor2.loads(cbor2.loads(document)[2])
    ders = [*payload["cabundle"], payload["certificate"]]
    return [x509.load_der_x509_certificate(d) for d in ders], document


def test_root_persists_across_loads(tmp_path: Path) -> None:
    first = EmulatedAwsPki.load_or_create(tmp_path / "state")
    second = EmulatedAwsPki.load_or_create(tmp_path / "state")
    assert first.root_pem() == second.root_pem()
    key_mode = stat.S_IMODE(os.stat(tmp_path / "state" / "root-key.pem").st_mode)
    assert key_mode == 0o600


def test_distinct_state_dirs_have_distinct_roots(tmp_path: Path) -> None:
    a = EmulatedAwsPki.load_or_create(tmp_path / "a")
    b = EmulatedAwsPki.load_or_create(tmp_path / "b")
    assert a.root_pem() != b.root_pem()


def test_half_written_state_is_refused_not_overwritten(tmp_path: Path) -> None:
    EmulatedAwsPki.load_or_create(tmp_path)
    (tmp_path / "root-key.pem").unlink()
    with pytest.raises(UsageError, match="incomplete"):
        EmulatedAwsPki.load_or_create(tmp_path)


def test_mismatched_key_and_certificate_are_refused(tmp_path: Path) -> None:
    EmulatedAwsPki.load_or_create(tmp_path / "a")
    EmulatedAwsPki.load_or_create(tmp_path / "b")
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(UsageError, match="does not belong"):
        EmulatedAwsPki.load_or_create(tmp_path / "a")


def test_garbage_state_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "root-key.pem").write_text("junk")
    (tmp_path / "root.pem").write_text("junk")
    with pytest.raises(UsageError, match="unreadable"):
        EmulatedAwsPki.load_or_create(tmp_path)


def test_default_state_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVEKIT_STATE_DIR", "/srv/ek")
    assert default_state_dir() == Path("/srv/ek/nsm")
    monkeypatch.delenv("ENCLAVEKIT_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg")
    assert default_state_dir() == Path("/xdg/enclavekit/nsm")


def test_root_is_marked_as_emulated_and_self_signed() -> None:
    root = EmulatedAwsPki.ephemeral().root_certificate()
    assert "enclavekit-emulator" in root.subject.rfc4514_string()
    assert root.issuer == root.subject


def test_leaf_is_reused_within_its_lifetime_and_rotated_before_expiry() -> None:
    """Like AWS: one leaf signs documents for ~3 h, then a new one is issued."""
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pki=pki)
    first, _ = chain(emulator, T0)
    five_min, _ = chain(emulator, T0 + timedelta(minutes=5))
    assert first[-1] == five_min[-1]
    late, _ = chain(emulator, T0 + timedelta(hours=2, minutes=50))
    assert late[-1] != first[-1]
    assert late[-2] == first[-2]  # same instance CA


@pytest.mark.parametrize(
    ("elapsed", "renewed"),
    [
        (timedelta(hours=23), {"leaf", "instance"}),
        (timedelta(days=5, hours=20), {"leaf", "instance", "zonal"}),
        (timedelta(days=20), {"leaf", "instance", "zonal", "regional"}),
    ],
)
def test_every_level_rotates_and_the_chain_stays_valid(
    elapsed: timedelta, renewed: set[str]
) -> None:
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pki=pki)
    before, _ = chain(emulator, T0)
    after, document = chain(emulator, T0 + elapsed)
    names = ["root", "regional", "zonal", "instance", "leaf"]
    changed = {n for n, a, b in zip(names, before, after, strict=True) if a != b}
    assert changed == renewed
    at = T0 + elapsed
    Verifier([pki.root_certificate()]).verify_signature_and_chain(document, at=at)
    for parent, child in itertools.pairwise(after):
        assert parent.not_valid_before_utc <= child.not_valid_before_utc
        assert child.not_valid_after_utc <= parent.not_valid_after_utc


def test_two_enclaves_share_the_ca_chain_but_not_the_leaf() -> None:
    pki = EmulatedAwsPki.ephemeral()
    a, _ = chain(NsmEmulator(pki=pki), T0)
    b, _ = chain(NsmEmulator(pki=pki), T0)
    assert a[:3] == b[:3]
    assert a[-1] != b[-1]
