"""bench/gateway.py's reading of a streamed answer: content chunks counted and joined, other chunks skipped."""

from __future__ import annotations

import time

import pytest

from bench.gateway import timed

ROLE = {"choices": [{"delta": {"role": "assistant"}}]}
STOP = {"choices": [{"delta": {}, "finish_reason": "stop"}]}


def piece(text: str) -> dict:
    return {"choices": [{"delta": {"content": text}}]}


def test_timed_counts_content_chunks_only():
    r = timed(time.perf_counter(), iter([ROLE, piece("Hel"), {"choices": []}, piece("lo"), STOP]), "arm")
    assert (r["chunks"], r["text"]) == (2, "Hello") and r["ttft_s"] >= 0


def test_one_chunk_has_no_decode_rate_and_an_empty_stream_is_refused():
    assert timed(time.perf_counter(), iter([ROLE, piece("a"), STOP]), "arm")["decode_tps"] is None
    with pytest.raises(RuntimeError, match="arm: no content streamed"):
        timed(time.perf_counter(), iter([ROLE, STOP]), "arm")
