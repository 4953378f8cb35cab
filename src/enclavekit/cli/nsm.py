"""``enclavekit nsm ...``: run the NSM emulator, print its root, and talk to whichever NSM is configured.

``serve`` runs an emulator; ``root`` prints its (never trusted by default) root certificate; ``attest``,
``describe-nsm``, ``describe-pcr``, ``extend-pcr`` and ``lock-pcr`` talk to ``$ENCLAVEKIT_NSM`` if set,
else to ``/dev/nsm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from enclavekit._fs import write_atomic
from enclavekit.cli._common import bind_error, endpoint_url
from enclavekit.cli._files import parse_hex, renamed_option
from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.errors import UsageError
from enclavekit.nsm.client import ENV_VAR, Nsm
from enclavekit.nsm.emulator import BOOT_LOCKED_PCRS, NsmEmulator
from enclavekit.nsm.messages import PCR_LENGTH
from enclavekit.nsm.server import EmulatorServer
from enclavekit.pki.emulated import (
    DEFAULT_REGION,
    EmulatedAwsPki,
    default_state_dir,
    root_fingerprint,
)

#: A public key file larger than this is not a key.
MAX_PUBLIC_KEY_FILE = 64 * 1024


def register(group: click.Group) -> None:
    group.add_command(nsm)


@click.group()
def nsm() -> None:
    """The Nitro Secure Module: emulator and client.

    Client commands use $ENCLAVEKIT_NSM (unix:///path or tcp://host:port, an `enclavekit nsm serve`
    emulator) when set, else /dev/nsm.
    """


# -- helpers -----------------------------------------------------------------------------------


def _state_dir(value: Path | None) -> Path:
    return value if value is not None else default_state_dir()


def _parse_hex(value: str | None, name: str) -> bytes | None:
    if value is None:
        return None
    return parse_hex(value, name)


def _parse_pcr_options(values: tuple[str, ...]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for item in values:
        index_text, sep, hex_text = item.partition("=")
        if not sep:
            raise UsageError(f"--pcr expects N=HEX, got {item!r}")
        try:
            index = int(index_text, 10)
        except ValueError:
            raise UsageError(f"--pcr index must be a number 0..15, got {index_text!r}") from None
        if index not in BOOT_LOCKED_PCRS:
            raise UsageError(
                f"--pcr can set PCR0-15 (locked at boot), got PCR{index}; PCR16-31 start at zero "
                "and are extended by the enclave (`enclavekit nsm extend-pcr`)"
            )
        value = _parse_hex(hex_text, f"--pcr {index}")
        assert value is not None
        if len(value) != PCR_LENGTH:
            raise UsageError(
                f"--pcr {index}: expected {PCR_LENGTH} bytes ({2 * PCR_LENGTH} hex digits), "
                f"got {len(value)} bytes"
            )
        if index in pcrs:
            raise UsageError(f"--pcr {index} given twice")
        pcrs[index] = value
    return pcrs


def _eif_pcrs(path: Path) -> dict[int, bytes]:
    try:
        from enclavekit.eif.reader import measure_eif
    except ImportError:  # pragma: no cover - only in a checkout without the EIF reader
        raise UsageError("this build of enclavekit cannot read EIFs; use --pcr N=HEX") from None
    measurements = measure_eif(path)
    return dict(measurements.pcrs)


def _read_public_key(path: Path) -> bytes:
    """A PEM public key becomes its DER SubjectPublicKeyInfo (what KMS expects); else raw bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PUBLIC_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read --public-key {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PUBLIC_KEY_FILE:
        raise UsageError(f"--public-key {path} is larger than {MAX_PUBLIC_KEY_FILE} bytes")
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--public-key {path}: not a PEM public key ({exc})") from None
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data, mode=0o666, durable=True)
    except OSError as exc:
        raise UsageError(f"--output-file {path}: cannot write it: {exc.strerror or exc}") from None


def _backend_name() -> str:
    url = os.environ.get(ENV_VAR, "").strip()
    return f"emulator at {url}" if url else "/dev/nsm"


def _warn_if_emulated() -> None:
    if os.environ.get(ENV_VAR, "").strip():
        warn(
            f"{ENV_VAR} is set: this is an EMULATED NSM; its documents are signed by an emulator "
            "root and are NOT evidence of AWS Nitro hardware"
        )


# -- serve -------------------------------------------------------------------------------------


