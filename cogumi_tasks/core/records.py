"""Reading JSONL records with per-line validation and a quarantine.

A bad line never stops the read by itself and is never lost: it goes to the quarantine with the
file, line, field and reason. Files are read in bounded chunks, so memory does not grow with the
file, and a line over the configured size limit is quarantined without being held whole. The
caller decides with :func:`check_error_rate` whether the share of bad lines is tolerable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ErrorRateExceeded(RuntimeError):
    """Too many bad records: the step stops and publishes nothing."""


@dataclass
class Quarantine:
    """Rejected records with where and why, written as a JSONL artifact."""

    rows: list[dict] = field(default_factory=list)

    def add(
        self, source: str, line: int | None, field_name: str, reason: str, raw: Any, *, offset: int | None = None
    ) -> None:
        row = {"source": source, "line": line, "field": field_name, "reason": reason, "raw": raw}
        if offset is not None:  # byte offset of the line in the file, for lines that could not be decoded
            row["offset"] = offset
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["reason"].split(":")[0]] = out.get(r["reason"].split(":")[0], 0) + 1
        return out

    def write(self, path: Path) -> None:
        write_jsonl(path, self.rows)


def describe(row: dict) -> str:
    where = f"{row['source']}:{row['line']}" if row.get("line") else row["source"]
    return f"{where}: field {row['field']!r}: {row['reason']}"


class RecordError(ValueError):
    """An unreadable line in a file this project wrote itself (no quarantine for those)."""


@dataclass(frozen=True)
class Line:
    """One non-blank line: its text, or why it could not be read (then ``text`` is None)."""

    number: int
    offset: int  # byte offset of the line's first byte in the file
    text: str | None
    problem: str | None = None
    preview: str | None = None  # the first bytes of an unreadable line, for the quarantine


BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1 << 20
PREVIEW_BYTES = 200


def read_lines(path: Path, max_record_bytes: int | None = None) -> Iterator[Line]:
    """Every non-blank line of a UTF-8 file, read in bounded chunks (constant memory).

    A leading byte-order mark is skipped. A line that is not valid UTF-8, or longer than
    ``max_record_bytes`` (then never held whole: the rest of it is skipped chunk by chunk),
    comes back with ``problem`` set and no text; nothing is ever silently replaced.
    """
    number, offset, size = 1, 0, 0  # size: bytes of the current line read so far
    partial: list[bytes] = []  # its pieces, unless it is already over the limit
    over, preview, first = False, "", True
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            if first and block.startswith(BOM):
                block, offset = block[len(BOM) :], len(BOM)
            first = False
            start = 0
            while (end := block.find(b"\n", start)) >= 0:
                size += end - start
                if over:
                    line: Line | None = _too_long(number, offset, size, max_record_bytes, preview)
                else:
                    partial.append(block[start:end])
                    line = _line(number, offset, b"".join(partial), max_record_bytes)
                if line is not None:
                    yield line
                number, offset, size, partial, over = number + 1, offset + size + 1, 0, [], False
                start = end + 1
            rest = block[start:]
            size += len(rest)
            if not over:
                partial.append(rest)
                if max_record_bytes is not None and size > max_record_bytes + 1:  # + 1: a CR before the LF
                    preview = b"".join(partial)[:PREVIEW_BYTES].decode("utf-8", "backslashreplace")
                    over, partial = True, []
    if over:
        yield _too_long(number, offset, size, max_record_bytes, preview)
    elif size:
        line = _line(number, offset, b"".join(partial), max_record_bytes)
        if line is not None:
            yield line


def _line(number: int, offset: int, raw: bytes, max_record_bytes: int | None) -> Line | None:
    raw = raw.removesuffix(b"\r")
    if max_record_bytes is not None and len(raw) > max_record_bytes:
        return _too_long(number, offset, len(raw), max_record_bytes,
                         raw[:PREVIEW_BYTES].decode("utf-8", "backslashreplace"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Line(number, offset, None, f"invalid UTF-8: at byte offset {offset + exc.start} of the file",
                    raw.decode("utf-8", "backslashreplace"))
    return Line(number, offset, text) if text.strip() else None


def _too_long(number: int, offset: int, size: int, limit: int | None, preview: str) -> Line:
    return Line(number, offset, None, f"record too large: {size} bytes, above the limit of {limit} bytes", preview)


def read_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a file this project wrote; an unreadable line raises."""
    for line in read_lines(path):
        if line.text is None:
            raise RecordError(f"{path}:{line.number}: {line.problem}")
        yield line.number, line.text


def iter_records(
    path: Path, model: type[M], source: str, quarantine: Quarantine, max_record_bytes: int | None = None
) -> Iterator[tuple[int, M]]:
    """(line number, record) for each valid line of ``path`` as ``model``; bad lines go to ``quarantine``."""
    for line in read_lines(path, max_record_bytes):
        n, raw = line.number, line.text
        if raw is None:
            quarantine.add(source, n, "<line>", line.problem or "unreadable", line.preview, offset=line.offset)
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            quarantine.add(source, n, "<line>", f"invalid JSON: {exc.msg} at column {exc.colno}", raw)
            continue
        if not isinstance(data, dict):
            quarantine.add(source, n, "<line>", "not a JSON object", raw)
            continue
        try:
            yield n, model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "<record>"
            reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            quarantine.add(source, n, where, f"invalid: {reason}", data)


def load_records(
    path: Path, model: type[M], source: str, quarantine: Quarantine, max_record_bytes: int | None = None
) -> list[M]:
    """Every valid line of ``path`` as ``model`` (see :func:`iter_records`)."""
    return [rec for _, rec in iter_records(path, model, source, quarantine, max_record_bytes)]


def check_error_rate(what: str, bad: int, total: int, max_rate: float, quarantine: Quarantine) -> None:
    """Raise :class:`ErrorRateExceeded` naming the first bad records when bad/total > max_rate."""
    if total == 0:
        raise ErrorRateExceeded(f"{what}: no records at all")
    rate = bad / total
    if rate > max_rate:
        first = "; ".join(describe(r) for r in quarantine.rows[:3])
        raise ErrorRateExceeded(
            f"{what}: {bad} of {total} records bad ({rate:.1%}), above the allowed {max_rate:.1%}; "
            f"nothing published; first: {first}"
        )


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            # ASCII escapes keep U+2028 and friends out of the file: any line splitter reads it back
            f.write(json.dumps(row) + "\n")


def iter_jsonl_dicts(path: Path) -> Iterator[dict]:
    """Rows of a JSONL file this project wrote itself, streamed (trusted: a bad line raises, no quarantine)."""
    for n, raw in read_jsonl(path):
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{n}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        yield row
