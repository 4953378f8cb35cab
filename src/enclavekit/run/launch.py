"""From an EIF file to an unpacked enclave directory: check, measure, unpack, read ``cmd``/``env``.

Steps of :func:`prepare`:

1. open the EIF and check its layout (:meth:`enclavekit.eif.reader.Eif.open`);
2. one verifying pass: CRC, PCR0/1/2 (+ PCR8 and the signature when signed); a CRC mismatch or a
   signature over another PCR0 refuses the image (as the hypervisor would);
3. unpack every ramdisk, in order, into ``<dir>/initramfs`` (the hypervisor concatenates them into
   one initramfs; later entries win);
4. read ``/cmd`` and ``/env`` as nitro's ``init`` does: one item per line, no quoting, missing or
   empty ``cmd`` → ``sh`` with ``PATH=/sbin:/usr/sbin:/bin:/usr/bin``; the application's root is
   ``/rootfs``. ``/rootfs`` must be a real directory and ``/cmd``/``/env`` regular files: they are
   opened without following links (:mod:`enclavekit.run.rootfs`), so an image cannot make a host
   directory its root or a host file its argv.

Not done: booting the kernel, loading ``nsm.ko`` or running ``init`` (the runner plays ``init``'s
part itself), and checking the signing certificate's validity period.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavekit.eif.describe import describe_report
from enclavekit.eif.format import SectionType
from enclavekit.eif.measure import Measurements
from enclavekit.eif.metadata import IdentityInfo
from enclavekit.eif.reader import Eif
from enclavekit.errors import EifIntegrityError, MalformedInput
from enclavekit.run.cpio import extract
from enclavekit.run.rootfs import open_directory, opened_directory, read_regular_file

#: ``init``'s defaults when ``/cmd`` is missing or empty.
DEFAULT_ARGV = ("sh",)
DEFAULT_ENV = ("PATH=/sbin:/usr/sbin:/bin:/usr/bin",)
#: A ramdisk is unpacked from memory; bound what one may take.
MAX_RAMDISK_SIZE = 2 * 1024 * 1024 * 1024
#: ``/cmd`` and ``/env`` are a few lines; bound what is read.
MAX_CMD_ENV_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PreparedEnclave:
    """An EIF checked and unpacked: where its rootfs is and what ``init`` would run."""

    eif_path: Path
    eif_size: int
    measurements: Measurements
    metadata: IdentityInfo | None
    initramfs: Path
    argv: tuple[str, ...]
    env: tuple[str, ...]
    #: describe-enclaves ``--metadata`` fields (ImageName, ImageVersion, Metadata), if any.
    described_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rootfs(self) -> Path:
        return self.initramfs / "rootfs"


def read_lines(initramfs_fd: int, name: str) -> tuple[str, ...]:
    """``init``'s reading of ``/cmd`` and ``/env``: split on ``\\n``, empty lines dropped; a missing
    file reads as no lines; a link or a non-regular file is refused (not followed)."""
    raw = read_regular_file(initramfs_fd, name, shown=f"/{name}", limit=MAX_CMD_ENV_SIZE)
    if raw is None:
        return ()
    if b"\0" in raw:
        raise MalformedInput(f"{name} contains a NUL byte; init would cut the line there")
    return tuple(line for line in raw.decode("utf-8", "surrogateescape").split("\n") if line)


def measure_and_check(eif: Eif) -> tuple[Measurements, IdentityInfo | None, dict[str, Any]]:
    """Measurements, metadata and describe-enclaves' metadata fields; refuses a damaged image."""
    report = eif.verify()
    problems = report.problems()
    if problems:
        raise EifIntegrityError(
            f"{eif.path}: refusing to run a damaged image: " + "; ".join(problems)
        )
    described = describe_report(report)
    extra: dict[str, Any] = {
        k: described[k] for k in ("ImageName", "ImageVersion", "Metadata") if k in described
    }
    return report.measurements, report.metadata, extra


def prepare(eif_path: Path, directory: Path) -> PreparedEnclave:
    """Steps 1-4 of the module docstring; ``directory`` receives ``initramfs/``."""
    with Eif.open(eif_path) as eif:
        measurements, metadata, described = measure_and_check(eif)
        initramfs = directory / "initramfs"
        initramfs.mkdir(parents=True, exist_ok=True)
        for section in eif.sections_of(SectionType.RAMDISK):
            data = eif.read_section(section, limit=MAX_RAMDISK_SIZE)
            try:
                extract(data, initramfs)
            except MalformedInput as exc:
                raise MalformedInput(f"{eif_path}: ramdisk {section.index}: {exc}") from exc
        size = eif.file_size
    with opened_directory(initramfs) as top:
        rootfs = open_directory(top, ("rootfs",), shown="/", why="nitro's init chroots into it")
        if rootfs is None:
            raise MalformedInput(
                f"{eif_path}: the ramdisks hold no /rootfs directory; nitro's init chroots into"
                " /rootfs (was the image built by build-enclave?)"
            )
        os.close(rootfs)
        argv = read_lines(top, "cmd")
        env = read_lines(top, "env") if argv else DEFAULT_ENV
    if not argv:
        argv = DEFAULT_ARGV
    return PreparedEnclave(eif_path, size, measurements, metadata, initramfs, argv, env, described)
