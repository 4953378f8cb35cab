"""``enclavekit verify`` and ``enclavekit inspect``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from enclavekit.cli._common import nsm_verifier, root_option
from enclavekit.cli._files import decode_document, parse_hex, read_input, read_policy
from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.errors import Error, PolicyViolation, UsageError

if TYPE_CHECKING:  # imported where used, so `enclavekit verify --help` starts fast
    from cryptography import x509

    from enclavekit.attestation.document import AttestationDocument
    from enclavekit.attestation.policy import Policy
    from enclavekit.attestation.verifier import VerifiedAttestation

#: Text encodings (hex/base64) of a 16 KiB document stay far below this; bounds what we read.
MAX_INPUT = 1024 * 1024
#: ``verify --json`` schema identifier; bump on incompatible changes.
VERIFY_SCHEMA = "enclavekit.verify/v1"


def register(group: click.Group) -> None:
    group.add_command(verify)
    group.add_command(inspect)


def read_document(source: str) -> bytes:
    """Read DOC (a path or ``-``) and return raw COSE bytes (raw CBOR, hex or base64 accepted)."""
    data = read_input(source, "DOC", limit=MAX_INPUT)
    return decode_document(data, f"DOC {source}")


def parse_at(value: str, doc: AttestationDocument) -> datetime:
    """``now``, ``doc`` (the document's own timestamp) or an ISO-8601 instant (UTC if no offset)."""
    if value == "now":
        return datetime.now(UTC)
    if value == "doc":
        return doc.timestamp
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {value!r}: expected now, doc or an ISO-8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _pcr_options(values: tuple[str, ...], flag: str = "--pcr") -> dict[int, bytes]:
    from enclavekit.attestation.policy import parse_pcr_index, parse_pcr_value

    out: dict[int, bytes] = {}
    for item in values:
        index, sep, hexvalue = item.partition("=")
        if not sep:
            raise UsageError(f"{flag} {item!r}: expected N=HEX (e.g. {flag} 0=abcd…)")
        i = parse_pcr_index(index, flag)
        if i in out:
            raise UsageError(f"{flag} {i} given twice")
        out[i] = parse_pcr_value(hexvalue, f"{flag} {index}")
    return out


def _hex_option(value: str | None, name: str) -> bytes | None:
    if value is None:
        return None
    return parse_hex(value, name)


def _cert_json(cert: x509.Certificate) -> dict[str, Any]:
    from enclavekit.pki.roots import fingerprint

    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": fingerprint(cert),
    }


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def document_json(doc: AttestationDocument) -> dict[str, Any]:
    """Fields of a decoded document as JSON values (PCRs as lowercase hex).

    ``pcrs`` holds enclave PCRs only; a NitroTPM document's PCRs are under ``nitrotpm_pcrs``."""
    return {
        "module_id": doc.module_id,
        "kind": doc.kind.value,
        "digest": doc.digest,
        "timestamp": doc.timestamp.isoformat(),
        "timestamp_ms": doc.timestamp_ms,
        "is_debug": doc.is_debug,
        "is_nitrotpm": doc.is_nitrotpm,
        "pcrs": {str(i): v.hex() for i, v in doc.pcrs.items()},
        "nitrotpm_pcrs": {str(i): v.hex() for i, v in doc.nitrotpm_pcrs.items()},
        "public_key": _hex_or_none(doc.public_key),
        "user_data": _hex_or_none(doc.user_data),
        "nonce": _hex_or_none(doc.nonce),
    }


