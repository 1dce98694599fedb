"""Structured logging: an event name and key=value pairs, like klog's structured lines.

    log = get_logger("proxy")
    log.info("listener opened", service="default/web", address="10.96.0.10:80")

prints `I 18:33:01.123 proxy: listener opened service="default/web" address="10.96.0.10:80"`.
Nothing on a per-packet path logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_LEVEL_LETTER = {"DEBUG": "D", "INFO": "I", "WARNING": "W", "ERROR": "E", "CRITICAL": "F"}


def _quote(value: Any) -> str:
    text = str(value)
    plain = text and all(c.isalnum() or c in "._-:/" for c in text)
    if isinstance(value, int | float | bool) or plain:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "kv", {})
        pairs = "".join(f" {k}={_quote(v)}" for k, v in fields.items())
        stamp = self.formatTime(record, "%H:%M:%S") + f".{int(record.msecs):03d}"
        level = _LEVEL_LETTER.get(record.levelname, "?")
        line = f"{level} {stamp} {record.name}: {record.getMessage()}{pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StructLogger:
    """A thin wrapper over a stdlib logger taking key=value fields as keyword arguments."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"kv": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)

    def is_debug(self) -> bool:
        return self._logger.isEnabledFor(logging.DEBUG)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(f"kubeshim.{name}" if name else "kubeshim"))


def setup(level: str = "info", stream: Any = None) -> None:
    """Configure the kubeshim loggers once (the daemon calls this; libraries never do)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("kubeshim")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
