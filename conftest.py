"""Root conftest: the documentation's examples (README.md, docs/*.md) are tests (see tests/docs/examples.py)."""

from tests.docs.examples import pytest_collect_file

__all__ = ["pytest_collect_file"]
