"""Phase 0 for real: Airflow's dag.test() with the S3 server, the llama.cpp teacher and the strong tier on loopback.

Request-counting proxies (the fault proxy at 0% faults) sit in front of both, so the tests can tell exactly which
calls reached a model; the one in front of the strong tier plants one wrong answer, which the verifier judge must
reject with its checker's reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import load_config
from cogumi_tasks.core.ledger import read_run_ledger
from cogumi_tasks.core.steps import StepFailed, run_step
from tests.servers.fault_proxy import proxy_stats, start_fault_proxy

pytestmark = pytest.mark.stack

SMALL = {
    "dataset.prompts.limit": 10,
    "dataset.prompts.shards": 2,
    "dataset.prompts.world.families": {"list_fn": 4, "word_arith": 4, "tool_call": 4},
    "teachers.0.weight": 0.2,  # of these family prompts the cheap tier answers 2, the strong tier 10
    "teachers.1.weight": 0.8,
    "dataset.generate.max_tokens": 48,  # the strong tier's answers are at most 38 of its tokens
    "dataset.score.max_tokens": 48,
    "llm.backoff_base_s": 0.05,
}
GENERAL_ONLY = {"dataset.prompts.world.families": {}}  # the cases that only need the llama.cpp teacher


@pytest.fixture(scope="module")
def strong_counter(strong_server, tmp_root):
    """A counting proxy in front of the strong tier that rewrites its first ``Answer: <n>`` answer to n + 1."""
    from cogumi_tasks.stack.services import free_port, stop

    port = free_port()
    proc = start_fault_proxy(strong_server.removesuffix("/v1"), port, fault_rate=0.0, seed=0, hang_s=0,
                             log_path=tmp_root / "logs" / "strong-counter.log", wrong_answers=1)
    yield f"http://127.0.0.1:{port}"
    os.environ["COGUMI_STRONG_URL"] = strong_server  # later modules talk to the strong tier itself
    stop(proc)


def chat_calls(*proxies: str) -> int:
    return sum(proxy_stats(p)["forwarded"] for p in proxies)


def _rows(store: ArtifactStore, uri: str) -> list[dict]:
    return [json.loads(x) for x in store.get_bytes(uri).decode().splitlines()]


def _publish_manifest(store: ArtifactStore, name: str) -> dict:
    uris = [u for u in store.list(store.uri(name, "data.publish") + "/") if u.endswith("/_manifest.json")]
    assert len(uris) == 1, uris
    return store.get_json(uris[0])


def _run_dag(dagbag, config_path: str):
    dag = dagbag.dags["phase0_dataset"]
    return dag.test(run_conf={"config": config_path})


@pytest.fixture(scope="module")
def baseline(dagbag, s3_server, fault_proxy, strong_counter, tmp_path_factory):
    """One uninterrupted Phase 0 run through Airflow (pipeline ``p0-base``)."""
    import yaml

    from cogumi_tasks.core.config import apply_overrides, resolve_config_path

    os.environ["COGUMI_LLM_URL"] = fault_proxy + "/v1"
    os.environ["COGUMI_STRONG_URL"] = strong_counter + "/v1"
    data = apply_overrides(yaml.safe_load(resolve_config_path("tiny").read_text()), {**SMALL, "name": "p0-base"}, "t")
    path = tmp_path_factory.mktemp("cfg") / "p0-base.yaml"
    path.write_text(yaml.safe_dump(data))
    store = ArtifactStore(load_config(str(path)).storage, s3_server.credentials())
    store.ensure_bucket()
    before = chat_calls(fault_proxy, strong_counter)
    started = time.monotonic()
    run = _run_dag(dagbag, str(path))
    return {"run": run, "path": str(path), "store": store, "calls": chat_calls(fault_proxy, strong_counter) - before,
            "seconds": time.monotonic() - started, "manifest": _publish_manifest(store, "p0-base"),
            "wrong": proxy_stats(strong_counter)["wrong"]}


def test_dag_runs_and_publishes_consistent_counts(baseline):
    assert baseline["run"].state == "success"
    m, store = baseline["manifest"], baseline["store"]
    s = m["metrics"]
    assert s["prompts"] == 10 + 12 and s["prompts_per_family"] == {"list_fn": 4, "word_arith": 4, "tool_call": 4}
    assert s["answers_generated"] + s["generation_failed"] == 22
    assert s["judged"] + s["judge_quarantined"] == s["answers_generated"]
    assert s["final_records"] == s["passed_judge"] - s["exact_duplicates"] - s["near_duplicates"]
    rows = _rows(store, m["outputs"]["dataset"])
    assert len(rows) == s["final_records"]
    score = load_config(baseline["path"]).dataset.score
    assert rows, "the tiny judge threshold keeps parseable verdicts"
    for r in rows:
        assert set(r) == {"id", "prompt", "response", "domain", "teacher", "model", "judge_score", "judge_reason",
                          "judge_kind", "task"}
        assert r["response"] and r["judge_kind"] == ("verifier" if r["task"] else "llm")
        assert r["judge_score"] == 10 if r["task"] else r["judge_score"] >= score.llm_threshold
    # every family answer was judged by its checker, every general one by the LLM judge
    verified = s["scored_per_judge_kind"]["verifier"]
    llm_judged = sum(s["scored_per_judge_kind"]["llm"].values()) + s["judge_quarantined"]
    assert sum(verified.values()) == 12 and llm_judged == 10
    # every request reached a model once, plus each retry the clients counted (the tiny judge's unparseable
    # verdicts are re-asked): what the proxies forwarded is what the clients say they sent, and only the
    # general prompts' answers went to the LLM judge
    clients = [ep for stage in s["faults"].values() for ep in stage.values()]
    retries, cache_hits = sum(c["retries"] for c in clients), sum(c["cache_hits"] for c in clients)
    assert baseline["calls"] == sum(c["calls"] for c in clients)
    assert baseline["calls"] == s["prompts"] + llm_judged - cache_hits + retries
    ledger = read_run_ledger(store, store.uri("p0-base", "_runs"))
    paid = [r for r in ledger if not r["cached"]]
    # a ledger row for each call that came back with usage; a timeout under load (none planted here) has none
    assert len(paid) == baseline["calls"] - sum(c["no_usage"] for c in clients)
    assert s["cost"]["usd"] == pytest.approx(sum(r["usd"] for r in paid)) and s["cost"]["usd"] > 0
    print(f"phase0 tiny: {s} in {baseline['seconds']:.1f}s")


def test_verifier_rejects_the_planted_wrong_answer_and_keeps_the_strong_tiers(baseline):
    """The proxy rewrote one strong-tier answer (its final ``Answer: n`` to n + 1): the checker rejects it with
    its reason; every other strong-tier answer passes, and the cheap tier's family answers are checked too."""
    store, m = baseline["store"], baseline["manifest"]
    assert len(baseline["wrong"]) == 1
    planted = baseline["wrong"][0]
    scores = [store.get_json(u) for u in store.list(store.uri("p0-base", "data.score") + "/")
              if u.endswith("_manifest.json")]
    kept = [r for sm in scores for r in _rows(store, sm["outputs"]["kept"])]
    rejected = [r for sm in scores for r in _rows(store, sm["outputs"]["rejected"])]
    bad = [r for r in rejected if r["prompt"] == planted["prompt"]]
    assert len(bad) == 1 and bad[0]["response"] == planted["answer"] and bad[0]["teacher"] == "teacher-b"
    want = int(bad[0]["task"]["reference"].rsplit("Answer:", 1)[1])
    assert (bad[0]["judge_kind"], bad[0]["judge_score"]) == ("verifier", 1)
    assert bad[0]["judge_reason"] == f"answered {want + 1}, expected {want}"
    strong = [r for r in kept + rejected if r["teacher"] == "teacher-b"]
    assert len(strong) == 10 and all(r in kept and r["judge_score"] == 10 for r in strong if r is not bad[0])
    cheap_family = [r for r in kept + rejected if r["teacher"] == "teacher-a" and r.get("task")]
    assert len(cheap_family) == 2 and all(r["judge_kind"] == "verifier" for r in cheap_family)
    assert bad[0]["id"] not in {r["id"] for r in _rows(store, m["outputs"]["dataset"])}
    by_domain = m["metrics"]["scored_per_domain"]
    assert by_domain["reasoning"]["rejected"] >= 1
    print("phase0 tiny kept/rejected per domain: " + ", ".join(
        f"{d} {c.get('kept', 0)}/{c.get('rejected', 0)}" for d, c in sorted(by_domain.items()))
        + f"; by judge kind: {m['metrics']['scored_per_judge_kind']}; planted: {bad[0]['judge_reason']}")


