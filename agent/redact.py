"""Keeping storage credentials out of logs and error messages.

Agents and the coordinator hold S3 credentials; ranks never do, and nothing they receive
or an operator reads may carry them. botocore itself logs the SigV4 ``Authorization``
header (with the access key id) and session tokens at DEBUG, and an error text can quote
anything. So every credential a store resolves is registered here (:func:`register`), and

* a log record factory, installed on the first registration, rewrites any record whose
  message contains a registered secret, or a SigV4 credential scope / security token that
  may belong to credentials rotated since (``Credential=AKIA.../``), before any handler -
  ours, pytest's, an operator's - sees it;
* :func:`scrub` cleans a text before it leaves the process as a gRPC status message.

What is replaced becomes ``[REDACTED]``; the rest of the message stays readable.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Iterable

MASK = "[REDACTED]"
#: Shortest value masked by value. Shorter ones (test or well-known defaults such as
#: ``minioadmin``) would turn ordinary words of messages into ``[REDACTED]``; real AWS key
#: ids are 20 characters and secrets 40, and the SigV4 pattern below catches any key id.
MIN_SECRET_LENGTH = 16
_PATTERNS = (
    # SigV4 Authorization header / presigned query: the access key id before the scope
    re.compile(r"(Credential=)[^/\s,'\"]+"),
    re.compile(r"(X-Amz-Credential=)[^%/&\s'\"]+", re.IGNORECASE),
    # temporary credentials' session token, as a header or query parameter
    re.compile(r"([Xx]-[Aa]mz-[Ss]ecurity-[Tt]oken['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,&}]+"),
)

_TRACEBACKS = logging.Formatter()
_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_installed = False


def register(values: Iterable[str | None]) -> None:
    """Mask these values (access key ids, secret keys, session tokens) from now on."""
    global _secrets
    new = {v for v in values if v and len(v) >= MIN_SECRET_LENGTH}
    with _lock:
        if not new <= _secrets:
            _secrets = _secrets | new
        _install()


def scrub(text: str) -> str:
    """``text`` with every registered secret and SigV4 credential replaced by ``[REDACTED]``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def _install() -> None:
    """Wrap the log record factory once; it composes with any factory installed before it."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format is the handler's to report
            return record
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse a cached exc_text: fill it now, cleaned, so a traceback's
            # exception text cannot carry a secret past us either.
            record.exc_text = scrub(_TRACEBACKS.formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
