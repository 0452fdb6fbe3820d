"""Reading JSONL records with per-line validation and a quarantine.

A bad line never stops the read by itself and is never lost: it goes to the quarantine with the
file, line, field and reason. The caller decides with :func:`check_error_rate` whether the share
of bad lines is tolerable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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

    def add(self, source: str, line: int | None, field_name: str, reason: str, raw: Any) -> None:
        self.rows.append({"source": source, "line": line, "field": field_name, "reason": reason, "raw": raw})

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


def read_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, raw line) for each non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield n, line.rstrip("\n")


def load_records(path: Path, model: type[M], source: str, quarantine: Quarantine) -> list[M]:
    """Parse and validate every line of ``path`` as ``model``; bad lines go to ``quarantine``."""
    good: list[M] = []
    for n, raw in read_jsonl(path):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            quarantine.add(source, n, "<line>", f"invalid JSON: {exc.msg} at column {exc.colno}", raw)
            continue
        if not isinstance(data, dict):
            quarantine.add(source, n, "<line>", "not a JSON object", raw)
            continue
        try:
            good.append(model.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "<record>"
            reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            quarantine.add(source, n, where, f"invalid: {reason}", data)
    return good


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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            # ASCII escapes keep U+2028 and friends out of the file: any line splitter reads it back
            f.write(json.dumps(row) + "\n")


def iter_jsonl_dicts(path: Path) -> Iterator[dict]:
    """Rows of a JSONL file this project wrote itself (trusted: no quarantine)."""
    for _, raw in read_jsonl(path):
        yield json.loads(raw)
