"""Logging setup: plain text for people, one JSON object per line for collectors."""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import Any

from common import jsoncodec

current_request: ContextVar[str | None] = ContextVar("ara_request_id", default=None)
current_notification: ContextVar[str | None] = ContextVar("ara_notification_id", default=None)

_TOKEN_RE = re.compile(r"((?:^|[?&])token=)[^&\s\"']+")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Emits ``ts``, ``level``, ``logger``, ``message`` and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return jsoncodec.dumps(entry).decode()


class RedactTokens(logging.Filter):
    """Keeps JWTs passed as ``?token=`` out of server logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_RE.sub(r"\1<redacted>", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_RE.sub(r"\1<redacted>", record.msg)
        return True


class ContextIds(logging.Filter):
    """Stamps records with the request and notification ids of the current task."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        notification_id = current_notification.get()
        if notification_id is not None and not hasattr(record, "notification_id"):
            record.notification_id = notification_id
        return True


class TextFormatter(logging.Formatter):
    """Human-readable lines, with the ids appended when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{key}={getattr(record, key)}"
            for key in ("request_id", "notification_id")
            if getattr(record, key, None)
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure_logging(log_format: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactTokens())
    handler.addFilter(ContextIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
