"""Secrets never echoed: find and mask anything that looks like a credential in text we print, store or
post (errors, logs, reports, rendered objects, Kubernetes Events).

Torch-free; both packages use it. Credentials belong in a Secret (`spec.storage.secretRef`) or the
environment; the spec rejects them inline (`contains_credentials`), and what still reaches a message is
masked here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

_VALUE = r"(?P<secret>[^\s\"',}]+)"
_PATTERNS = [
    # user:password@ in a URL (s3://KEY:SECRET@bucket, https://user:pw@host)
    re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<secret>[^/@\s:]+:[^@\s]+)(?=@)"),
    # AWS access key ids (long-term and temporary)
    re.compile(r"(?P<secret>\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b)"),
    # presigned-URL and token query parameters
    re.compile(r"(?P<keep>[?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token|"
               r"access_token|api_key|apikey|password)=)(?P<secret>[^&\s\"']+)", re.IGNORECASE),
    # NAME=value / NAME: value for secret-looking environment names (env dumps, tracebacks, YAML)
    re.compile(r"(?P<keep>\b[A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS?)"
               r"[A-Z0-9_]*[\"']?\s*[=:]\s*[\"']?)" + _VALUE),
    # the same for lower-case option names (key/secret/token of s3fs, passwords)
    re.compile(r"(?P<keep>[\"']?\b(?:password|passwd|secret|secret_key|token|session_token|api_key|apikey|"
               r"access_key|aws_secret_access_key|aws_access_key_id)\b[\"']?\s*[=:]\s*[\"']?)" + _VALUE),
]


def redact(text: str) -> str:
    """`text` with every credential-looking substring replaced by ***."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.groupdict().get("keep") or "") + MASK, text)
    return text


def redact_obj(obj: Any) -> Any:
    """The same over every string of a JSON-like structure (rendered objects, reports)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_obj(v) for v in obj]
    return obj


def contains_credentials(text: str) -> bool:
    """Would `redact` change this? (The spec refuses such values with 'use storage.secretRef'.)"""
    return redact(text) != text


class RedactingFilter(logging.Filter):
    """A logging filter that masks credentials in every record a handler emits (message and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def redact_logging() -> None:
    """Install the filter on every handler of the root logger (call after logging is configured)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
