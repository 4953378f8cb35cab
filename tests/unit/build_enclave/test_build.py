"""End-to-end builds: image → EIF; measurements, reproducibility, bad input leaves nothing behind."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclavekit.eif.build import BuildResult, build_enclave, build_time, kernel_config_info
from enclavekit.eif.format import SectionType
from enclavekit.eif.image import RootfsDir, open_source
from enclavekit.eif.measure import pcr_of_bytes
from enclavekit.eif.metadata import IdentityInfo
from enclavekit.eif.ramdisk import HOSTS, bootstrap_ramdisk
from enclavekit.eif.reader import Eif, measure_eif
from enclavekit.eif.sign import EifSigner
from enclavekit.errors import MalformedInput, UsageError
from tests.unit.build_enclave.factory import (
    F,
    base_layer,
    docker_archive,
    kernel_bytes,
    layer,
    oci_layout,
    read_cpio,
    write_signing_files,
)


def _layers() -> list[bytes]:
    return [
        base_layer(),
        layer(
            F("etc", kind="dir", mode=0o700, mtime=42),
            F("etc/.wh.passwd"),
            F("app", kind="dir"),
            F("app/run", b"#!/bin/sh\nexec /bin/hello\n", mode=0o755),
            F("app/run2", kind="link", link="app/run"),
        ),
    ]


def _build(source: Path | str, out: Path, blobs: Path, **kwargs: object) -> BuildResult:
    return build_enclave(open_source(str(source)), out, blobs_dir=blobs, **kwargs)  # type: ignore[arg-type]


def _sections(path: Path) -> dict[SectionType, list[bytes]]:
    out: dict[SectionType, list[bytes]] = {}
    with Eif.open(path) as eif:
        for section in eif.sections:
            out.setdefault(section.section_type, []).append(b"".join(eif.iter_section(section)))
    return out


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_build_reports_the_measurements_describe_eif_finds(tmp_path: Path, blobs_dir: Path) -> None:
    image = docker_archive(tmp_path / "img.tar", _layers())
    result = _build(image, tmp_path / "app.eif", blobs_dir)
    assert measure_eif(result.path) == result.measurements
    assert result.path.stat().st_size == result.size
    sections = _sections(result.path)
    kernel, cmdline = sections[SectionType.KERNEL][0], sections[SectionType.CMDLINE][0]
    bootstrap, customer = sections[SectionType.RAMDISK]
    assert kernel == kernel_bytes()
    assert cmdline == (blobs_dir / "cmdline").read_bytes().strip()
    assert len(cmdline) == 119
    assert bootstrap == bootstrap_ramdisk(
        (blobs_dir / "init").read_bytes(), (blobs_dir / "nsm.ko").read_bytes()
    )
    assert result.measurements.pcr1 == pcr_of_bytes(kernel + cmdline + bootstrap)
    assert result.measurements.pcr2 == pcr_of_bytes(customer)
    assert result.measurements.pcr0 == pcr_of_bytes(kernel + cmdline + bootstrap + customer)
    assert result.measurements.pcr8 is None


def test_customer_ramdisk_is_the_docker_export_view(tmp_path: Path, blobs_dir: Path) -> None:
    result = _build(docker_archive(tmp_path / "img.tar", _layers()), tmp_path / "a.eif", blobs_dir)
    members = read_cpio(_sections(result.path)[SectionType.RAMDISK][1])
    by_name = {m.name: m for m in members}
    names = [m.name for m in members]
    assert names[:4] == [b"rootfs", b"rootfs/app/", b"rootfs/app/run", b"rootfs/app/run2"]
    assert by_name[b"rootfs/app/run2"].mode == 0o120755
    assert by_name[b"rootfs/app/run2"].data == b"run"
    # Docker's init layer: etc/ takes the init layer's attributes; hosts/resolv.conf/mtab replaced
    assert by_name[b"rootfs/etc/"].mode == 0o40755
    assert b"rootfs/etc/passwd" not in by_name  # whiteout
    assert by_name[b"rootfs/etc/hosts"].data == HOSTS
    assert by_name[b"rootfs/etc/hosts"].mode == 0o100755
    assert by_name[b"rootfs/etc/resolv.conf"].data == b"/run/resolvconf/resolv.conf"
    assert by_name[b"rootfs/etc/mtab"].data == b"/proc/mounts"
    for gone in (b"rootfs/.dockerenv", b"rootfs/dev/console", b"rootfs/etc/hostname"):
        assert gone not in by_name
    for present in (
        b"rootfs/dev/",
        b"rootfs/dev/pts/",
        b"rootfs/dev/shm/",
        b"rootfs/proc/",
        b"rootfs/sys/",
    ):
        assert by_name[present].mtime == 1492533000
    assert by_name[b"rootfs/tmp/"].mode == 0o41777
    assert by_name[b"rootfs/lib"].data == b"usr/lib"
    assert by_name[b"cmd"].data == b"/bin/hello\n"
    assert by_name[b"env"].data == b"PATH=/usr/bin:/bin\nHELLO=hi\n"
    assert names[-10:-3] == [
        b"rootfs",
        b"rootfs/dev",
        b"rootfs/run",
        b"rootfs/sys",
        b"rootfs/var",
        b"rootfs/proc",
        b"rootfs/tmp",
    ]


def test_every_source_format_gives_the_same_pcrs(tmp_path: Path, blobs_dir: Path) -> None:
    layers = _layers()
    (tmp_path / "oci").mkdir()
    sources = [
        docker_archive(tmp_path / "legacy.tar", layers, legacy=True),
        docker_archive(tmp_path / "modern.tar", layers, legacy=False),
        oci_layout(tmp_path / "oci", layers),
        oci_layout(tmp_path / "oci.tar", layers, as_tar=True, compress=False),
    ]
    results = [
        _build(s, tmp_path / f"{i}.eif", blobs_dir, name="n", version="v")
        for i, s in enumerate(sources)
    ]
    assert len({r.measurements for r in results}) == 1


def test_metadata_follows_nitro_cli(tmp_path: Path, blobs_dir: Path) -> None:
    result = _build(docker_archive(tmp_path / "img.tar", _layers()), tmp_path / "a.eif", blobs_dir)
    with Eif.open(result.path) as eif:
        meta = IdentityInfo.from_bytes(eif.read_section(eif.sections_of(SectionType.METADATA)[0]))
    assert meta.image_name == "hello"
    assert len(meta.image_version) == 64
    assert meta.build_info.build_time == "2024-05-01T12:00:00.500+00:00"
    assert (meta.build_info.operating_system, meta.build_info.kernel_version) == (
        "Linux",
        "4.14.256",
    )
    assert meta.docker_info["Id"] == "sha256:" + meta.image_version
    assert meta.docker_info["RepoTags"] == ["hello:v1"]


@pytest.mark.parametrize(
    ("epoch", "created", "expected"),
    [
        ("0", "2024-01-01T00:00:00Z", "1970-01-01T00:00:00+00:00"),
        ("1700000000", None, "2023-11-14T22:13:20+00:00"),
        (None, "2024-05-01T14:00:00.123456789+02:00", "2024-05-01T12:00:00.123456789+00:00"),
        (None, "2024-05-01T12:00:00.120Z", "2024-05-01T12:00:00.120+00:00"),
        (None, "2024-05-01T12:00:00.000001Z", "2024-05-01T12:00:00.000001+00:00"),
        (None, None, "1970-01-01T00:00:00+00:00"),
    ],
)
def test_build_time_is_deterministic(epoch: str | None, created: str | None, expected: str) -> None:
    assert build_time(epoch, created) == expected


def test_bad_source_date_epoch_is_refused() -> None:
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        build_time("yesterday", None)


def test_kernel_config_line_three(blobs_dir: Path, tmp_path: Path) -> None:
    assert kernel_config_info(blobs_dir / "bzImage.config") == ("Linux", "4.14.256")
    assert kernel_config_info(tmp_path / "missing") == ("Unknown", "Unknown")


def _cli(
    args: list[str], *, env: dict[str, str], cwd: Path, umask: int
) -> subprocess.CompletedProcess[str]:
    code = (
        f"import os, sys; os.umask({umask}); sys.argv = ['enclavekit', *sys.argv[1:]]; "
        "from enclavekit.cli import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_two_builds_under_different_conditions_are_byte_identical(
    tmp_path: Path, blobs_dir: Path
) -> None:
    """Different umask, time zone, locale, working directory and output directory: same bytes."""
    image = oci_layout(tmp_path / "oci.tar", _layers(), as_tar=True)
    base = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "TZ")}
    outputs = []
    for i, (umask, tz) in enumerate([(0o022, "UTC"), (0o077, "Asia/Kolkata")]):
        work = tmp_path / f"run{i}"
        work.mkdir()
        out = work / "sub" / "app.eif"
        out.parent.mkdir()
        env = {**base, "TZ": tz, "LC_ALL": "C", "NITRO_CLI_BLOBS": str(blobs_dir)}
        done = _cli(
            ["build-enclave", "--image", str(image), "--output-file", "sub/app.eif"],
            env=env,
            cwd=work,
            umask=umask,
        )
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        outputs.append((out.read_bytes(), printed))
        # describe-eif's view equals what build printed
        assert measure_eif(out).to_json() == printed["Measurements"]
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]
    assert set(outputs[0][1]["Measurements"]) == {"HashAlgorithm", "PCR0", "PCR1", "PCR2"}


def test_source_date_epoch_sets_build_time(tmp_path: Path, blobs_dir: Path) -> None:
    result = _build(
        docker_archive(tmp_path / "img.tar", _layers()),
        tmp_path / "a.eif",
        blobs_dir,
        source_date_epoch="86400",
    )
    assert result.metadata.build_info.build_time == "1970-01-02T00:00:00+00:00"


# -- bad input -------------------------------------------------------------------------------------------


def test_layer_digest_mismatch_is_refused_and_leaves_nothing(
    tmp_path: Path, blobs_dir: Path
) -> None:
    """A layer whose bytes do not hash to its manifest digest is refused (the digest mismatch is reported
    rather than the tar damage it causes), and no output is left."""
    (tmp_path / "oci").mkdir()
    oci_layout(tmp_path / "oci", _layers(), compress=False)
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    victim = next(p for p in blobs.iterdir() if p.read_bytes()[257:262] == b"ustar")
    data = bytearray(victim.read_bytes())
    data[600] ^= 1  # inside the first file's contents
    victim.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(MalformedInput, match="digest mismatch"):
        _build(tmp_path / "oci", out_dir / "app.eif", blobs_dir)
    assert list(out_dir.iterdir()) == []


def test_layer_content_swapped_after_export_is_refused_and_leaves_nothing(
    tmp_path: Path, blobs_dir: Path
) -> None:
    """Content changed deep inside a file (the tar still parses): the digest check, which runs while the
    EIF is being written, refuses the build before the output is committed, and nothing is left."""
    big = F("app/blob", bytes(range(256)) * 4096)  # 1 MiB
    (tmp_path / "oci").mkdir()
    oci_layout(tmp_path / "oci", [base_layer(), layer(F("app", kind="dir"), big)], compress=False)
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    victim = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside app/blob's contents
    victim.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(MalformedInput, match="layer digest mismatch"):
        _build(tmp_path / "oci", out_dir / "app.eif", blobs_dir)
    assert list(out_dir.iterdir()) == []


def test_diff_id_mismatch_is_refused(tmp_path: Path, blobs_dir: Path) -> None:
    """A docker-save layer that is not the one the config's diff_ids promise."""
    layers = _layers()
    from tests.unit.build_enclave.factory import config, sha

    wrong = config([sha(layers[0]), sha(b"something else")])
    image = docker_archive(tmp_path / "img.tar", layers, config_bytes=wrong)
    with pytest.raises(MalformedInput, match="diff_id mismatch"):
        _build(image, tmp_path / "app.eif", blobs_dir)
    assert not (tmp_path / "app.eif").exists()
    assert _leftovers(tmp_path) == []


