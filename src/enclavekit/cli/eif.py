"""``describe-eif``, ``pcr`` and ``sign-eif``: nitro-cli's commands of the same names.

With ``--json`` each prints nitro-cli's JSON object on stdout; without it a human summary goes to
stderr. Exit codes: 0 ok; 1 integrity failure (bad CRC, bad or foreign signature, damaged layout); 2
unreadable input or bad usage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from enclavekit.cli._files import output_error
from enclavekit.cli._render import emit_json, json_option, stderr
from enclavekit.eif.describe import describe_report
from enclavekit.eif.measure import (
    HASH_ALGORITHM_SHA384,
    HASH_ALGORITHM_SHA512_384,
    pcr3_of_iam_role,
    pcr4_of_instance_id,
    pcr8_of_certificate,
    pcr_of_file,
)
from enclavekit.eif.reader import Eif
from enclavekit.eif.sign import EifSigner
from enclavekit.eif.signing import sign_eif
from enclavekit.errors import EifIntegrityError, UsageError

_HASH_LABELS = {"legacy": HASH_ALGORITHM_SHA384, "nitro-cli-1.5": HASH_ALGORITHM_SHA512_384}

_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


def _hash_label_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--hash-algorithm-label",
        type=click.Choice(sorted(_HASH_LABELS)),
        default="legacy",
        show_default=True,
        help="HashAlgorithm string: legacy = 'Sha384 { ... }' (nitro-cli <= 1.4), "
        "nitro-cli-1.5 = 'Sha512_384 { .. }' (unconfirmed).",
    )(func)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr for interactive use; nothing when stderr is not a terminal."""
    if not stderr.is_terminal or total < (64 << 20):
        yield None
        return
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


@click.command("describe-eif")
@click.option("--eif-path", required=True, type=_existing_file, help="The EIF to describe.")
@_hash_label_option
@json_option
def describe_eif_command(eif_path: Path, hash_algorithm_label: str, as_json: bool) -> None:
    """Show an EIF's version, PCRs, signature and metadata (nitro-cli describe-eif).

    Exit 1 when the CRC or the signature check fails (the JSON is still printed), 2 when the file
    cannot be read as an EIF.
    """
    with Eif.open(eif_path) as eif, _progress(eif.file_size, "measuring") as progress:
        report = eif.verify(hash_algorithm=_HASH_LABELS[hash_algorithm_label], progress=progress)
    described = describe_report(report)
    # nitro-cli prints this JSON on stdout; the human summary (stderr) is skipped with --json.
    emit_json(described)
    if not as_json:
        _print_description(eif_path, described, "aarch64" if report.header.is_arm64 else "x86_64")
    problems = report.problems()
    if problems:
        raise EifIntegrityError(f"{eif_path}: " + "; ".join(problems))


def _print_description(path: Path, described: dict[str, Any], arch: str) -> None:
    stderr.print(f"[bold]{path}[/]: EIF version {described['EifVersion']}, {arch}")
    for key, value in described["Measurements"].items():
        stderr.print(f"  {key:<13} {value}")
    signed = described["IsSigned"]
    stderr.print(f"  {'CRC':<13} {'ok' if described['CheckCRC'] else '[red]MISMATCH[/]'}")
    if signed:
        cert = described["SigningCertificate"]
        check = "ok" if described["SignatureCheck"] else "[red]signs another PCR0[/]"
        stderr.print(f"  {'Signature':<13} {check}")
        issuer = ", ".join(f"{k}={v}" for k, v in cert["IssuerName"].items())
        stderr.print(f"  {'Issuer':<13} {issuer}")
        stderr.print(f"  {'Valid':<13} {cert['NotBefore']} .. {cert['NotAfter']}")
    else:
        stderr.print(f"  {'Signature':<13} none (unsigned)")
    if "ImageName" in described:
        stderr.print(f"  {'Image':<13} {described['ImageName']} {described['ImageVersion']}")
        meta = described["Metadata"]
        stderr.print(
            f"  {'Built':<13} {meta['BuildTime']} by {meta['BuildTool']} {meta['BuildToolVersion']}"
        )


