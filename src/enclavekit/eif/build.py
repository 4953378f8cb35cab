"""``build-enclave`` without a Docker daemon: image → merged root fs → linuxkit-style ramdisks → EIF.

Steps (each input byte is read once, each output byte written once):

1. Find the blobs (kernel, cmdline, init, nsm.ko) and refuse early if any is missing.
2. Index every layer's entries into a :class:`~enclavekit.eif.layers.MergedTree`. Gzip layers are
   streamed once, hashed (digest, diff_id) while unpacked into a spool file beside the output;
   uncompressed layers are referenced in place, their headers parsed here while worker threads hash
   them (:class:`DigestChecks`, waited for before the EIF is committed).
3. Add what ``docker create`` adds (its init layer), so the listing matches ``docker export``.
   (A single layer already in walk order skips the tree: :mod:`~enclavekit.eif.layerstream` lists it in
   one pass while the EIF is written, and hands over to the tree at the first entry it cannot list.)
4. Write the EIF with :func:`enclavekit.eif.writer.write_eif_file`: the bootstrap ramdisk (``dev``,
   ``init``, ``nsm.ko``) and the customer ramdisk streamed from the merged tree, measured as they are
   written. The output appears atomically; on any error (a layer digest mismatch included) no ``.eif``
   is left behind.

Reproducible: nothing depends on the clock, umask, time zone or host; ``BuildTime`` comes from
``SOURCE_DATE_EPOCH`` (passed in), else the image's ``created`` time, else the Unix epoch.

Not reproduced from nitro-cli: ``DockerInfo`` (nitro-cli stores the daemon's ``docker inspect``; we store
the same fields derived from the image config), ``BuildTool`` (``enclavekit``), and mount points Docker
creates for ``WORKDIR``/``VOLUME`` at ``docker create`` time when the image lacks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from enclavekit.eif.image import (
    Image,
    LayerBlob,
    LayerStream,
    RootfsDir,
    SourceRestarted,
    rootfs_entries,
)
from enclavekit.eif.layers import (
    ContentReader,
    ContentRef,
    EntryKind,
    MergedTree,
    Spool,
    TarEntry,
)
from enclavekit.eif.layerstream import NotStreamable, streamed_listing
from enclavekit.eif.measure import HASH_ALGORITHM_SHA384, Measurements
from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.ramdisk import (
    Listing,
    argv_file,
    bootstrap_ramdisk,
    customer_ramdisk_chunks,
)
from enclavekit.eif.sign import EifSigner
from enclavekit.eif.writer import WrittenEif, write_eif_file
from enclavekit.errors import MalformedInput, UsageError

log = logging.getLogger(__name__)

#: Where nitro-cli's RPM installs its blobs (used when neither --blobs nor NITRO_CLI_BLOBS is set).
DEFAULT_BLOBS_DIR = Path("/usr/share/nitro_enclaves/blobs")
#: Kernel file name per architecture, as nitro-cli ships them.
KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
#: Blobs larger than this are refused (nitro-cli's are a few MiB); they are read into memory.
MAX_SMALL_BLOB = 64 << 20
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Progress = Callable[[str], None]


# -- blobs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blobs:
    """nitro-cli's blobs for one architecture."""

    directory: Path
    arch: str
    kernel: Path
    cmdline: bytes  # trimmed, as stored in the EIF
    init: Path
    nsm_ko: Path
    operating_system: str
    kernel_version: str

    @classmethod
    def load(cls, directory: Path, arch: str) -> Blobs:
        """Check that every blob exists; a missing one is a :class:`UsageError` naming all of them."""
        kernel_name = KERNEL_NAMES[arch]
        paths = {name: directory / name for name in (kernel_name, "cmdline", "init", "nsm.ko")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise UsageError(
                f"missing blobs for {arch}: {', '.join(missing)}; pass --blobs DIR (or set "
                f"NITRO_CLI_BLOBS) to a directory holding {kernel_name}, cmdline, init and nsm.ko "
                "as nitro-cli ships them"
            )
        raw_cmdline = _read_small(paths["cmdline"])
        cmdline = raw_cmdline.strip()
        if b"\0" in cmdline:
            raise MalformedInput(f"{paths['cmdline']} contains a NUL byte")
        os_name, kernel_version = kernel_config_info(directory / f"{kernel_name}.config")
        return cls(
            directory,
            arch,
            paths[kernel_name],
            cmdline,
            paths["init"],
            paths["nsm.ko"],
            os_name,
            kernel_version,
        )


def blobs_directory(explicit: str | Path | None, environ: Mapping[str, str]) -> Path:
    """``--blobs``, else ``NITRO_CLI_BLOBS``, else nitro-cli's install location."""
    if explicit:
        return Path(explicit)
    if environ.get("NITRO_CLI_BLOBS"):
        return Path(environ["NITRO_CLI_BLOBS"])
    return DEFAULT_BLOBS_DIR


def kernel_config_info(path: Path) -> tuple[str, str]:
    """``OperatingSystem`` and ``KernelVersion`` as nitro-cli reads them: line 3 of the kernel config
    split on spaces, ``/`` and ``-``, words 1 and 3 (``Unknown`` when absent)."""
    try:
        lines = _read_small(path).decode("utf-8", "replace").splitlines()
    except UsageError:
        return "Unknown", "Unknown"
    words = re.split(r"[ /-]", lines[2]) if len(lines) > 2 else []
    return (
        words[1] if len(words) > 1 else "Unknown",
        words[3] if len(words) > 3 else "Unknown",
    )


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SMALL_BLOB + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SMALL_BLOB:
        raise MalformedInput(f"{path} is larger than {MAX_SMALL_BLOB} bytes")
    return data


# -- build time ------------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d{1,9})\d*)?(Z|z|[+-]\d\d:\d\d)$"
)