def test_rerun_is_served_from_the_step_cache(baseline, dagbag, fault_proxy, strong_counter):
    before = chat_calls(fault_proxy, strong_counter)
    run = _run_dag(dagbag, baseline["path"])
    assert run.state == "success"
    assert chat_calls(fault_proxy, strong_counter) == before
    assert _publish_manifest(baseline["store"], "p0-base")["prefix"] == baseline["manifest"]["prefix"]


def test_killed_generate_resumes_without_rerequesting_and_matches(baseline, dagbag, fault_proxy, strong_counter,
                                                                  write_config):
    """SIGKILL `cogumi run-step data.generate` mid-shard, run it again, then the whole DAG."""
    path = write_config("p0-kill", SMALL)
    cfg = load_config(path)
    store = baseline["store"]
    shards = run_step("data.prompts", cfg, store=store).outputs["shards"]
    shard_rows = len(store.get_bytes(shards[0]).decode().splitlines())
    cmd = [sys.executable, "-m", "cogumi_tasks.cli", "run-step", "data.generate", "--config", path,
           "--input", f"shard={shards[0]}", "--run-id", "kill-test"]
    before = chat_calls(fault_proxy, strong_counter)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while chat_calls(fault_proxy, strong_counter) - before < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = chat_calls(fault_proxy, strong_counter) - before
    assert 2 <= done_before_kill < shard_rows, "the kill must land mid-shard"
    # a request in flight at the kill still runs on the server: let it end, or it would share the server's
    # batch with the next request and change that one's greedy answer
    deadline = time.monotonic() + 120
    while proxy_stats(fault_proxy)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = chat_calls(fault_proxy, strong_counter) - before
    generated = [store.get_json(u) for u in store.list(store.uri("p0-kill", "data.generate") + "/")
                 if u.endswith("_manifest.json")]
    assert len(generated) == 1
    retries = sum(c["retries"] for c in generated[0]["metrics"]["faults"].values())  # e.g. a timeout under load
    # each prompt reached a model once, plus at most the one call in flight when killed (and the retries the
    # resumed run's clients counted)
    assert shard_rows <= resumed - retries <= shard_rows + 1

    run = _run_dag(dagbag, path)
    assert run.state == "success"
    def answers(name: str) -> list[bytes]:
        manifests = [store.get_json(u) for u in store.list(store.uri(name, "data.generate") + "/")
                     if u.endswith("_manifest.json")]
        return sorted(store.get_bytes(m["outputs"]["answers"]) for m in manifests)

    # The same rows, teachers and prompts as the uninterrupted run. Not byte-identical answers: llama-cpp-python
    # reuses the KV cache of the previous request's common prefix, so a greedy answer can depend on which request
    # the server answered before it, and the resumed run asks in a different order.
    def keys(blobs: list[bytes]) -> list[tuple]:
        rows = [json.loads(x) for b in blobs for x in b.decode().splitlines()]
        assert all(r["response"].strip() for r in rows)
        return sorted((r["id"], r["teacher"], r["model"], r["prompt"]) for r in rows)

    assert keys(answers("p0-kill")) == keys(answers("p0-base")) and len(answers("p0-kill")) == 2
    killed = _publish_manifest(store, "p0-kill")
    assert killed["metrics"]["prompts"] == baseline["manifest"]["metrics"]["prompts"]