@nsm.command()
@click.option(
    "--eif-path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take PCR0, 1, 2 (and 8 if signed) from this EIF's measurements.",
)
@click.option(
    "--pcr",
    "pcr_values",
    multiple=True,
    metavar="N=HEX",
    help="Set PCR N (0-15) to 48 hex-encoded bytes; repeatable; overrides --eif-path values.",
)
@click.option("--debug-mode", is_flag=True, help="Emulate nitro-cli --debug-mode: PCR0/1/2/8 zero.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the emulator root lives (default $ENCLAVEKIT_STATE_DIR/nsm, else "
    "~/.local/state/enclavekit/nsm).",
)
@click.option(
    "--listen",
    metavar="URL",
    help="unix:///path, HOST:PORT or tcp://HOST:PORT (default unix://<state-dir>/nsm.sock).",
)
@click.option("--region", default=DEFAULT_REGION, show_default=True, help="Region in CA names.")
@click.option("--module-id", help="Module id (default random, i-<17 hex>-enc<16 hex>).")
@click.option(
    "--definite-payload",
    is_flag=True,
    help="Encode the payload map with definite length, like AWS documents before mid-2025.",
)
@json_option
def serve(
    eif_path: Path | None,
    pcr_values: tuple[str, ...],
    debug_mode: bool,
    state_dir: Path | None,
    listen: str | None,
    region: str,
    module_id: str | None,
    definite_payload: bool,
    as_json: bool,
) -> None:
    """Run an NSM emulator until interrupted (Ctrl-C or SIGTERM).

    With --json, one object describing the running emulator is printed on stdout once it listens.
    """
    directory = _state_dir(state_dir)
    pcrs = _eif_pcrs(eif_path) if eif_path is not None else {}
    pcrs.update(_parse_pcr_options(pcr_values))
    pki = EmulatedAwsPki.load_or_create(directory, region=region)
    try:
        emulator = NsmEmulator(
            pcrs=pcrs,
            debug_mode=debug_mode,
            pki=pki,
            module_id=module_id,
            definite_payload=definite_payload,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    url = endpoint_url(listen, "--listen") if listen else f"unix://{directory / 'nsm.sock'}"
    asyncio.run(_serve(emulator, url, directory, as_json))


async def _serve(emulator: NsmEmulator, url: str, directory: Path, as_json: bool) -> None:
    server = EmulatorServer(emulator, url)
    try:
        await server.start()
    except OSError as exc:
        raise bind_error("--listen", url, exc) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    root = emulator.pki.root_certificate()
    info: dict[str, Any] = {
        "listen": server.address,
        "module_id": emulator.module_id,
        "debug_mode": emulator.debug_mode,
        "root_certificate": str(directory / "root.pem"),
        "root_sha256": root_fingerprint(root),
        "pcrs": {str(i): emulator.pcr(i)[1].hex() for i in range(16)},
    }
    warn(
        "this is an NSM EMULATOR: its attestation documents are signed by an emulated root "
        f"(SHA-256 {info['root_sha256']}) that no verifier trusts by default"
    )
    if as_json:
        emit_json(info)
    stderr.print(f"NSM emulator {emulator.module_id} listening on {server.address}")
    stderr.print(f"  export {ENV_VAR}={server.address}")
    stderr.print(f"  verify with: enclavekit verify --root {directory / 'root.pem'} DOC")
    try:
        await stop.wait()
    finally:
        await server.close()
        stderr.print("NSM emulator stopped")


# -- root --------------------------------------------------------------------------------------


@nsm.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The emulator's state directory (default $ENCLAVEKIT_STATE_DIR/nsm, else "
    "~/.local/state/enclavekit/nsm). It must hold a root unless --create is given.",
)
@click.option(
    "--create",
    is_flag=True,
    help="Create the directory and a new root when there is none (`nsm serve` does this too).",
)
@json_option
def root(state_dir: Path | None, create: bool, as_json: bool) -> None:
    """Print the emulator root certificate (PEM) on stdout, to pin it in a verifier.

    This root is never trusted by default: pass it explicitly (`enclavekit verify --root FILE`).
    Exit 2 when the state directory holds no root and --create is not given: a new root printed by
    mistake would be pinned and then match no document.
    """
    directory = _state_dir(state_dir)
    if not create and not (directory / "root.pem").exists():
        where = "--state-dir" if state_dir is not None else "the default state directory"
        found = "does not exist" if not directory.exists() else "holds no root.pem"
        raise UsageError(
            f"{where} {directory} {found}: no emulator root to print. Start `enclavekit nsm serve"
            f" --state-dir {directory}` (which creates it), or pass --create to make a new root"
        )
    pki = EmulatedAwsPki.load_or_create(directory)
    certificate = pki.root_certificate()
    if as_json:
        emit_json(
            {
                "path": str(directory / "root.pem"),
                "subject": certificate.subject.rfc4514_string(),
                "sha256": root_fingerprint(certificate),
                "pem": pki.root_pem().decode(),
            }
        )
        return
    sys.stdout.write(pki.root_pem().decode())
    sys.stdout.flush()


