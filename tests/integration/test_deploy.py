"""Phase 5's release steps on a real small release: serve.release builds it from the Phase 3/4 bundles,
serve.validate serves it with the real engine and gateway on loopback and scores the held-out items against the
reference, serve.promote moves the registry's current pointer only when validation passed."""

from __future__ import annotations

import json

import pytest
import yaml

from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.steps import StepFailed, run_step
from tests.conftest import REPO
from tests.serve_release import LOW_CALIBRATOR, MODIFIERS, phase_bundles

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def bundles(serve_world, tmp_path_factory) -> dict[str, str]:
    """The two bundles serve.release reads, naming the session's small release parts (tests/serve_release.py: the
    packaged GGUF, seeded LoRAs, a router on planted verdicts, a small escalation student)."""
    return phase_bundles(serve_world["tmp"], tmp_path_factory.mktemp("deploy"), LOW_CALIBRATOR)


def _config(tmp_path, gates: dict) -> str:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "t-deploy"
    for m in data["modifiers"]:
        m["heldout"]["n"] = 1  # one held-out item per domain: 3 requests through the gateway
    data["eval"].update(max_tokens=12, gates=gates)
    path = tmp_path / f"deploy-{len(gates)}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_release_validate_and_promote_only_when_validation_passed(s3_server, store_for, serve_world, bundles,
                                                                  tmp_path):
    from cogumi_tasks.serve.release import resolve_release

    cfg = load_config(_config(tmp_path, {}))
    store = store_for(cfg)
    built = run_step("serve.release", cfg, bundles, store=store)
    rid = built.metrics["id"]
    assert rid.startswith("r-") and built.metrics["models"] == ["base", *MODIFIERS]
    assert built.metrics["total_bytes"] == sum(built.metrics["bytes"].values())
    again = run_step("serve.release", cfg, bundles, store=store)
    assert again.metrics["id"] == rid  # a retry builds the same release

    items = phase_bundles(serve_world["tmp"], tmp_path / "b", LOW_CALIBRATOR, cfg)["items"]
    ids = [json.loads(line)["id"] for line in open(items)]

    checked = run_step("serve.validate", cfg, {"release": built.outputs["release"], "items": str(items)}, store=store)
    v = checked.metrics
    assert v["release"] == rid and v["n"] == len(ids) == 3 and v["passed"] and v["gates"] == []
    assert sum(v["route_mix"].values()) == pytest.approx(1.0)
    speed = v["tokens_per_s"]  # every answer streamed through the gateway carries its first-to-last token seconds
    assert speed["answers_timed"] >= 1 and speed["decode_ci"][0] <= speed["decode"] <= speed["decode_ci"][1]
    assert v["feedback"]["n"] == 0 and v["feedback"]["status"].startswith("not measured")
    assert set(v["pct_of_reference"]) >= {"code", "reasoning", "automation", "all"}
    promoted = run_step("serve.promote", cfg, {"release": built.outputs["release"],
                                               "validation": checked.outputs["validation"]}, store=store)
    registry = store.uri(cfg.name, "releases")
    assert store.get_json(f"{registry}/current.json")["id"] == rid == promoted.metrics["id"]
    assert resolve_release("current", tmp_path / "fetched", store, registry).id == rid

    # another release (other calibrator) under a gate no release can pass: validation fails, promote refuses, and
    # the pointer object stays exactly as it was
    pointer = store.get_json(f"{registry}/current.json")
    strict = load_config(_config(tmp_path, {"code": 1000}))
    other = run_step("serve.release", strict, phase_bundles(serve_world["tmp"], tmp_path / "other",
                                                            {"method": "platt", "a": 1.0, "b": -6.0}), store=store)
    assert other.metrics["id"] != rid
    failed = run_step("serve.validate", strict, {"release": other.outputs["release"], "items": str(items)},
                      store=store)
    assert failed.metrics["release"] == other.metrics["id"]
    assert not failed.metrics["passed"] and failed.metrics["gates"][0]["verdict"] in ("not met", "undefined")
    with pytest.raises(StepFailed, match=f"not promoted; current stays {rid}"):
        run_step("serve.promote", strict, {"release": other.outputs["release"],
                                           "validation": failed.outputs["validation"]}, store=store)
    assert store.get_json(f"{registry}/current.json") == pointer
    assert resolve_release("current", tmp_path / "fetched-after", store, registry).id == rid


