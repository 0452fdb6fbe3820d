"""Follow the registry's ``current`` pointer while serving: a newly published calibration release is swapped in
without a restart.

``cogumi serve --release current`` starts a :class:`ReleaseWatcher` (every ``serve.reload_s`` seconds, 0: never).
Each poll reads ``releases/current.json``; when it names another release, that release is fetched (sha256-checked
by :func:`~cogumi_tasks.serve.release.resolve_release`) and handed to :meth:`Gateway.swap`, which takes it only when
it loads the same model files (re-calibration changes the calibrator, threshold and router parts, never the GGUFs).
A release with other models is logged once and left for a restart. A failed poll is logged and retried next time;
it never stops serving. Every response names the release that answered (``X-Cogumi-Release``, ``cogumi.release``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.serve.gateway import Gateway

log = logging.getLogger("cogumi")


class ReleaseWatcher:
    """Polls ``<registry>/current.json`` and swaps the release it names into ``gateway``."""

    def __init__(self, gateway: Gateway, store: ArtifactStore, registry: str, dest: Path, every_s: float) -> None:
        self.gateway, self.store, self.registry, self.dest, self.every_s = gateway, store, registry, dest, every_s
        self.refused: set[str] = set()  # ids that need a restart (other models): not fetched again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogumi-release-watcher", daemon=True)

    def check(self) -> str | None:
        """One poll: the id swapped in, or None (no change, a release that needs a restart, or an error)."""
        from cogumi_tasks.core.artifacts import join_uri
        from cogumi_tasks.serve.release import CURRENT, resolve_release

        try:
            pointer: Any = self.store.get_json(join_uri(self.registry, CURRENT))
            wanted = str((pointer or {}).get("id") or "")
            if not wanted or wanted == self.gateway.release.id or wanted in self.refused:
                return None
            release = resolve_release("current", self.dest, self.store, self.registry)
        except Exception as exc:  # noqa: BLE001 - serving goes on with the release it has
            log.warning("release watcher: reading %s failed (%s); serving %s", self.registry, exc,
                        self.gateway.release.id)
            return None
        if release.id != wanted:
            return None  # the pointer moved between the two reads; the next poll takes the newer one
        was = self.gateway.release.id
        if not self.gateway.swap(release):
            self.refused.add(release.id)
            log.warning("release watcher: %s loads other model files than %s; restart `cogumi serve` to serve it",
                        release.id, was)
            return None
        log.info("release watcher: now serving %s (was %s)", release.id, was)
        return release.id

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()

    def start(self) -> ReleaseWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
