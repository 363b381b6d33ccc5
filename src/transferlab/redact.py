"""Secrets out of everything we write or log: URL passwords and tokens.

A data source, a storage URL or a tracking URI may carry credentials
(https://user:password@host/..., https://TOKEN@host/..., ?token=...). Params,
tags, logged files and log lines get `redact(value)` instead of the value.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_SECRET_KEY = re.compile(r"(?i)token|secret|passw|pwd|key|signature|sig$|credential|auth")


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url.split(":", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        # user:password@ keeps the user; a lone TOKEN@ is itself the secret
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(k, MASK if _SECRET_KEY.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret (and sqlite:///x keeps its empty host)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(value: Any) -> Any:
    """`value` with every URL in it redacted; non-strings pass through."""
    if not isinstance(value, str) or "://" not in value:
        return value
    return _URL.sub(lambda m: redact_url(m.group(0)), value)


def redact_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return redact(value)