def build_time(source_date_epoch: str | None, created: str | None) -> str:
    """chrono's ``to_rfc3339()`` text (UTC, ``+00:00``; fraction of 0, 3, 6 or 9 digits) for
    ``SOURCE_DATE_EPOCH``, else the image's ``created`` time, else the Unix epoch."""
    if source_date_epoch is not None:
        if not source_date_epoch.isdigit():
            raise UsageError(
                f"SOURCE_DATE_EPOCH must be a non-negative integer (seconds), found "
                f"{source_date_epoch!r}"
            )
        moment = datetime.fromtimestamp(int(source_date_epoch), UTC)
        return _rfc3339(moment, 0)
    if created:
        match = _RFC3339.match(created)
        if match is not None:
            date, clock, fraction, zone = match.groups()
            zone = "+00:00" if zone in ("Z", "z") else zone
            try:
                moment = datetime.fromisoformat(f"{date}T{clock}{zone}").astimezone(UTC)
            except ValueError:
                pass
            else:
                return _rfc3339(moment, int((fraction or "0").ljust(9, "0")))
        log.warning("image 'created' time %r is not RFC 3339; using the Unix epoch", created)
    return _rfc3339(datetime.fromtimestamp(0, UTC), 0)


def _rfc3339(moment: datetime, nanos: int) -> str:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        if nanos % 1_000_000 == 0:
            text += f".{nanos // 1_000_000:03d}"
        elif nanos % 1000 == 0:
            text += f".{nanos // 1000:06d}"
        else:
            text += f".{nanos:09d}"
    return text + "+00:00"


# -- reading layers --------------------------------------------------------------------------------------


class _HashingReader:
    """Reads ``size`` bytes from a file region, feeding every byte to ``hashers``."""

    def __init__(self, stream: BinaryIO | _Resumed, size: int, hashers: Sequence[Any]) -> None:
        self._stream = stream
        self._remaining = size
        self._hashers = hashers

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._remaining:
            n = self._remaining
        data = self._stream.read(n)
        if len(data) < n:
            raise MalformedInput("the layer blob ended early (truncated file)")
        self._remaining -= len(data)
        for hasher in self._hashers:
            hasher.update(data)
        return data


