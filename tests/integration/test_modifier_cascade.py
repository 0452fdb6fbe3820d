"""Phase 3's cascade on loopback: the packaged SmolLM2 GGUF as the compressed base on train-part tool_call tasks,
then tier 1 (SmolLM2 through llama.cpp, greedy, 2-shot, behind the fault proxy), tier 2 (the same, best-of-2 at
temperature 0.8) and tier 3 (the strong tier). Asserted: what each step guarantees (counts chain from tier to tier,
one call per unsolved item per round, the strong tier solves every family task it gets, every solved row passes
its checker, ledger costs at the configured prices, a finished tier re-runs from the step cache), and backfill: tier
2 fails while its teacher answers only 500s, and once the teacher is back the re-run completes without sending any
request twice after it got a 200."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from cogumi_tasks import world
from cogumi_tasks.core.artifacts import ArtifactStore
from cogumi_tasks.core.config import apply_overrides, config_dir, load_config, resolve_config_path
from cogumi_tasks.core.ledger import load_prices
from cogumi_tasks.core.steps import StepFailed, run_step
from cogumi_tasks.world.base import part_of, task_key
from tests.servers.fault_proxy import proxy_stats

pytestmark = pytest.mark.stack

N, SAMPLES, TIER1_MAX = 4, 2, 3  # small: SmolLM2 answers about 1 token/s on a loaded 2-core machine
MODIFIER = {
    "name": "automation", "domain": "automation",
    "tasks": {"kind": "world", "family": "tool_call", "n": N, "seed": 5},
    "heldout": {"kind": "world", "family": "tool_call", "n": 4, "seed": 0},
    "tiers": [{"teacher": "teacher-a", "max_items": TIER1_MAX, "max_tokens": 32, "shots": 2},
              {"teacher": "teacher-a", "samples": SAMPLES, "temperature": 0.8, "max_tokens": 32},
              {"teacher": "teacher-b"}],
    "rank": 8, "alpha": 16,
}


def _config(tmp_path, name: str, llm_url: str):
    """tiny.yaml with one small modifier, teacher-a (the cheap tier) at ``llm_url``, few fast retries."""
    data = apply_overrides(yaml.safe_load(resolve_config_path("tiny").read_text()),
                           {"name": name, "eval.max_tokens": 32, "llm.max_retries": 2, "llm.backoff_base_s": 0.05,
                            "llm.backoff_max_s": 0.2}, "test")
    data["modifiers"] = [MODIFIER]
    data["teachers"][0]["base_url"] = llm_url
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(str(path))


def _rows(store: ArtifactStore, uri: str) -> list[dict]:
    return [json.loads(x) for x in store.get_bytes(uri).decode().splitlines() if x.strip()]


def _forwarded(proxy: str) -> int:
    return proxy_stats(proxy)["forwarded"]


@pytest.fixture(scope="module")
def cascade(s3_server, llm_server, strong_server, fault_proxy, tmp_path_factory):
    from cogumi_tasks.models.packaged import smollm2_gguf

    config = _config(tmp_path_factory.mktemp("cascade"), f"cascade-{uuid.uuid4().hex[:8]}", fault_proxy + "/v1")
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    params = {"modifier": "automation"}
    test = run_step("modifiers.test", config, {"gguf": str(smollm2_gguf())}, params=params, store=store)
    tiers, remaining, forwarded = [], test.outputs["remaining"], []
    for k in (1, 2, 3):
        before = _forwarded(fault_proxy)
        tiers.append(run_step("modifiers.tier", config, {"remaining": remaining}, params={**params, "tier": k},
                              store=store))
        forwarded.append(_forwarded(fault_proxy) - before)
        remaining = tiers[-1].outputs["remaining"]
    return {"config": config, "store": store, "test": test, "tiers": tiers, "forwarded": forwarded}


def test_the_base_is_tested_on_train_part_tasks_only(cascade):
    test, store = cascade["test"], cascade["store"]
    items = _rows(store, test.outputs["items"])
    want = world.generate("tool_call", N, 5, part="train")
    assert [r["id"] for r in items] == [i.id for i in want]
    assert all(part_of(task_key(r["task"]["family"], r["task"]["params"])) == "train" for r in items)
    failed = [r for r in items if not r["passed"]]
    remaining = _rows(store, test.outputs["remaining"])
    assert [r["id"] for r in remaining] == [r["id"] for r in failed]
    assert all(r["reason"] and r["messages"][-1]["content"] == r["prompt"] for r in remaining)
    m = test.metrics
    assert (m["tested"], m["passed"], m["failed"]) == (N, N - len(failed), len(failed))
    assert m["accuracy"] == pytest.approx((N - len(failed)) / N)


def test_counts_chain_from_tier_to_tier(cascade):
    test, tiers, store = cascade["test"], cascade["tiers"], cascade["store"]
    assert tiers[0].metrics["items_in"] == test.metrics["failed"]
    for prev, nxt in zip(tiers, tiers[1:], strict=False):
        assert nxt.metrics["items_in"] == prev.metrics["remaining"]
    for k, t in enumerate(tiers, 1):
        m = t.metrics
        assert (m["tier"], m["modifier"]) == (k, "automation")
        assert m["solved"] + m["remaining"] == m["items_in"]
        assert len(_rows(store, t.outputs["solved"])) == m["solved"]
        assert len(_rows(store, t.outputs["remaining"])) == m["remaining"]
    first = tiers[0].metrics
    assert (first["shots"], tiers[1].metrics["shots"]) == (2, 0)
    assert first["attempted"] == min(TIER1_MAX, first["items_in"])
    assert first["passed_on"] == first["items_in"] - first["attempted"]
    given = _rows(store, test.outputs["remaining"])
    kept = _rows(store, tiers[0].outputs["remaining"])
    if first["passed_on"]:  # the tasks over max_items pass on untouched, after the tier's own
        assert kept[-first["passed_on"]:] == given[-first["passed_on"]:]


def test_best_of_k_sends_one_call_per_unsolved_item_per_round(cascade):
    m = cascade["tiers"][1].metrics
    rounds = m["rounds"]
    assert rounds and rounds[0]["sent"] == m["attempted"] - m["refused"]
    for prev, nxt in zip(rounds, rounds[1:], strict=False):
        assert nxt["sent"] == prev["sent"] - prev["solved"]
    assert len(rounds) <= SAMPLES and m["calls"] == sum(r["sent"] for r in rounds) <= SAMPLES * m["attempted"]
    assert cascade["forwarded"][1] == m["calls"]  # each request reached the teacher once (nothing cached before)
    assert m["solved"] == sum(r["solved"] for r in rounds)


def test_the_strong_tier_solves_every_family_task_it_gets(cascade):
    m = cascade["tiers"][2].metrics
    assert (m["teacher"], m["refused"]) == ("teacher-b", 0)
    assert m["solved"] == m["attempted"] == m["items_in"] and m["remaining"] == 0
    assert cascade["forwarded"][2] == 0  # the strong tier is not behind the proxy


def test_every_solved_row_passes_its_checker(cascade):
    store = cascade["store"]
    solved = [r for t in cascade["tiers"] for r in _rows(store, t.outputs["solved"])]
    assert len(solved) == sum(t.metrics["solved"] for t in cascade["tiers"])
    assert len({r["id"] for r in solved}) == len(solved)
    verdicts = world.check_many([world.Instance.from_dict(r["task"]) for r in solved], [r["response"] for r in solved])
    assert all(ok for ok, _ in verdicts), [why for ok, why in verdicts if not ok]
    for k, t in enumerate(cascade["tiers"], 1):
        for r in _rows(store, t.outputs["solved"]):
            assert (r["tier"], r["teacher"], r["judge_kind"]) == (k, t.metrics["teacher"], "verifier")
            assert 0 <= r["sample"] < MODIFIER["tiers"][k - 1].get("samples", 1)


def test_costs_are_in_the_ledger_at_the_configured_prices(cascade):
    config, store = cascade["config"], cascade["store"]
    prices = load_prices(config_dir() / config.llm.prices_file)
    ledger = store.uri(config.name, "_runs", "manual", "ledger")
    for t in cascade["tiers"]:
        teacher = config.teacher(t.metrics["teacher"])
        assert t.metrics["price"] == teacher.price
        part = "modifiers.tier-" + t.manifest_uri.rsplit("/", 2)[1]
        rows = [json.loads(line) for uri in store.list(ledger + "/") if uri.rsplit("/", 1)[1].startswith(part)
                for line in store.get_bytes(uri).decode().splitlines() if line.strip()]
        assert len(rows) == t.metrics["calls"] and {r["endpoint"] for r in rows} <= {teacher.name}
        for r in rows:
            assert r["usd"] == pytest.approx(prices[teacher.price].cost(r["prompt_tokens"], r["completion_tokens"]))
        assert t.metrics["cost_usd"] == pytest.approx(sum(r["usd"] for r in rows))
        assert t.metrics["list_cost_usd"] == pytest.approx(t.metrics["cost_usd"])  # nothing came from the cache
        if t.metrics["calls"]:
            assert t.metrics["cost_usd"] > 0
            assert t.metrics["cost_per_attempted_usd"] == pytest.approx(t.metrics["cost_usd"] / t.metrics["attempted"])


def test_a_finished_tier_reruns_from_the_step_cache(cascade, fault_proxy):
    t = cascade["tiers"][1]
    before = _forwarded(fault_proxy)
    again = run_step("modifiers.tier", cascade["config"], {"remaining": cascade["tiers"][0].outputs["remaining"]},
                     params={"modifier": "automation", "tier": 2}, store=cascade["store"])
    assert again.skipped and again.outputs == t.outputs and _forwarded(fault_proxy) == before


def test_list_cost_of_a_batch_endpoint_is_at_the_batch_price(cascade, fault_proxy, tmp_path):
    """Tier 3 again with its teacher on the batch API: every answer comes from the response cache (same config
    name), and its list cost is the same tokens at the batch price, not the online one."""
    first, store = cascade["tiers"][2], cascade["store"]
    online = _config(tmp_path, cascade["config"].name, fault_proxy + "/v1")
    data = yaml.safe_load((tmp_path / f"{online.name}.yaml").read_text())
    data["teachers"][1]["batch"] = True
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(str(tmp_path / "batch.yaml"))
    assert config.teacher(first.metrics["teacher"]).batch
    again = run_step("modifiers.tier", config, {"remaining": cascade["tiers"][1].outputs["remaining"]},
                     params={"modifier": "automation", "tier": 3}, store=store)
    m = again.metrics
    assert not again.skipped and m["cached_calls"] == m["calls"] == first.metrics["calls"] > 0 and m["cost_usd"] == 0
    tokens = m["cost"]["per_endpoint"][m["teacher"]]
    price = load_prices(config_dir() / config.llm.prices_file)[m["price"]]
    assert m["list_cost_usd"] == pytest.approx(price.cost(tokens["prompt_tokens"], tokens["completion_tokens"],
                                                          batch=True))
    assert m["list_cost_usd"] == pytest.approx(first.metrics["list_cost_usd"] * (1 - price.batch_discount))


def test_a_failed_tier_is_backfilled_without_paying_twice(fault_proxy, tmp_path, s3_server):
    """Tier 2 on a fresh pipeline (its own response cache) for N tasks: its teacher answers N - 1 requests, then only
    500s; the step fails naming modifier, tier and teacher. With the teacher back, the re-run completes, and no
    request body reached the teacher again after it once got a 200."""
    import requests

    config = _config(tmp_path, f"backfill-{uuid.uuid4().hex[:8]}", fault_proxy + "/v1")
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    given = tmp_path / "remaining.jsonl"
    given.write_text("".join(json.dumps({"id": i.id, "domain": i.domain, "prompt": i.prompt, "task": i.to_dict(),
                                         "messages": [{"role": "user", "content": i.prompt}], "reason": "base failed"})
                             + "\n" for i in world.generate("tool_call", N, 5, part="train")))
    uri = store.uri(config.name, "inputs", "remaining.jsonl")
    store.upload(given, uri)
    requests.post(fault_proxy + "/_reset", timeout=5).raise_for_status()
    requests.post(fault_proxy + "/_faults", json={"only": "500", "after": N - 1}, timeout=5).raise_for_status()
    params = {"modifier": "automation", "tier": 2}
    try:
        with pytest.raises(StepFailed) as failed:
            run_step("modifiers.tier", config, {"remaining": uri}, params=params, store=store)
    finally:
        requests.post(fault_proxy + "/_faults", json={"only": None}, timeout=5).raise_for_status()
    message = str(failed.value)
    assert "modifier automation tier 2 (teacher teacher-a" in message and "sample 0" in message, message
    assert f"{N - 1} of {N} answers" in message and "teacher is down" in message, message
    down = proxy_stats(fault_proxy)
    assert (down["forwarded"], down["faults"]["500"]) == (N - 1, config.llm.max_retries + 1)
    done = run_step("modifiers.tier", config, {"remaining": uri}, params=params, store=store)
    m = done.metrics
    assert not done.skipped and m["attempted"] == N and m["solved"] + m["remaining"] == N
    assert m["cached_calls"] == N - 1  # every answer of the failed run came from the response cache
    assert m["list_cost_usd"] > m["cost_usd"] > 0  # the cached answers cost nothing now but count at list price
    statuses = proxy_stats(fault_proxy)["statuses"]
    assert all(200 not in seq[:-1] for seq in statuses.values()), statuses
    assert sum(seq.count(200) for seq in statuses.values()) == m["calls"]


def test_a_refused_task_stays_in_remaining(s3_server, strong_server, tmp_path):
    """The strong tier refuses a prompt outside its families (HTTP 400): counted as refused, not a failure, and the
    task goes on in ``remaining`` with the refusal as its reason, beside the family task it solved."""
    config = _config(tmp_path, f"refusal-{uuid.uuid4().hex[:8]}", "http://127.0.0.1:9/v1")  # teacher-a: not asked
    store = ArtifactStore(config.storage, s3_server.credentials())
    store.ensure_bucket()
    inst = world.generate("tool_call", 1, 5, part="train")[0]
    general = "Write a haiku about the sea."
    rows = [{"id": inst.id, "domain": inst.domain, "prompt": inst.prompt, "task": inst.to_dict(),
             "messages": [{"role": "user", "content": inst.prompt}], "reason": "base failed"},
            {"id": "general-1", "domain": "automation", "prompt": general,
             "messages": [{"role": "user", "content": general}], "reason": "base failed"}]
    given = tmp_path / "remaining.jsonl"
    given.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uri = store.uri(config.name, "inputs", "remaining.jsonl")
    store.upload(given, uri)
    done = run_step("modifiers.tier", config, {"remaining": uri}, params={"modifier": "automation", "tier": 3},
                    store=store)
    m = done.metrics
    assert (m["attempted"], m["solved"], m["refused"], m["remaining"], m["calls"]) == (2, 1, 1, 1, 2)
    left = _rows(store, done.outputs["remaining"])
    assert [r["id"] for r in left] == ["general-1"] and left[0]["reason"].startswith("refused by teacher-b: ")
    assert "HTTP 400" in left[0]["reason"]
    assert [r["id"] for r in _rows(store, done.outputs["solved"])] == [inst.id]
