"""NSM emulator attestation throughput, against raw P-384 ECDSA signing measured in the same run.

Every attestation document costs one ECDSA P-384 signature (the leaf and its encoded chain are cached), so
the baseline is ``EllipticCurvePrivateKey.sign`` on a document-sized Sig_structure, single-threaded. Reported:

1. in-process ``NsmEmulator.attest`` (single thread) as a ratio to the raw sign rate;
2. the emulator server on loopback (a separate process, as ``enclavekit nsm serve`` runs), loaded by many
   concurrent connections from an asyncio client for a bounded time; attestations/s and errors (every answer
   must be an Attestation response; a sample is verified against the emulator root).

Target (issue #5): >= 500 attestations/s over loopback on 2 cores with zero errors.

Usage: python benchmarks/bench_nsm.py [--seconds S] [--connections C] [--transport tcp|unix]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import struct
import sys
import tempfile
import time

from _results import record
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.attestation.verifier import Verifier
from enclavekit.nsm import NsmEmulator
from enclavekit.nsm.messages import (
    Attestation,
    AttestationDocument,
    decode_response,
    encode_request,
)
from enclavekit.pki.emulated import EmulatedAwsPki

TARGET = 500.0
ATTEST_PREFIX = bytes.fromhex("a16b4174746573746174696f6ea168646f63756d656e74")


def rate(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


def run_server(url: str, state_dir: str, ready) -> None:
    from enclavekit.nsm.server import EmulatorServer

    async def main() -> None:
        emulator = NsmEmulator(pki=EmulatedAwsPki.load_or_create(state_dir))
        server = EmulatorServer(emulator, url)
        await server.start()
        ready.put(server.address)
        await asyncio.Event().wait()

    asyncio.run(main())


async def load(url: str, connections: int, seconds: float) -> tuple[int, int, list[bytes]]:
    ok = errors = 0
    samples: list[bytes] = []
    deadline = time.perf_counter() + seconds

    async def open_connection():
        if url.startswith("unix://"):
            return await asyncio.open_unix_connection(url.removeprefix("unix://"))
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        return await asyncio.open_connection(host, int(port))

    async def worker(n: int) -> None:
        nonlocal ok, errors
        reader, writer = await open_connection()
        i = 0
        try:
            while time.perf_counter() < deadline:
                nonce = struct.pack(">II", n, i)
                request = encode_request(Attestation(nonce=nonce, user_data=b"bench"))
                writer.write(struct.pack(">I", len(request)) + request)
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                answer = await reader.readexactly(length)
                if answer.startswith(ATTEST_PREFIX):
                    ok += 1
                    if len(samples) < 20 and i % 50 == 0:
                        samples.append(answer)
                else:
                    errors += 1
                i += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(connections)))
    return ok, errors, samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="load duration (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    args = parser.parse_args()

    key = ec.generate_private_key(ec.SECP384R1())
    tbs = os.urandom(4600)
    raw_sign = rate(lambda: key.sign(tbs, ec.ECDSA(hashes.SHA384())), 1.0)

    with tempfile.TemporaryDirectory() as state_dir:
        pki = EmulatedAwsPki.load_or_create(state_dir)
        emulator = NsmEmulator(pki=pki)
        in_process = rate(lambda: emulator.attest(nonce=b"x" * 32), 1.0)

        url = "tcp://127.0.0.1:0" if args.transport == "tcp" else f"unix://{state_dir}/nsm.sock"
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        server = ctx.Process(target=run_server, args=(url, state_dir, ready), daemon=True)
        server.start()
        try:
            address = ready.get(timeout=30)
            start = time.perf_counter()
            ok, errors, samples = asyncio.run(load(address, args.connections, args.seconds))
            elapsed = time.perf_counter() - start
        finally:
            server.terminate()
            server.join(timeout=10)

        verifier = Verifier([pki.root_certificate()])
        for answer in samples:
            response = decode_response(answer)
            assert isinstance(response, AttestationDocument)
            try:
                verifier.verify_signature_and_chain(response.document)
            except Exception as exc:
                print(f"sample failed verification: {exc}", file=sys.stderr)
                errors += 1

    served = ok / elapsed
    print(f"cores available                 {os.cpu_count()}")
    print(f"raw P-384 sign (baseline)       {raw_sign:8.0f} /s")
    print(
        f"in-process attest               {in_process:8.0f} /s  ({in_process / raw_sign:.2f} x raw)"
    )
    print(
        f"server over {args.transport:<4} ({args.connections} conns) {served:8.0f} /s  "
        f"({served / raw_sign:.2f} x raw single-thread sign), {ok} documents, {errors} errors, "
        f"{len(samples)} samples verified"
    )
    print(
        f"target                          {TARGET:8.0f} /s with 0 errors: "
        f"{'MET' if served >= TARGET and errors == 0 else 'NOT MET'}"
    )
    raw_baseline = f"raw P-384 ECDSA sign, one thread ({raw_sign:.0f}/s), same run"
    record(
        bench="bench_nsm",
        figure="in-process attest rate / raw sign rate",
        value=in_process / raw_sign,
        unit="ratio",
        baseline=raw_baseline,
    )
    record(
        bench="bench_nsm",
        figure=f"emulator server over {args.transport}, {args.connections} connections",
        value=served,
        unit="attestations/s",
        baseline=f"{raw_baseline}; ratio {served / raw_sign:.2f}",
        target=f">= {TARGET:g}/s with 0 errors",
        met=served >= TARGET and errors == 0,
        headline=True,
    )
    record(
        bench="bench_nsm",
        figure="emulator server errors",
        value=errors,
        unit="errors",
        baseline=None,
        target="0",
        met=errors == 0,
    )
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
