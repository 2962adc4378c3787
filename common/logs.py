"""Logging set-up for every tensorq process: ``text`` for people, ``json``
(one object per line) for log shippers. Configured once at the edge (the CLI,
or a spawned worker's entry point), never at import.

Lifecycle events only at INFO (start, model loaded, worker died/restarted,
reclaim, dead letter); nothing is logged per request at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str | None) -> None:
        super().__init__()
        self._process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": self._process_name or record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str = "text", *, process_name: str | None = None) -> None:
    """Replace the root handler; ``process_name`` labels a worker's lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        label = process_name or "%(name)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {label}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
