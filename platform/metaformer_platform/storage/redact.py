"""Redaction of secrets in values that are logged or stored (MLflow params and artifacts, checkpoint
``config.yaml``, printed hints): the one helper every dump of a config or URI goes through.

A URI's password (``scheme://user:PASSWORD@host``), a userinfo that is a bare token (``https://TOKEN@host``)
and query parameters named like credentials (``?password=...``, ``token``, ``secret``, ``key``...) become
``***``. Everything else is kept, so a redacted value still says where things are. Written by hand because
neither urllib nor MLflow offers it for arbitrary URIs (MLflow's own helpers know only its HTTP URIs).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameter names that carry credentials (matched as a substring, case-insensitive).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth", re.IGNORECASE)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

__all__ = ["MASK", "redact", "redact_tree"]


def redact(value: str) -> str:
    """``value`` with the secrets of a URI masked; a string that is not a URI comes back unchanged."""
    if not _URI.match(value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:  # malformed (an unclosed IPv6 bracket...): say nothing of it rather than leak it
        return f"{value.split('://', 1)[0]}://{MASK}"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return value
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, scalars) with every string passed through ``redact``."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact_tree(value) for value in tree]
    return tree
