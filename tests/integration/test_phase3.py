"""Phases 3, 4 and 5 through Airflow itself (scheduler, dag-processor, api-server of a throwaway local stack).

Phase 3, with a backfill: one modifier (``code``) on a few tasks. Every teacher sits behind a fault proxy that
counts requests; tier 2's answers only 500s, so ``code.tier_2`` fails and its modifier's tasks wait. With the teacher
healthy again, ``cogumi backfill phase3 --modifier code --tier 2`` clears it through the REST API: the run finishes,
no other tier task runs again, and no request that once got a 200 is sent again.

Phases 4 and 5 on what it published: its ``cogumi_phase3`` Asset event schedules ``phase4_routing`` (with a
``cogumi_phase2`` event posted through the REST API for the calibrator and tokenizer), whose ``cogumi_phase4`` event
schedules ``phase5_deploy``: the release built from both is validated served and becomes ``current``.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from cogumi_tasks.stack.demo import follow
from tests.conftest import REPO
from tests.servers.fault_proxy import proxy_stats
from tests.servers.stack import throwaway_stack

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2400)]
DAG, PHASE4, PHASE5 = "phase3_modifiers", "phase4_routing", "phase5_deploy"


def _config(llm_proxy: str, tier2_proxy: str, strong_proxy: str) -> dict:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "p3"
    data["llm"].update({"max_retries": 1, "backoff_base_s": 0.05, "backoff_max_s": 0.1})
    teachers = {t["name"]: t for t in data["teachers"]}
    teachers["teacher-a"]["base_url"] = llm_proxy + "/v1"
    teachers["teacher-b"]["base_url"] = strong_proxy + "/v1"
    data["teachers"].append({**teachers["teacher-a"], "name": "teacher-c", "base_url": tier2_proxy + "/v1",
                             "weight": 0.0})
    code = data["modifiers"][0]
    code.update({"tasks": {**code["tasks"], "n": 6}, "heldout": {**code["heldout"], "n": 6}, "sparsity": [0.5],
                 "rank": 4, "alpha": 8, "epochs": 1})
    code["tiers"][1] = {"teacher": "teacher-c", "samples": 2, "temperature": 0.8}
    data["modifiers"] = [code]
    # Phases 4 and 5 on that one modifier, small: 6 held-out code queries + 10 general ones, a quick escalation
    # detector, no release gate (the gate's refusal is tests/integration/test_deploy.py's)
    routing = data["routing"]
    routing["labels"]["general"] = 10
    routing["router"].update({"costs": {"base": 1.0, "code": 1.2}, "keywords": {"code": ["python", "function"]},
                              "pca_dims": 4, "validation": 0.25, "cv_folds": 3, "bootstrap": 100, "max_epochs": 60,
                              "patience": 10})
    routing["escalation"].update({"generated": 60, "teacher_epochs": 1, "augment": 1, "hidden": 16, "layers": 1,
                                  "embed_dim": 16, "student_epochs": 2, "latency_messages": 20})
    data["eval"]["gates"] = {}
    return data


def _post_asset_event(api, name: str, outputs: dict[str, str]) -> None:
    """An event of Asset ``name`` with the extra a phase's publish task sets (what asset inputs read)."""
    assets = api.request("GET", "/assets", params={"name_pattern": name})["assets"]
    asset_id = next(a["id"] for a in assets if a["name"] == name)
    api.request("POST", "/assets/events", json={"asset_id": asset_id, "extra": {"outputs": outputs}})


def _asset_run(api, dag_id: str, timeout_s: float = 120) -> str:
    """The run of ``dag_id`` an upstream Asset event created (make demo's wait for it)."""
    from cogumi_tasks.stack.demo import _wait_asset_run

    run_id = _wait_asset_run(api, dag_id, since=0, timeout_s=timeout_s)
    assert run_id is not None, f"no Asset-triggered run of {dag_id} after {timeout_s:.0f}s"
    return run_id


