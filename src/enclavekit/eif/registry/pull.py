"""Pull an image from a registry into the blob cache and open it as an :class:`~enclavekit.eif.image.Image`.

Steps: resolve the reference's manifest (an OCI index or Docker manifest list picks the platform:
``linux``, the wanted architecture, and the variant when one is asked for), fetch and check the
config, then stream every layer into the :class:`~enclavekit.eif.registry.cache.BlobCache`, each
hashed while it arrives. The :class:`Image` points at the cached files, so the build reads the same
bytes a local OCI layout or ``docker save`` of the image would hold: the EIF is byte-identical.
:func:`start_pull` downloads the layers in order on one background thread while the caller builds:
each layer's ``stream`` reads its bytes as they arrive, its ``wait`` blocks until the verified file
is in the cache. A pull then costs little more than the slower of download and build.

The first reader of a layer takes the downloaded batches from memory, the very ``bytes`` objects
the cache hashed and wrote (:class:`_HeldReader`): the build then neither re-reads the file nor
hashes the compressed bytes a second time, and relies on the download's digest check, which covers
exactly what it read (``checked()``; a retry after bytes were read, or batches dropped before the
build came to the layer, and the build hashes the layer itself, as for any other reader). At most
:data:`MAX_HELD` bytes are held: a download that far ahead of the build waits for a layer the build
reads, and drops what it held of a layer nobody reads yet (that layer is then read from the file and
hashed by the build: the same verdict, one more pass).

Checked: manifest digests (by digest: against the reference; by tag: against
``Docker-Content-Digest`` when sent), media types, descriptor sizes, every blob's digest and size,
layer count against the config's ``diff_ids`` (the diff_ids themselves are checked by the build).
Not supported: schema 1 manifests, foreign/non-distributable layers, encrypted layers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavekit.eif.image import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    ImageConfig,
    LayerBlob,
    SourceRestarted,
    check_digest,
    manifest_layers,
    parse_config,
    parse_json,
)
from enclavekit.eif.layers import ContentRef
from enclavekit.eif.registry.auth import Credentials, find_credentials
from enclavekit.eif.registry.cache import BlobCache
from enclavekit.eif.registry.client import RegistryClient
from enclavekit.eif.registry.reference import ImageReference, parse_reference
from enclavekit.errors import MalformedInput, UsageError

MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
CONFIG_TYPES = {
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}
#: ``--arch`` spellings → (image architecture, variant or None).
PLATFORMS = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "arm64/v8": ("arm64", "v8"),
}

#: Bytes the blob cache hashes and writes at once while a layer streams in.
_BATCH = 1 << 20
#: Bytes of downloaded layer data held in memory for the build (see the module docstring).
MAX_HELD = 64 << 20
#: Seconds :meth:`PullInProgress.close` waits for the download thread to stop.
CLOSE_TIMEOUT = 1.0

#: ``progress(label, done, total)``: called with done=0 when a blob starts, then as bytes arrive;
#: ``done == total`` when it is complete (from the cache or the network).
BlobProgress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class PulledImage:
    image: Image
    reference: ImageReference
    manifest_digest: str


def pull_image(
    reference: str | ImageReference,
    *,
    arch: str | None = None,
    cache: BlobCache | None = None,
    credentials: Credentials | None = None,
    insecure_registries: Sequence[str] = (),
    progress: BlobProgress | None = None,
    warn: Callable[[str], None] | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> PulledImage:
    """Pull ``reference`` (Docker's syntax) for ``arch`` (``x86_64``/``amd64``, ``aarch64``/``arm64``,
    ``arm64/v8``; default amd64) and return once every layer is in the cache. Credentials default to
    Docker's sources (see :mod:`~enclavekit.eif.registry.auth`). :func:`start_pull` returns as soon as
    the manifest and config are checked, to build while the layers arrive."""
    with start_pull(
        reference,
        arch=arch,
        cache=cache,
        credentials=credentials,
        insecure_registries=insecure_registries,
        progress=progress,
        warn=warn,
        client_options=client_options,
    ) as pending:
        return pending.finish()


def start_pull(
    reference: str | ImageReference,
    *,
    arch: str | None = None,
    cache: BlobCache | None = None,
    credentials: Credentials | None = None,
    insecure_registries: Sequence[str] = (),
    progress: BlobProgress | None = None,
    warn: Callable[[str], None] | None = None,
    client_options: Mapping[str, Any] | None = None,
    hold: int = MAX_HELD,
) -> PullInProgress:
    """Resolve and check ``reference``'s manifest and config, then download its layers in order on a
    background thread (arguments as :func:`pull_image`; ``hold``: bytes of downloaded batches kept
    in memory for the layers' first readers, 0 for none). Use the result as a context manager."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    if arch is not None and arch not in PLATFORMS:
        raise UsageError(f"--arch {arch!r}: expected one of {', '.join(PLATFORMS)}")
    want_arch, want_variant = PLATFORMS[arch or "amd64"]
    cache = cache or BlobCache()
    if credentials is None:
        credentials = find_credentials(ref.registry)
    insecure = ref.registry in insecure_registries or ref.api_host in insecure_registries
    client = RegistryClient(
        ref, credentials=credentials, insecure=insecure, warn=warn, **(client_options or {})
    )
    try:
        top = client.manifest(ref.reference, MANIFEST_TYPES)
        manifest_obj, media_type, digest = _decode(top.data, top.media_type, f"{ref}")
        if media_type in (OCI_INDEX, DOCKER_LIST):
            chosen = _select(manifest_obj, want_arch, want_variant, ref)
            child = client.manifest(chosen, MANIFEST_TYPES)
            manifest_obj, media_type, digest = _decode(
                child.data, child.media_type, f"{ref} ({want_arch})"
            )
            if media_type in (OCI_INDEX, DOCKER_LIST):
                raise MalformedInput(f"{ref}: an index inside an index is not supported")
            digest = child.digest
        else:
            digest = top.digest
        config_desc = _descriptor(manifest_obj.get("config"), f"{ref}: config")
        if config_desc.media_type not in CONFIG_TYPES:
            raise UsageError(
                f"{ref} is not a container image (config media type {config_desc.media_type!r}); "
                "an enclave needs an OCI or Docker image"
            )
        config_bytes = client.blob_bytes(config_desc.digest, config_desc.size, f"{ref}: config")
        config = parse_config(config_bytes, f"{ref}: image config")
        layer_list = manifest_layers(manifest_obj, config, str(ref))
        wanted = []
        for i, raw in enumerate(layer_list):
            desc = _descriptor(raw, f"{ref}: layer {i}")
            if desc.media_type not in LAYER_TYPES:
                raise UsageError(
                    f"{ref}: layer {i} has media type {desc.media_type!r}; supported are "
                    + ", ".join(sorted(LAYER_TYPES))
                )
            wanted.append((desc, f"layer {i} ({desc.digest[:19]})"))
    except BaseException:
        client.close()
        raise
    return PullInProgress(ref, digest, config, wanted, client, cache, progress, hold=hold)


class PullInProgress:
    """A pull whose manifest and config are checked and whose layers download, in order, on a
    background thread into the blob cache.

    :attr:`image` is usable at once: each layer's ``wait`` blocks until that layer's verified bytes
    are in the cache and raises the download's error if they never will be (a build reads layers in
    order, so it overlaps each layer's download with the work on the layers before). Nothing is
    trusted early: a layer is readable only after the cache checked its digest and size. Leaving
    the context stops the download and closes the connection; :meth:`finish` waits for every layer.
    """

    def __init__(
        self,
        reference: ImageReference,
        manifest_digest: str,
        config: ImageConfig,
        wanted: Sequence[tuple[_Descriptor, str]],
        client: RegistryClient,
        cache: BlobCache,
        progress: BlobProgress | None,
        *,
        hold: int = MAX_HELD,
    ) -> None:
        self.reference = reference
        self.manifest_digest = manifest_digest
        self._client = client
        self._cache = cache
        self._progress = progress
        self._wanted = list(wanted)
        self._done = [threading.Event() for _ in self._wanted]
        self._errors: list[BaseException | None] = [None] * len(self._wanted)
        self._stop = threading.Event()
        # Per layer: the current download attempt's temporary file and how much of it is written.
        self._arrived = threading.Condition()
        self._partial: list[tuple[str, int] | None] = [None] * len(self._wanted)
        self._attempt = [0] * len(self._wanted)  # download attempts begun, per layer
        # Per layer: the current attempt's batches not yet taken by the layer's first reader (kept
        # while ``_retained``, which stays True only while they are all there from the attempt's
        # first byte on); ``_claimed``: a reader takes them; ``_served``: bytes it took; ``_mixed``:
        # an attempt restarted after it took some.
        count = len(self._wanted)
        self._hold = max(0, hold)
        self._held: list[collections.deque[bytes]] = [collections.deque() for _ in range(count)]
        self._head = [0] * count  # bytes of the first held batch already taken
        self._held_bytes = 0
        self._retained = [self._hold > 0] * count
        self._claimed = [False] * count
        self._served = [0] * count
        self._mixed = [False] * count
        layers = tuple(
            LayerBlob(
                ContentRef(str(cache.path(desc.digest)), 0, desc.size),
                label,
                desc.digest,
                diff_id,
                wait=functools.partial(self._wait, i),
                stream=functools.partial(self._follow, i),
            )
            for i, ((desc, label), diff_id) in enumerate(
                zip(self._wanted, config.diff_ids, strict=True)
            )
        )
        tags = () if reference.digest else (f"{reference.familiar_repository}:{reference.tag}",)
        self.image = Image(config, layers, f"docker://{reference}", tags)
        self._thread = threading.Thread(target=self._download, name="layer-pull", daemon=True)
        self._thread.start()

    def _download(self) -> None:
        for i, (desc, label) in enumerate(self._wanted):
            try:
                if self._stop.is_set():
                    raise _Cancelled()
                path = _fetch_layer(
                    self._client,
                    self._cache,
                    desc,
                    label,
                    self._progress,
                    self._stop,
                    functools.partial(self._written, i),
                )
                if path != self._cache.path(desc.digest):  # the cache's layout changed under us
                    raise AssertionError(f"{label}: cached at {path}, expected elsewhere")
            except BaseException as exc:  # handed to whoever waits for this layer or a later one
                # Once stopped, whatever closing the connection made the download raise is noise.
                error = _Cancelled() if self._stop.is_set() else exc
                with self._arrived:
                    for j in range(i, len(self._wanted)):
                        self._errors[j] = error
                        self._done[j].set()
                    self._arrived.notify_all()
                return
            with self._arrived:
                self._done[i].set()
                self._arrived.notify_all()

    def _written(self, index: int, path: str, written: int, chunk: bytes) -> None:
        """The download wrote (and hashed) ``chunk``; ``written`` bytes of this attempt are in
        ``path`` (a new path: a new attempt, starting over)."""
        with self._arrived:
            previous = self._partial[index]
            if previous is None or previous[0] != path:  # an attempt begins
                self._attempt[index] += 1
                if previous is not None:  # a retry starts over
                    self._drop(index)
                    if self._served[index]:
                        self._mixed[index] = True
                        self._retained[index] = False
            if chunk and self._retained[index]:
                if self._claimed[index]:
                    # Its reader frees memory as it goes: wait for it (never drop what it reads).
                    while (
                        self._claimed[index]
                        and self._held_bytes
                        and self._held_bytes + len(chunk) > self._hold
                        and not self._stop.is_set()
                    ):
                        self._arrived.wait()
                elif self._held_bytes + len(chunk) > self._hold:
                    self._drop(index)
                    self._retained[index] = False
                if self._retained[index] and not self._stop.is_set():
                    self._held[index].append(chunk)
                    self._held_bytes += len(chunk)
            self._partial[index] = (path, written)
            self._arrived.notify_all()

    def _drop(self, index: int) -> None:
        """Forget the batches held for layer ``index`` (the condition's lock is held)."""
        held = self._held[index]
        self._held_bytes -= sum(len(batch) for batch in held) - self._head[index]
        held.clear()
        self._head[index] = 0
        self._arrived.notify_all()

    def _release(self, index: int) -> None:
        with self._arrived:
            self._claimed[index] = False
            self._retained[index] = False
            self._drop(index)

    def _follow(self, index: int) -> _HeldReader | _LayerFollower:
        desc, label = self._wanted[index]
        with self._arrived:
            # Held from the attempt's first byte: everything, or all that arrived so far (a layer
            # served from the cache was never held: it is read from its file).
            complete_in_memory = not self._done[index].is_set() or (
                sum(len(batch) for batch in self._held[index]) == desc.size
            )
            if (
                self._retained[index]
                and not self._claimed[index]
                and self._served[index] == 0
                and self._errors[index] is None
                and complete_in_memory
            ):
                self._claimed[index] = True
                for earlier in range(index):  # the build reads in order: it is done with those
                    if not self._claimed[earlier]:
                        self._retained[earlier] = False
                        self._drop(earlier)
                return _HeldReader(self, index, desc.size)
        return _LayerFollower(functools.partial(self._readable, index), desc.size, label)

    def _take(self, index: int, n: int) -> bytes:
        """Up to ``n`` held bytes of layer ``index`` for its reader, blocking until some arrive;
        b"" at the end. Raises the download's error, or :class:`SourceRestarted`."""
        with self._arrived:
            while True:
                if self._mixed[index] or not self._retained[index]:
                    raise SourceRestarted(self._wanted[index][1])
                error = self._errors[index]
                if error is not None:
                    raise error
                held = self._held[index]
                if held:
                    first = held[0]
                    start = self._head[index]
                    if start == 0 and len(first) <= n:
                        data = held.popleft()
                    else:
                        data = first[start : start + n]
                        if start + len(data) == len(first):
                            held.popleft()
                            self._head[index] = 0
                        else:
                            self._head[index] = start + len(data)
                    self._held_bytes -= len(data)
                    self._served[index] += len(data)
                    self._arrived.notify_all()
                    return data
                if self._done[index].is_set():
                    if self._served[index] != self._wanted[index][0].size:
                        raise SourceRestarted(self._wanted[index][1])
                    return b""
                self._arrived.wait()

    def _checked(self, index: int) -> bool:
        with self._arrived:
            return (
                self._done[index].is_set()
                and self._errors[index] is None
                and not self._mixed[index]
                and self._served[index] == self._wanted[index][0].size
            )

    def _readable(self, index: int, position: int, gone: str | None) -> tuple[str, int, int]:
        """(file, bytes readable in it, download attempt) for layer ``index``, blocking until some
        past ``position`` exist in a file other than ``gone`` (one found removed: a failed
        attempt's); the cached file once the layer is complete; the download's error if it failed."""
        desc, label = self._wanted[index]
        with self._arrived:
            while True:
                error = self._errors[index]
                if error is not None:
                    raise error
                if self._done[index].is_set():
                    cached = str(self._cache.path(desc.digest))
                    if cached == gone:
                        raise MalformedInput(
                            f"{label}: {cached} was removed from the blob cache during the pull"
                        )
                    return cached, desc.size, self._attempt[index]
                partial = self._partial[index]
                if partial is not None and partial[1] > position and partial[0] != gone:
                    return partial[0], partial[1], self._attempt[index]
                self._arrived.wait()

    def _wait(self, index: int) -> None:
        self._done[index].wait()
        error = self._errors[index]
        if error is not None:
            raise error

    def finish(self) -> PulledImage:
        """Wait for every layer; the image with plain (already present) layers."""
        with self._arrived:  # nobody reads them from memory any more
            for i in range(len(self._wanted)):
                self._retained[i] = False
                self._drop(i)
        for i in range(len(self._wanted)):
            self._wait(i)
        layers = tuple(
            dataclasses.replace(layer, wait=None, stream=None) for layer in self.image.layers
        )
        image = dataclasses.replace(self.image, layers=layers)
        return PulledImage(image, self.reference, self.manifest_digest)

    def close(self) -> None:
        """Stop the download (between chunks) and close the connection."""
        self._stop.set()
        with self._arrived:  # a download waiting for the build to take held bytes goes on, to stop
            for i in range(len(self._wanted)):
                self._retained[i] = False
                self._drop(i)
        # Closing the connections ends a read blocked on a silent registry (the download then stops
        # and removes its temporary file); should it still hang, the daemon thread is left behind
        # and the file it was writing is removed here.
        with contextlib.suppress(Exception):
            self._client.close()
        self._thread.join(timeout=CLOSE_TIMEOUT)
        if self._thread.is_alive():
            with self._arrived:
                leftovers = [partial[0] for partial in self._partial if partial is not None]
            for name in leftovers:
                with contextlib.suppress(OSError):
                    os.unlink(name)

    def __enter__(self) -> PullInProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HeldReader:
    """The first reader of a layer: takes the download's batches from memory, the very objects the
    cache hashed (see the module docstring). ``read(n)`` blocks until ``n`` bytes (or the rest of the
    blob) arrived; :meth:`checked` (after the layer's ``wait``) says whether the download's digest
    check covers all that was read. Closing it early lets the download drop the rest."""

    source_checks_digest = True

    def __init__(self, pull: PullInProgress, index: int, size: int) -> None:
        self._pull = pull
        self._index = index
        self._remaining = size
        self._closed = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._remaining:
            n = self._remaining
        out: list[bytes] = []
        wanted = n
        while wanted > 0:
            data = self._pull._take(self._index, wanted)
            if not data:
                break
            out.append(data)
            wanted -= len(data)
        self._remaining -= n - wanted
        return out[0] if len(out) == 1 else b"".join(out)

    def checked(self) -> bool:
        return self._pull._checked(self._index)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pull._release(self._index)

    def __enter__(self) -> _HeldReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LayerFollower:
    """Reads a layer's bytes while they arrive: from the current download attempt's temporary file,
    then from the cache. ``read(n)`` blocks until ``n`` bytes (or the rest of the blob) are there.

    The bytes are *not verified* when they are read: whoever reads them must check the layer's digest
    itself before trusting what it made of them (the build does: a gzip layer is hashed while it is
    unpacked and checked before its tar is parsed), and call the layer's ``wait`` at the end for the
    cache's verdict. A retried download restarts its file: a follower that had read nothing goes on
    in the new one; one that had read bytes of the failed attempt raises :class:`SourceRestarted`
    (its reader then reads the layer from the verified file, as it would after a held reader's
    restart: the same verdict either way).
    """

    def __init__(
        self, readable: Callable[[int, str | None], tuple[str, int, int]], size: int, label: str
    ) -> None:
        self._readable = readable  # PullInProgress._readable for this layer
        self._size = size
        self._label = label
        self._pos = 0
        self._path: str | None = None
        self._handle: Any = None
        self._attempt: int | None = None

    source_checks_digest = False

    def checked(self) -> bool:
        return False  # its reader hashes what it read

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        out: list[bytes] = []
        wanted = min(n, self._size - self._pos)
        gone: str | None = None
        while wanted > 0:
            path, available, attempt = self._readable(self._pos, gone)
            if self._pos and attempt != self._attempt:
                self.close()
                raise SourceRestarted(self._label)
            self._attempt = attempt
            if path != self._path:
                self.close()
                try:
                    self._handle = open(path, "rb")  # noqa: SIM115 - closed by close()
                except FileNotFoundError:  # a failed attempt's file: wait for the next one
                    gone = path
                    continue
                self._path = path
            self._handle.seek(self._pos)
            data = self._handle.read(min(wanted, available - self._pos))
            if not data:  # shorter than written: changed behind our back
                raise MalformedInput(
                    f"{self._label}: {path} ended at {self._pos} bytes, "
                    f"{available} were written; was the blob cache changed during the pull?"
                )
            out.append(data)
            self._pos += len(data)
            wanted -= len(data)
        return b"".join(out)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._path = None

    def __enter__(self) -> _LayerFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cancelled(Exception):
    """The pull was closed before this layer arrived."""

    def __str__(self) -> str:
        return "the pull was stopped before this layer arrived"


@dataclass(frozen=True, slots=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int


def _descriptor(value: Any, what: str) -> _Descriptor:
    if not isinstance(value, dict):
        raise MalformedInput(f"{what}: expected a descriptor object")
    digest = check_digest(value.get("digest"), f"{what} digest")
    size = value.get("size")
    if type(size) is not int or size < 0:
        raise MalformedInput(f"{what}: 'size' must be a non-negative integer")
    media = value.get("mediaType")
    if not isinstance(media, str):
        raise MalformedInput(f"{what}: 'mediaType' must be a string")
    return _Descriptor(media, digest, size)


def _decode(data: bytes, header_type: str, what: str) -> tuple[dict[str, Any], str, str]:
    """(manifest object, media type, "") — the digest is the caller's (it knows how it fetched)."""
    obj = parse_json(data, f"{what}: manifest")
    if not isinstance(obj, dict):
        raise MalformedInput(f"{what}: the manifest is not a JSON object")
    body_type = obj.get("mediaType")
    media_type = body_type if isinstance(body_type, str) else header_type
    if isinstance(body_type, str) and header_type in MANIFEST_TYPES and header_type != body_type:
        raise MalformedInput(
            f"{what}: the registry labels the manifest {header_type} but it says {body_type}"
        )
    if media_type not in MANIFEST_TYPES:
        if obj.get("schemaVersion") == 1 or "prettyjws" in media_type:
            raise UsageError(
                f"{what} uses Docker's schema 1 manifest, which is not supported; re-push the "
                "image with a current Docker, buildah or skopeo"
            )
        if "manifests" in obj:
            media_type = OCI_INDEX
        elif "layers" in obj:
            media_type = OCI_MANIFEST
        else:
            raise MalformedInput(f"{what}: unknown manifest media type {media_type!r}")
    if obj.get("schemaVersion") != 2:
        raise MalformedInput(
            f"{what}: expected schemaVersion 2, found {obj.get('schemaVersion')!r}"
        )
    return obj, media_type, ""


def _select(index: Mapping[str, Any], arch: str, variant: str | None, ref: ImageReference) -> str:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise MalformedInput(f"{ref}: the index has no 'manifests' list")
    matches: list[tuple[str | None, str]] = []
    seen = []
    for i, entry in enumerate(entries):
        desc = _descriptor(entry, f"{ref}: index entry {i}")
        annotations = entry.get("annotations") or {}
        if isinstance(annotations, dict) and annotations.get("vnd.docker.reference.type"):
            continue  # buildx attestation manifests
        platform = entry.get("platform")
        if not isinstance(platform, dict):
            continue
        p_os, p_arch, p_variant = (
            platform.get("os"),
            platform.get("architecture"),
            platform.get("variant"),
        )
        seen.append(f"{p_os}/{p_arch}" + (f"/{p_variant}" if p_variant else ""))
        if p_os != "linux" or p_arch != arch:
            continue
        if variant is not None and p_variant != variant:
            continue
        matches.append((p_variant if isinstance(p_variant, str) else None, desc.digest))
    if not matches:
        wanted = arch + (f"/{variant}" if variant else "")
        raise UsageError(
            f"{ref} has no linux/{wanted} image (it has {', '.join(seen) or 'none'}); pick one "
            "with --arch"
        )
    # Without a requested variant: prefer no variant, then arm64's v8 (what Docker picks).
    matches.sort(key=lambda m: (m[0] is not None, m[0] != "v8"))
    return matches[0][1]


def _fetch_layer(
    client: RegistryClient,
    cache: BlobCache,
    desc: _Descriptor,
    label: str,
    progress: BlobProgress | None,
    stop: threading.Event,
    on_write: Callable[[str, int, bytes], None] | None = None,
) -> Path:
    if progress is not None:
        progress(label, 0, desc.size)
    cached = cache.lookup(desc.digest, desc.size)
    if cached is not None:
        if progress is not None:
            progress(label, desc.size, desc.size)
        return cached

    def attempt() -> Path:
        with client.blob_stream(desc.digest, label) as chunks:
            return cache.store(
                desc.digest,
                desc.size,
                _counted(chunks, label, desc.size, progress, stop),
                label,
                on_write=on_write,
            )

    return client.retrying(attempt, label)


def _counted(
    chunks: Any, label: str, total: int, progress: BlobProgress | None, stop: threading.Event
) -> Any:
    done = 0
    if progress is not None:
        progress(label, 0, total)
    # The connection delivers ~64 KiB at a time; the cache hashes and writes 1 MiB batches (16 times
    # fewer hand-offs of the GIL to and from SHA-256 and write, which a build running beside the pull
    # would otherwise wait for).
    batch: list[bytes] = []
    batched = 0
    for chunk in chunks:
        if stop.is_set():
            raise _Cancelled()
        batch.append(chunk)
        batched += len(chunk)
        if batched >= _BATCH:
            done += batched
            yield b"".join(batch)
            batch.clear()
            batched = 0
            if progress is not None:
                progress(label, min(done, total), total)
    if batch:
        done += batched
        yield b"".join(batch)
        if progress is not None:
            progress(label, min(done, total), total)
