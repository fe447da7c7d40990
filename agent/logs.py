"""Log lines of the services: readable text for people, or one JSON object per line for log pipelines.

Log calls that concern one save pass its context as ``extra`` (usually through a
``LoggerAdapter`` held by the session): ``job``, ``kind``, ``step``, ``rank``, ``save_id``,
``agent``. The JSON format carries those as fields of their own, so a log pipeline can
select every line of one checkpoint, or of one rank, without parsing messages.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

CONTEXT_FIELDS = ("job", "kind", "step", "rank", "save_id", "agent")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <context fields>, "exception"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Set up the root logger of a process; like ``logging.basicConfig``, a no-op if it already has
    handlers (the embedding application, or pytest, configured logging itself)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
