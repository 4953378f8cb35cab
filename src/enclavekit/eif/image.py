"""Image sources for ``build-enclave``: docker-archive tarballs, OCI image layouts and root-fs directories.

A source is opened into an :class:`Image`: the parsed config (with nitro-cli's CMD/ENTRYPOINT rule, spec
``eif.md`` §6.5) and the layer blobs in order, each located on disk (path, offset, size) together with the
digests the source promises for it. Nothing is decompressed or hashed here except the small JSON documents;
:mod:`enclavekit.eif.build` streams the layers once, checking the digests as it goes.

Recognised sources:

- ``docker save`` tarballs (``manifest.json``; the legacy ``<id>/layer.tar`` form and the Docker 25+ form whose
  blobs live under ``blobs/sha256/``);
- OCI image layouts as skopeo, podman and buildah write them (``oci-layout`` + ``index.json`` + ``blobs/``), as a
  directory or a tar of one. ``PATH:REF`` picks the manifest annotated with that ref name; image indexes pick
  the manifest for the requested architecture;
- a root file-system directory (``--cmd``/``--env`` supply what a config would).

Checked here: JSON shape and duplicate keys, config and manifest digests and sizes, that blob digests are
well-formed (no path traversal through ``digest``). Not checked here: layer digests (checked while streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from enclavekit.eif.layers import ContentRef, EntryKind, TarEntry
from enclavekit.errors import MalformedInput, UsageError

#: JSON documents (manifests, configs, indexes) larger than this are refused.
MAX_JSON_SIZE = 8 << 20
#: How many nested image indexes are followed.
MAX_INDEX_DEPTH = 4

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: nitro-cli maps the image architecture to the EIF header's arch flag; nothing else is accepted.
ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


class LayerStream(Protocol):
    """A reader of a layer's bytes in order (see :attr:`LayerBlob.stream`).

    ``source_checks_digest``: the source hashes exactly the bytes objects this reader returns and
    checks them against the layer's digest (a download handing over what it hashed), so the reader
    need not hash them again; it must then call :meth:`checked` once the layer's ``wait`` returned,
    and hash the layer itself (from the verified file) if that is False. Such a reader may raise
    :class:`SourceRestarted` instead of returning bytes.
    """

    source_checks_digest: bool

    def read(self, n: int = -1, /) -> bytes: ...

    def checked(self) -> bool:
        """True when every byte read came from the one download attempt whose digest check
        passed, and all of the layer was read."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> LayerStream: ...

    def __exit__(self, *exc: object) -> None: ...