def _gunzip(raw: _HashingReader, label: str) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-member) gzip stream, never more than 1 MiB at once."""
    decompressor = zlib.decompressobj(31)
    in_member = False
    pending = b""
    try:
        while True:
            if not pending:
                pending = raw.read(_CHUNK)
                if not pending:
                    if in_member:
                        tail = decompressor.flush()
                        if tail:
                            yield tail
                        if not decompressor.eof:
                            raise MalformedInput(f"{label}: the gzip stream is truncated")
                    return
            in_member = True
            out = decompressor.decompress(pending, _CHUNK)
            if out:
                yield out
            if decompressor.eof:
                pending = decompressor.unused_data
                decompressor = zlib.decompressobj(31)
                in_member = False
            else:
                pending = decompressor.unconsumed_tail
    except zlib.error as exc:
        raise MalformedInput(f"{label}: corrupt gzip data ({exc})") from None


def _hasher(digest: str | None) -> Any:
    return hashlib.new(digest.partition(":")[0]) if digest else None


def _check(label: str, what: str, expected: str | None, hasher: Any) -> None:
    if expected is None or hasher is None:
        return
    found = f"{expected.partition(':')[0]}:{hasher.hexdigest()}"
    if found != expected:
        raise MalformedInput(
            f"{label}: {what} mismatch: expected {expected}, found {found}; the image is corrupt "
            "or was tampered with (export it again)"
        )


class DigestChecks:
    """Digest checks of uncompressed layers, run on worker threads while the build goes on.

    The build parses the layer's headers and writes the EIF's temp file meanwhile; :meth:`wait` is
    called before the output is committed, so a layer whose bytes are not what the image promises
    still leaves no ``.eif`` behind. Parsing before the check widens nothing: whoever can change a layer
    can also change the config that holds its digest, so the tar parser is hardened for hostile input
    either way; the check is for corruption and mismatched exports.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=workers or min(2, os.cpu_count() or 1), thread_name_prefix="layer-digest"
        )
        self._futures: list[Future[None]] = []
        self._stop = threading.Event()

    def submit(self, layer: LayerBlob, location: ContentRef) -> None:
        """Hash ``location`` (the layer's bytes) and compare with its digest and diff_id."""
        self._futures.append(self._pool.submit(_check_uncompressed, layer, location, self._stop))

    def wait(self) -> None:
        """Block until every check ran; raise the first failure (in layer order)."""
        for future in self._futures:
            future.result()

    def close(self) -> None:
        """Stop outstanding checks (an error elsewhere ended the build) and the threads."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DigestChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_uncompressed(layer: LayerBlob, location: ContentRef, stop: threading.Event) -> None:
    blob_hasher = _hasher(layer.digest)
    # An uncompressed layer is its own diff: one pass checks both digests.
    diff_hasher = blob_hasher if layer.digest == layer.diff_id else _hasher(layer.diff_id)
    hashers = list({id(h): h for h in (blob_hasher, diff_hasher) if h}.values())
    if not hashers:
        return
    _hash_region(location, hashers, stop)
    if stop.is_set():
        return
    _check(layer.label, "layer digest", layer.digest, blob_hasher)
    _check(layer.label, "diff_id", layer.diff_id, diff_hasher)


def index_layer(tree: MergedTree, layer: LayerBlob, spool: Spool, checks: DigestChecks) -> None:
    """Apply one layer to ``tree``; its digest and diff_id are checked.

    Uncompressed layers are hashed on a worker thread of ``checks`` while only their headers are parsed
    here (the caller must call ``checks.wait()`` before trusting the result).
    Gzip layers are hashed while they are unpacked into ``spool``, checked, then parsed there.
    """
    location = unpacked_layer(layer, spool, checks)
    try:
        tree.add_layer(location, label=layer.label)
    except MalformedInput:
        checks.wait()  # a digest mismatch explains a damaged tar better than the damage does
        raise


def unpacked_layer(layer: LayerBlob, spool: Spool, checks: DigestChecks) -> ContentRef:
    """Where the uncompressed tar of ``layer`` lies: in place (its digests checked on ``checks``,
    meanwhile), or for a gzip layer in ``spool`` (unpacked once, hashed on the way, checked)."""
    location = layer.location
    if layer.stream is not None:
        # Still downloading (registry pull): a gzip layer is unpacked while it arrives; nothing is
        # parsed before both digests are checked (by _unpacked_gzip).
        try:
            with layer.stream() as arriving:
                magic = arriving.read(4)
                if magic.startswith(_GZIP_MAGIC):
                    return _unpacked_arriving_gzip(layer, spool, _Resumed(magic, arriving))
        except SourceRestarted:
            pass  # nothing unpacked yet: read it from its verified file below
    if layer.wait is not None:
        layer.wait()  # the verified bytes of a layer still downloading, or why they never came
    with open(location.path, "rb") as handle:
        handle.seek(location.offset)
        magic = handle.read(4)
    if magic.startswith(_ZSTD_MAGIC):
        raise MalformedInput(
            f"{layer.label}: zstd-compressed layers are not supported; convert the image to gzip "
            "layers (e.g. skopeo copy --dest-compress-format gzip)"
        )
    if not magic.startswith(_GZIP_MAGIC):
        checks.submit(layer, location)
        return location
    return _unpacked_gzip(layer, spool, None)


class _Resumed:
    """``head`` (bytes already read from ``stream``), then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: LayerStream) -> None:
        self._head = head
        self._stream = stream
        self.source_checks_digest = stream.source_checks_digest

    def read(self, n: int = -1, /) -> bytes:
        head = self._head
        if not head:
            return self._stream.read(n)
        self._head = b""
        if n is not None and 0 <= n < len(head):
            self._head = head[n:]
            return head[:n]
        more = self._stream.read(-1 if n is None or n < 0 else n - len(head))
        return head + more if more else head

    def checked(self) -> bool:
        return self._stream.checked()

    def close(self) -> None:
        self._stream.close()


