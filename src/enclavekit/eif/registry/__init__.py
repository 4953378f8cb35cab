"""``build-enclave`` straight from an OCI/Docker registry, with no Docker daemon.

One job per module:

- :mod:`~enclavekit.eif.registry.reference` — Docker's image reference syntax and Hub defaults;
- :mod:`~enclavekit.eif.registry.auth` — credentials (Docker config, credential helpers, ECR) and
  ``WWW-Authenticate`` challenges;
- :mod:`~enclavekit.eif.registry.cache` — the content-addressed, verified blob cache;
- :mod:`~enclavekit.eif.registry.client` — the distribution API over httpx (TLS rules, retries);
- :mod:`~enclavekit.eif.registry.pull` — manifest resolution, platform selection, layer download
  into an :class:`~enclavekit.eif.image.Image`.
"""

from enclavekit.eif.registry.cache import BlobCache, BlobMismatch
from enclavekit.eif.registry.pull import PulledImage, PullInProgress, pull_image, start_pull
from enclavekit.eif.registry.reference import ImageReference, parse_reference

__all__ = [
    "BlobCache",
    "BlobMismatch",
    "ImageReference",
    "PullInProgress",
    "PulledImage",
    "parse_reference",
    "pull_image",
    "start_pull",
]
