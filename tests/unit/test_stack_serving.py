"""The serving side of the local stack: the gateway's API key lives in secrets.env (added once, mode 600) and the
printed usage never contains it."""

from __future__ import annotations

import stat

from cogumi_tasks.stack import local
from cogumi_tasks.stack.serving import KEY, ServingPorts, api_key, usage


def test_api_key_is_added_once_to_the_private_secrets_file(tmp_path):
    settings = local.Settings.from_env({}, home=tmp_path / "home")
    before = local.load_secrets(settings)
    assert KEY not in before
    key = api_key(settings)
    assert key.startswith("ck-") and len(key) > 30
    assert api_key(settings) == key  # the second call reads it back
    after = local.load_secrets(settings)
    assert {k: after[k] for k in before} == before  # nothing else changed
    assert stat.S_IMODE(settings.secrets_file.stat().st_mode) == 0o600


def test_usage_names_the_addresses_and_never_the_key(tmp_path):
    settings = local.Settings.from_env({}, home=tmp_path / "home")
    key = api_key(settings)
    ports = ServingPorts.from_env({"COGUMI_SERVE_PORT": "19001", "COGUMI_CHAT_PORT": "19002"})
    text = "\n".join(usage(settings, ports))
    assert ports.prometheus == 18800 and "http://127.0.0.1:19001/v1" in text and "http://127.0.0.1:19002/" in text
    assert key not in text and str(settings.secrets_file) in text