def _unpacked_arriving_gzip(layer: LayerBlob, spool: Spool, stream: _Resumed) -> ContentRef:
    """A gzip layer unpacked from ``stream`` while it downloads. When the download itself checks the
    digest over exactly the bytes read (``source_checks_digest``), they are not hashed again here;
    should that check not cover them in the end (a retried download, batches it dropped, a layer
    found in the cache), or should they fail to unpack before it did, the layer is unpacked once
    more from its verified file and hashed here, as any layer is: the verdict is the file's."""
    mark = spool.mark()
    try:
        return _unpacked_gzip(layer, spool, stream)
    except SourceRestarted:
        pass
    spool.rewind(mark)
    if layer.wait is not None:
        layer.wait()  # the verified file, or why it never came
    return _unpacked_gzip(layer, spool, None)


def _unpacked_gzip(layer: LayerBlob, spool: Spool, stream: _Resumed | None) -> ContentRef:
    """A gzip layer unpacked once into the spool (hashed on the way in and out) and checked; it is
    then parsed in place like an uncompressed one. ``stream``: read it as it arrives; when its source
    checks the blob's digest, ``stream.checked()`` must say so, or :class:`SourceRestarted` is
    raised."""
    location = layer.location
    source_checks = stream is not None and stream.source_checks_digest
    blob_hasher = None if source_checks else _hasher(layer.digest)
    diff_hasher = _hasher(layer.diff_id)
    try:
        with contextlib.ExitStack() as files:
            handle: BinaryIO | _Resumed = (
                stream if stream is not None else files.enter_context(_opened_at(location))
            )
            raw = _HashingReader(handle, location.size, [h for h in (blob_hasher,) if h])
            unpacked = spool.append(_hashed(_gunzip(raw, layer.label), diff_hasher))
    except MalformedInput:
        if stream is not None:
            stream.close()  # a download waiting for this reader to take held bytes goes on
        if layer.wait is not None:
            layer.wait()  # bytes that are not gzip may be a registry's bad blob: say that first
        if stream is not None and not stream.checked():
            # Bytes read while the layer arrived may be a failed attempt's: only the verified
            # file may fail the build.
            raise SourceRestarted(layer.label) from None
        raise
    if layer.wait is not None:
        layer.wait()  # the download's own verdict first (a registry's bad blob is named as such)
    if source_checks:
        assert stream is not None
        if not stream.checked():
            raise SourceRestarted(layer.label)
    else:
        _check(layer.label, "layer digest", layer.digest, blob_hasher)
    _check(layer.label, "diff_id", layer.diff_id, diff_hasher)
    spool.flush()
    return unpacked


@contextmanager
def _opened_at(location: ContentRef) -> Iterator[BinaryIO]:
    with open(location.path, "rb") as handle:
        handle.seek(location.offset)
        yield handle


def _hashed(chunks: Iterator[bytes], hasher: Any) -> Iterator[bytes]:
    for chunk in chunks:
        if hasher is not None:
            hasher.update(chunk)
        yield chunk


def _hash_region(location: ContentRef, hashers: Sequence[Any], stop: threading.Event) -> None:
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    remaining = location.size
    with open(location.path, "rb", buffering=0) as handle:
        handle.seek(location.offset)
        while remaining and not stop.is_set():
            n = handle.readinto(view[: min(_CHUNK, remaining)])
            if not n:
                raise MalformedInput(
                    f"{location.path}: the layer blob ended early (truncated file)"
                )
            for hasher in hashers:
                hasher.update(view[:n])
            remaining -= n


