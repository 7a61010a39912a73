"""The one scrubber of secrets: everything a person or a log can read goes through ``redact`` first (CLI error
lines and the log records they print, workers' warnings on the driver's console, pipeline member errors and the
family report, MLflow params, tags and artifacts, each checkpoint's ``config.yaml``, exception messages the
registry re-raises, and the job plan sent to Ray's workers).

What it masks (as ``***``), in a value or anywhere in a text:

- a URI's password (``scheme://user:PASSWORD@host``) and a userinfo that is a bare token
  (``https://TOKEN@host``). The password runs to the URI's last ``@``, so a password holding ``/``, ``?`` or
  ``#`` (which SQLAlchemy accepts: ``postgresql://user:p/ss@db/x``) is masked whole; a database URI is then
  read back with SQLAlchemy's own ``make_url`` (what MLflow's SQL store reads it with) and, should SQLAlchemy
  still find a password in the masked text, rendered by SQLAlchemy with the password hidden;
- query parameters named like credentials (``password``, ``token``, ``secret``, ``key``, ``sig`` ...:
  ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token`` of a presigned URL);
- the secret values this process holds in its environment, wherever they appear: the S3 secret key and
  session token (as ``S3Settings`` reads them), ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``, and
  the password of ``MLFLOW_TRACKING_URI``, plain or percent-encoded.

Everything else is kept, so a redacted value still says where things are. Written here rather than taken from
a library: neither urllib nor MLflow offers it for arbitrary URIs and text (MLflow's helpers know only its HTTP
URIs; SQLAlchemy only its own).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import quote

MASK = "***"
# Query parameter names that carry credentials (matched as a substring, case-insensitive).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth", re.IGNORECASE)
# ... except these, which only look like one: MLflow UI's shared view (a view's name the platform prints in links)
_PUBLIC_PARAMS = frozenset({"viewStateShareKey"})
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
_URI_START = re.compile(_SCHEME)
# A URI inside a text: up to the first whitespace, quote or bracket that ends it in prose, JSON or a repr.
_URI_IN_TEXT = re.compile(_SCHEME + r"""[^\s'"<>`]+""")
# userinfo: ``user:password@`` (the password up to the last ``@``) or a bare ``token@``
_USERINFO = re.compile(
    rf"^(?P<head>{_SCHEME})(?:(?P<user>[^:/@?#]*):(?P<password>.*)|(?P<token>[^:/@?#]+))@(?P<rest>.*)$", re.DOTALL
)
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#?\s]+)=(?P<value>[^&;#\s]*)")
# URI schemes read by SQLAlchemy (MLflow's SQL store): ``postgresql+psycopg2://`` counts by its dialect
_DATABASES = {"postgresql", "postgres", "mysql", "mariadb", "sqlite", "mssql", "oracle", "cockroachdb"}
# Environment variables whose values are secrets wherever they appear (short values would mask common words).
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")
_MIN_SECRET = 4

__all__ = ["MASK", "RedactingFormatter", "redact", "redact_logging", "redact_tree", "secret_values"]


def redact(text: str) -> str:
    """``text`` with every secret masked: a whole value that is one URI (a config value: its password may even
    hold spaces), or any text with URIs in it (an error message, a traceback, a log line)."""
    if not text:
        return text
    if _URI_START.match(text) and "\n" not in text:
        masked = _mask_uri(text)
    else:
        masked = _URI_IN_TEXT.sub(lambda m: _mask_uri(m.group(0)), text)
    return _mask_known(masked)


def _mask_uri(uri: str) -> str:
    masked = _mask_query(_mask_userinfo(uri))
    dialect = uri.split("://", 1)[0].split("+", 1)[0].lower()
    return _as_sqlalchemy_reads(uri, masked) if dialect in _DATABASES else masked


def _mask_userinfo(uri: str) -> str:
    match = _USERINFO.match(uri)
    if match is None:
        return uri
    userinfo = MASK if match["token"] is not None else f"{match['user']}:{MASK}"
    return f"{match['head']}{userinfo}@{match['rest']}"


def _mask_query(uri: str) -> str:
    def mask(m: re.Match[str]) -> str:
        secret = m["value"] and _SECRET_PARAM.search(m["name"]) and m["name"] not in _PUBLIC_PARAMS
        return f"{m['sep']}{m['name']}={MASK}" if secret else m.group(0)

    return _QUERY_PARAM.sub(mask, uri)


def _as_sqlalchemy_reads(original: str, masked: str) -> str:
    """``masked``, checked with SQLAlchemy's own parser: when it still finds a password there (a URI this module
    splits otherwise than SQLAlchemy does), SQLAlchemy's rendering with the password hidden."""
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # no SQLAlchemy: nothing here can connect to a database with the URI either
        return masked
    try:
        password = make_url(original).password
    except Exception:  # not a URL SQLAlchemy reads (a fragment in a message): the masking above stands
        return masked
    if password is None or password == MASK:
        return masked
    try:
        seen = make_url(masked).password
    except Exception:
        seen = None
    if seen in (None, MASK):
        return masked
    return _mask_query(make_url(original).render_as_string(hide_password=True))


def secret_values() -> list[str]:
    """The secret values of this process's environment (see the module's docstring), longest first."""
    from metaformer_platform.storage.settings import S3Settings

    values = {os.environ.get(name, "") for name in _SECRET_ENV}
    try:
        s3 = S3Settings.from_env()
        values |= {s3.secret_key or "", s3.session_token or ""}
    except ValueError:  # a malformed AWS_MAX_ATTEMPTS: the variables above still count
        pass
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    match = _USERINFO.match(uri)
    if match is not None:
        values.add(match["password"] or match["token"] or "")
    return sorted((v for v in values if len(v) >= _MIN_SECRET and v != MASK), key=len, reverse=True)


def _mask_known(text: str) -> str:
    for secret in secret_values():
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, MASK)
    return text


def redact_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, tuples, scalars) with every string passed through ``redact``."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(redact_tree(value) for value in tree)
    return tree


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line (message, arguments and traceback alike) has passed ``redact``."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_logging(logger: logging.Logger | None = None) -> None:
    """Make every handler of ``logger`` (default: the root logger) print through ``RedactingFormatter``."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