@click.command("pcr")
@click.option("--input", "input_path", type=_existing_file, help="Any file: its PCR.")
@click.option(
    "--signing-certificate", type=_existing_file, help="A PEM signing certificate: its PCR8."
)
@click.option("--instance-id", help="A parent instance id (i-...): the PCR4 it yields.")
@click.option("--iam-role", help="A parent IAM role ARN: the PCR3 it yields.")
@json_option
def pcr_command(
    input_path: Path | None,
    signing_certificate: Path | None,
    instance_id: str | None,
    iam_role: str | None,
    as_json: bool,
) -> None:
    """Compute a PCR value (nitro-cli pcr; --instance-id/--iam-role are enclavekit additions).

    --input and --signing-certificate hash the content then extend a zero register; --instance-id
    and --iam-role extend the raw string (no inner hash), as the hypervisor does for PCR4/PCR3.
    """
    given = [x is not None for x in (input_path, signing_certificate, instance_id, iam_role)]
    if sum(given) != 1:
        raise UsageError(
            "give exactly one of --input, --signing-certificate, --instance-id, --iam-role"
        )
    key = "PCR"
    if input_path is not None:
        value = pcr_of_file(input_path)
        what = str(input_path)
    elif signing_certificate is not None:
        value = pcr8_of_certificate(signing_certificate.read_bytes())
        key, what = "PCR8", str(signing_certificate)
    elif instance_id is not None:
        if not instance_id or instance_id != instance_id.strip():
            raise UsageError(
                f"expected an instance id like i-0123456789abcdef0, got {instance_id!r}"
            )
        value, what = pcr4_of_instance_id(instance_id), f"instance id {instance_id} (PCR4)"
    else:
        assert iam_role is not None
        if not iam_role.startswith("arn:"):
            raise UsageError(
                "expected an IAM role ARN like arn:aws:iam::123456789012:role/Name, got "
                f"{iam_role!r}"
            )
        value, what = pcr3_of_iam_role(iam_role), f"IAM role {iam_role} (PCR3)"
    emit_json({key: value.hex()})  # nitro-cli's shape, always on stdout
    if not as_json:
        stderr.print(f"{what}\n  {key}: {value.hex()}")


@click.command("sign-eif")
@click.option("--eif-path", required=True, type=_existing_file, help="The EIF to sign.")
@click.option(
    "--signing-certificate", required=True, type=_existing_file, help="PEM signing certificate."
)
@click.option(
    "--private-key",
    required=True,
    metavar="FILE|KMS-ARN",
    help="PEM or DER EC private key (P-256/384/521) of the certificate, or the ARN of an AWS KMS "
    "ECC_NIST_P256/384/521 key or alias (arn:aws:kms:...) that signs with KMS Sign.",
)
@click.option(
    "-o",
    "--output-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the signed EIF here instead of replacing --eif-path.",
)
@_hash_label_option
@json_option
def sign_eif_command(
    eif_path: Path,
    signing_certificate: Path,
    private_key: str,
    output_file: Path | None,
    hash_algorithm_label: str,
    as_json: bool,
) -> None:
    """Add or replace an EIF's signature over PCR0 (nitro-cli sign-eif); written atomically."""
    signer = EifSigner.from_files(signing_certificate, private_key)
    try:
        measurements = sign_eif(
            eif_path, signer, output=output_file, hash_algorithm=_HASH_LABELS[hash_algorithm_label]
        )
    except OSError as exc:  # the signed EIF is written beside its target: name the target
        error = output_error(exc, {"--output-file": output_file or eif_path})
        if error is None:
            raise
        raise error from None
    stderr.print("Enclave Image successfully signed.")
    emit_json({"Measurements": measurements.to_json()})  # nitro-cli's shape, always on stdout
    if not as_json:
        for key, value in measurements.to_json().items():
            stderr.print(f"  {key:<13} {value}")


def register(group: click.Group) -> None:
    """Add describe-eif, pcr and sign-eif to the enclavekit command."""
    group.add_command(describe_eif_command)
    group.add_command(pcr_command)
    group.add_command(sign_eif_command)