def docker_init_layer() -> list[TarEntry]:
    """What ``docker create`` puts in a container's init layer (moby ``initlayer.Setup``): it sits
    above the image, so these entries win over the image's own."""
    d, f = EntryKind.DIRECTORY, EntryKind.REGULAR
    names = [
        (b"dev", d),
        (b"dev/pts", d),
        (b"dev/shm", d),
        (b"proc", d),
        (b"sys", d),
        (b"etc", d),
        (b".dockerenv", f),
        (b"etc/resolv.conf", f),
        (b"etc/hosts", f),
        (b"etc/hostname", f),
        (b"dev/console", f),
    ]
    entries = [TarEntry(name, kind, 0o755) for name, kind in names]
    entries.append(TarEntry(b"etc/mtab", EntryKind.SYMLINK, 0o777, linkname=b"/proc/mounts"))
    return entries


# -- the build -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What :func:`build_enclave` produced."""

    path: Path
    measurements: Measurements
    size: int
    metadata: IdentityInfo


def index_image(
    source: Image | RootfsDir,
    spool: Spool,
    checks: DigestChecks,
    progress: Progress | None = None,
) -> MergedTree:
    """Every layer applied in order (plus Docker's init layer for images). Digests of uncompressed layers
    are checked on ``checks`` while this goes on: call ``checks.wait()`` before trusting the tree."""
    tree = MergedTree()
    if isinstance(source, RootfsDir):
        tree.begin_layer(f"{source.path}")
        for entry in rootfs_entries(source.path):
            tree.apply(entry)
        return tree
    for number, layer in enumerate(source.layers, 1):
        _reading(progress, layer, number, len(source.layers))
        index_layer(tree, layer, spool, checks)
    _add_init_layer(tree, docker_init_layer())
    spool.flush()
    return tree


def _reading(progress: Progress | None, layer: LayerBlob, number: int, layers: int) -> None:
    if progress is not None:
        progress(f"Reading {layer.label} ({number}/{layers}, {layer.location.size / 1e6:.1f} MB)")


def _add_init_layer(tree: MergedTree, entries: Sequence[TarEntry]) -> None:
    """Docker's init layer on top of the image's (see :func:`docker_init_layer`)."""
    tree.begin_layer("docker init layer")
    for entry in entries:
        tree.apply(entry)


def docker_info(image: Image) -> dict[str, Any]:
    """The ``docker inspect`` fields derivable from the image itself (no daemon state)."""
    raw = image.config.raw
    return {
        "Architecture": image.config.architecture,
        "Config": raw.get("config") or {},
        "Created": image.config.created,
        "Id": f"sha256:{image.config.image_id}",
        "Os": image.config.os,
        "RepoDigests": [],
        "RepoTags": list(image.repo_tags),
        "RootFS": {"Layers": list(image.config.diff_ids), "Type": "layers"},
    }