def test_make_demo_serving_starts_the_current_release_and_down_stops_it(s3_server, store_for, bundles, tmp_path):
    """What `make demo` runs once a release is current (stack.serving.serve_up): the gateway on the registry's
    current release, the chat UI and Prometheus on free loopback ports, each answering; a completion through the
    gateway with the key generated into secrets.env names that release; `stack down` stops all three."""
    import base64
    import os
    import secrets
    import time
    import urllib.request

    import openai

    from cogumi_tasks.core.secrets import write_private
    from cogumi_tasks.serve.release import CURRENT, publish_release
    from cogumi_tasks.stack import local
    from cogumi_tasks.stack.serving import KEY, SERVING, ServingPorts, serve_up, usage
    from tests.servers.procs import pick_base_port

    cfg_path = _config(tmp_path, {})
    cfg = load_config(cfg_path)
    store = store_for(cfg)
    built = run_step("serve.release", cfg, bundles, store=store)
    rid, registry = built.metrics["id"], store.uri(cfg.name, "releases")
    publish_release(store, store.fetch_prefix(built.outputs["release"], tmp_path / "release"), registry)  # promote's
    assert store.get_json(f"{registry}/{CURRENT}")["id"] == rid

    base = pick_base_port((20, 21, 22))
    ports = ServingPorts(gateway=base + 20, chat=base + 21, prometheus=base + 22)
    settings = local.Settings.from_env({}, home=tmp_path / "home", s3_port=int(s3_server.endpoint.rsplit(":", 1)[1]))
    settings.home.mkdir(parents=True)
    write_private(settings.secrets_file, "".join(f"{k}={v}\n" for k, v in {
        "COGUMI_S3_ACCESS_KEY": s3_server.access_key, "COGUMI_S3_SECRET_KEY": s3_server.secret_key,
        "COGUMI_AIRFLOW_PASSWORD": "x", "COGUMI_JWT_SECRET": secrets.token_urlsafe(16),
        "COGUMI_API_SECRET_KEY": secrets.token_urlsafe(16),
        "COGUMI_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode()}.items()))
    lines: list[str] = []
    try:
        serve_up(settings, cfg_path, ports, log=lines.append)
        assert [line.split()[0] for line in lines] == list(SERVING) and all("started pid" in x for x in lines)
        key = local.load_secrets(settings)[KEY]
        assert key.startswith("ck-") and key not in "\n".join(lines)
        client = openai.OpenAI(base_url=ports.api, api_key=key, max_retries=0, timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model="cogumi-base", max_tokens=8, messages=[{"role": "user", "content": "Say hello."}])
        assert raw.headers["X-Cogumi-Release"] == rid and raw.parse().choices[0].message.content.strip()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=ports.api, api_key="ck-wrong", max_retries=0).models.list()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.chat}/", timeout=30) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()
        scraped: set[str] = set()
        for _ in range(60):  # file_sd targets reach the scrape manager a few seconds after start
            with urllib.request.urlopen(f"http://127.0.0.1:{ports.prometheus}/api/v1/targets", timeout=30) as page:
                scraped = {t["labels"]["instance"] for t in json.loads(page.read())["data"]["activeTargets"]}
            if f"127.0.0.1:{ports.gateway}" in scraped:
                break
            time.sleep(1)
        assert f"127.0.0.1:{ports.gateway}" in scraped
        assert any(ports.api in line for line in usage(settings, ports))
        again: list[str] = []
        serve_up(settings, cfg_path, ports, log=again.append)  # a second demo reuses what runs
        assert all("reusing pid" in x for x in again) and len(again) == len(SERVING)
    finally:
        stopped = local.down(settings, log=lambda _: None)
    assert sorted(stopped) == sorted(SERVING)
    assert local.read_pids(settings) == {}
