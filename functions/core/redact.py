"""Scrub secrets from text before it is logged.

The server never logs a token, passphrase, SAS or connection string on
purpose; this is the second line: anything formatted for a log (a traceback
above all) goes through :func:`redact`, and ``functions.local`` formats every
log record through :class:`RedactingFormatter`.
"""

from __future__ import annotations

import logging
import re

from ferry import tokens

_PATTERNS = [
    (re.compile(r"(?i)\b(bearer)\s+\S+"), r"\1 <redacted>"),
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig|FERRY_ADMIN_KEY)=[^;&\s'\"]+"),
     r"\1=<redacted>"),
    (re.compile(r"(?i)(['\"](?:passphrase|token|operator_token|admin_key|authorization)['\"]\s*:\s*)"
                r"(['\"])[^'\"]*\2"), r"\1\2<redacted>\2"),
]  # fmt: skip


def redact(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``<redacted>``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return tokens.redact(text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output (message and traceback) is passed through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
