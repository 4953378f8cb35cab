"""Test images written by Python: layer tars, docker-save archives, OCI layouts; plus a cpio reader."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MTIME = 1_700_000_000


@dataclass
class F:
    """One layer entry: kind is file|dir|symlink|link|char|block|fifo."""

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer(*entries: F, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed layer tar."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.kind != "dir" or e.mode != 0o644 else 0o755
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.linkname = e.link
            info.devmajor, info.devminor = e.dev
            info.pax_headers = dict(e.pax)
            if e.kind == "file":
                info.size = len(e.data)
                archive.addfile(info, io.BytesIO(e.data))
            else:
                archive.addfile(info)
    return out.getvalue()


def base_layer() -> bytes:
    return layer(
        F("bin", kind="dir", mode=0o755),
        F("bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755),
        F("etc", kind="dir", mode=0o755),
        F("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        F("etc/hosts", b"127.0.0.1 something\n"),
        F("usr", kind="dir", mode=0o755),
        F("usr/lib", kind="dir", mode=0o755),
        F("usr/lib/libc.so", b"\x7fELF" + bytes(range(256)) * 8, mode=0o755),
        F("lib", kind="symlink", link="usr/lib", mode=0o777),
        F("tmp", kind="dir", mode=0o1777),
    )


def config(
    diff_ids: list[str],
    *,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    arch: str = "amd64",
    created: str | None = "2024-05-01T12:00:00.5Z",
    omit_cmd: bool = False,
) -> bytes:
    inner: dict[str, Any] = {"Env": env if env is not None else ["PATH=/usr/bin:/bin", "HELLO=hi"]}
    if not omit_cmd:
        inner["Cmd"] = cmd if cmd is not None else ["/bin/hello"]
    if entrypoint is not None:
        inner["Entrypoint"] = entrypoint
    obj: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if created is not None:
        obj["created"] = created
    return json.dumps(obj, sort_keys=True).encode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    archive.addfile(info, io.BytesIO(data))


def docker_archive(
    path: Path,
    layers: list[bytes],
    *,
    legacy: bool = True,
    tags: tuple[str, ...] = ("hello:v1",),
    config_bytes: bytes | None = None,
    **config_kwargs: Any,
) -> Path:
    """A ``docker save`` tarball (legacy ``<id>/layer.tar`` or Docker 25+ ``blobs/sha256``)."""
    cfg = config_bytes or config([sha(x) for x in layers], **config_kwargs)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        names = []
        for i, data in enumerate(layers):
            name = (
                f"{i:064x}/layer.tar"
                if legacy
                else f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"
            )
            if name not in names:
                _add(archive, name, data)
            names.append(name)
        cfg_name = (
            f"{hashlib.sha256(cfg).hexdigest()}.json"
            if legacy
            else f"blobs/sha256/{hashlib.sha256(cfg).hexdigest()}"
        )
        _add(archive, cfg_name, cfg)
        manifest = [{"Config": cfg_name, "RepoTags": list(tags), "Layers": names}]
        _add(archive, "manifest.json", json.dumps(manifest).encode())
    return path


def oci_layout(
    target: Path,
    layers: list[bytes],
    *,
    compress: bool = True,
    as_tar: bool = False,
    ref: str | None = "v1",
    config_bytes: bytes | None = None,
    **config_kwargs: Any,
) -> Path:
    """An OCI image layout (directory, or tar of one) with gzip or plain layers."""
    cfg = config_bytes or config([sha(x) for x in layers], **config_kwargs)
    blobs: dict[str, bytes] = {}
    descs = []
    for data in layers:
        stored = gzip.compress(data, mtime=0) if compress else data
        blobs[sha(stored)] = stored
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": media, "digest": sha(stored), "size": len(stored)})
    blobs[sha(cfg)] = cfg
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
    ).encode()
    blobs[sha(manifest)] = manifest
    entry: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(manifest),
        "size": len(manifest),
    }
    if ref:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
    index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.partition(":")[2]] = data
    if as_tar:
        with tarfile.open(target, "w") as archive:
            for name, data in files.items():
                _add(archive, name, data)
    else:
        for name, data in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
    return target


@dataclass(frozen=True)
class CpioMember:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    dev: tuple[int, int]
    rdev: tuple[int, int]
    name: bytes
    data: bytes


def read_cpio(archive: bytes) -> list[CpioMember]:
    """An independent newc reader for checking what the writer wrote (checks the 4-byte padding)."""
    members = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1]
        assert archive[name_start + namesize - 1] == 0
        data_start = name_start + namesize
        assert archive[data_start : data_start + (-data_start % 4)] == bytes(-data_start % 4)
        data_start += -data_start % 4
        data = archive[data_start : data_start + size]
        pos = data_start + size
        assert archive[pos : pos + (-pos % 4)] == bytes(-pos % 4)
        pos += -pos % 4
        members.append(
            CpioMember(ino, mode, uid, gid, nlink, mtime, (dmaj, dmin), (rmaj, rmin), name, data)
        )
        if name == b"TRAILER!!!":
            assert len(archive) % 512 == 0
            assert archive[pos:] == bytes(len(archive) - pos)
            return members


def kernel_bytes() -> bytes:
    """A synthetic kernel: deterministic, not bootable."""
    return hashlib.sha512(b"synthetic kernel").digest() * 128


def write_signing_files(
    directory: Path,
    *,
    curve: ec.EllipticCurve | None = None,
    not_before: datetime.datetime = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    days: int = 3650,
) -> tuple[Path, Path]:
    """A self-signed EIF signing certificate and its key as ``cert.pem`` / ``key.pem`` in ``directory``
    (P-384 with SHA-384 by default; a P-256 ``curve`` is signed with SHA-256, as nitro-cli users do)."""
    curve = curve or ec.SECP384R1()
    key = ec.generate_private_key(curve)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclavekit test signer")])
    digest = hashes.SHA256() if isinstance(curve, ec.SECP256R1) else hashes.SHA384()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .sign(key, digest)
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
