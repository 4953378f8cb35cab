"""Attestation verification throughput against raw P-384 ECDSA verification, measured in the same run.

Prints documents/s for a warm verifier (chain cached: one ECDSA verify per document) and a cold one (chain
validated every time: five ECDSA verifies plus path building), each as a ratio to the raw rate of
``EllipticCurvePublicKey.verify`` on the same Sig_structure. Targets: warm ≥ 0.8 x raw; cold ≥ 0.8 x raw/5.
Also reports a new leaf under a cached CA path (ratio to raw/2, no target), batch verification across
cores (``Verifier.verify_many``) and, per batch size, verify_many against a sequential ``verify`` loop
measured in the same run: where worker processes start to pay off, and that verify_many as shipped
(in-process below ``PROCESS_MIN_DOCUMENTS``) is never slower than the loop.

Usage: python benchmarks/bench_verify.py [--seconds S] [--batch-sizes 10,100,400,1000,2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from _results import record
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclavekit.attestation import AttestationDocument, Verifier
from enclavekit.attestation import verifier as verifier_module
from enclavekit.attestation.policy import AllOf, PcrsEqual

DOC = Path(__file__).resolve().parents[1] / "tests/assets/attestation/real/marlin-2024-08-prod.cbor"


def rate(fn, seconds: float) -> float:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


@dataclass
class Crossover:
    report: str
    ok: bool
    worst: float  # the smallest loop/shipped ratio over the batch sizes


def verify_many_crossover(
    raw: bytes, policy: AllOf, at: datetime, sizes: list[int], rounds: int = 3
) -> Crossover:
    """verify_many vs a sequential ``verify`` loop (the baseline) per batch size, measured in this run.

    Three timings per size, interleaved over ``rounds`` (median per document): the sequential loop with
    a fresh verifier, verify_many forced into worker processes (PROCESS_MIN_DOCUMENTS set to 0), and
    verify_many as shipped. The batch repeats one real document: one chain, the case where processes
    pay off latest (a batch of many chains costs more per document in process, so processes pay off
    earlier there). Target: verify_many as shipped is never slower than the loop (ratio >= 0.9: below
    the threshold both run the same code, so the rest is noise on a shared machine).
    """
    forced_threshold = verifier_module.PROCESS_MIN_DOCUMENTS
    lines = [
        f"verify_many vs sequential loop (one chain; median of {rounds}; "
        f"{os.cpu_count()} CPUs; PROCESS_MIN_DOCUMENTS = {forced_threshold}):",
        "   docs   loop µs/doc  processes µs/doc  shipped µs/doc  loop/processes  loop/shipped",
    ]
    ok = True
    worst = float("inf")
    first_payoff: int | None = None
    for size in sizes:
        docs = [raw] * size
        loop_t, proc_t, auto_t = [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            verifier = Verifier.aws()
            for doc in docs:
                verifier.verify(doc, policy, at=at)
            loop_t.append((time.perf_counter() - start) / size)
            verifier_module.PROCESS_MIN_DOCUMENTS = 0
            try:
                start = time.perf_counter()
                Verifier.aws().verify_many(docs, policy, at=at)
                proc_t.append((time.perf_counter() - start) / size)
            finally:
                verifier_module.PROCESS_MIN_DOCUMENTS = forced_threshold
            start = time.perf_counter()
            Verifier.aws().verify_many(docs, policy, at=at)
            auto_t.append((time.perf_counter() - start) / size)
        loop_m, proc_m, auto_m = (statistics.median(t) for t in (loop_t, proc_t, auto_t))
        if first_payoff is None and loop_m > proc_m:
            first_payoff = size
        ok = ok and loop_m / auto_m >= 0.9
        worst = min(worst, loop_m / auto_m)
        lines.append(
            f"  {size:5d}   {loop_m * 1e6:11.0f}  {proc_m * 1e6:16.0f}  {auto_m * 1e6:14.0f}"
            f"  {loop_m / proc_m:14.2f}  {loop_m / auto_m:12.2f}"
        )
    lines.append(
        "processes first pay off at "
        + (f"{first_payoff} documents" if first_payoff else f"none of these sizes (<= {sizes[-1]})")
        + f"; shipped threshold {forced_threshold}; target loop/shipped >= 0.9 at every size"
    )
    return Crossover("\n".join(lines), ok, worst)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="rounds x 0.3 s per measurement")
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10, 100, 200, 400, 1000, 2000],
        help="verify_many batch sizes to compare with the sequential loop (comma-separated)",
    )
    args = parser.parse_args()
    raw = DOC.read_bytes()
    doc = AttestationDocument.from_cbor(raw)
    at = doc.timestamp
    policy = AllOf([PcrsEqual({0: doc.pcrs[0], 1: doc.pcrs[1], 2: doc.pcrs[2]})])

    key = x509.load_der_x509_certificate(doc.certificate).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der_sig = encode_dss_signature(
        int.from_bytes(doc.signature[:48], "big"), int.from_bytes(doc.signature[48:], "big")
    )
    tbs = doc.sig_structure()

    warm = Verifier.aws()
    cold = Verifier.aws()
    new_leaf = Verifier.aws()

    def new_leaf_once() -> None:
        # A new enclave on a known instance: the CA path is cached, the leaf is not (its full path is
        # forgotten), so the leaf is validated under the cached CA path (two ECDSA verifications).
        new_leaf._paths.clear()
        new_leaf.verify(raw, policy, at=at)

    def cold_once() -> None:
        cold.clear_cache()  # a long-lived verifier meeting a chain it has never seen
        cold.verify(raw, policy, at=at)

    # The floor of a cold verification: only the cryptography it cannot skip, with nothing around it —
    # pyca's RFC 5280 validation (the verifier's own, same policy) of freshly parsed certificates (four
    # links, each with a key loaded for the first time) and the COSE verification with the leaf's freshly
    # loaded key.
    path_validator = Verifier.aws()

    def cold_floor_once() -> None:
        leaf = x509.load_der_x509_certificate(doc.certificate)
        bundle = [x509.load_der_x509_certificate(d) for d in doc.cabundle[1:]]
        path_validator._validate_path(leaf, bundle, at)
        leaf_key = leaf.public_key()
        assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
        leaf_key.verify(der_sig, tbs, ec.ECDSA(hashes.SHA384()))

    # The machine may be shared: interleave short rounds of baseline and candidates, and use the median of
    # the per-round ratios, so that load drifting during the run affects both sides of each ratio alike.
    rounds = max(3, int(args.seconds * 3))
    raws, warms, colds, floors, new_leaves = [], [], [], [], []
    for _ in range(rounds):
        raws.append(rate(lambda: key.verify(der_sig, tbs, ec.ECDSA(hashes.SHA384())), 0.3))
        warms.append(rate(lambda: warm.verify(raw, policy, at=at), 0.3))
        colds.append(rate(cold_once, 0.3))
        floors.append(rate(cold_floor_once, 0.3))
        new_leaves.append(rate(new_leaf_once, 0.3))
    warm_ratio = statistics.median(w / r for w, r in zip(warms, raws, strict=True))
    cold_ratio = statistics.median(c / (r / 5) for c, r in zip(colds, raws, strict=True))
    floor_ratio = statistics.median(f / (r / 5) for f, r in zip(floors, raws, strict=True))
    of_floor = statistics.median(c / f for c, f in zip(colds, floors, strict=True))
    new_leaf_ratio = statistics.median(n / (r / 2) for n, r in zip(new_leaves, raws, strict=True))
    raw_rate, warm_rate, cold_rate = (statistics.median(x) for x in (raws, warms, colds))

    batch_docs = [raw] * 400
    start = time.perf_counter()
    results = Verifier.aws().verify_many(batch_docs, policy, at=at)
    batch_rate = len(batch_docs) / (time.perf_counter() - start)
    assert all(not isinstance(r, Exception) for r in results)
    crossover = verify_many_crossover(raw, policy, at, args.batch_sizes)

    print(f"raw P-384 ECDSA verify:      {raw_rate:9.1f} /s  (baseline)")
    print(
        f"warm verify (chain cached):  {warm_rate:9.1f} docs/s  ratio {warm_ratio:.2f}  (target >= 0.80)"
    )
    print(
        f"cold verify (full chain):    {cold_rate:9.1f} docs/s  ratio to raw/5 {cold_ratio:.2f}  (target >= 0.80)"
    )
    print(
        f"cold floor (crypto only):    {statistics.median(floors):9.1f} docs/s  ratio to raw/5 {floor_ratio:.2f}  "
        f"(pyca path validation + COSE verify, fresh keys; cold verify reaches {of_floor:.2f} of it)"
    )
    print(
        f"new leaf, CA path cached:    {statistics.median(new_leaves):9.1f} docs/s  ratio to raw/2 "
        f"{new_leaf_ratio:.2f}  (no target: two ECDSA verifies, the leaf validated by pyca)"
    )
    print(
        f"batch verify_many (all CPUs):{batch_rate:9.1f} docs/s  ratio {batch_rate / raw_rate:.2f} (includes process start-up)"
    )
    print(crossover.report)
    raw_baseline = f"raw P-384 ECDSA verify of the same Sig_structure ({raw_rate:.0f}/s), same run"
    per_round = f"median of {rounds} interleaved per-round ratios"
    record(
        bench="bench_verify",
        figure="warm verify rate / raw verify rate",
        value=warm_ratio,
        unit="ratio",
        baseline=f"{raw_baseline}, {per_round}",
        target=">= 0.8",
        met=warm_ratio >= 0.8,
        headline=True,
    )
    record(
        bench="bench_verify",
        figure="cold verify rate / (raw verify rate / 5)",
        value=cold_ratio,
        unit="ratio",
        baseline=f"{raw_baseline} / 5 (five ECDSA verifies), {per_round}",
        target=">= 0.8",
        met=cold_ratio >= 0.8,
        headline=True,
    )
    record(
        bench="bench_verify",
        figure="cold floor rate / (raw verify rate / 5)",
        value=floor_ratio,
        unit="ratio",
        baseline=f"{raw_baseline} / 5, {per_round}",
    )
    record(
        bench="bench_verify",
        figure="new leaf under a cached CA path / (raw verify rate / 2)",
        value=new_leaf_ratio,
        unit="ratio",
        baseline=f"{raw_baseline} / 2, {per_round}",
    )
    record(
        bench="bench_verify",
        figure="verify_many on all CPUs, 400 documents / raw verify rate",
        value=batch_rate / raw_rate,
        unit="ratio",
        baseline=f"{raw_baseline} (the batch includes process start-up)",
    )
    record(
        bench="bench_verify",
        figure="sequential verify loop time / verify_many time, worst batch size",
        value=crossover.worst,
        unit="ratio",
        baseline=f"a sequential verify loop, same run, batch sizes {','.join(map(str, args.batch_sizes))}",
        target=">= 0.9 at every size",
        met=crossover.ok,
    )
    ok = warm_ratio >= 0.8 and cold_ratio >= 0.8 and crossover.ok
    print("targets met" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
