"""``enclavekit seal`` / ``enclavekit unseal``: HPKE payloads only an attested enclave can read."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from enclavekit.atls.seal import load_private_key, load_recipient_key, seal, unseal
from enclavekit.attestation.policy import AllOf, NotDebug
from enclavekit.cli._common import nsm_verifier, root_option
from enclavekit.cli._files import (
    decode_document,
    read_input,
    read_policy,
    renamed_option,
    write_output,
)
from enclavekit.cli._render import stderr
from enclavekit.errors import UsageError

MAX_INPUT = 64 * 1024 * 1024 + 4096


def _read(path: str | None, option: str) -> bytes:
    return read_input("-" if path is None else path, option, limit=MAX_INPUT)


def _write(data: bytes, output: str | None) -> None:
    write_output("-" if output is None else output, data, "--output-file", mode=0o600)


@click.command("seal")
@click.option(
    "--to",
    "doc_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The enclave's attestation document (raw CBOR, hex or base64); its public_key receives.",
)
@click.option(
    "--policy",
    "policy_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="What the enclave must be (JSON/YAML policy or nitro-cli measurements).",
)
@root_option
@click.option("-i", "--input", "input_path", help="Plaintext file (default: stdin).")
@renamed_option(
    ("-o", "--output-file"), "output", "--output", help="Sealed file (default: stdout)."
)
def seal_command(
    doc_path: str,
    policy_file: str,
    roots: tuple[str, ...],
    input_path: str | None,
    output: str | None,
) -> None:
    """Verify DOC against the policy, then HPKE-encrypt stdin to its attested public key.

    Exit 1 (nothing written) if the document does not verify or violates the policy.
    """
    document = decode_document(_read(doc_path, "--to"), f"--to {doc_path}")
    verifier = nsm_verifier(roots)
    verified = verifier.verify(
        document, AllOf([NotDebug(), read_policy(policy_file)]), at=datetime.now(UTC)
    )
    if verified.public_key is None:
        raise UsageError("the document has no public_key; the enclave must attest a sealing key")
    recipient = load_recipient_key(verified.public_key)
    sealed = seal(_read(input_path, "--input"), recipient)
    _write(sealed, output)
    stderr.print(f"sealed {len(sealed)} bytes to the key attested by {verified.module_id}")


@click.command("unseal")
@renamed_option(
    ("--private-key",),
    "key_path",
    "--key",
    required=True,
    type=click.Path(dir_okay=False),
    help="The enclave's private key (PEM PKCS#8) whose public key was attested.",
)
@click.option("-i", "--input", "input_path", help="Sealed file (default: stdin).")
@renamed_option(
    ("-o", "--output-file"), "output", "--output", help="Plaintext output file (default: stdout)."
)
def unseal_command(key_path: str, input_path: str | None, output: str | None) -> None:
    """Decrypt a sealed payload inside the enclave. Exit 1 if it was sealed to another key or altered."""
    key = load_private_key(_read(key_path, "--private-key"))
    _write(unseal(_read(input_path, "--input"), key), output)


def register(group: click.Group) -> None:
    group.add_command(seal_command)
    group.add_command(unseal_command)
