"""The one JSONL reader: BOM, invalid UTF-8, per-record size limit, line numbers across chunk boundaries."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest
from pydantic import BaseModel

from cogumi_tasks.core import records
from cogumi_tasks.core.records import Quarantine, RecordError, iter_jsonl_dicts, iter_records, read_lines


class Row(BaseModel):
    id: str


def test_bom_is_accepted_and_offsets_count_it(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(records.BOM + b'{"id": "a"}\r\n{"id": "b"}\n')
    q = Quarantine()
    got = [(n, r.id) for n, r in iter_records(path, Row, "bom.jsonl", q)]
    assert got == [(1, "a"), (2, "b")] and len(q) == 0
    assert [line.offset for line in read_lines(path)] == [3, 3 + len(b'{"id": "a"}\r\n')]


def test_invalid_utf8_is_quarantined_with_its_byte_offset_never_replaced(tmp_path):
    path = tmp_path / "bad.jsonl"
    first = b'{"id": "a"}\n'
    path.write_bytes(first + b'{"id": "caf\xe9"}\n{"id": "c"}\n')
    q = Quarantine()
    got = [r.id for _, r in iter_records(path, Row, "bad.jsonl", q)]
    assert got == ["a", "c"]
    (row,) = q.rows
    assert (row["source"], row["line"], row["field"], row["offset"]) == ("bad.jsonl", 2, "<line>", len(first))
    assert row["reason"] == f"invalid UTF-8: at byte offset {len(first) + 11} of the file"
    assert "\\xe9" in row["raw"] and "\ufffd" not in row["raw"]
    with pytest.raises(RecordError, match=r"bad.jsonl:2: invalid UTF-8"):
        list(iter_jsonl_dicts(path))


def test_oversized_line_is_quarantined_with_its_size_without_being_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "READ_CHUNK", 64 * 1024)
    path = tmp_path / "big.jsonl"
    big = b'{"id": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    path.write_bytes(b'{"id": "a"}\n' + big + b'\n{"id": "b"}\n' + big)  # the last line has no newline
    q = Quarantine()
    tracemalloc.start()
    got = [(n, r.id) for n, r in iter_records(path, Row, "big.jsonl", q, max_record_bytes=4096)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(1, "a"), (3, "b")]
    assert [(r["line"], r["field"], r["reason"]) for r in q.rows] == [
        (n, "<line>", f"record too large: {len(big)} bytes, above the limit of 4096 bytes") for n in (2, 4)]
    assert all(r["raw"].startswith('{"id": "xxx') and len(r["raw"]) <= records.PREVIEW_BYTES for r in q.rows)
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes: the 20 MB line was held"


def test_limit_is_exact(tmp_path):
    path = tmp_path / "edge.jsonl"
    line = json.dumps({"id": "abcdef"}).encode()
    path.write_bytes(line + b"\n" + line + b"x\n")
    q = Quarantine()
    assert [n for n, _ in iter_records(path, Row, "edge", q, max_record_bytes=len(line))] == [1]
    assert [r["line"] for r in q.rows] == [2]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_lines_and_offsets_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(records, "READ_CHUNK", chunk)
    rnd = random.Random(chunk)
    lines = [("" if rnd.random() < 0.2 else json.dumps({"id": "é" * rnd.randrange(0, 30)})) for _ in range(200)]
    data = "\n".join(lines).encode()
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    want, offset = [], 0
    for n, text in enumerate(lines, 1):
        if text:
            want.append((n, offset, text))
        offset += len(text.encode()) + 1
    assert [(x.number, x.offset, x.text) for x in read_lines(path)] == want
    limit = 40
    got = [(x.number, x.text is None) for x in read_lines(path, limit)]
    assert got == [(n, len(t.encode()) > limit) for n, _, t in want]


def test_trusted_reader_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(RecordError, match=r"t.jsonl:3: invalid JSON"):
        list(iter_jsonl_dicts(path))