class SourceRestarted(Exception):
    """A :class:`LayerStream` whose source restarted (a retried download) after bytes were read:
    those bytes are covered by no digest check; read the layer again from its verified file."""


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """One layer as stored: where its bytes are and what they must hash to."""

    location: ContentRef
    label: str
    digest: str | None = None  # of the stored (possibly compressed) bytes, when the source names it
    diff_id: str | None = None  # of the uncompressed tar, from the config's rootfs.diff_ids
    #: For a layer still arriving (a registry pull in progress): blocks until its verified bytes are
    #: at ``location``, or raises why they never will be. None: the bytes are there.
    wait: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    #: For a layer still arriving: opens a reader of its bytes as they arrive (``read(n)`` blocks;
    #: the bytes are unverified until the reader checks the digest and ``wait`` returns).
    stream: Callable[[], LayerStream] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config a build uses."""

    image_id: str  # sha256 hex of the config bytes: what ``docker inspect`` calls the image Id
    architecture: str
    os: str
    created: str | None
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    env: tuple[str, ...]
    diff_ids: tuple[str, ...]
    raw: Mapping[str, Any] = field(compare=False, repr=False)

    def argv(self) -> tuple[str, ...]:
        """nitro-cli's rule: ``Cmd`` if present (even empty; ``Entrypoint`` is then ignored), else
        ``Entrypoint``; neither is an error."""
        if self.cmd is not None:
            return self.cmd
        if self.entrypoint is not None:
            return self.entrypoint
        raise MalformedInput(
            "the image config has neither Cmd nor Entrypoint, so the enclave would not know what to run; "
            "add CMD to the image (nitro-cli refuses such images too)"
        )

    @property
    def arch(self) -> str:
        """``x86_64`` or ``aarch64`` (the EIF's architecture)."""
        try:
            return ARCHITECTURES[self.architecture]
        except KeyError:
            raise MalformedInput(
                f"image architecture is {self.architecture!r}; an enclave image needs 'amd64' or 'arm64'"
            ) from None


@dataclass(frozen=True, slots=True)
class Image:
    """A container image ready to be flattened."""

    config: ImageConfig
    layers: tuple[LayerBlob, ...]
    source: str
    repo_tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RootfsDir:
    """A directory to use as the enclave's root file system, as is."""

    path: Path


# -- small helpers ---------------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedInput(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except MalformedInput as exc:
        raise MalformedInput(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedInput(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MalformedInput(f"{what}: expected a JSON object, found {type(value).__name__}")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedInput(f"{what}: expected a list of strings or null")
    return tuple(value)


def _string(obj: Mapping[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise MalformedInput(f"{what}: {key!r} must be a string, found {type(value).__name__}")
    return value


def check_digest(digest: Any, what: str) -> str:
    """A well-formed ``sha256:<64 hex>`` (or sha512) digest; anything else could name a path."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise MalformedInput(f"{what}: {digest!r} is not a sha256/sha512 digest")
    return digest


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def manifest_layers(manifest: Mapping[str, Any], config: ImageConfig, where: str) -> list[Any]:
    """The manifest's ``layers`` list, refused unless there is one entry per config ``diff_id``."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise MalformedInput(f"{where}: the manifest has no 'layers' list")
    if len(layers) != len(config.diff_ids):
        raise MalformedInput(
            f"{where}: the manifest lists {len(layers)} layers but the config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    return layers


def parse_config(data: bytes, what: str = "image config") -> ImageConfig:
    """An image config (OCI or Docker) from its JSON bytes."""
    raw = _object(parse_json(data, what), what)
    inner = _object(raw.get("config") or {}, f"{what} 'config'")
    rootfs = _object(raw.get("rootfs") or {}, f"{what} 'rootfs'")
    diff_ids = _strings(rootfs.get("diff_ids"), f"{what} rootfs.diff_ids") or ()
    for diff_id in diff_ids:
        check_digest(diff_id, f"{what} rootfs.diff_ids")
    created = raw.get("created")
    if created is not None and not isinstance(created, str):
        raise MalformedInput(f"{what}: 'created' must be a string")
    return ImageConfig(
        image_id=hashlib.sha256(data).hexdigest(),
        architecture=_string(raw, "architecture", what, "amd64"),
        os=_string(raw, "os", what, "linux"),
        created=created,
        cmd=_strings(inner.get("Cmd"), f"{what} config.Cmd"),
        entrypoint=_strings(inner.get("Entrypoint"), f"{what} config.Entrypoint"),
        env=_strings(inner.get("Env"), f"{what} config.Env") or (),
        diff_ids=diff_ids,
        raw=raw,
    )


# -- blob stores -----------------------------------------------------------------------------------------


class _Store:
    """Files of an image source, by relative path."""

    def locate(self, name: str) -> ContentRef:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, what: str) -> bytes:
        ref = self.locate(name)
        if ref.size > MAX_JSON_SIZE:
            raise MalformedInput(f"{what} is {ref.size} bytes; refusing more than {MAX_JSON_SIZE}")
        with open(ref.path, "rb") as handle:
            handle.seek(ref.offset)
            data = handle.read(ref.size)
        if len(data) != ref.size:
            raise MalformedInput(f"{what} is truncated")
        return data

    def blob_name(self, digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        return f"blobs/{algorithm}/{hexdigest}"

    def read_blob(self, descriptor: Any, what: str) -> bytes:
        desc = _object(descriptor, what)
        digest = check_digest(desc.get("digest"), f"{what} digest")
        data = self.read(self.blob_name(digest), what)
        size = desc.get("size")
        if size is not None and size != len(data):
            raise MalformedInput(f"{what}: descriptor says {size} bytes, the blob has {len(data)}")
        if digest_of(data, digest.partition(":")[0]) != digest:
            raise MalformedInput(
                f"{what}: digest mismatch: expected {digest}, found "
                f"{digest_of(data, digest.partition(':')[0])}; the image is corrupt"
            )
        return data


class _DirStore(_Store):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts:
            raise MalformedInput(f"{name!r} leaves the image directory (path traversal refused)")
        return self.root.joinpath(*parts)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def locate(self, name: str) -> ContentRef:
        path = self._path(name)
        try:
            info = path.stat()
        except OSError:
            raise MalformedInput(
                f"{self.root}: missing {name!r}; the image layout is incomplete"
            ) from None
        if not stat.S_ISREG(info.st_mode):
            raise MalformedInput(f"{path} is not a regular file")
        return ContentRef(str(path), 0, info.st_size)


class _TarStore(_Store):
    """Members of an (uncompressed) outer tar such as ``docker save`` writes."""

    MAX_LINK_HOPS = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(
                path, mode="r:", encoding="utf-8", errors="surrogateescape"
            ) as archive:
                for member in archive:
                    self.members[posixpath.normpath(member.name).lstrip("/")] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise MalformedInput(
                f"{path}: not a readable (uncompressed) tar archive ({exc}); is the file complete?"
            ) from None

    def _member(self, name: str) -> tarfile.TarInfo:
        current = posixpath.normpath(name)
        for _ in range(self.MAX_LINK_HOPS):
            member = self.members.get(current)
            if member is None:
                raise MalformedInput(f"{self.path}: missing {name!r}; the archive is incomplete")
            if member.issym():
                current = posixpath.normpath(
                    posixpath.join(posixpath.dirname(current), member.linkname)
                )
            elif member.islnk():
                current = posixpath.normpath(member.linkname)
            elif member.isreg():
                return member
            else:
                raise MalformedInput(f"{self.path}: {name!r} is not a file")
            if current.startswith("../") or current == ".." or current.startswith("/"):
                raise MalformedInput(
                    f"{self.path}: {name!r} links outside the archive (path traversal refused)"
                )
        raise MalformedInput(
            f"{self.path}: {name!r} is a chain of more than {self.MAX_LINK_HOPS} links"
        )

    def exists(self, name: str) -> bool:
        return posixpath.normpath(name) in self.members

    def locate(self, name: str) -> ContentRef:
        member = self._member(name)
        if member.issparse():
            raise MalformedInput(f"{self.path}: {name!r} is a sparse member; not supported")
        return ContentRef(str(self.path), member.offset_data, member.size)


# -- opening sources -------------------------------------------------------------------------------------


def open_source(source: str, *, arch: str | None = None) -> Image | RootfsDir:
    """Open ``source`` (see the module docstring). ``arch`` (``x86_64``/``aarch64``) picks from indexes."""
    path = Path(source)
    ref: str | None = None
    if not path.exists() and ":" in source:
        head, _, ref = source.rpartition(":")
        path = Path(head)
    if not path.exists():
        raise UsageError(
            f"image source {source!r} does not exist; give a docker-save tarball, an OCI "
            "layout (directory or tar) or a root file-system directory"
        )
    if path.is_dir():
        if (path / "oci-layout").exists() or (path / "index.json").exists():
            return _open_oci(_DirStore(path), str(path), ref, arch)
        if ref is not None:
            raise UsageError(
                f"{path} is not an OCI layout, so ':{ref}' cannot select an image in it"
            )
        return RootfsDir(path)
    store = _TarStore(path)
    if store.exists("manifest.json") and ref is None:
        return _open_docker_archive(store, str(path))
    if store.exists("index.json"):
        return _open_oci(store, str(path), ref, arch)
    raise MalformedInput(
        f"{path}: neither a docker-save archive (manifest.json) nor an OCI layout (index.json)"
    )


def _open_docker_archive(store: _TarStore, source: str) -> Image:
    manifest = parse_json(store.read("manifest.json", "manifest.json"), f"{source}: manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise MalformedInput(f"{source}: manifest.json must be a non-empty list of images")
    if len(manifest) > 1:
        tags = [
            t for entry in manifest if isinstance(entry, dict) for t in entry.get("RepoTags") or []
        ]
        raise UsageError(
            f"{source} holds {len(manifest)} images ({', '.join(map(str, tags)) or 'untagged'}); "
            "save a single image per archive (docker save IMAGE)"
        )
    entry = _object(manifest[0], f"{source}: manifest.json[0]")
    config_name = _string(entry, "Config", f"{source}: manifest.json[0]")
    config_bytes = store.read(config_name, f"{source}: config {config_name}")
    expected = _digest_from_name(config_name)
    if expected is not None and digest_of(config_bytes) != expected:
        raise MalformedInput(
            f"{source}: config {config_name} does not match its digest; corrupt archive"
        )
    config = parse_config(config_bytes, f"{source}: image config")
    layer_names = _strings(entry.get("Layers"), f"{source}: manifest.json Layers") or ()
    if len(layer_names) != len(config.diff_ids):
        raise MalformedInput(
            f"{source}: manifest lists {len(layer_names)} layers but the config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    layers = tuple(
        LayerBlob(
            store.locate(name), f"layer {i} ({_short(name)})", _digest_from_name(name), diff_id
        )
        for i, (name, diff_id) in enumerate(zip(layer_names, config.diff_ids, strict=True))
    )
    repo_tags = _strings(entry.get("RepoTags"), f"{source}: RepoTags") or ()
    return Image(config, layers, source, repo_tags)


def _short(name: str) -> str:
    return name if len(name) <= 40 else f"{name[:19]}…{name[-19:]}"


def _digest_from_name(name: str) -> str | None:
    """The digest a docker-save member name promises: ``blobs/<alg>/<hex>`` (Docker ≥ 25) or the
    legacy ``<image id>.json`` config."""
    normal = posixpath.normpath(name)
    match = re.fullmatch(r"blobs/(sha256|sha512)/([0-9a-f]+)", normal)
    if match is not None:
        return f"{match.group(1)}:{match.group(2)}"
    legacy = re.fullmatch(r"([0-9a-f]{64})\.json", normal)
    return f"sha256:{legacy.group(1)}" if legacy is not None else None


def _open_oci(store: _Store, source: str, ref: str | None, arch: str | None) -> Image:
    if store.exists("oci-layout"):
        layout = _object(
            parse_json(store.read("oci-layout", "oci-layout"), f"{source}: oci-layout"),
            f"{source}: oci-layout",
        )
        if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
            raise MalformedInput(f"{source}: unsupported imageLayoutVersion {layout!r}")
    index = _object(
        parse_json(store.read("index.json", "index.json"), f"{source}: index.json"),
        f"{source}: index.json",
    )
    wanted = {"x86_64": "amd64", "aarch64": "arm64"}.get(arch or "")
    candidates = list(_manifests(store, source, index, None, 0))
    if ref is not None:
        candidates = [c for c in candidates if c[1] == ref]
        if not candidates:
            raise UsageError(f"{source}: no manifest is annotated with ref name {ref!r}")
    if len({c[0].get("digest") for c in candidates}) > 1:
        by_platform = [c for c in candidates if c[2] in (wanted or "amd64", None)]
        if len({c[0].get("digest") for c in by_platform}) == 1:
            candidates = by_platform
        else:
            names = sorted({f"{c[1] or '?'} ({c[2] or '?'})" for c in candidates})
            raise UsageError(
                f"{source} holds several images: {', '.join(names)}; pick one with SOURCE:REF or --arch"
            )
    if not candidates:
        raise MalformedInput(f"{source}: index.json lists no image manifest")
    descriptor, ref_name, _ = candidates[0]
    manifest = _object(
        parse_json(store.read_blob(descriptor, f"{source}: manifest"), f"{source}: manifest"),
        f"{source}: manifest",
    )
    config_bytes = store.read_blob(manifest.get("config"), f"{source}: image config")
    config = parse_config(config_bytes, f"{source}: image config")
    layer_descs = manifest_layers(manifest, config, source)
    layers = []
    for i, (desc, diff_id) in enumerate(zip(layer_descs, config.diff_ids, strict=True)):
        desc = _object(desc, f"{source}: layer {i}")
        digest = check_digest(desc.get("digest"), f"{source}: layer {i} digest")
        location = store.locate(store.blob_name(digest))
        if desc.get("size") is not None and desc["size"] != location.size:
            raise MalformedInput(
                f"{source}: layer {i} should be {desc['size']} bytes, the blob has {location.size}"
            )
        layers.append(LayerBlob(location, f"layer {i} ({digest[:19]})", digest, diff_id))
    tags = (ref_name,) if ref_name else ()
    return Image(config, tuple(layers), source, tags)


def _manifests(
    store: _Store, source: str, index: Mapping[str, Any], platform: str | None, depth: int
) -> Iterator[tuple[Mapping[str, Any], str | None, str | None]]:
    """(descriptor, ref name, architecture) of every image manifest reachable from ``index``."""
    if depth > MAX_INDEX_DEPTH:
        raise MalformedInput(f"{source}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise MalformedInput(f"{source}: index has no 'manifests' list")
    for entry in entries:
        desc = _object(entry, f"{source}: index entry")
        annotations = desc.get("annotations") or {}
        if isinstance(annotations, dict) and annotations.get("vnd.docker.reference.type"):
            continue  # buildx attestation manifests
        plat = desc.get("platform")
        arch = plat.get("architecture") if isinstance(plat, dict) else platform
        ref = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
        media = desc.get("mediaType")
        if media in (OCI_INDEX, DOCKER_LIST):
            nested = _object(
                parse_json(store.read_blob(desc, f"{source}: nested index"), f"{source}: index"),
                f"{source}: index",
            )
            for found, nested_ref, nested_arch in _manifests(
                store, source, nested, arch, depth + 1
            ):
                yield found, nested_ref or ref, nested_arch
        else:
            yield (
                desc,
                ref if isinstance(ref, str) else None,
                arch if isinstance(arch, str) else None,
            )


# -- root file-system directories -----------------------------------------------------------------------


def rootfs_entries(root: Path) -> Iterator[TarEntry]:
    """A directory tree as one layer: lstat attributes, contents referenced in place, hard links by inode.

    Sockets are skipped (``docker export`` skips them too). Symlinks are not followed.
    """
    seen: dict[tuple[int, int], bytes] = {}
    todo: list[tuple[Path, bytes]] = [(root, b"")]
    while todo:
        directory, prefix = todo.pop()
        try:
            with os.scandir(directory) as scan:
                children = sorted(scan, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            raise MalformedInput(f"cannot read directory {directory}: {exc.strerror}") from None
        for child in children:
            name = prefix + os.fsencode(child.name)
            info = child.stat(follow_symlinks=False)
            mode = info.st_mode
            if stat.S_ISDIR(mode):
                yield _stat_entry(name, EntryKind.DIRECTORY, info)
                todo.append((Path(child.path), name + b"/"))
                continue
            if stat.S_ISSOCK(mode):
                continue
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in seen:
                yield _stat_entry(name, EntryKind.HARDLINK, info, linkname=seen[key])
                continue
            seen[key] = name
            if stat.S_ISREG(mode):
                content = ContentRef(child.path, 0, info.st_size)
                yield _stat_entry(name, EntryKind.REGULAR, info, content=content)
            elif stat.S_ISLNK(mode):
                target = os.fsencode(os.readlink(child.path))
                yield _stat_entry(name, EntryKind.SYMLINK, info, linkname=target)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = EntryKind.CHAR if stat.S_ISCHR(mode) else EntryKind.BLOCK
                yield _stat_entry(name, kind, info, rdev=info.st_rdev)
            elif stat.S_ISFIFO(mode):
                yield _stat_entry(name, EntryKind.FIFO, info)


def _stat_entry(
    name: bytes,
    kind: EntryKind,
    info: os.stat_result,
    *,
    linkname: bytes = b"",
    content: ContentRef | None = None,
    rdev: int | None = None,
) -> TarEntry:
    return TarEntry(
        name,
        kind,
        stat.S_IMODE(info.st_mode),
        info.st_uid,
        info.st_gid,
        int(info.st_mtime // 1),
        linkname,
        os.major(rdev) if rdev is not None else 0,
        os.minor(rdev) if rdev is not None else 0,
        content,
    )


def parse_cmd(value: str | None) -> tuple[str, ...] | None:
    """``--cmd`` as a JSON array (``'["/app", "-v"]'``) or a whitespace-separated command line."""
    if value is None:
        return None
    if value.lstrip().startswith("["):
        try:
            result = _strings(parse_json(value.encode(), "--cmd"), "--cmd")
        except MalformedInput as exc:
            raise UsageError(f"{exc} (expected a JSON array of strings)") from None
        assert result is not None
        return result
    return tuple(value.split())


def check_env(values: Sequence[str]) -> tuple[str, ...]:
    """``--env KEY=VALUE`` items; ``init`` splits ``/env`` on newlines, so a value cannot contain one."""
    for item in values:
        if "=" not in item or item.startswith("=") or "\n" in item:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE on one line")
    return tuple(values)


# -- a Docker daemon, when one is reachable --------------------------------------------------------------


def export_from_docker(uri: str, destination: Path, *, docker: str = "docker") -> Path:
    """``docker save`` of ``uri`` (pulled first if the daemon lacks it) into ``destination``.

    Needs the ``docker`` client and a reachable daemon; otherwise a :class:`UsageError` says how to
    build from an exported image instead.
    """
    executable = shutil.which(docker)
    advice = (
        "export the image where Docker runs (docker save IMAGE -o image.tar, or skopeo copy "
        "docker://IMAGE oci-archive:image.tar) and pass --image image.tar"
    )
    if executable is None:
        raise UsageError(f"--docker-uri needs the docker client, which is not installed; {advice}")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [executable, *args], capture_output=True, text=True, check=False, timeout=3600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UsageError(f"running docker {args[0]} failed ({exc}); {advice}") from None

    if run("image", "inspect", uri).returncode != 0:
        pulled = run("pull", uri)
        if pulled.returncode != 0:
            raise UsageError(
                f"Docker could not provide {uri!r}: {pulled.stderr.strip() or 'no output'}; {advice}"
            )
    target = destination / "docker-save.tar"
    saved = run("save", "-o", str(target), uri)
    if saved.returncode != 0 or not target.is_file():
        raise UsageError(
            f"docker save {uri} failed: {saved.stderr.strip() or 'no output'}; {advice}"
        )
    return target


def docker_daemon_reachable(*, docker: str = "docker", timeout: float = 10.0) -> bool:
    """Whether the ``docker`` client is installed and its daemon answers ``docker version``."""
    executable = shutil.which(docker)
    if executable is None:
        return False
    try:
        done = subprocess.run(
            [executable, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())