def test_corrupt_gzip_layer_is_refused(tmp_path: Path, blobs_dir: Path) -> None:
    (tmp_path / "oci").mkdir()
    oci_layout(tmp_path / "oci", _layers())
    for blob in (tmp_path / "oci" / "blobs" / "sha256").iterdir():
        if blob.read_bytes()[:2] == b"\x1f\x8b":
            blob.write_bytes(blob.read_bytes()[:40])
    with pytest.raises(MalformedInput):
        _build(tmp_path / "oci", tmp_path / "app.eif", blobs_dir)
    assert not (tmp_path / "app.eif").exists()


def test_gzip_bomb_is_streamed_not_buffered(tmp_path: Path, blobs_dir: Path) -> None:
    """A layer that decompresses 1000:1 is read in bounded chunks (and here simply builds)."""
    big = layer(F("zeros", bytes(16 << 20)))
    assert len(gzip.compress(big)) < (1 << 20)
    (tmp_path / "oci").mkdir()
    oci_layout(tmp_path / "oci", [big])
    result = _build(tmp_path / "oci", tmp_path / "app.eif", blobs_dir)
    assert result.size > 16 << 20


def test_path_traversal_in_layer_is_refused(tmp_path: Path, blobs_dir: Path) -> None:
    """A layer entry named ``../x`` stops the build; no EIF is written."""
    image = docker_archive(tmp_path / "img.tar", [layer(F("../../etc/cron.d/x", b"boom"))])
    with pytest.raises(MalformedInput, match="path traversal"):
        _build(image, tmp_path / "app.eif", blobs_dir)
    assert not (tmp_path / "app.eif").exists()
    assert _leftovers(tmp_path) == []