def _stats(proxy: str) -> dict:
    return proxy_stats(proxy)


def _resent_after_200(proxy: str) -> list[str]:
    """Request bodies sent again after one sending of them got a 200."""
    out = []
    for body, statuses in (_stats(proxy).get("statuses") or {}).items():
        first_ok = next((i for i, s in enumerate(statuses) if str(s) == "200"), None)
        if first_ok is not None and first_ok < len(statuses) - 1:
            out.append(body)
    return out


@pytest.fixture(scope="module")
def p3(tmp_path_factory, hf_dir):
    from cogumi_tasks.models.packaged import smollm2_gguf

    proxied = {"llm": "llm", "tier2": "llm", "strong": "strong"}
    # Phase 3 paused until the cogumi_phase2 event below is posted: an unpaused Phase 3 would run on it
    with throwaway_stack(tmp_path_factory.mktemp("p3"), (DAG, PHASE4, PHASE5), proxied,
                         lambda p: _config(p["llm"], p["tier2"], p["strong"]), paused=(DAG,)) as stack:
        store = stack.store
        gguf = store.uri("inputs", "base.gguf")
        store.upload(smollm2_gguf(), gguf)
        for f in sorted(hf_dir.iterdir()):
            store.upload(f, store.uri("inputs", "pruned", f.name))
        rows = [{"id": f"r{i}", "prompt": f"Say the number {i}.", "response": str(i), "domain": "general"}
                for i in range(10)]
        dataset = store.uri("inputs", "dataset.jsonl")
        store.put_bytes(dataset, "".join(json.dumps(r) + "\n" for r in rows).encode())
        calibrator = store.uri("inputs", "calibrator.json")
        store.put_bytes(calibrator, json.dumps({"method": "temperature", "t": 1.0}).encode())
        # what Phase 2's publish would have sent: Phase 4 reads the calibrator and tokenizer from it
        _post_asset_event(stack.api, "cogumi_phase2", {"gguf": gguf, "pruned": store.uri("inputs", "pruned") + "/",
                                                       "calibrator": calibrator})
        stack.api.unpause(DAG)
        yield {"api": stack.api, "settings": stack.settings, "store": store, "password": stack.password,
               "proxies": list(stack.proxies.values()),
               "conf": {"config": "p3", "gguf": gguf, "model": store.uri("inputs", "pruned") + "/",
                        "dataset": dataset}}


def test_failed_tier_is_backfilled_alone_and_pays_nothing_twice(p3, monkeypatch):
    from cogumi_tasks.stack.backfill import cli_backfill

    api, (llm_proxy, tier2_proxy, strong_proxy) = p3["api"], p3["proxies"]
    httpx.post(tier2_proxy + "/_faults", json={"only": "500"}, timeout=10, trust_env=False).raise_for_status()
    run_id = api.trigger(DAG, p3["conf"])
    state, tis = follow(api, DAG, run_id, timeout_s=1200)
    by_id = {t["task_id"]: t for t in tis}
    assert state == "failed", {k: t["state"] for k, t in by_id.items()}
    assert by_id["code.test"]["state"] == "success" and by_id["code.tier_1"]["state"] == "success"
    assert by_id["code.tier_2"]["state"] == "failed"
    assert {by_id[t]["state"] for t in ("code.tier_3", "code.train", "code.compress", "evaluate", "publish")} \
        == {"upstream_failed"}
    assert "teacher-c" in api.failure_line(DAG, run_id, by_id["code.tier_2"])  # the message names the teacher
    tries_before = {k: t["try_number"] for k, t in by_id.items()}
    calls_before = {p: _stats(p)["forwarded"] for p in (llm_proxy, strong_proxy)}

    httpx.post(tier2_proxy + "/_faults", json={"only": None}, timeout=10, trust_env=False).raise_for_status()
    monkeypatch.setenv("COGUMI_AIRFLOW_URL", p3["settings"].airflow_url)
    monkeypatch.setenv("COGUMI_AIRFLOW_PASSWORD", p3["password"])
    t0 = time.monotonic()
    assert cli_backfill(["phase3", "--modifier", "code", "--tier", "2", "--run", run_id, "--wait",
                         "--timeout", "1200"]) == 0
    print(f"backfill to success: {time.monotonic() - t0:.0f}s")
    after = {t["task_id"]: t for t in api.task_instances(DAG, run_id)}
    assert {k: t["state"] for k, t in after.items()} == dict.fromkeys(after, "success")
    for unchanged in ("code.test", "code.tier_1"):  # not run again
        assert after[unchanged]["try_number"] == tries_before[unchanged]
    assert after["code.tier_2"]["try_number"] > tries_before["code.tier_2"]
    assert _stats(llm_proxy)["forwarded"] == calls_before[llm_proxy]  # tier 1's teacher got nothing more
    for proxy in (llm_proxy, tier2_proxy, strong_proxy):
        assert _resent_after_200(proxy) == [], proxy
    publish = api.xcom(DAG, run_id, "publish")
    table = p3["store"].get_json(publish["table"])
    cascade = table["modifiers"]["code"]["cascade"]
    assert [t["tier"] for t in cascade["tiers"]] == [1, 2, 3]
    assert cascade["tiers"][-1]["remaining"] == 0  # the strong tier solves every family task it gets
    bundle = p3["store"].get_json(publish["bundle"])
    assert [m["name"] for m in bundle["modifiers"]] == ["code"]