def _short(text: str, limit: int = 96) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _print_document(doc: AttestationDocument, title: str) -> None:
    stderr.print(title)
    stderr.print(f"  module     {doc.module_id}" + ("  [NitroTPM]" if doc.is_nitrotpm else ""))
    if doc.is_nitrotpm:
        stderr.print(
            "  kind       [yellow]NitroTPM: an EC2 instance's TPM, not a Nitro Enclave; its PCRs are "
            "set by the instance's operating system[/]"
        )
    inconsistency = doc.kind_inconsistency
    if inconsistency is not None:
        stderr.print(f"  kind       [red]inconsistent: {inconsistency}[/]")
    stderr.print(f"  timestamp  {doc.timestamp.isoformat()}")
    for index, value in doc.pcrs.items():
        if any(value):
            stderr.print(f"  PCR{index:<2}      {value.hex()}")
        else:
            note = "  [yellow]debug mode: image not measured[/]" if index in (0, 1, 2) else ""
            stderr.print(f"  PCR{index:<2}      0…0 ({len(value)} zero bytes){note}")
    for index, value in doc.nitrotpm_pcrs.items():
        stderr.print(f"  TPM PCR{index:<2}  {value.hex()}")
    for name in ("public_key", "user_data", "nonce"):
        value = getattr(doc, name)
        shown = "null" if value is None else f"{_short(value.hex())} ({len(value)} bytes)"
        stderr.print(f"  {name:<10} {shown}")


