"""``enclavekit demo``: the whole lifecycle on one machine, each step printed with what was checked.

application → image → EIF → running enclave → attestation → certificate → verifying client →
sealed payload → answer; then a tampered rebuild that the client refuses. No AWS, no Docker, no
network (everything is on loopback and unix sockets), no files outside the work directory.

Stand-ins, said out loud in the output:

- the kernel, ``init`` and ``nsm.ko`` blobs are small synthetic files generated here (the local
  runner does not boot a kernel; it unpacks the ramdisks and plays ``init``'s part), so PCR1 is not
  nitro-cli's;
- the NSM is the emulator, its root generated in the work directory and pinned explicitly by the CA
  and the client (no default trust store ever contains it);
- the image carries only the application's source; the Python runtime and enclavekit come from this
  machine (``$ENCLAVEKIT_PYTHON``, bound read-only into the chroot) and are not measured.

The CA's policy certifies enclaves booted from the demo's kernel+bootstrap (PCR1); which
*application* may receive data is the client's decision (PCR0 and PCR2 pinned from the build).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from enclavekit.eif.measure import Measurements
from enclavekit.eif.reader import measure_eif
from enclavekit.errors import Error, PolicyViolation, VerificationError
from enclavekit.run import runner, vsock
from enclavekit.run import state as run_state

#: Where the application reaches the CA (parent side) and serves attested TLS (enclave side).
CA_VSOCK_PORT = 8000
SERVICE_VSOCK_PORT = 5000
SERVICE = "hello-enclave"
DNS_NAME = "hello-enclave.enclavekit.internal"
#: How long to wait for the application to obtain its certificate and listen.
READY_TIMEOUT = 45.0
APP_SOURCE = Path(__file__).parent / "examples" / "hello_enclave.py"
APP_PATH_IN_IMAGE = "app/hello_enclave.py"
#: The image's command: the runner provides the interpreter; the path is relative to / (init's cwd).
IMAGE_CMD = ("/bin/sh", "-c", f'exec "$ENCLAVEKIT_PYTHON" {APP_PATH_IN_IMAGE}')
IMAGE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
TAMPER_FROM = 'GREETER = "hello-enclave"'
TAMPER_TO = 'GREETER = "hello-enclave (tampered: payloads are copied to the operator)"'
#: nitro-cli's x86_64 kernel command line (blobs/x86_64/cmdline).
NITRO_CMDLINE = (
    "reboot=k panic=30 pci=off nomodules console=ttyS0 i8042.noaux i8042.nomux i8042.nopnp"
    " i8042.dumbkbd random.trust_cpu=on"
)


class DemoFailure(Exception):
    """A step did not behave as expected."""


@dataclass
class StepLog:
    """What was done and checked, for the JSON summary."""

    steps: list[dict[str, Any]] = field(default_factory=list)


class Narrator:
    """Rich step-by-step output on stderr."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.number = 0
        self.log = StepLog()
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        self.number += 1
        checks: list[str] = []
        self.console.print(f"\n[bold cyan][{self.number}/{self.total}] {title}[/]")
        t0 = time.monotonic()
        yield checks
        elapsed = time.monotonic() - t0
        self.log.steps.append({"step": title, "checked": checks, "seconds": round(elapsed, 2)})
        self.console.print(f"    [dim]({elapsed:.1f} s)[/]")

    def check(self, checks: list[str], text: str) -> None:
        checks.append(text)
        self.console.print(f"    [green]✓[/] {text}")

    def info(self, text: str) -> None:
        self.console.print(f"      {text}", highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(f"    [yellow]![/] {text}")


# ------------------------------------------------------------------------------------ building


def write_blobs(directory: Path) -> Path:
    """Synthetic stand-ins for nitro-cli's blobs (deterministic, so PCR1 is stable)."""
    directory.mkdir(parents=True, exist_ok=True)
    stand_in = b"enclavekit demo stand-in: the local runner does not boot this file\n"
    (directory / "bzImage").write_bytes(b"MZ" + b"\0" * 510 + b"HdrS" + stand_in)
    (directory / "bzImage.config").write_text(
        "#\n# Automatically generated file; DO NOT EDIT.\n"
        "# Linux/x86_64 6.1.0-enclavekit-demo Kernel Configuration\n"
    )
    (directory / "cmdline").write_text(NITRO_CMDLINE + "\n")
    (directory / "init").write_bytes(b"#!/bin/false\n# init " + stand_in)
    (directory / "nsm.ko").write_bytes(b"\x7fELF nsm.ko " + stand_in)
    return directory


def write_rootfs(directory: Path, *, tampered: bool) -> Path:
    """The application image as a root file-system directory: just the application's source."""
    if directory.exists():
        shutil.rmtree(directory)
    app = directory / APP_PATH_IN_IMAGE
    app.parent.mkdir(parents=True)
    source = APP_SOURCE.read_text()
    if tampered:
        if TAMPER_FROM not in source:
            raise DemoFailure(f"cannot tamper: {TAMPER_FROM!r} not found in {APP_SOURCE}")
        source = source.replace(TAMPER_FROM, TAMPER_TO)
    app.write_text(source)
    for path in [directory, app.parent, app]:
        os.utime(path, (1, 1))
    return directory


def build_image(rootfs: Path, output: Path, blobs: Path, version: str) -> Measurements:
    from enclavekit.eif.build import build_enclave
    from enclavekit.eif.image import RootfsDir

    result = build_enclave(
        RootfsDir(rootfs),
        output,
        blobs_dir=blobs,
        name=SERVICE,
        version=version,
        cmd=IMAGE_CMD,
        env=IMAGE_ENV,
        source_date_epoch="0",
    )
    return result.measurements


# ------------------------------------------------------------------------------------ parent side


@dataclass
class ParentSide:
    """The CA, the parent's vsock relays and the CA/NSM roots."""

    workdir: Path
    store: run_state.EnclaveStore
    stops: list[Callable[[], None]] = field(default_factory=list)
    ca_root: Any = None
    nsm_root: Any = None

    def close(self) -> None:
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                stop()
        self.stops.clear()

    def relay(self, listener: socket.socket, upstream: Callable[[], socket.socket]) -> None:
        from enclavekit.transport.server import RelayServer

        server = RelayServer(upstream)
        server.start(listener)
        self.stops.append(server.close)

    def expose(self, cid: int) -> int:
        """A loopback TCP port relayed to the enclave's attested-TLS vsock port."""
        listener = socket.create_server(("127.0.0.1", 0))
        directory = run_state.vsock_dir(self.store.root)
        target = f"vsock://{cid}:{SERVICE_VSOCK_PORT}"
        self.relay(listener, lambda: vsock.connect(target, timeout=5, directory=directory))
        port: int = listener.getsockname()[1]
        return port


def start_ca(parent: ParentSide, pcr1: bytes) -> str:
    from enclavekit.atls.ca import (
        CaPolicy,
        Issuer,
        NitroEvidenceVerifier,
        ServicePolicy,
        create_ca_keys,
    )
    from enclavekit.atls.service import create_app, start_in_thread
    from enclavekit.atls.store import SqliteStore
    from enclavekit.attestation.verifier import Verifier
    from enclavekit.pki.emulated import EmulatedAwsPki

    pki = EmulatedAwsPki.load_or_create(parent.store.root / "nsm")
    parent.nsm_root = pki.root_certificate()
    keys = create_ca_keys("enclavekit demo attestation CA", now=datetime.now(UTC))
    parent.ca_root = keys.root
    policy = CaPolicy(
        services={
            SERVICE: ServicePolicy(
                name=SERVICE,
                dns_names=(DNS_NAME,),
                pcr_allowlist=({1: pcr1},),
                validity=timedelta(hours=1),
            )
        }
    )
    store = SqliteStore(parent.workdir / "ca.sqlite")
    issuer = Issuer(keys, policy, store, NitroEvidenceVerifier(Verifier([parent.nsm_root])))
    service = start_in_thread(create_app(issuer))
    parent.stops.append(service.stop)
    directory = run_state.ensure_private_dir(run_state.vsock_dir(parent.store.root))
    listener = vsock.listen(f"vsock://ANY:{CA_VSOCK_PORT}", directory=directory, own_cid=3)
    ca_address = ("127.0.0.1", service.port)
    parent.relay(listener, lambda: socket.create_connection(ca_address, timeout=5))
    return service.url


def wait_until_serving(
    store: run_state.EnclaveStore, record: run_state.EnclaveRecord, timeout: float
) -> None:
    """Until the application listens on its vsock port; DemoFailure with its console otherwise."""
    path = vsock.socket_path(run_state.vsock_dir(store.root), record.cid, SERVICE_VSOCK_PORT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        if not run_state.pid_alive(record.pid):
            break
        time.sleep(0.1)
    raise DemoFailure(
        f"the enclave application did not start serving within {timeout:.0f} s; its console:\n"
        + console_text(store, record)
    )


def console_text(store: run_state.EnclaveStore, record: run_state.EnclaveRecord) -> str:
    for path in (
        runner.console_path(store, record),
        run_state.logs_dir(store.root) / f"{record.enclave_id}.log",
    ):
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")
    return "(no console output)"


# ------------------------------------------------------------------------------------ client side


def post_sealed(peer: Any, port: int, sealed: bytes) -> dict[str, Any]:
    """POST /hello over a TLS connection pinned to the verified certificate."""
    context: ssl.SSLContext = peer.pinned_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=DNS_NAME) as tls,
    ):
        head = (
            f"POST /hello HTTP/1.1\r\nHost: {DNS_NAME}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(sealed)}\r\nConnection: close\r\n\r\n"
        )
        tls.sendall(head.encode() + sealed)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
            if len(data) > 1 << 20:
                break
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = head_bytes.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise DemoFailure(f"the enclave answered {status!r}: {body[:200]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


# ------------------------------------------------------------------------------------ the demo


@dataclass(frozen=True, slots=True)
class DemoResult:
    ok: bool
    steps: list[dict[str, Any]]
    seconds: float
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "steps": self.steps,
            "error": self.error,
        }


