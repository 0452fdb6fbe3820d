"""AirflowREST against a small HTTP server on loopback: SQLite's "database locked" answers are retried, other
errors are not."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cogumi_tasks.stack.demo import AirflowREST, DemoError

LOCKED = (500, {"detail": {"reason": "Database error", "statement": "hidden"}})


@pytest.fixture
def api_server() -> Iterator[tuple[str, list, list]]:
    """A server that answers /auth/token, then each PATCH with the next scripted (status, body); base URL, the
    script to fill and the PATCH paths it saw."""
    script: list[tuple[int, dict]] = []
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(201, {"access_token": "t"})

        def do_PATCH(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.path)
            self._send(*script.pop(0))

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", script, seen
    server.shutdown()


def test_database_locked_answers_are_retried(api_server):
    url, script, seen = api_server
    script += [LOCKED, (503, {"detail": "database is locked"}), (200, {"is_paused": False})]
    api = AirflowREST(url, "admin", "pw", locked_tries=5, locked_wait_s=0.01)
    assert api.request("PATCH", "/dags/phase4_routing", json={"is_paused": False}) == {"is_paused": False}
    assert seen == ["/api/v2/dags/phase4_routing"] * 3


def test_retries_stop_after_locked_tries_and_other_errors_are_not_retried(api_server):
    url, script, seen = api_server
    api = AirflowREST(url, "admin", "pw", locked_tries=2, locked_wait_s=0.01)
    script += [LOCKED, LOCKED]
    with pytest.raises(DemoError, match="HTTP 500.*Database error"):
        api.request("PATCH", "/dags/d", json={})
    assert len(seen) == 2
    script += [(500, {"detail": "something else"})]
    with pytest.raises(DemoError, match="something else"):
        api.request("PATCH", "/dags/d", json={})
    assert len(seen) == 3