TIMEOUT_S = 30


def test_faults_are_retried_and_counted(llm_server, s3_server, write_config, tmp_root, store_for):
    from cogumi_tasks.stack.services import free_port, stop

    port = free_port()
    # the timeout is far above a real answer's time on a loaded machine (a real answer cut off is re-asked while
    # the server still computes the first, and on 2 busy cores that can snowball past every retry); a planted
    # hang outlasts it
    proc = start_fault_proxy(llm_server.removesuffix("/v1"), port, fault_rate=0.2, seed=7, hang_s=TIMEOUT_S + 1,
                             log_path=tmp_root / "logs" / "faults.log")
    try:
        url = f"http://127.0.0.1:{port}/v1"
        path = write_config("p0-faults", {**SMALL, **GENERAL_ONLY, "dataset.prompts.limit": 8,
                                          "teachers.0.base_url": url,
                                          "teachers.1.base_url": url, "judge.base_url": url,
                                          "teachers.0.timeout_s": TIMEOUT_S, "teachers.1.timeout_s": TIMEOUT_S,
                                          "judge.timeout_s": TIMEOUT_S, "llm.max_retries": 10})
        cfg = load_config(path)
        store = store_for(cfg)
        shards = run_step("data.prompts", cfg, store=store, run_id="faults").outputs["shards"]
        kept = []
        for shard in shards:
            answers = run_step("data.generate", cfg, {"shard": shard}, store=store, run_id="faults")
            kept.append(run_step("data.score", cfg, {"answers": answers.outputs["answers"]}, store=store,
                                 run_id="faults").outputs["kept"])
        deduped = run_step("data.dedup", cfg, {"scored": kept}, store=store, run_id="faults")
        stats = run_step("data.publish", cfg, {"deduped": deduped.outputs["deduped"]}, store=store,
                         run_id="faults").metrics
        seen = proxy_stats(f"http://127.0.0.1:{port}")
    finally:
        stop(proc)
    assert stats["answers_generated"] == 8 and stats["judged"] == 8
    counted = {k: 0 for k in ("429", "5xx", "timeout", "unparseable")}
    for per_step in stats["faults"].values():
        for per_endpoint in per_step.values():
            for k in counted:
                counted[k] += per_endpoint.get(k, 0)
    assert sum(seen["faults"].values()) > 0
    assert counted["429"] == seen["faults"]["429"]
    assert counted["5xx"] == seen["faults"]["500"]
    # a real answer that outlasts the timeout on a loaded machine is a timeout too
    assert counted["timeout"] >= seen["faults"]["hang"]
    assert counted["unparseable"] >= seen["faults"]["garbage"]