# -- client commands ---------------------------------------------------------------------------


@nsm.command()
@click.option("--nonce", metavar="HEX", help="Nonce to embed (hex).")
@click.option("--user-data", metavar="HEX", help="User data to embed (hex).")
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File whose key to embed: a PEM public key is embedded as DER SubjectPublicKeyInfo, "
    "any other file as its raw bytes.",
)
@renamed_option(
    ("-o", "--output-file"),
    "output",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    help="Where to write the raw attestation document (COSE_Sign1 CBOR); '-' for stdout.",
)
@json_option
def attest(
    nonce: str | None,
    user_data: str | None,
    public_key: Path | None,
    output: Path,
    as_json: bool,
) -> None:
    """Ask the configured NSM for an attestation document and write it (raw CBOR)."""
    nonce_bytes = _parse_hex(nonce, "--nonce")
    user_data_bytes = _parse_hex(user_data, "--user-data")
    key_bytes = _read_public_key(public_key) if public_key is not None else None
    _warn_if_emulated()
    with Nsm.open() as client:
        document = client.attestation(
            user_data=user_data_bytes, nonce=nonce_bytes, public_key=key_bytes
        )
    if str(output) == "-":
        if as_json:
            raise UsageError("--json needs --output-file FILE (stdout carries the document)")
        sys.stdout.buffer.write(document)
        sys.stdout.flush()
    else:
        _write_atomically(output, document)
    stderr.print(f"wrote a {len(document)}-byte attestation document from {_backend_name()}")
    if as_json:
        emit_json({"output": str(output), "size": len(document), "nsm": _backend_name()})


@nsm.command("describe-nsm")
@json_option
def describe_nsm(as_json: bool) -> None:
    """Version, module id and PCR layout of the configured NSM."""
    with Nsm.open() as client:
        description = client.describe_nsm()
    if as_json:
        emit_json(
            {
                "version": f"{description.version_major}.{description.version_minor}."
                f"{description.version_patch}",
                "module_id": description.module_id,
                "max_pcrs": description.max_pcrs,
                "locked_pcrs": list(description.locked_pcrs),
                "digest": description.digest,
            }
        )
        return
    stderr.print(f"module_id   {description.module_id}")
    stderr.print(
        f"version     {description.version_major}.{description.version_minor}."
        f"{description.version_patch}"
    )
    stderr.print(f"max_pcrs    {description.max_pcrs}  digest {description.digest}")
    stderr.print(f"locked      {', '.join(str(i) for i in description.locked_pcrs)}")


def _pcr_report(index: int, lock: bool, data: bytes, as_json: bool) -> None:
    if as_json:
        emit_json({"index": index, "lock": lock, "data": data.hex()})
        return
    stderr.print(f"PCR{index} ({'locked' if lock else 'unlocked'})")
    click.echo(data.hex())  # the value is the result: stdout, like the raw output of other commands


@nsm.command("describe-pcr")
@click.argument("index", type=click.IntRange(0, 65535))
@json_option
def describe_pcr(index: int, as_json: bool) -> None:
    """Value and lock state of PCR INDEX."""
    with Nsm.open() as client:
        description = client.describe_pcr(index)
    _pcr_report(index, description.lock, description.data, as_json)


@nsm.command("extend-pcr")
@click.argument("index", type=click.IntRange(0, 65535))
@click.option("--data", "data_hex", required=True, metavar="HEX", help="Bytes to extend with.")
@json_option
def extend_pcr(index: int, data_hex: str, as_json: bool) -> None:
    """PCR INDEX = SHA-384(PCR INDEX ‖ data); prints the new value."""
    data = _parse_hex(data_hex, "--data")
    assert data is not None
    with Nsm.open() as client:
        value = client.extend_pcr(index, data)
    _pcr_report(index, False, value, as_json)


@nsm.command("lock-pcr")
@click.argument("index", type=click.IntRange(0, 65535))
@json_option
def lock_pcr(index: int, as_json: bool) -> None:
    """Lock PCR INDEX for the rest of the enclave's life."""
    with Nsm.open() as client:
        client.lock_pcr(index)
    if as_json:
        emit_json({"index": index, "lock": True})
    stderr.print(f"PCR{index} locked")