def test_phase3s_asset_runs_phase4_whose_asset_runs_phase5(p3):
    """Phase 3's publish (the backfilled run above; a run of its own when this test runs alone) sends the
    cogumi_phase3 event; the scheduler runs Phase 4 on it and Phase 5 on Phase 4's, with no trigger of ours."""
    api, store = p3["api"], p3["store"]

    def succeeded() -> list[dict]:
        return api.request("GET", f"/dags/{DAG}/dagRuns", params={"state": "success"})["dag_runs"]

    if not succeeded():
        state, _ = follow(api, DAG, api.trigger(DAG, p3["conf"]), timeout_s=1200)
        assert state == "success"
    phase3 = api.xcom(DAG, succeeded()[0]["dag_run_id"], "publish")

    run4 = _asset_run(api, PHASE4)
    state, tis = follow(api, PHASE4, run4, timeout_s=1200)
    assert state == "success", {t["task_id"]: t["state"] for t in tis}
    routing = api.xcom(PHASE4, run4, "publish")
    table = store.get_json(routing["table"])
    assert table["models"] == ["base", "code"]
    # the 6 held-out code queries Phase 3 answered with both models, and 10 general prompts answered here
    assert (table["labels"]["domain_queries"], table["labels"]["general_queries"]) == (6, 10)
    assert table["shipped"]["refit"] and table["escalation"]["student"]["n"] > 0
    bundle = store.get_json(routing["bundle"])
    assert bundle["calibrator"] == store.uri("inputs", "calibrator.json")  # from the posted cogumi_phase2 event
    assert bundle["threshold"] == table["thresholds"]["chosen"]["threshold"] == table["shipped"]["threshold"]

    run5 = _asset_run(api, PHASE5)
    state, tis = follow(api, PHASE5, run5, timeout_s=900)
    assert state == "success", {t["task_id"]: t["state"] for t in tis}
    validation = store.get_json(api.xcom(PHASE5, run5, "validate")["validation"])
    items = [json.loads(line) for line in store.get_bytes(phase3["items"]).decode().splitlines()]
    assert validation["passed"] and validation["n"] == len({r["id"] for r in items}) == 6
    assert set(validation["route_mix"]) == {"base", "code"}
    assert sum(validation["route_mix"].values()) == pytest.approx(1.0)
    current = store.get_json(store.uri("p3", "releases", "current.json"))
    assert current["id"] == validation["release"]
