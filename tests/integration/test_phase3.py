"""Phase 3 through Airflow itself (scheduler, dag-processor, api-server of a throwaway local stack), with a backfill.

One modifier (``code``) on a few tasks. Every teacher sits behind a fault proxy that counts requests; tier 2's
answers only 500s, so ``code.tier_2`` fails and its modifier's tasks wait. With the teacher healthy again,
``cogumi backfill phase3 --modifier code --tier 2`` clears it through the REST API: the run finishes, no other tier
task runs again, and no request that once got a 200 is sent again.
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
DAG = "phase3_modifiers"


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
    return data


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
    with throwaway_stack(tmp_path_factory.mktemp("p3"), (DAG,), proxied,
                         lambda p: _config(p["llm"], p["tier2"], p["strong"])) as stack:
        store = stack.store
        gguf = store.uri("inputs", "base.gguf")
        store.upload(smollm2_gguf(), gguf)
        for f in sorted(hf_dir.iterdir()):
            store.upload(f, store.uri("inputs", "pruned", f.name))
        rows = [{"id": f"r{i}", "prompt": f"Say the number {i}.", "response": str(i), "domain": "general"}
                for i in range(10)]
        dataset = store.uri("inputs", "dataset.jsonl")
        store.put_bytes(dataset, "".join(json.dumps(r) + "\n" for r in rows).encode())
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
