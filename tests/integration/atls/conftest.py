"""Fixtures for the attested-TLS integration tests (defined in atls_loop.py)."""

from tests.integration.atls.atls_loop import loop, shared_loop

__all__ = ["loop", "shared_loop"]
