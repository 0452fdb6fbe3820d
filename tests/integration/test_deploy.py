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
    assert v["feedback"]["n"] == 0 and v["feedback"]["status"].startswith("not measured")
    assert set(v["pct_of_reference"]) >= {"code", "reasoning", "automation", "all"}
    promoted = run_step("serve.promote", cfg, {"release": built.outputs["release"],
                                               "validation": checked.outputs["validation"]}, store=store)
    registry = store.uri(cfg.name, "releases")
    assert store.get_json(f"{registry}/current.json")["id"] == rid == promoted.metrics["id"]
    assert resolve_release("current", tmp_path / "fetched", store, registry).id == rid

    # a gate no release can pass: validation fails, promote refuses, the pointer stays
    strict = load_config(_config(tmp_path, {"code": 1000}))
    failed = run_step("serve.validate", strict, {"release": built.outputs["release"], "items": str(items)},
                      store=store)
    assert not failed.metrics["passed"] and failed.metrics["gates"][0]["verdict"] in ("not met", "undefined")
    with pytest.raises(StepFailed, match=f"not promoted; current stays {rid}"):
        run_step("serve.promote", strict, {"release": built.outputs["release"],
                                           "validation": failed.outputs["validation"]}, store=store)
    assert store.get_json(f"{registry}/current.json")["id"] == rid
