"""Structured logs: one JSON object per line, with the request ids, in every function.

`configure()` puts `JsonFormatter` on the root logger's handlers (Lambda's own
handler, which writes to the function's log group); `bind()` sets the ids the
following lines carry until the next invocation binds its own. A message that
is itself a JSON object (the jobs' summary lines) is merged in, so CloudWatch
Logs Insights can filter on its fields.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

_bound: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("instapg_log_ids", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            **(_bound.get() or {}),
        }
        parsed = None
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
        if isinstance(parsed, dict):
            line.update({k: v for k, v in parsed.items() if k not in line})
        else:
            line["message"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def bind(lambda_context: Any = None, **ids: str | None) -> None:
    """Ids for the lines that follow: the Lambda request id from `lambda_context`, plus `ids` (e.g. API Gateway's)."""
    bound = {}
    request_id = getattr(lambda_context, "aws_request_id", None)
    if request_id:
        bound["request_id"] = request_id
    bound.update({k: v for k, v in ids.items() if v})
    _bound.set(bound)


def bind_event(lambda_context: Any, event: Any) -> None:
    """`bind` for a chalice event: an HTTP request also carries API Gateway's request id."""
    api = getattr(event, "context", None)
    bind(lambda_context, api_request_id=api.get("requestId") if isinstance(api, dict) else None)


def configure(level: int = logging.INFO) -> None:
    """JSON on the root logger's handlers (a stderr handler when there is none); idempotent."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        if not isinstance(handler.formatter, JsonFormatter) and type(handler).__module__ != "_pytest.logging":
            handler.setFormatter(JsonFormatter())
    root.setLevel(level)