def _pcr_line(measurements: Measurements) -> list[str]:
    return [f"PCR{i}: {v.hex()}" for i, v in sorted(measurements.pcrs.items())]


def run_demo(
    *,
    workdir: Path | None = None,
    console: Console | None = None,
    isolation: str | None = None,
    keep: bool = False,
) -> DemoResult:
    """Run every step; never raises for a step that misbehaves (the result says so)."""
    out = console or Console(stderr=True, highlight=False)
    created = workdir is None
    base = Path(tempfile.mkdtemp(prefix="enclavekit-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    narrator = Narrator(out, total=8)
    store = run_state.EnclaveStore(base / "state")
    parent = ParentSide(base, store)
    started: list[run_state.EnclaveRecord] = []
    error = ""
    try:
        _steps(narrator, base, store, parent, started, isolation)
    except (DemoFailure, Error, OSError) as exc:
        error = exc.diagnostics() if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}"
        out.print(f"\n[bold red]✗ demo step {narrator.number} failed:[/] {error}")
    finally:
        for record in started:
            with contextlib.suppress(Exception):
                runner.terminate_enclave(record, store=store, timeout=5)
        parent.close()
        if created and not keep:
            shutil.rmtree(base, ignore_errors=True)
    seconds = time.monotonic() - narrator.started
    if not error:
        out.print(
            f"\n[bold green]All {narrator.total} steps behaved as expected[/] in {seconds:.1f} s"
            + (f" (work directory: {base})" if keep or not created else "")
        )
    return DemoResult(not error, narrator.log.steps, seconds, error)


def _steps(
    n: Narrator,
    base: Path,
    store: run_state.EnclaveStore,
    parent: ParentSide,
    started: list[run_state.EnclaveRecord],
    isolation: str | None,
) -> None:
    from enclavekit.atls.client import AttestedClient
    from enclavekit.atls.seal import load_recipient_key, seal
    from enclavekit.attestation.policy import PcrsEqual
    from enclavekit.attestation.verifier import Verifier

    blobs = write_blobs(base / "blobs")
    eif = base / "hello-enclave.eif"

    # 1. The image and the EIF.
    with n.step("Build the enclave image from enclavekit/examples/hello_enclave.py") as checks:
        rootfs = write_rootfs(base / "image", tampered=False)
        good = build_image(rootfs, eif, blobs, "1")
        n.check(checks, f"built {eif.name} ({eif.stat().st_size} bytes) without Docker")
        for line in _pcr_line(good):
            n.info(line)
        again = measure_eif(eif)
        if again.pcrs != good.pcrs:
            raise DemoFailure("the EIF reader measured other PCRs than the builder")
        n.check(checks, "re-read the EIF: CRC intact, PCR0/1/2 recomputed equal to the build's")
        n.note("kernel/init/nsm.ko are synthetic stand-ins (nothing boots them here)")

    # 2. The CA and the parent's relays.
    with n.step("Start the attestation CA and the parent's vsock relays") as checks:
        ca_url = start_ca(parent, good.pcr1)
        n.check(checks, f"CA listening on {ca_url}; the parent relays vsock port {CA_VSOCK_PORT}")
        n.check(
            checks,
            "CA trusts only the emulated NSM root generated for this run (pinned explicitly)",
        )
        n.info(f"CA policy for {SERVICE!r}: PCR1 = build's kernel+bootstrap, not debug")

    # 3. Run it.
    with n.step("Run the EIF (run-enclave)") as checks:
        options = runner.RunOptions(
            eif_path=eif,
            cpu_count=min(2, len(os.sched_getaffinity(0))),
            memory_mib=512,
            isolation=isolation,
            host_python=True,
            enclave_name="hello-enclave",
        )
        record = runner.run_enclave(options, store=store)
        started.append(record)
        n.check(
            checks,
            f"enclave {record.enclave_id} CID {record.cid} running ({record.isolation} mode)",
        )
        if any(record.measurements[f"PCR{i}"] != good.pcrs[i].hex() for i in (0, 1, 2)):
            raise DemoFailure("the runner measured other PCRs than the build")
        n.check(
            checks,
            "the runner re-measured the EIF (PCR0/1/2 equal to the build's) and loaded them into"
            " the enclave's emulated NSM",
        )
        n.info(escape(json.dumps(record.run_info())))
        n.note(
            "the image holds only the application's source; Python and enclavekit come from this"
            " machine ($ENCLAVEKIT_PYTHON) and are not measured"
        )
        wait_until_serving(store, record, READY_TIMEOUT)
        console_lines = console_text(store, record).splitlines()
        if not any("issued by the attestation CA" in line for line in console_lines):
            raise DemoFailure("the application serves but never reported its certificate")
        n.check(
            checks,
            "the app got a CA certificate by attestation (challenge nonce + key bound in an NSM"
            " document) and serves attested TLS on vsock",
        )
        for line in console_lines:
            n.info(f"[dim]console:[/] {escape(line)}")
        port = parent.expose(record.cid)

    # 4. Verify before sending anything.
    verifier = Verifier([parent.nsm_root])
    expected = {0: good.pcr0, 1: good.pcr1, 2: good.pcr2}
    client = AttestedClient(
        parent.ca_root, verifier=verifier, policy=PcrsEqual(expected), fresh=True
    )
    with n.step("Client verifies the enclave against the build's PCRs") as checks:
        peer = client.attest("127.0.0.1", port, server_hostname=DNS_NAME)
        n.check(checks, f"TLS certificate chains to the demo CA root and names {DNS_NAME}")
        n.check(
            checks,
            "embedded attestation document: signature and chain to the NSM root, not debug,"
            " public_key = the certificate's key",
        )
        if peer.fresh is None:
            raise DemoFailure("no fresh attestation document was checked")
        n.check(
            checks,
            "fresh document for the client's own nonce: nonce, key and user_data = context label"
            " ‖ SHA-256(cert) ‖ nonce all match",
        )
        n.check(checks, "PCR0, PCR1, PCR2 equal the values printed at build time")
        n.info(f"module {peer.fresh.module_id}")

    # 5. The sealed payload.
    with n.step("Client seals a payload to the attested key; the enclave answers") as checks:
        if peer.fresh.public_key is None:
            raise DemoFailure("the fresh document carries no public key")
        payload = json.dumps(
            {"name": "demo client", "secret": secrets.token_hex(16)}, sort_keys=True
        ).encode()
        sealed = seal(payload, load_recipient_key(peer.fresh.public_key))
        n.check(checks, f"sealed {len(payload)} bytes (HPKE) to the key from the verified document")
        answer = post_sealed(peer, port, sealed)
        if answer.get("plaintext_sha256") != hashlib.sha256(payload).hexdigest():
            raise DemoFailure(f"the enclave decrypted something else: {answer}")
        n.check(
            checks,
            "sent over TLS pinned to the verified certificate; the enclave decrypted exactly our"
            " payload (SHA-256 matches)",
        )
        n.info(f"enclave says: {answer.get('greeting')!r}")

    # 6. Tamper.
    tampered_eif = base / "hello-enclave-tampered.eif"
    with n.step("Rebuild with a tampered application") as checks:
        rootfs = write_rootfs(base / "image-tampered", tampered=True)
        bad = build_image(rootfs, tampered_eif, blobs, "1-tampered")
        n.info(f"changed one line: {TAMPER_TO}")
        for i in (0, 1, 2):
            same = bad.pcrs[i] == good.pcrs[i]
            n.info(f"PCR{i}: {bad.pcrs[i].hex()[:32]}… {'unchanged' if same else 'CHANGED'}")
        if bad.pcr0 == good.pcr0 or bad.pcr2 == good.pcr2 or bad.pcr1 != good.pcr1:
            raise DemoFailure("expected PCR0 and PCR2 to change and PCR1 to stay")
        n.check(checks, "PCR0 and PCR2 changed (application), PCR1 unchanged (kernel+bootstrap)")

    # 7. Run the tampered image; the CA certifies it (platform policy), the client must refuse.
    with n.step("Run the tampered EIF") as checks:
        bad_record = runner.run_enclave(
            runner.RunOptions(
                eif_path=tampered_eif,
                cpu_count=options.cpu_count,
                memory_mib=512,
                isolation=isolation,
                host_python=True,
                enclave_name="hello-enclave-tampered",
            ),
            store=store,
        )
        started.append(bad_record)
        wait_until_serving(store, bad_record, READY_TIMEOUT)
        n.check(
            checks,
            f"enclave {bad_record.enclave_id} CID {bad_record.cid} serving (the CA certified it:"
            " same PCR1)",
        )
        bad_port = parent.expose(bad_record.cid)

    with n.step("Client verifies the tampered enclave and refuses it") as checks:
        try:
            client.attest("127.0.0.1", bad_port, server_hostname=DNS_NAME)
        except PolicyViolation as refusal:
            mismatched = sorted({f.check for f in refusal.failures})
            for failure in refusal.failures:
                n.info(
                    f"[red]{failure.check}[/]: expected {failure.expected[:24]}…,"
                    f" found {failure.found[:24]}…"
                )
            if not any("PCR0" in c for c in mismatched) or not any("PCR2" in c for c in mismatched):
                raise DemoFailure(f"refused, but not for PCR0/PCR2: {mismatched}") from refusal
            n.check(
                checks,
                "REFUSED: PCR0 and PCR2 do not match the build; no payload was sealed or sent",
            )
        except VerificationError as refusal:
            raise DemoFailure(f"refused for another reason than the PCRs: {refusal}") from refusal
        else:
            raise DemoFailure("the client accepted the tampered enclave")
        for record in list(started):
            if runner.terminate_enclave(record, store=store):
                started.remove(record)
        n.check(checks, "both enclaves terminated (terminate-enclave)")
