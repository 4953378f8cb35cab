"""The gate for every speed change in verification: a verdict never depends on what the verifier saw before.

For every document of the mutation corpus (``mutations.py``: about 1,100 documents from the emulated AWS PKI,
each checked at two of five instants), a fresh :class:`Verifier` and one long-lived verifier that has
verified all the others must give the same outcome: the same exception class *and message*, or acceptance
with the same validated chain. Hypothesis then drives long-lived verifiers through random sequences of
(document, instant) pairs, biased towards accepted documents so that the caches fill.
"""

from __future__ import annotations

import functools

from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.attestation import Verifier
from enclavekit.errors import Error
from tests.unit.attestation.mutations import TIMES, Corpus, corpus

Outcome = tuple[str, str, tuple[x509.Certificate, ...]]


def _outcome(verifier: Verifier, raw: bytes, time_index: int) -> Outcome:
    try:
        verified = verifier.verify_signature_and_chain(raw, at=TIMES[time_index])
    except Error as exc:
        return (type(exc).__name__, str(exc), ())
    return ("ok", "", verified.chain)


@functools.cache
def _fresh(index: int, time_index: int) -> Outcome:
    """The verdict of a verifier that has seen nothing else (memoised: it cannot depend on history)."""
    data = corpus()
    return _outcome(Verifier([data.root.certificate]), data.cases[index].raw, time_index)


def _schedule(data: Corpus) -> list[tuple[int, int]]:
    """Every document at the first instant and at one of the others (rotating): 2 × len(cases) pairs."""
    return [
        pair for i in range(len(data.cases)) for pair in ((i, 0), (i, 1 + i % (len(TIMES) - 1)))
    ]


def _explain(data: Corpus, index: int, time_index: int, warm: Outcome, fresh: Outcome) -> str:
    return (
        f"{data.cases[index].name} at {TIMES[time_index].isoformat()}: long-lived verifier says "
        f"{warm[0]} {warm[1][:200]!r}, a fresh one {fresh[0]} {fresh[1][:200]!r}"
    )


def test_corpus_is_big_and_varied() -> None:
    data = corpus()
    assert len(_schedule(data)) >= 2000
    families = {case.name.split("/")[0] for case in data.cases}
    assert families == {"payload", "leaf", "ca", "envelope", "cbor"}
    verdicts = {_fresh(i, 0)[0] for i in range(len(data.cases))}
    assert verdicts >= {"ok", "MalformedInput", "VerificationError"}


def test_long_lived_verifier_agrees_with_fresh_ones_on_every_mutation() -> None:
    """Two passes (forward, then backward) of one verifier over the whole schedule: in the second pass every
    document comes after all the others."""
    data = corpus()
    schedule = _schedule(data)
    verifier = Verifier([data.root.certificate])
    mismatches = []
    for order in (schedule, schedule[::-1]):
        for index, time_index in order:
            warm = _outcome(verifier, data.cases[index].raw, time_index)
            fresh = _fresh(index, time_index)
            if warm != fresh:
                mismatches.append(_explain(data, index, time_index, warm, fresh))
    assert not mismatches, "\n".join(mismatches[:20])
    # The run exercised both caches (a change that silently stopped caching would pass the comparison).
    assert verifier._paths._entries and verifier._ca_paths._entries


def _accepted() -> list[int]:
    return [i for i in range(len(corpus().cases)) if _fresh(i, 0)[0] == "ok"]


@st.composite
def _histories(draw: st.DrawFn) -> list[tuple[int, int]]:
    accepted = _accepted()
    n = len(corpus().cases)
    index = st.one_of(st.sampled_from(accepted), st.integers(0, n - 1))
    time_index = st.one_of(st.just(0), st.integers(0, len(TIMES) - 1))
    return draw(st.lists(st.tuples(index, time_index), min_size=1, max_size=25))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_histories())
def test_verdict_does_not_depend_on_what_the_verifier_saw_before(
    history: list[tuple[int, int]],
) -> None:
    data = corpus()
    verifier = Verifier([data.root.certificate])
    for index, time_index in history:
        warm = _outcome(verifier, data.cases[index].raw, time_index)
        fresh = _fresh(index, time_index)
        assert warm == fresh, _explain(data, index, time_index, warm, fresh)


def test_cached_verifier_agrees_after_seeing_only_accepted_documents() -> None:
    """Fill the caches with every accepted document first, then verify every document (at rotating
    instants)."""
    data = corpus()
    verifier = Verifier([data.root.certificate])
    for index in _accepted():
        verifier.verify_signature_and_chain(data.cases[index].raw, at=TIMES[0])
    for index in range(len(data.cases)):
        time_index = index % len(TIMES)
        warm = _outcome(verifier, data.cases[index].raw, time_index)
        fresh = _fresh(index, time_index)
        assert warm == fresh, _explain(data, index, time_index, warm, fresh)
