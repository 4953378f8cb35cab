"""From an EIF file to an unpacked enclave directory: check, measure, unpack, read ``cmd``/``env``.

Steps of :func:`prepare`:

1. open the EIF and check its layout (:meth:`enclavekit.eif.reader.Eif.open`);
2. one pass over the file computes the CRC and PCR0/1/2 and, from the same bytes as they are read,
   unpacks every ramdisk, in order (the hypervisor concatenates them into one initramfs; later
   entries win), into the staging directory ``<dir>/.initramfs.unverified``: memory stays bounded
   (a few MiB of buffers, whatever the EIF size) and what is unpacked is exactly what was measured
   (the file is never read twice, so rewriting it during the run changes nothing);
3. then the checks: a CRC mismatch or a signature over another PCR0 refuses the image (as the
   hypervisor would) and the staging directory is removed; a damaged image is reported as damaged
   even where the damage also breaks a ramdisk's cpio; a malformed ramdisk in an intact image is
   refused after the pass. Only an image that passes becomes ``<dir>/initramfs`` (one rename);
   nothing is started before :func:`prepare` returns;
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
from enclavekit.eif.reader import Eif, EifReport, Section
from enclavekit.errors import EifIntegrityError, MalformedInput
from enclavekit.run.cpio import CpioParser, Extractor
from enclavekit.run.rootfs import open_directory, opened_directory, read_regular_file
from enclavekit.run.state import remove_tree

#: ``init``'s defaults when ``/cmd`` is missing or empty.
DEFAULT_ARGV = ("sh",)
DEFAULT_ENV = ("PATH=/sbin:/usr/sbin:/bin:/usr/bin",)
#: Where the ramdisks are unpacked until the EIF has passed its checks (inside ``<dir>``).
STAGING_NAME = ".initramfs.unverified"
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


def check_report(
    eif_path: Path, report: EifReport
) -> tuple[Measurements, IdentityInfo | None, dict[str, Any]]:
    """Measurements, metadata and describe-enclaves' metadata fields; refuses a damaged image."""
    problems = report.problems()
    if problems:
        raise EifIntegrityError(
            f"{eif_path}: refusing to run a damaged image: " + "; ".join(problems)
        )
    described = describe_report(report)
    extra: dict[str, Any] = {
        k: described[k] for k in ("ImageName", "ImageVersion", "Metadata") if k in described
    }
    return report.measurements, report.metadata, extra


class _RamdiskUnpacker:
    """The verifying pass's consumer: feeds each ramdisk's chunks to a cpio parser as they are
    read. The first malformed ramdisk stops unpacking (kept in :attr:`error`); the pass goes on, so
    that a damaged image is reported by its CRC."""

    def __init__(self, eif_path: Path, staging: Path) -> None:
        self._eif_path = eif_path
        self._extractor = Extractor(staging)
        self._section: Section | None = None
        self._parser: CpioParser | None = None
        self.error: MalformedInput | None = None

    def __call__(self, section: Section, chunk: memoryview) -> None:
        if section.section_type != SectionType.RAMDISK or self.error is not None:
            return
        try:
            if section is not self._section:
                self._end_section()
                self._section, self._parser = section, self._extractor.parser()
            assert self._parser is not None
            self._parser.feed(chunk)
        except MalformedInput as exc:
            self._fail(exc)

    def _end_section(self) -> None:
        if self._parser is not None:
            self._parser.finish()
            self._parser = None

    def _fail(self, exc: MalformedInput) -> None:
        where = f"ramdisk {self._section.index}: " if self._section is not None else ""
        self.error = MalformedInput(f"{self._eif_path}: {where}{exc}")
        self.error.__cause__ = exc
        self._extractor.close()

    def finish(self) -> None:
        """The last ramdisk's end and the directory modes; raises the kept error, if any."""
        if self.error is None:
            try:
                self._end_section()
                self._extractor.finish()
            except MalformedInput as exc:
                self._fail(exc)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._extractor.close()


def prepare(eif_path: Path, directory: Path) -> PreparedEnclave:
    """Steps 1-4 of the module docstring; ``directory`` receives ``initramfs/`` (it must not hold
    one yet). On any failure nothing unpacked is left in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / STAGING_NAME
    initramfs = directory / "initramfs"
    staging.mkdir(mode=0o700)
    try:
        with Eif.open(eif_path) as eif:
            unpacker = _RamdiskUnpacker(eif_path, staging)
            try:
                report = eif.verify(consume=unpacker)
            finally:
                unpacker.close()
            measurements, metadata, described = check_report(eif_path, report)
            unpacker.finish()
            size = eif.file_size
        os.rename(staging, initramfs)
    except BaseException:
        remove_tree(staging)
        raise
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
