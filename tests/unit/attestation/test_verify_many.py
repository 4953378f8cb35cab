"""verify_many: in-process below PROCESS_MIN_DOCUMENTS, worker processes above — same verdicts (issue 18)."""

from __future__ import annotations

import pytest

from enclavekit.attestation import verifier as verifier_module
from enclavekit.attestation.policy import NotDebug
from enclavekit.errors import Error

from .factory import NOW, TestPki, default_pcrs, make_document
from .test_attacks import verifier_for


def _verdicts(results: list[object]) -> list[tuple[str, str]]:
    out = []
    for result in results:
        if isinstance(result, Error):
            out.append((type(result).__name__, str(result)))
        else:
            out.append((type(result).__name__, repr(getattr(result, "pcrs", None))))
    return out


def test_small_batches_do_not_start_processes(
    pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the threshold nothing is sent to worker processes (they would only cost start-up)."""

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process pool was started for a small batch")

    monkeypatch.setattr(verifier_module, "ProcessPoolExecutor", no_pool)
    docs = [make_document(pki)] * 5
    results = verifier_for(pki).verify_many(docs, NotDebug(), at=NOW, workers=2)
    assert [type(r).__name__ for r in results] == ["VerifiedAttestation"] * 5


def test_processes_and_in_process_give_the_same_verdicts(
    pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (in process, shared cache) may only skip work whose result it has."""
    other = TestPki()  # a second chain, under another root: not trusted by this verifier
    good = make_document(pki)
    docs = [
        good,
        good + b"\x00",
        make_document(pki, pcrs=default_pcrs(debug=True)),
        make_document(other),
        good,
        make_document(pki, signing_key=other.leaf_key),
    ]
    in_process = verifier_for(pki).verify_many(docs, NotDebug(), at=NOW, workers=2)
    monkeypatch.setattr(verifier_module, "PROCESS_MIN_DOCUMENTS", 0)
    in_workers = verifier_for(pki).verify_many(docs, NotDebug(), at=NOW, workers=2)
    assert _verdicts(in_process) == _verdicts(in_workers)
    assert [v[0] for v in _verdicts(in_workers)] == [
        "VerifiedAttestation",
        "MalformedInput",
        "PolicyViolation",
        "VerificationError",
        "VerifiedAttestation",
        "VerificationError",
    ]
    # Documents of one chain share the loaded certificates in a batch.
    assert in_workers[0].chain[1] is in_workers[4].chain[1]  # type: ignore[union-attr]
