"""Errors raised by the transport layer (all :class:`enclavekit.errors.Error` subclasses)."""

from __future__ import annotations

from enclavekit.errors import Error, PolicyViolation


class TransportError(Error):
    """A connection could not be made, or a listener could not be bound (exit 2)."""

    exit_code = 2


class TargetNotAllowed(PolicyViolation):
    """The proxy target is not in the allowlist (exit 1); carries one failure per reason."""
