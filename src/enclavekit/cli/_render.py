"""Rendering shared by every command: JSON to stdout, human text and progress to stderr."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class _LazyConsole:
    """Stands for a rich ``Console`` on stderr, created on first use: importing rich costs about as much
    as importing click, and ``--help`` never needs it."""

    def __init__(self) -> None:
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)
        return getattr(self._console, name)


#: Human output and diagnostics go to stderr; stdout is reserved for machine output (JSON, raw data).
stderr = cast("Console", _LazyConsole())


def json_option(func: F) -> F:
    """The ``--json`` flag every reporting command has."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one stable JSON object on stdout."
    )(func)


def emit_json(obj: Any) -> None:
    """Write one JSON object to stdout (indented like nitro-cli), newline-terminated."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A loud warning on stderr (unsafe switches, emulator roots); one JSON line in a service that
    logs JSON."""
    from enclavekit.cli import _log

    if _log.active_format is not None:
        logging.getLogger("enclavekit.cli").warning(message, extra={"event": "warning"})
        return
    stderr.print(f"[bold yellow]WARNING:[/] {message}")