def test_budget_stops_new_calls_and_keeps_paid_results(llm_server, s3_server, write_config, store_for):
    os.environ["COGUMI_LLM_URL"] = llm_server
    budget = 0.0001  # teacher-a alone (priced as gpt-4o-mini) spends ~$0.00003 a call
    path = write_config("p0-budget", {**SMALL, **GENERAL_ONLY, "llm.budget_usd": budget})
    cfg = load_config(path)
    store = store_for(cfg)
    shards = run_step("data.prompts", cfg, store=store, run_id="budget").outputs["shards"]
    with pytest.raises(StepFailed, match=r"budget of \$0\.0001 reached"):
        for shard in shards:
            run_step("data.generate", cfg, {"shard": shard}, store=store, run_id="budget")
    rows = read_run_ledger(store, store.uri("p0-budget", "_runs", "budget", "ledger"))
    paid = [r["usd"] for r in sorted(rows, key=lambda r: r["ts"]) if not r["cached"]]
    assert paid, "some calls were made before the budget ran out"
    # every call but the last started under the budget (concurrency 1: one call in flight at most)
    assert sum(paid[:-1]) < budget <= sum(paid)
    cached = list(store.list(store.uri("p0-budget", "_llm_cache") + "/"))
    assert len(cached) == len(paid), "every paid answer is kept in the response cache"