def build_enclave(
    source: Image | RootfsDir,
    output: str | Path,
    *,
    blobs_dir: Path,
    name: str | None = None,
    version: str | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] = (),
    arch: str | None = None,
    signer: EifSigner | None = None,
    custom_metadata: Any = None,
    source_date_epoch: str | None = None,
    hash_algorithm: str = HASH_ALGORITHM_SHA384,
    image_name: str | None = None,
    progress: Progress | None = None,
    written: Callable[[int], None] | None = None,
) -> BuildResult:
    """Build ``output`` from ``source``. ``cmd``/``env`` are for root-fs directories only (an image's
    config supplies them). ``image_name`` is the name to record when ``name`` is not given.
    ``progress`` gets one line per step; ``written`` the number of EIF bytes written so far."""
    output = Path(output)
    if isinstance(source, Image):
        if cmd is not None or env:
            raise UsageError(
                "--cmd/--env apply to a root file-system directory; an image's config "
                "supplies its own"
            )
        image_arch = source.config.arch
        if arch is not None and arch != image_arch:
            raise UsageError(
                f"--arch {arch} does not match the image's architecture ({image_arch})"
            )
        arch = image_arch
        argv = source.config.argv()
        environment: Sequence[str] = source.config.env
    else:
        if cmd is None:
            raise UsageError("a root file-system directory needs --cmd (what the enclave runs)")
        if output.resolve().is_relative_to(source.path.resolve()):
            raise UsageError(
                f"the output {output} lies inside the root file system {source.path}; write it "
                "elsewhere (it would be packed into itself)"
            )
        arch = arch or "x86_64"
        argv, environment = tuple(cmd), tuple(env)
    if arch not in KERNEL_NAMES:
        raise UsageError(f"--arch must be x86_64 or aarch64, found {arch!r}")
    # 1. Blobs.
    blobs = Blobs.load(blobs_dir, arch)
    cmd_file, env_file = argv_file(argv), argv_file(environment)
    bootstrap = bootstrap_ramdisk(_read_small(blobs.init), _read_small(blobs.nsm_ko))
    metadata = _metadata(
        source, blobs, name, version, image_name, custom_metadata, source_date_epoch
    )
    if not output.parent.is_dir():
        raise UsageError(f"the output directory {output.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        spool = Spool(str(Path(scratch) / "spool"))
        try:
            with DigestChecks() as checks:

                def write(
                    listing: Callable[[ContentReader], Iterable[TarEntry] | Listing],
                ) -> WrittenEif:
                    # 4. Write the EIF, streaming the customer ramdisk.
                    if progress is not None:
                        progress("Writing the Enclave Image File...")
                    with ContentReader() as reader:
                        chunks = _then(
                            customer_ramdisk_chunks(
                                listing(reader), cmd=cmd_file, env=env_file, read=reader.chunks
                            ),
                            checks.wait,  # before the EIF is committed: a bad layer leaves no output
                        )
                        return write_eif_file(
                            output,
                            kernel=blobs.kernel,
                            cmdline=blobs.cmdline,
                            ramdisks=[bootstrap, chunks],
                            metadata=metadata,
                            signer=signer,
                            arch="aarch64" if arch == "aarch64" else "x86_64",
                            hash_algorithm=hash_algorithm,
                            progress=written,
                        )

                if isinstance(source, Image) and len(source.layers) == 1:
                    result = _build_single_layer(source.layers[0], spool, checks, write, progress)
                else:
                    # 2-3. Index the layers (uncompressed layers' digests are checked meanwhile, on
                    #      worker threads).
                    tree = index_image(source, spool, checks, progress)
                    spool.flush()
                    result = write(tree.export)
        finally:
            spool.close()
    return BuildResult(output, result.measurements, result.size, metadata)


def _build_single_layer(
    layer: LayerBlob,
    spool: Spool,
    checks: DigestChecks,
    write: Callable[[Callable[[ContentReader], Iterable[TarEntry] | Listing]], WrittenEif],
    progress: Progress | None,
) -> WrittenEif:
    """One layer: listed straight from its tar when it is in walk order (:mod:`.layerstream`), else
    (at the first entry that needs it, the partial EIF discarded) through the merged tree."""
    _reading(progress, layer, 1, 1)
    location = unpacked_layer(layer, spool, checks)
    init = docker_init_layer()
    try:
        try:
            return write(
                lambda reader: (
                    lambda plain_files: streamed_listing(
                        location,
                        label=layer.label,
                        init_layer=init,
                        reader=reader,
                        plain=plain_files.add,
                    )
                )
            )
        except NotStreamable as why:
            log.debug(
                "%s is not listed in one pass (%s): building the merged tree", layer.label, why
            )
        tree = MergedTree()
        tree.add_layer(location, label=layer.label)
        _add_init_layer(tree, init)
        return write(tree.export)
    except MalformedInput:
        checks.wait()  # a digest mismatch explains a damaged tar better than the damage does
        raise


def _then(chunks: Iterator[bytes], last: Callable[[], None]) -> Iterator[bytes]:
    """``chunks``, then ``last()`` (which may raise) once they are exhausted."""
    yield from chunks
    last()


def _untagged(repo_tag: str) -> str:
    """``host:5000/app:1`` → ``host:5000/app``; ``app:1`` → ``app`` (a registry port is kept)."""
    name, colon, tag = repo_tag.rpartition(":")
    return name if colon and "/" not in tag else repo_tag


def _metadata(
    source: Image | RootfsDir,
    blobs: Blobs,
    name: str | None,
    version: str | None,
    image_name: str | None,
    custom_metadata: Any,
    source_date_epoch: str | None,
) -> IdentityInfo:
    if isinstance(source, Image):
        default_name = image_name or (
            _untagged(source.repo_tags[0]) if source.repo_tags else Path(source.source).name
        )
        default_version = source.config.image_id
        created = source.config.created
        info: Any = docker_info(source)
    else:
        default_name = image_name or source.path.name
        default_version = "1.0"
        created = None
        info = None
    return IdentityInfo(
        name or default_name,
        version or default_version,
        BuildInfo(
            build_time=build_time(source_date_epoch, created),
            operating_system=blobs.operating_system,
            kernel_version=blobs.kernel_version,
        ),
        info,
        custom_metadata,
    )