def test_missing_blobs_are_named(tmp_path: Path) -> None:
    image = docker_archive(tmp_path / "img.tar", _layers())
    with pytest.raises(UsageError, match=r"bzImage.*cmdline.*init.*nsm\.ko"):
        _build(image, tmp_path / "app.eif", tmp_path / "no-blobs")
    assert not (tmp_path / "app.eif").exists()


def test_failed_rebuild_keeps_the_previous_eif(tmp_path: Path, blobs_dir: Path) -> None:
    good = _build(docker_archive(tmp_path / "img.tar", _layers()), tmp_path / "app.eif", blobs_dir)
    before = good.path.read_bytes()
    bad = docker_archive(tmp_path / "bad.tar", [layer(F("/abs", b"x"))])
    with pytest.raises(MalformedInput):
        _build(bad, tmp_path / "app.eif", blobs_dir)
    assert (tmp_path / "app.eif").read_bytes() == before


def test_rootfs_directory_build(tmp_path: Path, blobs_dir: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"app")
    os.link(root / "bin" / "app", root / "bin" / "app2")
    (root / "lib").symlink_to("bin")
    with pytest.raises(UsageError, match="--cmd"):
        build_enclave(RootfsDir(root), tmp_path / "a.eif", blobs_dir=blobs_dir)
    with pytest.raises(UsageError, match="inside the root file system"):
        build_enclave(RootfsDir(root), root / "bin" / "a.eif", blobs_dir=blobs_dir, cmd=["/x"])
    result = build_enclave(
        RootfsDir(root), tmp_path / "a.eif", blobs_dir=blobs_dir, cmd=["/bin/app"], env=["A=1"]
    )
    members = {m.name: m for m in read_cpio(_sections(result.path)[SectionType.RAMDISK][1])}
    assert members[b"rootfs/bin/app"].data == b"app"
    assert members[b"rootfs/bin/app2"].data == b"app"  # first name in walk order
    assert members[b"rootfs/lib"].data == b"bin"
    assert members[b"rootfs/etc/hosts"].data == HOSTS  # linuxkit's must-exist entries
    assert members[b"cmd"].data == b"/bin/app\n" and members[b"env"].data == b"A=1\n"
    assert result.metadata.image_name == "root"
    assert result.metadata.docker_info is None


