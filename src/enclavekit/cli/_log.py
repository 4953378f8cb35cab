"""Service logs on stderr (``ca serve``, ``atls proxy``): one line per event, as text or JSON.

Library code logs with ``logging.getLogger(__name__)`` and adds no handlers; an event that machines should
recognise carries ``extra={"event": NAME, "fields": {...}}``. This module is the one place that decides how
a record looks: ``text`` is ``TIME LEVEL EVENT message``; ``json`` is one JSON object per line with
``time``, ``level``, ``logger``, ``event``, ``message`` and the event's fields.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMATS = ("text", "json")

#: The format a service configured (None: not a service); warnings follow it.
active_format: str | None = None


def log_format_option(func: F) -> F:
    """``--log-format text|json`` for commands that run a service."""
    return click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default="text",
        show_default=True,
        help="Service log on stderr, one line per event: text for people, json for machines.",
    )(func)


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or record.name
        line = f"{_time(record)} {record.levelname.lower()} {event}: {record.getMessage()}"
        return line.replace("\n", " | ")  # one line per event, even for multi-line reasons


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            obj.update({k: v for k, v in fields.items() if k not in obj})
        return json.dumps(obj, ensure_ascii=False, default=str)


def service_logging(log_format: str) -> logging.Logger:
    """Send ``enclavekit.*`` records of level INFO and above to stderr in ``log_format``; returns the
    logger for the CLI's own start/stop lines."""
    global active_format
    active_format = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    package = logging.getLogger("enclavekit")
    package.handlers = [handler]
    package.propagate = False  # not twice through the root logger's -v handler
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    return logging.getLogger("enclavekit.service")


def event(
    logger: logging.Logger, name: str, message: str, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one event line."""
    logger.log(level, message, extra={"event": name, "fields": fields})
