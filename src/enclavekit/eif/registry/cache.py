"""A content-addressed blob cache: ``$XDG_CACHE_HOME/enclavekit/blobs/<alg>/<hex>``.

A blob enters the cache only after its bytes hashed to its name: it is streamed into a temporary
file in ``blobs/tmp/`` (same file system), checked, then renamed into place. Renames are atomic and
two builds writing the same digest write the same bytes, so concurrent builds are safe without
locks. A reader re-hashes a cached blob before using it (:meth:`BlobCache.lookup`) and evicts one that
no longer matches (disk damage or tampering), so a bad entry costs one download, never a wrong build.

A build killed mid-download (SIGKILL) can leave a file in ``blobs/tmp/``; it is never read, and temporary
files older than :data:`STALE_TMP_SECONDS` are removed by the next download. Not done: size limits or eviction
of old blobs (delete the folder to reclaim space).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from enclavekit.errors import MalformedInput, UsageError

_CHUNK = 1 << 20
#: Temporary files this old belong to no running download (one blob never takes a day).
STALE_TMP_SECONDS = 24 * 3600


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/enclavekit/blobs`` (``~/.cache/enclavekit/blobs`` when unset)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enclavekit" / "blobs"


class BlobCache:
    """Verified blobs by digest (``sha256:<hex>`` / ``sha512:<hex>``; callers check the form)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / algorithm / hexdigest

    def lookup(self, digest: str, size: int | None) -> Path | None:
        """The cached blob for ``digest`` after re-hashing it, or None (a mismatching file is
        removed)."""
        path = self.path(digest)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return None
        with handle:
            hasher = hashlib.new(digest.partition(":")[0])
            total = 0
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
                total += len(chunk)
        if f"{hasher.name}:{hasher.hexdigest()}" == digest and size in (None, total):
            return path
        with contextlib.suppress(OSError):
            path.unlink()
        return None

    def store(
        self,
        digest: str,
        size: int,
        chunks: Iterable[bytes],
        what: str,
        *,
        on_write: Callable[[str, int, bytes], None] | None = None,
    ) -> Path:
        """Write ``chunks`` as the blob ``digest`` of ``size`` bytes, hashing them as they stream.

        More than ``size`` bytes, fewer, or another digest: :class:`BlobMismatch`, and nothing enters
        the cache. Any other error (the source failing mid-stream) also leaves nothing behind.
        ``on_write(temporary path, bytes written, chunk)`` is called after each chunk was hashed and
        reached the file (written unbuffered, so other readers of that path see it), first with
        ``b""``: the bytes are not verified yet, but the digest check covers exactly these objects.
        """
        tmp_dir = self.root / "tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale(tmp_dir)
            fd, name = tempfile.mkstemp(prefix=digest.replace(":", "-") + ".", dir=tmp_dir)
        except OSError as exc:
            raise UsageError(
                f"cannot write to the blob cache {self.root}: {exc.strerror}; set XDG_CACHE_HOME "
                "to a writable folder"
            ) from None
        try:
            if on_write is not None:
                on_write(name, 0, b"")
            hasher = hashlib.new(digest.partition(":")[0])
            total = 0
            with os.fdopen(fd, "wb", buffering=0) as handle:
                for chunk in chunks:
                    total += len(chunk)
                    if total > size:
                        raise BlobMismatch(
                            f"{what}: the registry sent more than the {size} bytes its manifest "
                            "names; refused"
                        )
                    hasher.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[handle.write(view) or 0 :]
                    if on_write is not None:
                        on_write(name, total, chunk)
            found = f"{hasher.name}:{hasher.hexdigest()}"
            if total != size:
                raise BlobMismatch(
                    f"{what}: expected {size} bytes, the registry sent {total}; refused"
                )
            if found != digest:
                raise BlobMismatch(
                    f"{what}: the registry sent bytes that hash to {found}, not to {digest}; "
                    "refused (the registry's copy is corrupt or was tampered with)"
                )
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(name, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise UsageError(
                f"cannot write to the blob cache {self.root}: {exc.strerror}"
            ) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return final


class BlobMismatch(MalformedInput):
    """A blob's bytes do not match the digest or size that named it (exit 2)."""


def _remove_stale(tmp_dir: Path) -> None:
    """Remove temporary files left by killed downloads (older than :data:`STALE_TMP_SECONDS`)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    with contextlib.suppress(OSError), os.scandir(tmp_dir) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
