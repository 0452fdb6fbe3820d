"""The serving side of the local stack, on 127.0.0.1: the gateway (``cogumi serve`` on the registry's current
release), the chat UI (``cogumi chat``) and Prometheus scraping the gateway.

Started by ``make demo`` once Phase 5 has promoted a release, or by ``cogumi stack serve``; recorded in the
stack's ``pids.json`` so ``cogumi stack down`` stops them too. The gateway's API key is generated once into
``secrets.env`` (``COGUMI_API_KEY``) and never printed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from cogumi_tasks.core.secrets import write_private
from cogumi_tasks.stack import services
from cogumi_tasks.stack.local import Settings, _record, env, load_secrets, pid_alive, read_pids
from cogumi_tasks.stack.services import HOST

SERVING = ("gateway", "chat", "prometheus")
KEY = "COGUMI_API_KEY"


@dataclass(frozen=True)
class ServingPorts:
    gateway: int = 18600
    chat: int = 18700
    prometheus: int = 18800

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> ServingPorts:
        return cls(int(environ.get("COGUMI_SERVE_PORT") or 18600), int(environ.get("COGUMI_CHAT_PORT") or 18700),
                   int(environ.get("COGUMI_PROMETHEUS_PORT") or 18800))

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.gateway}/v1"


def api_key(settings: Settings) -> str:
    """The gateway's key from ``secrets.env``, added there (mode 600 kept) the first time."""
    sec = load_secrets(settings)
    if KEY not in sec:
        text = settings.secrets_file.read_text()
        write_private(settings.secrets_file, text + f"{KEY}=ck-{secrets.token_urlsafe(32)}\n")
        sec = load_secrets(settings)
    return sec[KEY]


def serve_up(settings: Settings, config: str, ports: ServingPorts, log=print) -> ServingPorts:
    """Start (or reuse) the gateway on the current release, the chat UI and Prometheus; wait until each answers."""
    key = api_key(settings)
    environ = env(settings) | {"COGUMI_API_KEYS": key, KEY: key}
    cogumi = services.venv_bin("cogumi")
    prom_dir = settings.home / "prometheus"
    prom_conf = services.prometheus_run_dir(prom_dir, {"gateway": [f"{HOST}:{ports.gateway}"],
                                                       "prometheus": [f"{HOST}:{ports.prometheus}"]})
    plans = {
        "gateway": ([cogumi, "serve", "--config", config, "--release", "current", "--port", str(ports.gateway)],
                    f"http://{HOST}:{ports.gateway}/healthz"),
        "chat": ([cogumi, "chat", "--api", ports.api, "--api-key-env", KEY, "--port", str(ports.chat)],
                 f"http://{HOST}:{ports.chat}/"),
    }
    for name in SERVING:
        rec = read_pids(settings).get(name)
        if rec and pid_alive(rec["pid"], rec.get("cmd")):
            log(f"{name:14s} reusing pid {rec['pid']}")
            continue
        log_path = settings.logs_dir / f"{name}.log"
        if name == "prometheus":
            proc = services.start_prometheus(prom_conf, ports.prometheus, prom_dir / "data", log_path)
            _record(settings, name, proc, list(proc.args))
        else:
            cmd, health = plans[name]
            if not services.port_is_free(int(health.split(":")[2].split("/")[0])):
                raise services.ServiceError(f"{name}: its port is in use ({health})")
            proc = services.spawn(cmd, log_path, env=environ, cwd=settings.home)
            _record(settings, name, proc, cmd)
            services.wait_http(health, timeout_s=300, proc=proc)
        log(f"{name:14s} started pid {proc.pid} ({log_path})")
    return ports


def usage(settings: Settings, ports: ServingPorts) -> list[str]:
    """Where the API, the chat UI and Prometheus are, and an example call (the key read from secrets.env)."""
    key_cmd = f"$(grep ^{KEY}= {Path(settings.secrets_file)} | cut -d= -f2)"
    return [
        f"API (OpenAI-compatible): {ports.api}  models: cogumi-auto, cogumi-base, cogumi-<modifier>",
        f"chat UI: http://{HOST}:{ports.chat}/",
        f"Prometheus: http://{HOST}:{ports.prometheus}/  (gateway metrics: http://{HOST}:{ports.gateway}/metrics)",
        "example:",
        f"  curl -s {ports.api}/chat/completions -H \"Authorization: Bearer {key_cmd}\" "
        "-H 'Content-Type: application/json' -d '{\"model\": \"cogumi-auto\", \"messages\": "
        "[{\"role\": \"user\", \"content\": \"Write a Python function that returns the even numbers of a list.\"}]}'",
        f"  python -c \"import openai; c = openai.OpenAI(base_url='{ports.api}', api_key='<{KEY}>'); "
        "print(c.chat.completions.create(model='cogumi-auto', messages=[{'role': 'user', 'content': 'Hi'}])"
        ".choices[0].message.content)\"",
    ]