def test_signed_build_adds_pcr8(tmp_path: Path, blobs_dir: Path) -> None:
    signer = EifSigner.from_files(*write_signing_files(tmp_path))
    result = _build(
        docker_archive(tmp_path / "img.tar", _layers()),
        tmp_path / "s.eif",
        blobs_dir,
        signer=signer,
    )
    assert result.measurements.pcr8 is not None
    assert measure_eif(result.path) == result.measurements
    with Eif.open(result.path) as eif:
        report = eif.verify()
    assert report.problems() == ()
    assert hashlib.sha384(b"").digest() != result.measurements.pcr8


def test_arm64_image_uses_the_aarch64_kernel_and_flag(tmp_path: Path, blobs_dir: Path) -> None:
    arm_blobs = tmp_path / "arm-blobs"
    arm_blobs.mkdir()
    for name in ("init", "nsm.ko", "cmdline"):
        (arm_blobs / name).write_bytes((blobs_dir / name).read_bytes())
    (arm_blobs / "Image").write_bytes(b"arm64 kernel" * 100)
    image = docker_archive(tmp_path / "img.tar", _layers(), arch="arm64")
    with pytest.raises(UsageError, match="Image"):
        _build(image, tmp_path / "x.eif", blobs_dir)  # no Image there
    result = _build(image, tmp_path / "a.eif", arm_blobs)
    with Eif.open(result.path) as eif:
        assert eif.header.flags & 1 == 1
    assert result.metadata.build_info.kernel_version == "Unknown"  # no Image.config


def test_arch_mismatch_is_refused(tmp_path: Path, blobs_dir: Path) -> None:
    image = docker_archive(tmp_path / "img.tar", _layers())
    with pytest.raises(UsageError, match="does not match"):
        _build(image, tmp_path / "a.eif", blobs_dir, arch="aarch64")
