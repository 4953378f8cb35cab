"""Small file-system helpers shared across the package."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, durable: bool = False
) -> None:
    """Write ``data`` to ``path`` through a new temporary file beside it, renamed into place.

    Readers see the old content or the new, never a partial file; a failure leaves no temporary file. The
    temporary file is created exclusively with ``mode`` (filtered by the umask). ``durable=True`` also
    fsyncs before the rename, for content that must survive a power loss (keys).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = -1
    try:  # created inside the try: a signal handler raising right after creation still removes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except FileExistsError:
        if fd != -1:
            tmp.unlink(missing_ok=True)
        raise  # else another file of that name, not ours to remove
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
