"""``build-enclave``: nitro-cli's command of the same name, without a Docker daemon.

Prints nitro-cli's ``{"Measurements": {...}}`` JSON on stdout (always; ``--json`` is accepted for
uniformity) and progress on stderr. Exit codes: 0 built; 2 bad usage, unreadable or corrupt image
(digest mismatch, path traversal, bad tar), missing blobs. No partial ``.eif`` is left on failure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from enclavekit.cli._files import output_error
from enclavekit.cli._render import emit_json, json_option, stderr, warn
from enclavekit.eif.build import BuildResult, blobs_directory, build_enclave
from enclavekit.eif.image import (
    Image,
    RootfsDir,
    check_env,
    docker_daemon_reachable,
    export_from_docker,
    open_source,
    parse_cmd,
)
from enclavekit.eif.measure import HASH_ALGORITHM_SHA384, HASH_ALGORITHM_SHA512_384
from enclavekit.eif.metadata import load_custom_metadata
from enclavekit.eif.registry.pull import BlobProgress, PullInProgress, start_pull
from enclavekit.eif.registry.reference import parse_reference
from enclavekit.eif.sign import EifSigner
from enclavekit.errors import UsageError

_HASH_LABELS = {"legacy": HASH_ALGORITHM_SHA384, "nitro-cli-1.5": HASH_ALGORITHM_SHA512_384}


def _say(message: str) -> None:
    stderr.print(message)


@contextmanager
def _progress_display() -> Iterator[Progress | None]:
    """One rich live display on stderr, shared by the layer downloads and the EIF being written
    (rich allows one at a time); None when stderr is not a terminal."""
    if not stderr.is_terminal:
        yield None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        yield bar


def _byte_progress(bar: Progress | None) -> Callable[[int], None] | None:
    """A byte counter while the EIF is written (only on a terminal)."""
    if bar is None:
        return None
    task = bar.add_task("writing", total=None)
    return lambda done: bar.update(task, completed=done)


@click.command("build-enclave")
@click.option(
    "--image",
    "image",
    metavar="SOURCE",
    help="A docker-save tarball, an OCI layout (directory or tar; PATH:REF picks a tagged image), "
    "a root file-system directory, or docker://REF to pull REF from its registry.",
)
@click.option(
    "--docker-uri",
    metavar="NAME",
    help="Export NAME from a reachable Docker daemon (docker save); with no daemon (or --pull "
    "always) pull NAME straight from its registry.",
)
@click.option(
    "--pull",
    type=click.Choice(["missing", "always", "never"]),
    default="missing",
    show_default=True,
    help="--docker-uri: missing = use the Docker daemon when one is reachable, else the registry; "
    "always = pull from the registry; never = only the daemon.",
)
@click.option(
    "--insecure-registry",
    "insecure_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Allow plain HTTP and unchecked TLS for this registry (repeatable; warns). Loopback "
    "registries may use plain HTTP without it.",
)
@click.option(
    "-o",
    "--output-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The EIF to write (atomically).",
)
@click.option(
    "--blobs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with bzImage (or Image), cmdline, init, nsm.ko. Default: $NITRO_CLI_BLOBS, "
    "then /usr/share/nitro_enclaves/blobs.",
)
@click.option("--name", help="ImageName in the metadata (default: the image's repository).")
@click.option("--version", help="ImageVersion in the metadata (default: the image id).")
@click.option(
    "--signing-certificate",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM certificate whose key signs PCR0 (with --private-key).",
)
@click.option(
    "--private-key",
    metavar="FILE|KMS-ARN",
    help="PEM EC private key matching --signing-certificate, or the ARN of an AWS KMS key or "
    "alias (arn:aws:kms:...) whose public key the certificate holds.",
)
@click.option(
    "--metadata",
    "metadata_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file (at most 4096 bytes) stored as CustomMetadata.",
)
@click.option(
    "--cmd",
    help="Root-fs directories only: the command, as a JSON array or a space-separated line.",
)
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    help="Root-fs directories only: an environment variable (repeatable).",
)
@click.option(
    "--arch",
    type=click.Choice(["x86_64", "aarch64", "amd64", "arm64", "arm64/v8"]),
    help="Pick this architecture from multi-arch images; for root-fs directories, the kernel to use "
    "(default x86_64).",
)
@click.option(
    "--hash-algorithm-label",
    type=click.Choice(sorted(_HASH_LABELS)),
    default="legacy",
    show_default=True,
    help="HashAlgorithm string: legacy = 'Sha384 { ... }', nitro-cli-1.5 = 'Sha512_384 { .. }'.",
)
@json_option
def build_enclave_command(
    image: str | None,
    docker_uri: str | None,
    pull: str,
    insecure_registries: tuple[str, ...],
    output_file: Path,
    blobs: Path | None,
    name: str | None,
    version: str | None,
    signing_certificate: Path | None,
    private_key: str | None,
    metadata_file: Path | None,
    cmd: str | None,
    env: tuple[str, ...],
    arch: str | None,
    hash_algorithm_label: str,
    as_json: bool,
) -> None:
    """Build an EIF from a container image or a root file system (nitro-cli build-enclave).

    The same image and blobs give a byte-identical EIF on any machine; BuildTime comes from
    SOURCE_DATE_EPOCH, else the image's created time.
    """
    if (image is None) == (docker_uri is None):
        raise UsageError("give exactly one of --image SOURCE or --docker-uri NAME")
    if (signing_certificate is None) != (private_key is None):
        raise UsageError("--signing-certificate and --private-key go together (both or neither)")
    signer = (
        EifSigner.from_files(signing_certificate, private_key)
        if signing_certificate is not None and private_key is not None
        else None
    )
    custom = load_custom_metadata(metadata_file.read_bytes()) if metadata_file else None
    registry_ref = _registry_reference(image, docker_uri, pull)
    eif_arch = _EIF_ARCH[arch] if arch is not None else None
    if not output_file.parent.is_dir():
        raise UsageError(
            f"--output-file {output_file}: the directory {output_file.parent} does not exist"
        )
    _say("Start building the Enclave Image...")
    with (
        _progress_display() as display,
        _pulling(registry_ref, arch, insecure_registries, display) as pulled,
        tempfile.TemporaryDirectory(prefix="enclavekit-docker-") as scratch,
    ):
        written = _byte_progress(display)
        source: Image | RootfsDir
        if pulled is not None:
            source, image_name = pulled.image, pulled.reference.familiar_repository
        elif docker_uri is not None:
            _say(f"Exporting {docker_uri} from the Docker daemon...")
            source = open_source(str(export_from_docker(docker_uri, Path(scratch))), arch=eif_arch)
            image_name = _repository_of(docker_uri)
        else:
            assert image is not None
            source = open_source(image, arch=eif_arch)
            image_name = None
        result = _build(
            output_file,
            source,
            output_file,
            blobs_dir=blobs_directory(blobs, os.environ),
            name=name,
            version=version,
            cmd=parse_cmd(cmd),
            env=check_env(env),
            arch=eif_arch,
            signer=signer,
            custom_metadata=custom,
            source_date_epoch=os.environ.get("SOURCE_DATE_EPOCH"),
            hash_algorithm=_HASH_LABELS[hash_algorithm_label],
            image_name=image_name,
            progress=_say,
            written=written,
        )
    _say(f"Enclave Image successfully created: {result.path} ({result.size} bytes).")
    emit_json({"Measurements": result.measurements.to_json()})


#: ``--arch`` spellings → the EIF's architecture.
_EIF_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "arm64/v8": "aarch64",
}


def _registry_reference(image: str | None, docker_uri: str | None, pull: str) -> str | None:
    """The reference to pull from a registry, or None to use a local source or the daemon."""
    if image is not None and image.startswith("docker://"):
        return image.removeprefix("docker://")
    if docker_uri is None:
        return None
    if pull == "always":
        return docker_uri
    if pull == "missing" and not docker_daemon_reachable():
        _say("No Docker daemon is reachable: pulling from the registry.")
        return docker_uri
    return None


def _repository_of(uri: str) -> str:
    """``host:5000/app:1`` → ``host:5000/app`` (the name recorded as ImageName)."""
    try:
        return parse_reference(uri).familiar_repository
    except UsageError:
        return uri  # not a reference Docker would accept either: recorded as given


@contextmanager
def _pulling(
    reference: str | None,
    arch: str | None,
    insecure: tuple[str, ...],
    display: Progress | None,
) -> Iterator[PullInProgress | None]:
    """The registry pull (None without one): the manifest and config are checked here, the layers
    arrive while the build runs (it waits for each one before reading it)."""
    if reference is None:
        yield None
        return
    ref = parse_reference(reference)
    _say(f"Pulling {ref} from {ref.api_host}...")
    with start_pull(
        ref,
        arch=arch,
        insecure_registries=insecure,
        progress=_layer_progress(display),
        warn=warn,
    ) as pending:
        _say(
            f"Resolved {ref} to {pending.manifest_digest}: building while "
            f"{len(pending.image.layers)} layers download."
        )
        yield pending
        pending.finish()
    _say(f"Pulled {ref} ({pending.manifest_digest}).")


def _layer_progress(bar: Progress | None) -> BlobProgress:
    """One progress bar per layer on a terminal; otherwise one line per finished layer."""
    if bar is None:
        reported: set[str] = set()

        def line(label: str, done: int, total: int) -> None:
            if done == total and label not in reported:
                reported.add(label)
                _say(f"  {label}: {total} bytes")

        return line
    tasks: dict[str, TaskID] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return update


def _build(output_file: Path, *args: Any, **kwargs: Any) -> BuildResult:
    try:
        return build_enclave(*args, **kwargs)
    except OSError as exc:  # the EIF is written beside its target: name the target, not the temp
        error = output_error(exc, {"--output-file": output_file})
        if error is None:
            raise
        raise error from None


def register(group: click.Group) -> None:
    group.add_command(build_enclave_command)
