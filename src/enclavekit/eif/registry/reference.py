"""Image references as Docker writes them: ``repo:tag``, ``host[:port]/repo:tag``, ``…@sha256:…``.

Docker Hub's defaults apply (``alpine`` is ``docker.io/library/alpine:latest``; Docker Hub's API host is
``registry-1.docker.io``). The grammar is distribution's (``reference/regexp.go``): lower-case path
components joined by ``.``, ``_``, ``__`` or dashes, tags ``[\\w][\\w.-]{0,127}``, ``sha256`` digests.
A reference with both a tag and a digest is pulled by its digest (as Docker does). Not accepted:
upper-case repositories, digest algorithms other than sha256/sha512.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from enclavekit.errors import UsageError

DOCKER_HUB = "docker.io"
#: The host that serves Docker Hub's registry API.
DOCKER_HUB_API = "registry-1.docker.io"
#: The key Docker writes Hub credentials under in ``~/.docker/config.json``.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
MAX_REFERENCE = 255 + 1 + 128 + 1 + 135


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed reference: ``registry`` (``docker.io`` for Hub), ``repository`` (``library/alpine``),
    and a ``tag`` and/or ``digest`` (at least one)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host[:port] whose ``/v2/`` API serves this repository."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The registry's host name without port (and without IPv6 brackets)."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def is_loopback(self) -> bool:
        """``localhost`` or a 127.0.0.0/8 / ::1 address: Docker allows plain HTTP there."""
        if self.hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.hostname).is_loopback
        except ValueError:
            return False

    @property
    def familiar_repository(self) -> str:
        """The repository as Docker shows it: ``alpine``, ``user/app``, ``127.0.0.1:5000/app``."""
        if self.registry == DOCKER_HUB:
            return self.repository.removeprefix("library/")
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest when there is one, else the tag."""
        value = self.digest or self.tag
        assert value is not None
        return value

    def __str__(self) -> str:
        text = self.familiar_repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    """Parse ``text`` as Docker does (see the module docstring); :class:`UsageError` if it is not a
    reference."""
    if not text or len(text) > MAX_REFERENCE or text != text.strip():
        raise UsageError(f"--docker-uri {text!r} is not an image reference (expected REPO[:TAG])")
    rest, digest = text, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST.match(digest):
            raise UsageError(f"--docker-uri {text!r}: {digest!r} is not a sha256:<64 hex> digest")
    registry = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _DOMAIN.match(first):
            raise UsageError(f"--docker-uri {text!r}: {first!r} is not a registry host[:port]")
        registry, rest = first, remainder
    tag = None
    name, colon, maybe_tag = rest.rpartition(":")
    if colon and "/" not in maybe_tag:
        if not _TAG.match(maybe_tag):
            raise UsageError(f"--docker-uri {text!r}: {maybe_tag!r} is not a valid tag")
        rest, tag = name, maybe_tag
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    if not _PATH.match(rest):
        raise UsageError(
            f"--docker-uri {text!r}: {rest!r} is not a repository name (lower-case letters, "
            "digits and . _ - separators)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, rest, tag, digest)
