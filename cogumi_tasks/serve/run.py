"""``cogumi serve``: resolve a release, start the engine on it and the gateway with uvicorn, until interrupted."""

from __future__ import annotations

import logging
from pathlib import Path

from cogumi_tasks.core.config import PipelineConfig

log = logging.getLogger("cogumi")


def serve(config: PipelineConfig, release_spec: str, host: str | None = None, port: int | None = None) -> int:
    """Serve ``release_spec`` (a directory, an ``s3://`` release prefix, or ``current``: the registry's pointer
    ``s3://<bucket>/<config name>/releases/current.json``) on ``host:port`` (config ``serve`` by default)."""
    import uvicorn

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.serve.access import read_keys
    from cogumi_tasks.serve.engine import XllamacppEngine
    from cogumi_tasks.serve.gateway import create_app
    from cogumi_tasks.serve.release import resolve_release

    cfg = config.serve
    keys = read_keys(cfg.api_keys_file)
    if not keys:
        raise ValueError("no API keys: set COGUMI_API_KEYS (comma separated) or serve.api_keys_file")
    state = Path(cfg.state_dir).expanduser()
    remote = release_spec.startswith("s3://") or release_spec == "current"
    store = ArtifactStore(config.storage)
    release = resolve_release(release_spec, state / "releases", store if remote else None,
                              store.uri(config.name, "releases"))
    engine = XllamacppEngine.for_release(release, cfg)
    engine.start()
    memory = config.routing.memory if config.routing else None
    try:
        app = create_app(release, cfg, engine, store=store, log_prefix=store.uri(config.name, "query-logs"),
                         keys=keys, memory_config=memory,
                         registry=store.uri(config.name, "releases") if release_spec == "current" else None)
        host, port = host or cfg.host, port or cfg.port
        log.info("serving release %s (%s) on http://%s:%d/v1, engine at %s", release.id, ", ".join(release.models),
                 host, port, engine.url)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()
    return 0
