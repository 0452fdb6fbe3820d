"""Secrets: which values are secret, their redaction from JSON and logs, and files only the owner reads.

A value is secret when it is held by an environment variable whose name looks secret (:data:`SECRET_NAME_PARTS`),
by a variable a config names as a key holder (an endpoint's ``api_key_env``, a Kubernetes secret's variables:
:func:`register_env_names`), or when it was resolved from an Airflow connection (password, login, extra:
:func:`register_values`, called where the connection is read). Every JSON document the artifact store writes
and every log record of the handlers :func:`install_log_filter` covers has those values replaced by ``***``.
Values shorter than :data:`MIN_LENGTH` are not redacted (``TOKENIZERS_PARALLELISM=false`` is no secret, and
masking ``false`` would break every JSON document).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
PUBLIC_NAME_SUFFIXES = ("_ID",)  # AWS_ACCESS_KEY_ID: an identifier (printed in presigned URLs), not a secret
MIN_LENGTH = 8
MASK = "***"

_SECRET_NAME = re.compile("|".join(SECRET_NAME_PARTS), re.IGNORECASE)
_env_names: set[str] = set()
_values: set[str] = set()


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (``OPENAI_API_KEY``, ``HF_TOKEN``)."""
    return bool(_SECRET_NAME.search(name)) and not name.upper().endswith(PUBLIC_NAME_SUFFIXES)


def register_env_names(names: Iterable[str]) -> None:
    """Treat these environment variables as secret whatever their names (a config named them as key holders)."""
    _env_names.update(n for n in names if n)


def register_values(*values: Any) -> None:
    """Treat these values as secret (what an Airflow connection resolved to). A JSON object string (a
    connection's extra) or a dict also registers each string inside it."""
    for value in values:
        if isinstance(value, str) and value.strip().startswith("{"):
            with contextlib.suppress(ValueError):
                register_values(json.loads(value))
        if isinstance(value, dict):
            register_values(*value.values())
        elif isinstance(value, list | tuple):
            register_values(*value)
        elif isinstance(value, str) and len(value) >= MIN_LENGTH:
            _values.add(value)


def register_connection(conn: Any) -> None:
    """Register an Airflow connection's password, login and extra (anything with those attributes)."""
    register_values(*(getattr(conn, attr, None) for attr in ("password", "login", "extra")))


def secret_values() -> list[str]:
    """Every secret value known now, longest first (so a secret containing another is masked whole)."""
    found = set(_values)
    for name, value in os.environ.items():
        if len(value) >= MIN_LENGTH and (name in _env_names or looks_secret(name)):
            found.add(value)
    return sorted(found, key=lambda v: (-len(v), v))


def redact(text: str) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_bytes(data: bytes) -> bytes:
    """:func:`redact` for bytes (secrets matched in their UTF-8 form)."""
    for value in secret_values():
        raw = value.encode()
        if raw in data:
            data = data.replace(raw, MASK.encode())
    return data


class RedactFilter(logging.Filter):
    """Replaces secret values in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactFilter()
LOGGERS = ("cogumi", "cogumi_tasks", "cogumi_provider")


def install_log_filter() -> None:
    """Add the redaction filter to the cogumi loggers and to every handler of the root logger (a logger's
    filter sees only records logged to that very logger; a handler's sees those of its children too).
    Idempotent: call it wherever logging is configured."""
    for target in [*(logging.getLogger(n) for n in LOGGERS), *logging.getLogger().handlers]:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


def write_private(path: str | Path, data: str | bytes, *, overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` readable by its owner only (mode 0600 from creation, never wider), atomically:
    a new file (``O_CREAT|O_EXCL``, mode 0600) in the same directory, written, fsync-ed, then renamed over
    ``path``. With ``overwrite=False`` an existing ``path`` is kept (first writer wins) and False is returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