@click.command()
@click.argument("doc", metavar="DOC")
@root_option
@click.option(
    "--at",
    "at_value",
    default="now",
    show_default=True,
    help="Verification time: now, doc (the document's own timestamp) or ISO-8601.",
)
@click.option(
    "--pcr", "pcrs", multiple=True, metavar="N=HEX", help="Expected PCR value (repeatable)."
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    help="Policy file (JSON/YAML, or nitro-cli build-enclave/describe-eif JSON).",
)
@click.option("--nonce", help="Expected nonce (hex).")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    help="Maximum document age in seconds at the verification time.",
)
@click.option("--allow-debug", is_flag=True, help="Accept debug-mode enclaves (PCR0-2 all zero).")
@click.option(
    "--allow-nitrotpm",
    is_flag=True,
    help="Also accept NitroTPM (EC2 instance) documents; they are not enclaves. "
    "Check their PCRs with --nitrotpm-pcr.",
)
@click.option(
    "--nitrotpm-pcr",
    "tpm_pcrs",
    multiple=True,
    metavar="N=HEX",
    help="Expected NitroTPM PCR value (repeatable; needs --allow-nitrotpm).",
)
@json_option
def verify(
    doc: str,
    roots: tuple[str, ...],
    at_value: str,
    pcrs: tuple[str, ...],
    policy_file: str | None,
    nonce: str | None,
    max_age: float | None,
    allow_debug: bool,
    allow_nitrotpm: bool,
    tpm_pcrs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Verify an attestation document (path, '-' for stdin; raw CBOR, hex or base64).

    Checks the COSE signature and the certificate chain to a pinned root, then the policy. Exit 0: verified
    and policy satisfied; 1: verification or policy failure (every reason printed); 2: unusable input.
    NitroTPM (EC2 instance) documents are refused (exit 1) unless --allow-nitrotpm is given.
    """
    from enclavekit.attestation.document import AttestationDocument
    from enclavekit.attestation.policy import (
        MaxAge,
        NitroTpmPcrsEqual,
        NonceEquals,
        NotDebug,
        PcrsEqual,
        UnsafeNoOp,
        combine,
    )

    if max_age is not None and at_value == "doc":
        raise UsageError(
            "--max-age with --at doc: the age would be measured against the document's own timestamp, "
            "so it is always 0 and any old document passes. Use --max-age with --at now (the default) "
            "or an explicit --at TIME"
        )
    if tpm_pcrs and not allow_nitrotpm:
        raise UsageError(
            "--nitrotpm-pcr checks NitroTPM documents, which are refused without --allow-nitrotpm; "
            "add --allow-nitrotpm (or use --pcr for enclave PCRs)"
        )
    raw = read_document(doc)
    decoded = AttestationDocument.from_cbor(raw)
    verifier = nsm_verifier(roots)
    at = parse_at(at_value, decoded)

    parts: list[Policy] = []
    if not allow_debug:
        parts.append(NotDebug())
    expected = _pcr_options(pcrs)
    if expected:
        parts.append(PcrsEqual(expected))
    expected_tpm = _pcr_options(tpm_pcrs, "--nitrotpm-pcr")
    if expected_tpm:
        parts.append(NitroTpmPcrsEqual(expected_tpm))
    if policy_file:
        parts.append(read_policy(policy_file))
    has_measurement_policy = bool(expected or expected_tpm or policy_file)
    nonce_bytes = _hex_option(nonce, "--nonce")
    if nonce_bytes is not None:
        parts.append(NonceEquals(nonce_bytes))
    if max_age is not None:
        parts.append(MaxAge(timedelta(seconds=max_age)))
    if allow_debug:
        warn("--allow-debug: debug-mode enclaves (unmeasured images) are accepted.")
    if allow_nitrotpm:
        warn(
            "--allow-nitrotpm: NitroTPM documents are accepted; they attest an EC2 instance's TPM, "
            "not an enclave."
        )
    if not has_measurement_policy:
        kinds = "enclave or NitroTPM document" if allow_nitrotpm else "enclave"
        warn(
            "no measurement policy (--pcr, --policy): any genuine AWS-signed "
            f"{kinds} passes, whatever it runs. Pin the image with --pcr or --policy."
        )
    policy = combine(parts) if parts else UnsafeNoOp()

    verified: VerifiedAttestation | None = None
    error: Error | None = None
    try:
        verified = verifier.verify_signature_and_chain(raw, at=at, allow_nitrotpm=allow_nitrotpm)
        failures = policy.failures(verified)
        if failures:
            error = PolicyViolation(failures)
    except Error as exc:
        error = exc

    if as_json:
        out: dict[str, Any] = {
            "schema": VERIFY_SCHEMA,
            "ok": error is None,
            "signature_and_chain_valid": verified is not None,
            "policy_satisfied": error is None,
            "policy": "explicit" if has_measurement_policy else "none",
            "verified_at": at.isoformat(),
            **document_json(decoded),
            "certificate": _cert_json(verified.certificate) if verified else None,
            "chain": [_cert_json(c) for c in verified.chain] if verified else [],
            "failures": [
                {"check": f.check, "expected": f.expected, "found": f.found}
                for f in (error.failures if isinstance(error, PolicyViolation) else ())
            ],
            "error": None if error is None else error.diagnostics(),
        }
        emit_json(out)
    else:
        if verified is not None:
            _print_document(decoded, "[bold]Attestation document[/] (signature and chain verified)")
            stderr.print("  chain")
            for cert in verified.chain:
                stderr.print(
                    f"    {cert.subject.rfc4514_string()}  (until {cert.not_valid_after_utc.isoformat()})"
                )
            stderr.print(f"  verified at {at.isoformat()}")
        if error is None:
            stderr.print("[bold green]OK[/]: verified and policy satisfied")
        else:
            stderr.print(f"[bold red]FAILED[/]: {error.diagnostics()}")
    if error is not None:
        raise click.exceptions.Exit(error.exit_code)


@click.command()
@click.argument("doc", metavar="DOC")
@json_option
def inspect(doc: str, as_json: bool) -> None:
    """Decode and show an attestation document WITHOUT verifying it."""
    from enclavekit.attestation.document import AttestationDocument
    from enclavekit.attestation.verifier import _parse_cert

    raw = read_document(doc)
    decoded = AttestationDocument.from_cbor(raw)
    certs = []
    for der in (decoded.certificate, *decoded.cabundle):
        try:
            certs.append(_cert_json(_parse_cert(der, "certificate")))
        except (Error, ValueError) as exc:
            certs.append({"error": f"not a DER certificate: {exc}"})
    if as_json:
        emit_json(
            {
                "schema": "enclavekit.inspect/v1",
                "verified": False,
                **document_json(decoded),
                "tagged": decoded.tagged,
                "certificate": certs[0],
                "cabundle": certs[1:],
            }
        )
        return
    _print_document(decoded, "[bold red]UNVERIFIED[/] attestation document (nothing was checked)")
    stderr.print("  certificate")
    stderr.print(f"    {certs[0].get('subject', certs[0].get('error'))}")
    stderr.print("  cabundle (root first)")
    for cert in certs[1:]:
        stderr.print(f"    {cert.get('subject', cert.get('error'))}")
