"""An ASGI app served by uvicorn in a daemon thread on 127.0.0.1: ``serve.validate``'s gateway, and the tests'
and benchmarks' servers that must be reached over real HTTP on loopback while the caller goes on."""

from __future__ import annotations

import threading
import time
from typing import Any


class ThreadedServer:
    """``with ThreadedServer(app) as srv:`` serves ``app`` at ``srv.url`` (``http://127.0.0.1:<port>``; port 0: a
    free one the OS picks) until the block ends. Stopping runs the app's shutdown (e.g. the gateway's last query-log
    flush) before it returns."""

    def __init__(self, app: Any, port: int = 0, timeout_s: float = 120.0, stop_timeout_s: float = 60.0) -> None:
        self.app, self.port, self.timeout_s, self.stop_timeout_s = app, port, timeout_s, stop_timeout_s
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadedServer:
        """Start serving; raise RuntimeError when the server is not listening within ``timeout_s``."""
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start on 127.0.0.1 within {self.timeout_s:.0f}s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=self.stop_timeout_s)
        self._server = self._thread = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
